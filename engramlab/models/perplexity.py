"""Perplexity of a model over chunks of token ids.

Two ways to average, which agree when every batch holds the same number of target tokens:

- ``mode="token"`` (default): exp of the token-weighted mean next-token cross-entropy over all
  chunks, i.e. exp(sum of losses / number of targets). It does not depend on the batch size.
- ``mode="batch_mean"``: exp of the mean over batches of each batch's mean token loss, what the
  reference code reports (HF's mean loss per eval batch, averaged). A short last batch, or batches
  with more padding, then weigh as much as full ones, so it moves with the batch size.

A chunk is a sequence of token ids (a list, or a row of a (n, seq_len) tensor); chunks of
different lengths are right-padded and the padding is neither attended to nor scored. Every
position but the last predicts the next token; the model runs in eval mode, without gradients,
and its train/eval mode is restored afterwards. ``targets`` (bool (n, seq_len), with tensor chunks)
scores only the marked tokens (``Corpus.targets``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from engramlab.errors import EngramError
from engramlab.models.loading import pad_rows

MODES = ("token", "batch_mean")


def batch_losses(lm, chunks: torch.Tensor | Sequence[Sequence[int]], batch_size: int = 8,
                 targets: torch.Tensor | None = None) -> list[tuple[float, int]]:
    """(sum of next-token cross-entropies, number of targets) per batch of ``batch_size`` chunks
    (a batch without a marked target gives (0.0, 0))."""
    rows = [list(map(int, c)) for c in chunks] if not isinstance(chunks, torch.Tensor) else chunks
    if len(rows) == 0:
        raise EngramError("perplexity needs at least one chunk: the corpus gave none (check it is not empty)")
    if isinstance(rows, torch.Tensor) and rows.dim() != 2:
        raise EngramError(f"chunks must be a (n, seq_len) tensor of token ids, got shape {tuple(rows.shape)}")
    if (rows.shape[1] if isinstance(rows, torch.Tensor) else min(map(len, rows))) < 2:
        raise EngramError("every chunk needs at least 2 tokens (one next-token target): raise --seq-len")
    if batch_size < 1:
        raise EngramError(f"batch size must be at least 1, got {batch_size}")
    if targets is not None and (not isinstance(rows, torch.Tensor) or targets.shape != rows.shape):
        raise EngramError("perplexity: targets need tensor chunks of the same shape; build the corpus with them")
    model, out = lm.model, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                part = rows[i: i + batch_size]
                if isinstance(part, torch.Tensor):
                    ids = part.to(lm.device, torch.long)
                    am = torch.ones_like(ids)
                else:
                    ids, am = pad_rows(part, 0, lm.device)  # padding is masked: its id does not matter
                logits = model(input_ids=ids, attention_mask=am).logits
                keep = am[:, 1:] == 1
                if targets is not None:
                    keep &= targets[i: i + batch_size, 1:].to(keep.device)
                labels = ids[:, 1:].masked_fill(~keep, -100)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=-100, reduction="sum")
                out.append((float(loss), int(keep.sum())))
    finally:
        model.train(was_training)
    return out


def mean_loss(lm, chunks, batch_size: int = 8, mode: str = "token", targets: torch.Tensor | None = None) -> float:
    """The mean next-token cross-entropy (nats) that ``perplexity`` exponentiates."""
    if mode not in MODES:
        raise EngramError(f"unknown perplexity mode {mode!r}: choose one of {', '.join(MODES)}")
    losses = [(s, n) for s, n in batch_losses(lm, chunks, batch_size, targets) if n]
    if not losses:
        raise EngramError("perplexity: no token is marked as a target in these chunks")
    if mode == "token":
        return sum(s for s, _ in losses) / sum(n for _, n in losses)
    return sum(s / n for s, n in losses) / len(losses)


def perplexity(lm, chunks, batch_size: int = 8, mode: str = "token", targets: torch.Tensor | None = None) -> float:
    """exp(``mean_loss``): token-weighted (``mode="token"``) or the reference's ``"batch_mean"``;
    inf when the loss is too large for a float."""
    loss = mean_loss(lm, chunks, batch_size, mode, targets)
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
