"""``train``: fit a causal LM on a world's biographies, with checkpoints and knowledge metrics.

Run directory layout::

    RUN/manifest.json, summary.json       (engramlab.runs)
    RUN/metrics.jsonl                     one line per evaluation (see train.metrics)
    RUN/checkpoints/step-0000100/         save_pretrained model + tokenizer + trainer_state.json
                                          (+ optimizer.pt in the latest checkpoint only)

Every batch is a pure function of (seed, step) - the sampler draws from a generator seeded by
both, and biography templates come from ``random.Random`` seeded the same way; with ``dropout`` > 0
torch is re-seeded from (seed, step) before each update - so a run resumed from its last
checkpoint (``resume=True``) ends bit-identical to an uninterrupted one.

``--init`` continues a model with its own tokenizer; every word of the world must have a token in
it (a continual world built ``--rel-from`` the init run's world shares its vocabulary).

Attention-patched twins (``--patch-attention-from``) are in ``train.patching``; the analysis of
the learning curves written to summary.json (plateau, hallucination onset, forgetting) is
``dynamics.knowledge.summarize_training``. The speed options (``--precision``, ``--compile``,
``--grad-accum``; fused AdamW and pinned batches on CUDA; ``mfu`` in summary.json) are
``train.speed`` and docs/training.md.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engramlab.data.samplers import make_sampler
from engramlab.data.world import World
from engramlab.data.wordtok import build_word_tokenizer, check_covers, encode_biographies
from engramlab.dynamics.knowledge import plateau_of, summarize_training
from engramlab.errors import EngramError
from engramlab.models.loading import (CHECKPOINT_DIR, LoadedModel, list_checkpoints, load_model, load_tokenizer,
                                      resolve_device, wrap_model)
from engramlab.progress import progress_bar
from engramlab.report.curves import plot_training_curves
from engramlab.runs import append_jsonl, atomic_directory, atomic_write_jsonl, read_jsonl
from engramlab.train import speed
from engramlab.train.checkpoints import checkpoint_steps
from engramlab.train.config import SCHEDULES, TEMPLATE_CHOICES, TrainConfig  # noqa: F401 (re-exported)
from engramlab.train.metrics import EvalSet, baseline_loss, empirical_marginal_loss, evaluate
from engramlab.train.model_configs import build_model, count_parameters, set_dropout
from engramlab.train.patching import AttentionPatch, patch_window


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


def _dropout_seed(seed: int, step: int) -> int:
    """The torch seed of update ``step``'s dropout masks."""
    return random.Random(f"engramlab-dropout-{seed}-{step}").getrandbits(63)


# The batch entries the training step reads (pinned and copied to the device; the rest stay on the host).
_MODEL_INPUTS = ("input_ids", "attention_mask")


