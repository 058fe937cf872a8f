"""A prompt prefix run once, its keys/values shared by every row of later forward passes.

Scoring many variants of one prompt (neuron sets suppressed at the last prompt token, integration
points of one layer) changes nothing before the last prompt token: the model is causal. So the
prefix (positions 0..P-2) runs once, with batch 1, and each later forward pass puts its keys and
values in front of every row's own, per layer:

    K_l = cat(K_prefix_l.expand(rows, ...), K_new_l)    (1, kv, P-1, d) + (rows, kv, S, d) -> (rows, kv, P-1+S, d)

``PrefixCache`` is an HF ``Cache`` that does that and stores nothing: it never grows, so one object
serves any number of forward passes of any batch size, and decoder layers may be called in any
order (the batched IG kernel calls them itself). Passing it as ``cache=`` gives the same keys and
values as a copy of HF's cache repeated per row (``batch_repeat_interleave``), without the copies.
Mask sizes and the sequence length are read from HF's own cache layers after the prefix pass, so
sliding-window layers (which keep only the last window - 1 positions) mask exactly as HF does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engramlab.errors import EngramError


class _SharedLayer(CacheLayerMixin):
    """One layer's prefix keys/values (1, kv_heads, P', d_head), read-only; P' = P-1, or the last
    window - 1 positions of a sliding-window layer."""

    is_compileable = False

    def __init__(self, inner: CacheLayerMixin):
        super().__init__()
        self.inner = inner
        self.keys, self.values, self.is_initialized = inner.keys, inner.values, inner.is_initialized
        self.is_sliding = getattr(inner, "is_sliding", False)

    def lazy_initialization(self, key_states, value_states) -> None:  # never empty: nothing to set up
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """(rows, kv, S, d) new keys/values -> (rows, kv, P'+S, d), the prefix in front; nothing kept."""
        if self.keys is None or self.keys.numel() == 0:
            return key_states, value_states
        rows = key_states.shape[0]
        return (torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.inner.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.inner.get_seq_length()

    def get_max_length(self) -> int:
        return self.inner.get_max_length()

    def _read_only(self, *args, **kwargs):
        raise EngramError("a PrefixCache is shared by every forward pass and cannot be changed; build a new one")

    reset = crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = _read_only


class PrefixCache(Cache):
    """The keys/values of ``ids`` (a prompt prefix), shared by every row of every forward pass it
    is passed to as ``cache=`` (see the module docstring). Build it with ``PrefixCache.run``."""

    def __init__(self, cache: Cache, ids: Sequence[int]):
        layers = []
        for layer in cache.layers:
            if not isinstance(layer, CacheLayerMixin):
                raise EngramError(f"PrefixCache: cache layers of kind {type(layer).__name__} (no keys/values) are "
                                  "not supported; score without a prefix cache")
            layers.append(_SharedLayer(layer))
        super().__init__(layers=layers)
        self.ids = tuple(int(i) for i in ids)

    @property
    def length(self) -> int:
        """Tokens in the prefix."""
        return len(self.ids)

    @classmethod
    def run(cls, lm, ids: Sequence[int]) -> "PrefixCache":
        """One forward pass of ``ids`` (batch 1, no padding, no gradients): the prefix's cache.
        Hooks active around the call see that pass (the IG kernel records activations there)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise EngramError("PrefixCache.run needs at least one token; a one-token prompt has no prefix to share")
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True)
        return cls(out.cache, ids)
