"""The corruption of causal tracing: Gaussian noise on the subject tokens' input embeddings.

    x_p  <-  x_p + eps_p,   eps_p ~ N(0, sigma^2 I_d),   p in the subject span [b, e)

where x_p (d_model,) is the output of the input embedding module (``adapter.embed``) at position p
and ``sigma = noise x std``. ``std`` is one number, the standard deviation of every element of a
sample of embeddings (``embedding_std``):

* ``subjects`` (ROME's choice, ``collect_embedding_std`` over its known facts' subjects): the
  embeddings of the subject tokens of the traced facts, all elements pooled;
* ``embedding``: the embedding module's output for every token of the vocabulary.

The noise of fact k is drawn once, on the CPU in float32, from a generator seeded with
``seed * 1_000_003 + k`` (``fact_noise``), so a fact's trace does not depend on the device, on the
batch size or on the other facts (beyond sigma under ``subjects``) and repeats bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

SEED_STRIDE = 1_000_003


def fact_noise(seed: int, index: int, samples: int, n_tokens: int, d_model: int, sigma: float) -> torch.Tensor:
    """(samples, n_tokens, d_model) float32: ``sigma`` x standard normal draws for fact ``index``."""
    g = torch.Generator().manual_seed(int(seed) * SEED_STRIDE + int(index))
    return torch.randn((samples, n_tokens, d_model), generator=g, dtype=torch.float32) * float(sigma)


@torch.no_grad()
def embedding_std(lm, sample: str, subject_ids: Sequence[Sequence[int]] = ()) -> float:
    """Std (unbiased, float64) of every element of the embedding module's output over ``sample``:
    the tokens of ``subject_ids`` (``subjects``) or the whole vocabulary (``embedding``)."""
    embed = lm.adapter.embed
    device = embed.weight.device
    if sample == "subjects":
        flat = [int(i) for ids in subject_ids for i in ids]
        if not flat:
            return float("nan")
        chunks = [torch.tensor(flat, device=device)]
    else:
        n = embed.weight.shape[0]
        chunks = [torch.arange(s, min(s + 4096, n), device=device) for s in range(0, n, 4096)]
    total, sq, count = 0.0, 0.0, 0
    for c in chunks:  # two sums in float64: the std of a vocabulary-sized sample without holding it
        x = embed(c[None]).double()
        total += float(x.sum())
        sq += float((x * x).sum())
        count += x.numel()
    mean = total / count
    return float(max(sq - count * mean * mean, 0.0) / max(count - 1, 1)) ** 0.5


@contextmanager
def corrupted(lm, noise: torch.Tensor | None, start: int, offset: int = 0) -> Iterator[None]:
    """Add ``noise`` (n, d_model) to the input embeddings at absolute positions start..start+n-1.

    ``offset`` is the absolute position of the first token of the forward passes run inside the
    block (a pass continuing a cached prefix of ``offset`` tokens); positions outside the pass are
    left alone. ``noise`` None: nothing is added."""
    if noise is None:
        yield
        return
    n = noise.shape[0]

    def hook(module, args, out):
        width = out.shape[1]
        lo, hi = max(start, offset), min(start + n, offset + width)
        if lo >= hi:
            return None
        out = out.clone()
        out[:, lo - offset:hi - offset] += noise[lo - start:hi - start].to(device=out.device, dtype=out.dtype)
        return out

    handle = lm.adapter.embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["SEED_STRIDE", "corrupted", "embedding_std", "fact_noise"]
