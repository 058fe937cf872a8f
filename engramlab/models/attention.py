"""An eager attention function that exposes the attention pattern as a hook site.

Fused kernels (SDPA, flash) never materialise the (q_pos, k_pos) probability matrix, so the
``attn.pattern`` site cannot be a plain module hook. Instead engramlab registers this function with
transformers' attention and mask interfaces under the name ``ENGRAM_ATTENTION``; while a pattern
hook is active, ``HookPoints`` switches the model's ``_attn_implementation`` to it and back.
The arithmetic follows transformers' own eager path (scores in the model's dtype, softmax in
float32), so outputs agree with the default implementation to floating-point tolerance.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ENGRAM_ATTENTION = "engram_eager"

# module -> list of functions (pattern -> new pattern or None), filled by HookPoints.
PATTERN_HOOKS: dict[nn.Module, list] = {}


def engram_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (b, n_heads, q, d_head); key/value (b, n_kv_heads, k, d_head) -> (b, q, n_heads, d_head)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: query head h reads kv head h // groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    for fn in PATTERN_HOOKS.get(module, ()):
        new = fn(pattern)
        if new is not None:
            pattern = new
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(ENGRAM_ATTENTION, engram_attention_forward)
AttentionMaskInterface.register(ENGRAM_ATTENTION, eager_mask)
