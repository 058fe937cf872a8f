"""``train``: fit a causal LM on a world's biographies, with checkpoints and knowledge metrics.

Run directory layout::

    RUN/manifest.json, summary.json       (engramlab.runs)
    RUN/metrics.jsonl                     one line per evaluation (see train.metrics)
    RUN/checkpoints/step-0000100/         save_pretrained model + tokenizer + trainer_state.json
                                          (+ optimizer.pt in the latest checkpoint only)

Every batch is a pure function of (seed, step) - the sampler draws from a generator seeded by
both, and biography templates come from ``random.Random`` seeded the same way - so a run resumed
from its last checkpoint (``resume=True``) ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engramlab.config import option, validate
from engramlab.data.samplers import make_sampler
from engramlab.data.world import World
from engramlab.data.wordtok import build_word_tokenizer, encode_biographies
from engramlab.dynamics.plateau import detect_plateau
from engramlab.errors import EngramError
from engramlab.models.hooks import HookPoints
from engramlab.models.adapters import get_adapter
from engramlab.models.loading import CHECKPOINT_DIR, list_checkpoints, load_model, load_tokenizer, resolve_device
from engramlab.progress import progress_bar
from engramlab.report.curves import plot_training_curves
from engramlab.runs import append_jsonl, atomic_directory, atomic_write_jsonl, read_jsonl
from engramlab.train.checkpoints import checkpoint_steps
from engramlab.train.metrics import EVAL_CONTEXTS, EvalSet, baseline_loss, empirical_marginal_loss, evaluate
from engramlab.train.model_configs import build_model, count_parameters

SCHEDULES = ("cosine", "constant", "linear")
TEMPLATE_CHOICES = ("random", "first")


@dataclass
class TrainConfig:
    """Every knob of a training run (all plain data: saved in manifest.json)."""

    steps: int = option(2000, "Optimiser steps.", range=(0, None))
    batch_size: int = option(32, "Biographies per step.", range=(1, None))
    lr: float = option(1e-3, "Peak learning rate.", range=(0, None), open_low=True)
    min_lr_ratio: float = option(0.1, "cosine/linear decay to lr x min_lr_ratio.", range=(0, 1))
    schedule: str = option("cosine", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps.", range=(0, None))
    weight_decay: float = option(0.1, "AdamW weight decay.", range=(0, None))
    beta1: float = option(0.9, "AdamW beta1.", range=(0, 1), open_high=True)
    beta2: float = option(0.95, "AdamW beta2.", range=(0, 1), open_high=True)
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).", range=(0, None))
    sampler: str = "uniform"
    seed: int = 0
    eval_every: int = option(50, "Evaluate every this many steps.", range=(1, None))
    eval_people: int = option(100, "People per evaluation split (a fixed random subset).", range=(1, None))
    eval_templates: int = option(2, "Templates per (person, attribute) in evaluation.", range=(1, None))
    eval_context: str = option("sentence", "sentence | biography (whole evaluation biographies).",
                               choices=EVAL_CONTEXTS)
    eval_template_choice: str = option("random", "random (seeded per person) | first (lowest indices).",
                                       choices=TEMPLATE_CHOICES)
    attention_stats: bool = True
    checkpoints: str = "dense:24"    # see train.checkpoints
    plateau_reach: float = option(0.05, "Plateau starts at the first eval within this fraction above the baseline.",
                                  range=(0, None))
    plateau_exit: float = option(0.10, "Plateau ends at the first eval this fraction below the baseline.",
                                 range=(0, 1), open_high=True)
    stop_at_plateau_end: bool = False  # end the run at the plateau's end (scaling sweeps)
    device: str = "cpu"
    model_config: str = "tiny"
    init: str | None = None          # continue from a pretrained model or a run checkpoint
    tokenizer: str | None = None     # HF tokenizer (model SPEC) for from-scratch runs; default: word-level
    old_world: str | None = None     # retention metrics / replay population when fine-tuning
    patch_attention_from: str | None = None  # RUN:STEP whose attention patterns the twin uses
    patch_window: str | None = None  # "A:B": patch steps [A, B); default: the whole run
    world: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        validate(self)
        # The mini-languages are parsed now, so a typo fails before anything is written.
        checkpoint_steps(self.checkpoints, max(self.steps, 1))
        if not self.sampler.startswith("replay"):
            make_sampler(self.sampler, 10, seed=0)
        patch_window(self)


def patch_window(cfg: "TrainConfig") -> tuple[int, int] | None:
    """The patched steps [A, B) of ``--patch-window A:B`` (None: no patching)."""
    if not cfg.patch_attention_from:
        return None
    if not cfg.patch_window:
        return (0, cfg.steps)
    try:
        a, b = (int(x) if x else None for x in cfg.patch_window.split(":"))
    except ValueError:
        raise EngramError(f"--patch-window {cfg.patch_window!r}: use A:B (steps), e.g. 0:500") from None
    a, b = a or 0, cfg.steps if b is None else b
    if not 0 <= a < b:
        raise EngramError(f"--patch-window {cfg.patch_window!r}: need 0 <= A < B (steps), e.g. 0:500")
    return a, b


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based) for the configured schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - t)
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise EngramError(f"--schedule {cfg.schedule!r}: choose cosine, constant or linear")


class Population:
    """Maps sampler indices to (world, person) for biography generation.

    Bio worlds: index = person. Continual worlds: the corpus repeats each person ``frequency``
    times, so index = corpus entry. Replay: indices [0, n_old) are the old world's people.
    """

    def __init__(self, world: World, old_world: World | None = None):
        self.entries: list[tuple[World, int]] = []
        if old_world is not None:
            self.entries += [(old_world, i) for i in range(len(old_world.people))]
        self.n_old = len(self.entries)
        if world.config.kind == "continual":
            self.entries += [(world, int(i)) for i in world.corpus_indices()]
        else:
            self.entries += [(world, i) for i in range(len(world.people))]

    @property
    def n_new(self) -> int:
        return len(self.entries) - self.n_old

    def batch(self, indices, rng: random.Random):
        return [w.biography(i, rng) for w, i in (self.entries[int(j)] for j in indices)]


def _batch_rng(seed: int, step: int) -> random.Random:
    return random.Random(f"engramlab-batch-{seed}-{step}")


class Trainer:
    """One training run. ``Trainer(cfg, world, out).run()``; see ``train()`` for the API."""

    def __init__(self, cfg: TrainConfig, world: World, out: Path, resume: bool = False):
        self.cfg, self.world, self.out = cfg, world, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.old_world = World.load(cfg.old_world) if cfg.old_world else None
        self._build_model()
        self.adapter = get_adapter(self.model)
        self.hooks = HookPoints(self.adapter)
        is_replay = cfg.sampler.startswith("replay")
        self.population = Population(world, self.old_world if is_replay else None)
        if is_replay and self.old_world is None:
            raise EngramError("sampler replay needs the old population: pass --old-world DIR "
                              "(or --init a run trained on it)")
        spec = cfg.sampler
        if is_replay:  # the replay index space is (old, new): give it the old population's size
            spec = re.sub(r"old=[^,]*", f"old={self.population.n_old}", spec)
            if "old=" not in spec:
                spec = spec.replace("replay:", f"replay:old={self.population.n_old},", 1)
        self.sampler = make_sampler(spec, self.population.n_new, seed=cfg.seed)
        self.baseline = baseline_loss(world)
        self.ckpt_steps = set(checkpoint_steps(cfg.checkpoints, cfg.steps))
        self.start_step = 0
        self.optimizer = self._make_optimizer()
        self.reference = self._load_reference() if cfg.patch_attention_from else None
        self.patch_range = patch_window(cfg)
        if resume:
            self._resume()
        self.evalsets = self._build_evalsets()

    # -- set-up ---------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg = self.cfg
        if cfg.init:
            lm = load_model(cfg.init, device=str(self.device) if cfg.device != "auto" else "auto", trainable=True)
            self.model, self.tokenizer = lm.model.train(), lm.tokenizer
            if self.old_world is None:
                self.old_world = _world_of_run(cfg.init)
        else:
            self.tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_word_tokenizer(self.world)
            self.max_len = self._max_len()
            self.model = build_model(cfg.model_config, len(self.tokenizer), self.max_len, cfg.seed,
                                     self.tokenizer).to(self.device)
        self.model.requires_grad_(True)
        if self.tokenizer.pad_token_id is None:  # GPT-2-style tokenizers: pad with eos
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _max_len(self) -> int:
        # The longest biography: every template at its longest value plus <bos>/<eos>, rounded up.
        rng = random.Random(0)
        bios = [self.world.biography(i % len(self.world.people), rng) for i in range(256)]
        longest = int(encode_biographies(self.tokenizer, bios)["attention_mask"].sum(1).max())
        return 2 ** math.ceil(math.log2(longest * 1.5))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2))

    def _load_reference(self):
        ref = load_model(self.cfg.patch_attention_from, device=str(self.device))
        if ref.model.config.to_dict().get("num_hidden_layers", ref.adapter.n_layers) != self.adapter.n_layers \
                or ref.adapter.n_heads != self.adapter.n_heads:
            raise EngramError(f"--patch-attention-from {self.cfg.patch_attention_from}: its layers/heads "
                              f"({ref.adapter.n_layers}x{ref.adapter.n_heads}) differ from the model being trained "
                              f"({self.adapter.n_layers}x{self.adapter.n_heads}); use a checkpoint of the same config")
        return ref

    def _build_evalsets(self) -> list[EvalSet]:
        c, tok = self.cfg, self.tokenizer
        how = dict(context=c.eval_context, template_choice=c.eval_template_choice)
        sets = [EvalSet.build("eval", self.world, "heldout_templates", tok, c.eval_people, c.eval_templates, **how),
                EvalSet.build("train", self.world, "train_templates", tok, c.eval_people, c.eval_templates, **how)]
        p = self.sampler.probabilities()[self.population.n_old:]
        if self.world.config.kind == "bio" and not np.allclose(p, p[0]):
            # A non-uniform sampler: also measure knowledge on the training distribution itself,
            # people drawn (with repeats) as often as the sampler shows them.
            rng = np.random.default_rng([c.seed, 7])
            drawn = sorted(rng.choice(len(p), size=c.eval_people, p=p / p.sum()).tolist())
            sets.append(EvalSet.build("dist", self.world, "heldout_templates", tok, None, c.eval_templates,
                                      people=drawn, **how))
        if self.world.heldout_people:
            sets.append(EvalSet.build("heldout", self.world, "heldout_people", tok, c.eval_people, c.eval_templates,
                                      **how))
        if self.old_world is not None:
            sets.append(EvalSet.build("old", self.old_world, "heldout_templates", tok, c.eval_people,
                                      c.eval_templates, **how))
        return sets

    # -- checkpoints and resume -------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> None:
        path = self.out / CHECKPOINT_DIR / f"step-{step:07d}"
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(self.cfg)}))
        # Optimizer state is only needed to resume: keep it in the newest checkpoint alone.
        for s, p in list_checkpoints(self.out).items():
            if s != step and (p / "optimizer.pt").exists():
                (p / "optimizer.pt").unlink()

    def _resume(self) -> None:
        from safetensors.torch import load_file

        ckpts = {s: p for s, p in list_checkpoints(self.out).items() if (p / "optimizer.pt").exists()}
        if not ckpts:
            raise EngramError(f"--resume: {self.out} has no checkpoint to resume from "
                              f"({CHECKPOINT_DIR}/step-N with optimizer.pt); start the run without --resume")
        step = max(ckpts)
        state = load_file(str(ckpts[step] / "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any("lm_head" not in m for m in missing):
            raise EngramError(f"--resume: checkpoint {ckpts[step]} does not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if missing:  # tied embeddings are stored once
            self.model.tie_weights()
        state = torch.load(ckpts[step] / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        self.start_step = step + 1
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():  # drop evaluations made after the checkpoint: they will be redone
            atomic_write_jsonl(metrics, [r for r in read_jsonl(metrics) if r["step"] <= step])

    # -- the loop -----------------------------------------------------------------------------
    def _patterns(self, ids, am) -> dict:
        """Reference attention patterns for this batch, as {site: (B, H, T, T)}, no gradient."""
        sites = [f"blocks.{l}.attn.pattern" for l in range(self.adapter.n_layers)]
        with torch.no_grad(), self.reference.hooks.capture(sites) as cache:
            self.reference.model(input_ids=ids, attention_mask=am)
        return dict(cache)

    def _patching(self, step: int) -> bool:
        return self.patch_range is not None and self.patch_range[0] <= step < self.patch_range[1]

    def evaluate(self, step: int) -> dict:
        # Step s is the model after update s - 1 (0-based): evaluate it the way that update ran,
        # so a patched twin is measured with the patterns it was trained with (step 0: update 0).
        source = self._patterns if self._patching(max(step - 1, 0)) else None
        row = {"step": step}
        for es in self.evalsets:
            row.update(evaluate(self.model, es, hooks=self.hooks, pattern_source=source,
                                attention_stats=self.cfg.attention_stats and es.name == "eval"))
        row["baseline_loss"] = self.baseline
        row["lr"] = learning_rate(self.cfg, max(step - 1, 0))
        row["patched"] = bool(source)
        return row

    def make_batch(self, step: int) -> dict:
        """The batch of ``step``: a pure function of (seed, step)."""
        indices = self.sampler.indices(step, self.cfg.batch_size)
        return encode_biographies(self.tokenizer, self.population.batch(indices, _batch_rng(self.cfg.seed, step)))

    def batches(self, first: int, last: int):
        """Yield (step, batch) for steps [first, last), building the next batch in a background
        thread while the current step computes (torch releases the GIL in its kernels)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.make_batch, first) if first < last else None
            for step in range(first, last):
                batch = pending.result()
                pending = pool.submit(self.make_batch, step + 1) if step + 1 < last else None
                yield step, batch

    def train_step(self, step: int, batch: dict | None = None) -> tuple[float, int]:
        """One optimizer step on ``batch`` (default: ``make_batch(step)``); returns (loss, tokens)."""
        cfg = self.cfg
        batch = self.make_batch(step) if batch is None else batch
        ids, am = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if self.patch_range is not None and step == self.patch_range[0] and step > 0:
            self.optimizer.state.clear()  # patching starts: forget moments shaped by free attention
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg, step)
        with ExitStack() as stack:
            if self._patching(step):
                for site, pat in self._patterns(ids, am).items():
                    stack.enter_context(self.hooks.replace(site, pat))
            logits = self.model(input_ids=ids, attention_mask=am).logits
        targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), int(am.sum())

    def run(self, stop_after: int | None = None, show_progress: bool = True) -> dict:
        """Train to ``cfg.steps``; ``stop_after`` ends early after that step (tests of resume)."""
        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        if self.start_step == 0:
            if metrics_path.exists():
                metrics_path.unlink()
            self.model.train()
            append_jsonl(metrics_path, self.evaluate(0))
            if 0 in self.ckpt_steps:
                self._save_checkpoint(0)
            self.start_step = 1
        t0, tokens, train_loss = time.time(), 0, float("nan")
        # Step s applies the s-th update: batches are indexed by s - 1 so step 1 sees batch 0.
        batches = self.batches(self.start_step - 1, cfg.steps)
        status = lambda: f"loss {train_loss:.3f}" if train_loss == train_loss else ""  # noqa: E731 (nan: none yet)
        for index, batch in progress_bar(batches, "train", enabled=show_progress,
                                         total=cfg.steps - self.start_step + 1, status=status):
            step = index + 1
            train_loss, n = self.train_step(index, batch)
            tokens += n
            plateau_over = False
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row = self.evaluate(step)
                row["train_loss"] = train_loss
                append_jsonl(metrics_path, row)
                plateau_over = cfg.stop_at_plateau_end and self._plateau()[1] is not None
            if step in self.ckpt_steps or step == cfg.steps or plateau_over:
                self._save_checkpoint(step)
            if plateau_over or (stop_after is not None and step >= stop_after):
                break
        wall = time.time() - t0
        summary = self.summary(wall, tokens)
        plot_training_curves(read_jsonl(metrics_path), self.out / "curves.png",
                             (summary["plateau_start_step"], summary["plateau_end_step"]),
                             title=f"{self.out.name}: {len(self.world.people)} people, sampler {cfg.sampler}")
        return summary

    def _plateau(self, which: str = "eval") -> tuple[int | None, int | None]:
        rows = read_jsonl(self.out / "metrics.jsonl")
        return detect_plateau([r["step"] for r in rows], [r[f"{which}.attr_loss"] for r in rows], self.baseline,
                              self.cfg.plateau_reach, self.cfg.plateau_exit)

    def summary(self, wall: float, tokens: int) -> dict:
        rows = read_jsonl(self.out / "metrics.jsonl")
        start, end = self._plateau()
        last = rows[-1]
        n_params, n_non_embedding = count_parameters(self.model)
        out = {
            "baseline_loss": self.baseline,
            # What knowing only the N trained people's empirical marginals scores (below the
            # analytic baseline by ~(pool - 1) / 2N per pool); not used by the plateau criterion.
            "baseline_loss_empirical": empirical_marginal_loss(self.world),
            "final_step": last["step"],
            "final_attr_loss": last["eval.attr_loss"],
            "final_attr_acc": last["eval.attr_acc"],
            "final_train_template_acc": last["train.attr_acc"],
            "plateau_start_step": start,
            "plateau_end_step": end,
            "train_wall_seconds": round(wall, 3),
            "tokens_per_second": round(tokens / wall, 1) if wall > 0 else None,
            "n_people": len(self.world.people),
            "sampler": self.cfg.sampler,
            "n_params": n_params,
            "n_params_non_embedding": n_non_embedding,
        }
        if "dist.attr_loss" in last:  # knowledge on the training distribution (non-uniform samplers)
            out["plateau_start_step_train_dist"], out["plateau_end_step_train_dist"] = self._plateau("dist")
            out["final_attr_acc_train_dist"] = last["dist.attr_acc"]
        if "heldout.attr_loss" in last:
            out["heldout_loss_final"] = last["heldout.attr_loss"]
            out["heldout_top1_prob_final"] = last["heldout.first_token_top1_prob"]
            # Hallucination onset: first evaluation after the plateau started at which the loss
            # on never-seen people is plateau_exit above the baseline (confidently wrong).
            rise = [r["step"] for r in rows if start is not None and r["step"] >= start
                    and r["heldout.attr_loss"] > self.baseline * (1 + self.cfg.plateau_exit)]
            out["heldout_rise_step"] = rise[0] if rise else None
            at_end = [r for r in rows if r["step"] == end]
            out["heldout_loss_at_plateau_end"] = at_end[0]["heldout.attr_loss"] if at_end else None
        if "old.attr_acc" in last:
            out["old_acc_initial"] = rows[0]["old.attr_acc"]
            out["old_acc_final"] = last["old.attr_acc"]
            out["old_acc_min"] = min(r["old.attr_acc"] for r in rows)
            # Forgetting speed: first evaluation where the old population's accuracy is halved.
            halved = [r["step"] for r in rows if r["old.attr_acc"] < rows[0]["old.attr_acc"] / 2]
            out["old_acc_halved_step"] = halved[0] if halved else None
        return out


def _world_of_run(spec: str) -> World | None:
    """The world an ``engram train`` run (or one of its checkpoints) was trained on, if any."""
    path = Path(spec.rsplit(":", 1)[0] if ":" in spec and not Path(spec).exists() else spec)
    for candidate in (path, path.parent.parent):  # run dir, or run/checkpoints/step-N
        manifest = candidate / "manifest.json"
        if manifest.is_file():
            world = json.loads(manifest.read_text()).get("config", {}).get("world")
            if world and (Path(world) / "world.json").is_file():
                return World.load(world)
    return None


def train(world: World, out: str | Path, cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          show_progress: bool = True) -> dict:
    """Train on ``world`` into run directory ``out`` (checkpoints, metrics.jsonl); return the summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "writing shards" bars would drown the log
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, world, Path(out), resume=resume)
    return trainer.run(stop_after=stop_after, show_progress=show_progress)
