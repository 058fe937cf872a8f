"""Small random-weight models built from configs, one per supported family (tests, smoke runs).

Nothing is downloaded: the configs are written here. ``tiny_model("llama")`` has grouped-query
attention (4 query heads over 2 key/value heads) so GQA paths are exercised.
"""

from __future__ import annotations

import torch

from engramlab.errors import EngramError

FAMILIES = ("llama", "gpt2", "gpt_neox")


def tiny_config(family: str, vocab_size: int = 64, d_model: int = 32, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int | None = 2, d_mlp: int = 64, max_pos: int = 64, **extra):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                           num_hidden_layers=n_layers, num_attention_heads=n_heads,
                           num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=max_pos,
                           tie_word_embeddings=False, **extra)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
                          n_positions=max_pos, bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             max_position_embeddings=max_pos, rotary_pct=0.5, **extra)
    raise EngramError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")


def tiny_model(family: str, seed: int = 0, **config_kwargs):
    """A random-weight, eval-mode HF causal LM of ``family`` (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
