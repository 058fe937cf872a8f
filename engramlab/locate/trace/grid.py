"""The causal-tracing grid of one fact, batched: every (kind, layer, token) restoration at once.

For a prompt of T tokens with the subject at [b, e), the answer token a, noise draws eps_s
(``noise``, shape (S, e - b, d_model)) and a model of L layers::

    P_clean     = P(a | clean prompt)
    P_corrupt   = mean_s P(a | subject embeddings + eps_s)
    P_k[l, i]   = mean_s P(a | subject embeddings + eps_s, state k restored at token i, layer(s) W_k(l))
    IE_k[l, i]  = P_k[l, i] - P_corrupt                 (the indirect effect)

where "restored" means the hook site's corrupted value is replaced by its value in the clean run,
at that one token: ``resid`` is ``blocks.{l}.resid_post`` (the layer's output hidden state, one
layer), ``mlp`` is ``blocks.{m}.mlp.out`` and ``attn`` is ``blocks.{m}.attn.out`` for every m in the
window ``W(l) = [max(0, l - w // 2), min(L, l + w - w // 2))`` (ROME's window: w layers centred on
l, l - w//2 first; cut, not shifted, at the ends, so the first and last layers restore fewer).

How it is batched (and why that is exact): the model is causal, so

* a restoration at token i changes nothing before i: the corrupted run of tokens 0..i-1 runs once
  (``PrefixCache``), and each batch row runs only tokens i..T-1 on its keys/values;
* the restored token is the first of those, so every row of a batch restores position 0 of its
  own input; rows differ only in which site they restore (one hook per site, writing the clean
  value into the rows that restore it);
* before the subject (i < b) the clean and corrupted runs are the same, so P_k[l, i] = P_corrupt
  exactly and those cells are not run.

The clean states are captured once (one forward pass). One batched forward pass runs up to
``batch_size`` rows; ``engramlab.locate.trace.plain.trace_plain`` computes the same grid with one
full forward pass per cell, and tests/test_trace.py checks the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch

from engramlab.locate.trace.config import KINDS
from engramlab.locate.trace.noise import corrupted
from engramlab.models.hooks import site_name
from engramlab.models.prefix import PrefixCache

#: The hook site restored for each kind.
SITES = {"resid": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}


@dataclass
class FactTrace:
    """One fact's trace: probabilities of the answer token a."""

    p_clean: float
    p_corrupt: float           # mean over the noise draws
    restored: torch.Tensor     # (3, L, T) float32: P_k[l, i], kinds in KINDS order, mean over draws

    @property
    def effect(self) -> torch.Tensor:
        """(3, L, T) the indirect effects P_k[l, i] - P_corrupt."""
        return self.restored - self.p_corrupt


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together around ``layer``: [layer - w//2, layer + w - w//2) cut to [0, L)."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> range:
    return range(layer, layer + 1) if kind == "resid" else window_layers(layer, window, n_layers)


def answer_probs(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """(rows,) P(answer) from (rows, vocab) logits, softmax in float32."""
    return torch.softmax(logits.float(), dim=-1)[:, answer]


@torch.no_grad()
def clean_run(lm, ids: Sequence[int], answer: int) -> tuple[float, dict[str, torch.Tensor]]:
    """(P_clean, {kind: (L, T, d_model) clean states}) from one forward pass."""
    L = lm.adapter.n_layers
    names = {(k, l): site_name(SITES[k], l) for k in KINDS for l in range(L)}
    x = torch.tensor([list(ids)], device=lm.device)
    with lm.hooks.capture(list(names.values())) as cache:
        logits = lm.model(input_ids=x, logits_to_keep=1).logits[:, -1]
    states = {k: torch.stack([cache[names[k, l]][0] for l in range(L)]) for k in KINDS}
    return float(answer_probs(logits, answer)[0]), states


def _restore(t: torch.Tensor, rows: torch.Tensor, pos: int, value: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[rows, pos] = value.to(t.dtype)
    return t


@torch.no_grad()
def trace_grid(lm, ids: Sequence[int], span: tuple[int, int], answer: int, noise: torch.Tensor, window: int,
               batch_size: int = 96) -> FactTrace:
    """The batched grid of the module docstring. ``noise``: (S, e - b, d_model)."""
    ids = [int(i) for i in ids]
    a, T = lm.adapter, len(ids)
    L, (b, e) = a.n_layers, span
    p_clean, clean = clean_run(lm, ids, answer)
    cells = [(ki, l) for ki in range(len(KINDS)) for l in range(L)]
    restored = torch.zeros(noise.shape[0], len(KINDS), L, T, dtype=torch.float32)
    p_corrupt = []
    for s, eps in enumerate(noise):
        with corrupted(lm, eps, b):
            logits = lm.model(input_ids=torch.tensor([ids], device=lm.device), logits_to_keep=1).logits[:, -1]
        pc = float(answer_probs(logits, answer)[0])
        p_corrupt.append(pc)
        restored[s, :, :, :b] = pc
        for i in range(b, T):
            prefix = None
            if i > 0:
                with corrupted(lm, eps, b):
                    prefix = PrefixCache.run(lm, ids[:i])
            suffix = torch.tensor([ids[i:]], device=lm.device)
            for start in range(0, len(cells), batch_size):
                chunk = cells[start:start + batch_size]
                rows_of: dict[tuple[int, int], list[int]] = defaultdict(list)
                for r, (ki, l) in enumerate(chunk):
                    for m in restored_layers(KINDS[ki], l, window, L):
                        rows_of[ki, m].append(r)
                n = len(chunk)
                mask = torch.ones(n, T, dtype=torch.long, device=lm.device)
                with ExitStack() as stack:
                    stack.enter_context(corrupted(lm, eps, b, offset=i))
                    for (ki, m), rows in rows_of.items():
                        value, idx = clean[KINDS[ki]][m, i], torch.tensor(rows, device=lm.device)
                        stack.enter_context(lm.hooks.hook(
                            site_name(SITES[KINDS[ki]], m),
                            lambda t, idx=idx, value=value: _restore(t, idx, 0, value)))
                    out = lm.model(input_ids=suffix.expand(n, -1), attention_mask=mask, cache=prefix,
                                   use_cache=prefix is not None, logits_to_keep=1)
                p = answer_probs(out.logits[:, -1], answer).cpu()
                for r, (ki, l) in enumerate(chunk):
                    restored[s, ki, l, i] = p[r]
    return FactTrace(p_clean, sum(p_corrupt) / len(p_corrupt), restored.mean(0))


__all__ = ["FactTrace", "SITES", "answer_probs", "clean_run", "restored_layers", "trace_grid", "window_layers"]
