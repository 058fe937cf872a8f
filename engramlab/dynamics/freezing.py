"""The freezing study of parameter regions (``engram freeze``, Zhang et al. 2024): one
``CorpusTrainer`` run per arm on a corpus of an ``engram regions`` run, with nothing, its core
region or its random region held fixed, and what the other corpora forgot.

It sits above both the regions locator (its run directory, its held-out split) and the trainer,
which know nothing of each other.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch

from engramlab.errors import EngramError
from engramlab.models.loading import list_checkpoints, load_model
from engramlab.runs import read_jsonl
from engramlab.train.config import TrainConfig
from engramlab.train.corpus_train import CorpusTrainer

log = logging.getLogger("engramlab")



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
            log.info(f"arm {arm}: {trainer.freezer.n_frozen if trainer.freezer else 0} entries frozen")
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
