"""Small random-weight models built from configs, one per supported model type (tests, smoke runs).

Nothing is downloaded: the configs are written here. ``tiny_model("llama")`` has grouped-query
attention (4 query heads over 2 key/value heads) so GQA paths are exercised. Every model type
the adapters accept has a tiny config (``MODEL_TYPES``), each set to exercise what is particular
to its family:

===========  ====================================================================================
type         what the tiny config exercises
===========  ====================================================================================
llama        GQA (4 query heads, 2 key/value heads)
mistral      GQA and a sliding window (4 tokens) shorter than the test sequences
qwen2        q/k/v biases; a sliding window on layer 1 only
qwen3        per-head q/k RMSNorm after the projections; q/k/v biases
smollm3      tied embeddings; layer 1 without rotary embeddings (NoPE)
olmo         non-parametric LayerNorm; q/k/v clipping (``clip_qkv``)
gemma        RMSNorm scaled by (1 + weight); embeddings scaled by sqrt(d_model); tied
             embeddings; d_head (16) != d_model / n_heads (8)
phi3         fused ``qkv_proj`` and ``gate_up_proj``; GQA
gpt2         Conv1D projections, learned positions, LayerNorm with bias
gpt_neox     fused per-head QKV, partial rotary; parallel residual (``use_parallel_residual=False``
             for the sequential one)
===========  ====================================================================================
"""

from __future__ import annotations

import torch

from engramlab.errors import EngramError

# One per adapter family of the original set; tests parametrised over these stay small.
FAMILIES = ("llama", "gpt2", "gpt_neox")

# Special token ids inside the tiny vocabulary, for configs whose defaults are ids > 32000.
_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}

# Llama-like types: extra config fields that make the tiny model exercise the family's quirks.
_LLAMA_LIKE = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "qwen3": {"head_dim": 8, "attention_bias": True},
    "smollm3": {"no_rope_layer_interval": 2, **_IDS},
    "olmo": {"clip_qkv": 0.1, **_IDS},
    "gemma": {"head_dim": 16},
    "phi3": _IDS,
}
MODEL_TYPES = (*_LLAMA_LIKE, "gpt2", "gpt_neox")


def tiny_config(family: str, vocab_size: int = 64, d_model: int = 32, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int | None = 2, d_mlp: int = 64, max_pos: int = 64, **extra):
    """A HF config of model type ``family`` (one of ``MODEL_TYPES``); ``extra`` overrides fields."""
    from transformers import AutoConfig, GPT2Config, GPTNeoXConfig

    if family in _LLAMA_LIKE:
        fields = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=max_pos)
        return AutoConfig.for_model(family, **{**fields, **_LLAMA_LIKE[family], **extra})
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
                          n_positions=max_pos, bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **extra)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             max_position_embeddings=max_pos, rotary_pct=0.5, **extra)
    raise EngramError(f"unknown tiny model type {family!r}: choose one of {', '.join(MODEL_TYPES)}")


def tiny_model(family: str, seed: int = 0, **config_kwargs):
    """A random-weight, eval-mode HF causal LM of model type ``family`` (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
