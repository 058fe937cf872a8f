"""Continue training a model on the token chunks of one text corpus, tracking the perplexity of
several corpora (the freezing study of parameter regions, ``engram freeze``).

``CorpusTrainer(cfg, train_chunks, eval_chunks, out).run()`` shares the project's training loop
(``engramlab.train.trainer.TrainLoop``: AdamW groups, the learning-rate schedule, the
``--freeze`` region in either mode, gradient clipping, checkpoints with optimizer.pt, resume). The
model is ``load_model(cfg.init, trainable=True)``.

- Batch of update ``s`` (0-based): ``batch_size`` rows of ``train_chunks`` (n, seq_len), drawn
  without replacement by a generator seeded by (seed, s), so it is a pure function of (seed, s)
  and a resumed run ends bit-identical to an uninterrupted one. Every position is attended to and
  every next token is a target (the chunks are full).
- Evaluation at step 0, every ``eval_every`` steps and at the end: one metrics.jsonl row
  ``{"step", "ppl.<corpus>" for every corpus of eval_chunks, "train_loss" (the loss of the update
  just made; None at step 0), "lr" (the learning rate of that update)}``, perplexity as
  ``engramlab.locate.regions.perplexity.perplexity`` (token-weighted, eval mode, no gradients).

Checkpoints: ``checkpoints/step-N`` at every step of ``cfg.checkpoints`` but step 0 (the start is
the model spec itself) and at the end; only the newest is kept (a checkpoint of a 135M-parameter
model is half a gigabyte), so the final weights are in ``checkpoints/step-<steps>``.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch

from engramlab.errors import EngramError
from engramlab.models.loading import list_checkpoints, load_model, resolve_device
from engramlab.progress import progress_bar
from engramlab.runs import append_jsonl, read_jsonl
from engramlab.train.checkpoints import checkpoint_steps
from engramlab.train.config import TrainConfig
from engramlab.train.trainer import TrainLoop, learning_rate


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """The chunk indices of update ``step``: ``min(batch_size, n)`` distinct ints in [0, n), a pure
    function of (seed, step, n, batch_size)."""
    g = torch.Generator().manual_seed(random.Random(f"engramlab-corpus-batch-{seed}-{step}").getrandbits(63))
    return torch.randperm(n, generator=g)[:batch_size]


class CorpusTrainer(TrainLoop):
    """Training on ``train_chunks`` (n, seq_len) with ``eval_chunks`` {corpus: (m, seq_len)}
    evaluated; ``cfg.init`` is the model spec, ``cfg.freeze`` an optional masks file."""

    def __init__(self, cfg: TrainConfig, train_chunks: torch.Tensor, eval_chunks: Mapping[str, torch.Tensor],
                 out: str | Path, resume: bool = False, eval_batch_size: int = 8, lm=None):
        if not cfg.init:
            raise EngramError("CorpusTrainer: cfg.init must name the model SPEC to continue training")
        if not isinstance(train_chunks, torch.Tensor) or train_chunks.dim() != 2 or len(train_chunks) == 0:
            raise EngramError("CorpusTrainer: train_chunks must be a non-empty (n, seq_len) tensor of token ids")
        if not eval_chunks:
            raise EngramError("CorpusTrainer: give at least one corpus of held-out chunks to evaluate")
        self.cfg, self.out = cfg, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.train_chunks = train_chunks.long().cpu()
        self.eval_chunks = dict(eval_chunks)
        self.eval_batch_size = eval_batch_size
        self.lm = lm if lm is not None else load_model(cfg.init, device=cfg.device, trainable=True)
        self.model.requires_grad_(True)
        self.model.train()
        self.ckpt_steps = set(checkpoint_steps(cfg.checkpoints, cfg.steps)) - {0}
        self.start_step = 0
        self.optimizer = self._make_optimizer()
        if resume:
            self._resume()
        self.freezer = self._make_freezer()  # after a resume, as in Trainer

    def make_batch(self, step: int) -> dict:
        """{input_ids, attention_mask}: (batch_size, seq_len) of update ``step`` (``batch_indices``)."""
        ids = self.train_chunks[batch_indices(self.cfg.seed, step, len(self.train_chunks), self.cfg.batch_size)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def evaluate(self, step: int) -> dict:
        from engramlab.locate.regions.perplexity import perplexity

        row: dict = {"step": step}
        for name, chunks in self.eval_chunks.items():
            row[f"ppl.{name}"] = perplexity(self.lm, chunks, self.eval_batch_size)
        row["lr"] = learning_rate(self.cfg, max(step - 1, 0))
        return row

    def _save_checkpoint(self, step: int) -> None:
        super()._save_checkpoint(step)
        for s, path in list_checkpoints(self.out).items():  # the newest alone
            if s != step:
                shutil.rmtree(path)

    def run(self, stop_after: int | None = None, show_progress: bool = True) -> dict:
        """Train to ``cfg.steps`` (``stop_after``: end after that step, for tests of resume);
        returns {"steps_done", "seconds" (evaluations included), "seconds_per_step" (updates only),
        "tokens_per_second" (updates only)}."""
        cfg = self.cfg
        metrics = self.out / "metrics.jsonl"
        if self.start_step == 0:
            if metrics.exists():
                metrics.unlink()
            append_jsonl(metrics, {**self.evaluate(0), "train_loss": None})
            self.start_step = 1
        t0, tokens, done, train_loss, in_steps = time.time(), 0, 0, float("nan"), 0.0
        status = lambda: f"loss {train_loss:.3f}" if train_loss == train_loss else ""  # noqa: E731
        for index, batch in progress_bar(self.batches(self.start_step - 1, cfg.steps), "train",
                                         enabled=show_progress, total=cfg.steps - self.start_step + 1, status=status):
            step = index + 1
            t_step = time.time()
            train_loss, n = self.train_step(index, batch)
            tokens, done, in_steps = tokens + n, done + 1, in_steps + time.time() - t_step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                append_jsonl(metrics, {**self.evaluate(step), "train_loss": train_loss})
            if step in self.ckpt_steps or step == cfg.steps:
                self._save_checkpoint(step)
            if stop_after is not None and step >= stop_after:
                break
        wall = time.time() - t0
        return {"steps_done": done, "seconds": round(wall, 3),
                "seconds_per_step": round(in_steps / done, 3) if done else None,
                "tokens_per_second": round(tokens / in_steps, 1) if in_steps > 0 else None}

    def metrics(self) -> list[dict]:
        return read_jsonl(self.out / "metrics.jsonl")


# ------------------------------------------------------------------------------------------------
# the freezing study: one CorpusTrainer per arm on the corpora of an ``engram regions`` run

def read_regions_run(directory: str | Path) -> dict:
    """What ``engram freeze`` takes from an ``engram regions`` run directory: {"model", "corpus"
    (NAME=PATH specs), "names", "seq_len", "eval_chunks", "batch_size", "masks" {arm: path}}; a
    directory that is no complete regions run is a one-line error."""
    from engramlab.data.corpora import parse_corpus_spec
    from engramlab.runs import load_json

    d = Path(directory)
    where = f"--regions {d}"
    if not (d / "manifest.json").is_file():
        raise EngramError(f"{where}: not an engram regions run (no manifest.json); give the --out of engram regions")
    manifest = load_json(d / "manifest.json", "regions manifest")
    if manifest.get("command") != "regions":
        raise EngramError(f"{where}: holds a run of `engram {manifest.get('command')}`, not regions; give the --out "
                          f"of engram regions")
    if manifest.get("status") != "complete":
        raise EngramError(f"{where}: the regions run is {manifest.get('status')}, not complete; finish it first")
    config = manifest.get("config") or {}
    regions = config.get("regions") or {}
    if not config.get("model") or not config.get("corpus") or "seq_len" not in regions:
        raise EngramError(f"{where}: its manifest lacks the model, corpora or seq_len; run engram regions again")
    masks = {"core": d / "core.safetensors", "random": d / "random.safetensors"}
    for arm, path in masks.items():
        if not path.is_file():
            raise EngramError(f"{where}: no {path.name} (the {arm} region); run engram regions again")
    return {"model": config["model"], "corpus": list(config["corpus"]),
            "names": [parse_corpus_spec(s)[0] for s in config["corpus"]], "seq_len": int(regions["seq_len"]),
            "eval_chunks": int(regions.get("eval_chunks", 4)), "batch_size": int(regions.get("batch_size", 8)),
            "masks": masks}


def frozen_max_change(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor]) -> float:
    """max over masked entries of |end - start| (0.0 when the region was held bit-identically)."""
    worst = 0.0
    for name, m in masks.items():
        if m.any():
            a, b = start[name].detach().float().cpu(), end[name].detach().float().cpu()
            worst = max(worst, float((b - a).abs()[m.cpu()].max()))
    return worst


def _geomean(values: list[float]) -> float | None:
    import math

    if not values or any(v is None or not v > 0 or not math.isfinite(v) for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def arm_summary(arm: str, rows: list[dict], names: list[str], train: str) -> dict:
    """``<arm>.<corpus>.ppl_start`` / ``ppl_end`` / ``ppl_ratio`` (end/start) from an arm's
    metrics rows (the first and last), ``<arm>.forgetting`` = the geometric mean of ppl_ratio over
    the corpora other than ``train``, and ``<arm>.train_ppl_ratio``."""
    first, last = rows[0], rows[-1]
    out: dict = {}
    for c in names:
        s, e = first[f"ppl.{c}"], last[f"ppl.{c}"]
        out[f"{arm}.{c}.ppl_start"], out[f"{arm}.{c}.ppl_end"] = s, e
        out[f"{arm}.{c}.ppl_ratio"] = e / s if s and s > 0 else None
    out[f"{arm}.forgetting"] = _geomean([out[f"{arm}.{c}.ppl_ratio"] for c in names if c != train])
    out[f"{arm}.train_ppl_ratio"] = out[f"{arm}.{train}.ppl_ratio"]
    return out


def plot_freezing(curves: dict[str, list[dict]], names: list[str], train: str, out_png: str | Path) -> None:
    """Perplexity of every corpus over steps (log y): one colour per corpus, one line style per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": "-", "core": "--", "random": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(names):
        for arm, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[f"ppl.{c}"] for r in rows], styles.get(arm, "-."),
                    color=f"C{i}", label=f"{c}{' (trained)' if c == train else ''}, {arm}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"further training on {train}: arms {', '.join(curves)} (frozen region)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def freeze_study(regions: dict, train: str, out: str | Path, config, resume: bool = False,
                 device: str = "cpu", progress: bool = True) -> dict:
    """Run every arm of ``config`` (a ``FreezeConfig``) into ``out/<arm>/`` and return the summary
    (see ``engram freeze``). ``regions`` is ``read_regions_run``'s. With ``resume``, an arm whose
    ``done.json`` exists is skipped and an arm with a checkpoint continues from it.

    Summary keys, per arm: ``<arm>.<corpus>.ppl_start`` / ``ppl_end`` / ``ppl_ratio`` (end/start)
    for every corpus, ``<arm>.forgetting`` (geometric mean of ppl_ratio over the corpora other
    than ``train``), ``<arm>.train_ppl_ratio``, ``<arm>.frozen_max_change`` (max |Δθ| over the
    frozen entries between the model spec and the last checkpoint: 0.0 when held; None for arm
    none), ``<arm>.seconds_per_step`` (updates only, this invocation); then ``train_corpus``,
    ``train_chunks``, ``steps``, ``seconds``."""
    from safetensors.torch import load_file

    from engramlab.data.corpora import load_corpora
    from engramlab.locate.regions.find import split_chunks
    from engramlab.models.param_masks import load_masks
    from engramlab.runs import atomic_write_json, load_json

    out = Path(out)
    t0 = time.time()
    base = load_model(regions["model"], device=device)  # the start: its tokenizer and its weights
    start = {n: p.detach() for n, p in base.model.named_parameters()}
    corpora = load_corpora(regions["corpus"], base.tokenizer, seq_len=regions["seq_len"], max_chunks=None)
    # the split engram regions made: the last eval_chunks of each corpus are held out
    splits = {n: split_chunks(c.chunks, regions["eval_chunks"], None, n) for n, c in corpora.items()}
    held_out = {n: s[1] for n, s in splits.items()}
    names = list(corpora)
    summary: dict = {}
    curves: dict[str, list[dict]] = {}
    for arm in config.arms:
        arm_dir = out / arm
        done = arm_dir / "done.json"
        if resume and done.is_file():
            stats = load_json(done, f"arm {arm}")
        else:
            can_resume = resume and any((p / "optimizer.pt").is_file() for p in list_checkpoints(arm_dir).values()) \
                if arm_dir.is_dir() else False
            if arm_dir.exists() and not can_resume:
                shutil.rmtree(arm_dir)
            cfg = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                              schedule=config.schedule, weight_decay=config.weight_decay,
                              grad_clip=config.grad_clip, seed=config.seed, eval_every=config.eval_every,
                              checkpoints=f"every:{config.checkpoint_every}", init=regions["model"],
                              freeze=None if arm == "none" else str(regions["masks"][arm]),
                              freeze_mode=config.freeze_mode, device=device, world="")
            trainer = CorpusTrainer(cfg, splits[train][0], held_out, arm_dir, resume=can_resume,
                                    eval_batch_size=regions["batch_size"])
            if progress:
                print(f"arm {arm}: {trainer.freezer.n_frozen if trainer.freezer else 0} entries frozen")
            stats = trainer.run(show_progress=progress)
            del trainer
            atomic_write_json(done, stats)
            # a finished arm is never resumed: drop its optimizer state (twice the model's size)
            (list_checkpoints(arm_dir)[config.steps] / "optimizer.pt").unlink(missing_ok=True)
        rows = read_jsonl(arm_dir / "metrics.jsonl")
        curves[arm] = rows
        summary.update(arm_summary(arm, rows, names, train))
        if arm == "none":
            summary[f"{arm}.frozen_max_change"] = None
        else:
            end = load_file(str(list_checkpoints(arm_dir)[config.steps] / "model.safetensors"))
            summary[f"{arm}.frozen_max_change"] = frozen_max_change(start, end, load_masks(regions["masks"][arm]))
        summary[f"{arm}.seconds_per_step"] = stats.get("seconds_per_step")
    plot_freezing(curves, names, train, out / "freezing.png")
    summary.update({"train_corpus": train, "train_chunks": int(splits[train][0].shape[0]), "steps": config.steps,
                    "seconds": round(time.time() - t0, 3)})
    return summary
