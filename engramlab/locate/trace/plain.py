"""The plain reference of the causal-tracing grid: one full forward pass per cell and noise draw.

Written apart from ``grid.trace_grid`` (its own noise hook, window and restoration) so that the
batched grid is checked against a computation that shares none of its shortcuts: no prefix
cache, no skipped cells before the subject, batch 1, every token of the prompt in every pass.
tests/test_trace.py checks the two agree; benchmarks/bench_trace.py times both.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch

from engramlab.locate.trace.grid import FactTrace
from engramlab.models.hooks import site_name

_SITE = {"resid": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}
_KINDS = ("resid", "mlp", "attn")


@torch.no_grad()
def trace_plain(lm, ids: Sequence[int], span: tuple[int, int], answer: int, noise: torch.Tensor,
                window: int) -> FactTrace:
    """The grid of ``grid.trace_grid`` (same arguments, same meaning), cell by cell."""
    ids = torch.tensor([[int(i) for i in ids]], device=lm.device)
    T, L, (b, e) = ids.shape[1], lm.adapter.n_layers, span

    def prob(logits):
        return float(torch.softmax(logits[0, -1].float(), dim=-1)[answer])

    names = [site_name(_SITE[k], l) for k in _KINDS for l in range(L)]
    with lm.hooks.capture(names) as clean:
        p_clean = prob(lm.model(input_ids=ids).logits)

    def noisy(eps):
        def hook(module, args, out):
            out = out.clone()
            out[0, b:e] = out[0, b:e] + eps.to(out.device, out.dtype)
            return out
        return lm.adapter.embed.register_forward_hook(hook)

    def put(name, i):
        def fn(t):
            t = t.clone()
            t[0, i] = clean[name][0, i]
            return t
        return fn

    restored = torch.zeros(noise.shape[0], 3, L, T, dtype=torch.float32)
    corrupt = []
    for s, eps in enumerate(noise):
        handle = noisy(eps)
        try:
            corrupt.append(prob(lm.model(input_ids=ids).logits))
            for ki, kind in enumerate(_KINDS):
                for layer in range(L):
                    if kind == "resid":
                        layers = [layer]
                    else:
                        lo, hi = layer - window // 2, layer + (window + 1) // 2
                        layers = [m for m in range(lo, hi) if 0 <= m < L]
                    for i in range(T):
                        with ExitStack() as stack:
                            for m in layers:
                                name = site_name(_SITE[kind], m)
                                stack.enter_context(lm.hooks.hook(name, put(name, i)))
                            restored[s, ki, layer, i] = prob(lm.model(input_ids=ids).logits)
        finally:
            handle.remove()
    return FactTrace(p_clean, sum(corrupt) / len(corrupt), restored.mean(0))


__all__ = ["trace_plain"]
