"""Model presets for training from scratch: plain HF configs, Llama-style or GPT-2-style.

``--model-config`` takes a preset name (``tiny``, ``small``, ``paper``; append ``-gpt2`` for the
GPT-2 style, e.g. ``tiny-gpt2``), or a path to a HF ``config.json`` / model directory whose
config is reused with fresh random weights. The vocabulary size always comes from the tokenizer.

==========  ======  =====  =======  =====  ===========================================
preset      layers  heads  d_model  d_mlp  use
==========  ======  =====  =======  =====  ===========================================
tiny        2       4      128      512    CPU, seconds to minutes (tests, dynamics demos)
tiny4       4       4      128      512    CPU, minutes: enough depth for layer-order findings
small       4       4      256      1024   CPU, tens of minutes
paper       8       8      512      1365   the fact-learning paper's "44M" model (GPU)
paper-gpt2  8       8      512      2048   the same, GPT-2 style: Chinchilla's exact shape
==========  ======  =====  =======  =====  ===========================================

Dropout (``TrainConfig.dropout``) is switched on by the trainer with ``set_dropout``: a GPT-2
preset also carries it in its config (resid/embd/attn_pdrop, as GPT-2 was trained with 0.1);
a family without dropout modules (Llama, SmolLM2) gets it from forward hooks and attribute
settings that live only in the training process, so its checkpoints' config.json never holds it.

``paper`` matches the reference's parameter count, not its MLP width: a GPT-2 MLP has two
d_model x d_mlp matrices, a Llama (SwiGLU) MLP three, so the Llama preset uses
d_mlp = 2 * 2048 / 3 ~ 1365 and both styles hold ~25.2M non-embedding parameters
(12 * n_layers * d_model^2). Before 2026-12 ``paper`` used d_mlp 2048 (33.6M non-embedding);
``--model-config`` with a config.json reproduces that shape if wanted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from engramlab.errors import EngramError

PRESETS = {
    "tiny": dict(n_layers=2, n_heads=4, d_model=128, d_mlp=512),
    "tiny4": dict(n_layers=4, n_heads=4, d_model=128, d_mlp=512),
    "small": dict(n_layers=4, n_heads=4, d_model=256, d_mlp=1024),
    "paper": dict(n_layers=8, n_heads=8, d_model=512, d_mlp=2048),
}
#: Per-style MLP widths that differ from PRESETS (SwiGLU: 3 matrices instead of 2).
LLAMA_D_MLP = {"paper": 1365}
STYLES = ("llama", "gpt2")


def preset_names() -> list[str]:
    return [f"{p}{'' if s == 'llama' else '-' + s}" for p in PRESETS for s in STYLES]


def make_config(spec: str, vocab_size: int, max_len: int, tokenizer=None, dropout: float = 0.0):
    """A ``transformers`` config for SPEC (see module docstring) sized for ``vocab_size``;
    ``dropout`` sets a GPT-2 preset's resid/embd/attn_pdrop (Llama presets: see ``set_dropout``)."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(tokenizer, k, None) is not None}
    name, _, style = spec.partition("-")
    style = style or "llama"
    if name in PRESETS and style in STYLES:
        p = PRESETS[name]
        if style == "llama":
            d_mlp = LLAMA_D_MLP.get(name, p["d_mlp"])
            return LlamaConfig(vocab_size=vocab_size, hidden_size=p["d_model"], intermediate_size=d_mlp,
                               num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
                               num_key_value_heads=p["n_heads"], max_position_embeddings=max_len,
                               tie_word_embeddings=False, rope_theta=10000.0, **special)
        return GPT2Config(vocab_size=vocab_size, n_embd=p["d_model"], n_layer=p["n_layers"], n_head=p["n_heads"],
                          n_inner=p["d_mlp"], n_positions=max_len, resid_pdrop=dropout, embd_pdrop=dropout,
                          attn_pdrop=dropout, **special)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngramError(f"--model-config {spec}: not a valid JSON config ({e}); give a HF config.json") from e
        if "model_type" not in data:
            raise EngramError(f"--model-config {spec}: no \"model_type\" key; give a HF config.json")
        config = AutoConfig.for_model(**data)
        config.vocab_size = vocab_size
        for k, v in special.items():
            setattr(config, k, v)
        return config
    raise EngramError(f"--model-config {spec!r}: not a preset ({', '.join(preset_names())}) "
                      "nor a HF config.json / model directory")


def build_model(spec: str, vocab_size: int, max_len: int, seed: int, tokenizer=None,
                dropout: float = 0.0) -> torch.nn.Module:
    """A freshly initialised causal LM (deterministic for ``seed``), in train mode."""
    from transformers import AutoModelForCausalLM

    config = make_config(spec, vocab_size, max_len, tokenizer, dropout)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; tied weights count once.

    Non-embedding leaves out every ``nn.Embedding`` (tokens; GPT-2's learned positions) and
    the output projection (lm_head, when it is not tied to the token embedding), the
    convention of Kaplan et al. and of the "44M non-embedding" of the fact-learning paper.
    """
    params = {id(p): p.numel() for p in model.parameters()}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        embedding |= {id(p) for p in out.parameters()}
    total = sum(params.values())
    return total, total - sum(n for i, n in params.items() if i in embedding)


#: Config keys of GPT-2-style dropout, updated so a saved config says what training used.
_PDROP_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _dropout_hook(p: float):
    """Forward hook: y = x * m / (1 - p), m ~ Bernoulli(1 - p) per element (``F.dropout``), on
    the output x (B, T, d) in train mode (the first element of a tuple output, e.g. an attention
    module's (attn_output, weights)); the output untouched in eval mode."""

    def hook(module, args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    return hook


def set_dropout(model: torch.nn.Module, adapter, p: float) -> list:
    """Train ``model`` with dropout ``p`` where GPT-2 has it; returns the hook handles added.

    Every ``nn.Dropout`` of the model gets p (GPT-2: embeddings, attention probabilities,
    attention and MLP outputs; also its resid/embd/attn_pdrop config keys), and every attention
    module's float ``attention_dropout`` (Llama: dropout on attention probabilities, read in
    train mode only) is set to p. A family without ``nn.Dropout`` modules (Llama) also gets
    forward hooks that drop the token embeddings and each layer's attention and MLP outputs
    (before they join the residual stream), so p acts at GPT-2's places. ``adapter``
    (``models.adapters.ArchAdapter``) names the attention and MLP modules. p = 0 adds no hooks,
    so training is unchanged bit for bit. Hooks and attributes live only in this process:
    ``save_pretrained`` writes no Llama dropout, and all of it is off in ``model.eval()``.
    """
    own = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for module in own:
        module.p = p
    for module in model.modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            module.attention_dropout = p
    for key in _PDROP_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    if own or p == 0:
        return []
    hook = _dropout_hook(p)
    targets = [model.get_input_embeddings()]
    targets += [m for l in range(adapter.n_layers) for m in (adapter.attn(l), adapter.mlp(l))]
    return [m.register_forward_hook(hook) for m in targets]