def micro_batches(attention_mask: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """Gradient accumulation's split of a batch: (first row, end row, length) of each of ``k``
    micro-batches of consecutive rows (sizes differ by at most one, ``torch.tensor_split``),
    each cut after its last attended column (trailing all-padding columns predict nothing, and a
    causal model's earlier positions never see them). Micro-batches without a target (no row
    with two attended tokens) are left out. ``attention_mask``: (batch, seq), on the host."""
    out, first = [], 0
    for chunk in torch.tensor_split(attention_mask, k):
        end = first + len(chunk)
        attended = chunk.any(0).nonzero()
        length = int(attended[-1]) + 1 if len(attended) else 0
        if length > 1 and int(chunk[:, 1:length].sum()) > 0:
            out.append((first, end, length))
        first = end
    return out


class TrainLoop:
    """What every training loop here shares, whatever it trains on: the AdamW groups (weight decay
    on matrices only), ``train_step`` on a batch dict, the ``--freeze`` region, checkpoints with
    optimizer.pt and ``--resume`` from them, and the next batch built in a background thread.

    A subclass sets ``cfg`` (a ``TrainConfig``: the optimizer, schedule, clipping and freezing
    fields), ``lm``, ``device``, ``out`` and ``start_step``, and defines ``make_batch(step)``, a
    pure function of (seed, step), so a resumed run ends bit-identical to an uninterrupted one.
    ``Trainer`` (synthetic worlds) and ``engramlab.train.corpus_train.CorpusTrainer`` (text
    corpora) are the two.
    """

    cfg: TrainConfig
    lm: LoadedModel
    out: Path
    start_step: int = 0
    freezer = None
    _compiled = None

    def _setup_speed(self) -> None:
        """The device-specific options (``engramlab.train.speed``): refuse a precision the device
        lacks, set the TF32 flags on CUDA. Call once ``self.device`` is known."""
        speed.check_precision(self.cfg.precision, self.device)
        speed.set_matmul_precision(self.cfg.precision, self.device)

    @property
    def train_model(self):
        """The module the training forward runs: the model itself, or (``--compile``) its
        ``torch.compile`` twin, which shares its parameters."""
        if self._compiled is None:
            self._compiled = speed.compiled(self.model, self.cfg.compile)
        return self._compiled

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def _make_freezer(self):
        """The ``--freeze`` region as a ``Freezer`` (None without --freeze); masks are keyed by
        parameter name, as ``engram regions`` saves them."""
        if not self.cfg.freeze:
            return None
        from engramlab.models.param_masks import load_masks
        from engramlab.train.freeze import Freezer

        path = Path(self.cfg.freeze)
        if path.is_dir():
            path = path / "core.safetensors"
        if not path.is_file():
            raise EngramError(f"--freeze {self.cfg.freeze}: no masks file (give a .safetensors of masks or an engram "
                              "regions run directory with core.safetensors)")
        return Freezer(dict(self.model.named_parameters()), load_masks(path), self.cfg.freeze_mode)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                 **speed.adamw_kwargs(self.device))

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
    def make_batch(self, step: int) -> dict:
        raise NotImplementedError

    def _prepared_batch(self, step: int) -> dict:
        """``make_batch(step)``, its model inputs in pinned memory when training on CUDA."""
        return speed.pin(self.make_batch(step), self.device, _MODEL_INPUTS)

    def batches(self, first: int, last: int):
        """Yield (step, batch) for steps [first, last), building the next batch in a background
        thread while the current step computes (torch releases the GIL in its kernels). On CUDA
        the thread also pins the batch, so the step's copy to the GPU is asynchronous."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._prepared_batch, first) if first < last else None
            for step in range(first, last):
                batch = pending.result()
                pending = pool.submit(self._prepared_batch, step + 1) if step + 1 < last else None
                yield step, batch

    def train_step(self, step: int, batch: dict | None = None) -> tuple[float, int]:
        """One optimizer step on ``batch`` {input_ids, attention_mask: (batch, seq)} (default:
        ``make_batch(step)``): lr of ``step``, cross-entropy of next tokens (padding ignored),
        backward, the freezer, gradient clipping, AdamW; returns (loss, tokens in the
        batch = the attention mask's sum).

        With ``grad_accum`` k > 1 the batch runs as k micro-batches (``micro_batches``), each
        backward on its summed token losses / the whole batch's target count T, so the
        accumulated gradient and the returned loss are the whole batch's token mean
        sum_i sum_t l_it / T - not a mean of micro-batch means, which would weight the tokens of
        a micro-batch with more padding more."""
        cfg = self.cfg
        batch = self.make_batch(step) if batch is None else batch
        host_mask = batch["attention_mask"]
        n_tokens = int(host_mask.sum())  # counted before the copy: no wait on the device
        inputs = speed.to_device({k: batch[k] for k in _MODEL_INPUTS}, self.device)  # asynchronous when pinned
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        self._before_update(step)
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg, step)
        if cfg.dropout:  # dropout masks, like batches, a pure function of (seed, step): resume stays exact
            torch.manual_seed(_dropout_seed(cfg.seed, step))
        if cfg.grad_accum == 1:  # the original order of operations, so default runs stay bit-identical
            loss = self._token_loss(step, ids, am, "mean")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            n_targets = int(host_mask[:, 1:].cpu().sum())
            self.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=self.device)
            for first, end, length in micro_batches(host_mask.cpu(), cfg.grad_accum):
                part = self._token_loss(step, ids[first:end, :length], am[first:end, :length], "sum") / n_targets
                part.backward()
                loss += part.detach()
        if self.freezer is not None:
            self.freezer.before_step()  # before clipping: frozen gradients do not count in the norm
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.freezer is not None:
            self.freezer.after_step()
        return float(loss.detach()), n_tokens

    def _token_loss(self, step: int, ids: torch.Tensor, am: torch.Tensor, reduction: str) -> torch.Tensor:
        """Next-token cross-entropy of (rows, seq) ``ids`` with padding ignored, ``reduction``
        "mean" (over targets) or "sum"; the forward in ``_forward_context`` and (bf16) autocast,
        the loss itself in fp32."""
        with self._forward_context(step, ids, am), speed.autocast(self.cfg.precision, self.device):
            logits = self.train_model(input_ids=ids, attention_mask=am).logits
        targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction=reduction)

    def _before_update(self, step: int) -> None:
        """Called first in ``train_step`` (a subclass's hook; nothing here)."""

    def _forward_context(self, step: int, ids: torch.Tensor, am: torch.Tensor):
        """The context the training forward pass runs in (a subclass's hook; none here)."""
        return nullcontext()


class Trainer(TrainLoop):
    """One training run. ``Trainer(cfg, world, out).run()``; see ``train()`` for the API."""

    def __init__(self, cfg: TrainConfig, world: World, out: Path, resume: bool = False):
        self.cfg, self.world, self.out = cfg, world, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self._setup_speed()
        self.old_world = World.load(cfg.old_world) if cfg.old_world else None
        self.lm: LoadedModel = self._build_model()  # the model being trained, its tokenizer and hook sites
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
        window = patch_window(cfg)
        self.patch = None if window is None else AttentionPatch(cfg.patch_attention_from, window,
                                                                device=str(self.device), trained=self.lm)
        if resume:
            self._resume()
        # built after a resume: the values it holds are the frozen entries' values, equal at every step
        self.freezer = self._make_freezer()
        self.evalsets = self._build_evalsets()

    # -- set-up ---------------------------------------------------------------------------

    def _build_model(self) -> LoadedModel:
        """The model to train: --init's (with its own tokenizer, which must cover the world), or
        fresh weights of --model-config with the world's word tokenizer (or --tokenizer's)."""
        cfg = self.cfg
        if cfg.init:
            lm = load_model(cfg.init, device=str(self.device) if cfg.device != "auto" else "auto", trainable=True)
            lm.model.train()
            if self.old_world is None:
                self.old_world = _world_of_run(cfg.init)
            origin = f"--init {cfg.init}"
        else:
            tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_word_tokenizer(self.world)
            model = build_model(cfg.model_config, len(tokenizer), self._max_len(tokenizer), cfg.seed, tokenizer,
                                dropout=cfg.dropout)
            lm = wrap_model(model.to(self.device), tokenizer)
            origin = f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else None
        if origin is not None:  # a tokenizer not made from this world: an unknown word would train as <unk>
            check_covers(lm.tokenizer, self.world, f"{origin} on world {cfg.world or '(in memory)'}")
            if self.old_world is not None:
                check_covers(lm.tokenizer, self.old_world, f"{origin} on the old world")
        lm.model.requires_grad_(True)
        if lm.tokenizer.pad_token_id is None:  # GPT-2-style tokenizers: pad with eos
            lm.tokenizer.pad_token = lm.tokenizer.eos_token
        self.dropout_hooks = set_dropout(lm.model, lm.adapter, cfg.dropout)
        return lm

    @property
    def max_len(self) -> int:
        """The position budget a fresh model of this world gets (``_max_len``)."""
        return self._max_len(self.tokenizer)

    def _max_len(self, tokenizer) -> int:
        # The longest biography: every template at its longest value plus <bos>/<eos>, rounded up.
        rng = random.Random(0)
        bios = [self.world.biography(i % len(self.world.people), rng) for i in range(256)]
        longest = int(encode_biographies(tokenizer, bios)["attention_mask"].sum(1).max())
        return 2 ** math.ceil(math.log2(longest * 1.5))

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

    # -- the loop -----------------------------------------------------------------------------
    def _patched(self, step: int) -> bool:
        """Whether update ``step`` (0-based) trains with the reference's attention patterns."""
        return self.patch is not None and self.patch.active(step)

    def evaluate(self, step: int) -> dict:
        # Step s is the model after update s - 1 (0-based): evaluate it the way that update ran,
        # so a patched twin is measured with the patterns it was trained with (step 0: update 0).
        source = self.patch.patterns if self._patched(max(step - 1, 0)) else None
        row = {"step": step}
        for es in self.evalsets:
            row.update(evaluate(self.model, es, hooks=self.lm.hooks, pattern_source=source,
                                attention_stats=self.cfg.attention_stats and es.name == "eval"))
        row["baseline_loss"] = self.baseline
        row["lr"] = learning_rate(self.cfg, max(step - 1, 0))
        row["patched"] = bool(source)
        return row

    def make_batch(self, step: int) -> dict:
        """The batch of ``step``: a pure function of (seed, step)."""
        indices = self.sampler.indices(step, self.cfg.batch_size)
        return encode_biographies(self.tokenizer, self.population.batch(indices, _batch_rng(self.cfg.seed, step)))

    def _before_update(self, step: int) -> None:
        if self.patch is not None and self.patch.starts_at(step):
            self.optimizer.state.clear()  # patching starts: forget moments shaped by free attention

    def _forward_context(self, step: int, ids: torch.Tensor, am: torch.Tensor):
        return self.patch.replacing(self.lm.hooks, ids, am) if self._patched(step) else nullcontext()

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
        t0, tokens, train_loss, aside = time.time(), 0, float("nan"), 0.0  # aside: evaluations and checkpoints
        # Step s applies the s-th update: batches are indexed by s - 1 so step 1 sees batch 0.
        batches = self.batches(self.start_step - 1, cfg.steps)
        status = lambda: f"loss {train_loss:.3f}" if train_loss == train_loss else ""  # noqa: E731 (nan: none yet)
        for index, batch in progress_bar(batches, "train", enabled=show_progress,
                                         total=cfg.steps - self.start_step + 1, status=status):
            step = index + 1
            train_loss, n = self.train_step(index, batch)
            tokens += n
            plateau_over, t_aside = False, time.time()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row = self.evaluate(step)
                row["train_loss"] = train_loss
                append_jsonl(metrics_path, row)
                plateau_over = cfg.stop_at_plateau_end and self._plateau()[1] is not None
            if step in self.ckpt_steps or step == cfg.steps or plateau_over:
                self._save_checkpoint(step)
            aside += time.time() - t_aside
            if plateau_over or (stop_after is not None and step >= stop_after):
                break
        wall = time.time() - t0
        summary = self.summary(wall, tokens, update_seconds=wall - aside)
        plot_training_curves(read_jsonl(metrics_path), self.out / "curves.png",
                             (summary["plateau_start_step"], summary["plateau_end_step"]),
                             title=f"{self.out.name}: {len(self.world.people)} people, sampler {cfg.sampler}")
        return summary

    def _plateau(self) -> tuple[int | None, int | None]:
        return plateau_of(read_jsonl(self.out / "metrics.jsonl"), self.baseline, "eval", self.cfg.plateau_reach,
                          self.cfg.plateau_exit)

    def summary(self, wall: float, tokens: int, update_seconds: float | None = None) -> dict:
        """summary.json: the learning-curve analysis (``dynamics.knowledge``) and the run's facts.

        ``peak_tflops`` and ``mfu`` (``speed.mfu`` over ``update_seconds``, the loop's time less
        evaluations and checkpoints; default ``wall``) are there only when a peak is known: a
        CUDA device of ``speed.PEAK_TFLOPS``, or ``--peak-tflops``; a CPU run without it has neither."""
        # baseline_loss_empirical: what knowing only the N trained people's empirical marginals
        # scores (below the analytic baseline by ~(pool - 1) / 2N per pool); no criterion uses it.
        curves = summarize_training(read_jsonl(self.out / "metrics.jsonl"), self.baseline, self.cfg.plateau_reach,
                                    self.cfg.plateau_exit, baseline_empirical=empirical_marginal_loss(self.world))
        n_params, n_non_embedding = count_parameters(self.model)
        facts = {
            "train_wall_seconds": round(wall, 3),
            "tokens_per_second": round(tokens / wall, 1) if wall > 0 else None,
            "n_people": len(self.world.people),
            "sampler": self.cfg.sampler,
            "n_params": n_params,
            "n_params_non_embedding": n_non_embedding,
        }
        facts.update(speed_facts(self.cfg, self.device, n_params, tokens, wall if update_seconds is None
                                 else update_seconds))
        # summary.json keeps its key order: the final and plateau numbers, the run's facts, then
        # the per-split analyses (training distribution, held-out people, old population).
        keys = list(curves)
        cut = keys.index("plateau_end_step") + 1
        return {**{k: curves[k] for k in keys[:cut]}, **facts, **{k: curves[k] for k in keys[cut:]}}


def speed_facts(cfg: TrainConfig, device: torch.device, n_params: int, tokens: int, seconds: float) -> dict:
    """{"peak_tflops", "mfu"} of a run when a peak is known (``speed.peak_tflops``), else {}."""
    peak = speed.peak_tflops(device, cfg.precision, cfg.peak_tflops)
    if peak is None:
        return {}
    value = speed.mfu(n_params, tokens, seconds, peak)
    return {"peak_tflops": peak, "mfu": None if value is None else round(value, 6)}


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
