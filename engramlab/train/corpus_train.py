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
  ``engramlab.models.perplexity.perplexity`` (token-weighted, eval mode, no gradients).

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
from engramlab.train.model_configs import count_parameters
from engramlab.train.trainer import TrainLoop, learning_rate, speed_facts


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
        self._setup_speed()  # --precision / TF32 (engramlab.train.speed)
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
        from engramlab.models.perplexity import perplexity

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
        "tokens_per_second" (updates only)}, and "peak_tflops", "mfu" (updates only) when a peak is
        known (``Trainer.summary``)."""
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
                "tokens_per_second": round(tokens / in_steps, 1) if in_steps > 0 else None,
                **speed_facts(cfg, self.device, count_parameters(self.model)[0], tokens, in_steps)}

    def metrics(self) -> list[dict]:
        return read_jsonl(self.out / "metrics.jsonl")
