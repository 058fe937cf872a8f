"""Architecture adapters: one small class per model family that names the parts of a HF model.

The model itself stays an ordinary ``transformers`` module (no weight conversion, no LayerNorm
folding), so every number engramlab computes matches the HF forward pass exactly. An adapter only
knows where things are: the decoder layers, the attention and MLP sub-modules, the module whose
*input* is the concatenation of head outputs (the attention output projection), the module whose
input is the MLP neurons (the MLP output projection), and how the Q/K/V/O weights split by head.

Weight accessors return *views* of the live parameters reshaped per head, so editing them edits
the model and gradients flow through them:

=============  ===================================  ===========================================
accessor       shape                                meaning
=============  ===================================  ===========================================
``W_Q(l)``     (n_heads, d_model, d_head)           q_h = x_norm @ W_Q[h] (+ b_Q[h])
``W_K(l)``     (n_kv_heads, d_model, d_head)        grouped-query: query head h reads kv head
``W_V(l)``     (n_kv_heads, d_model, d_head)        ``kv_head(h)``
``W_O(l)``     (n_heads, d_head, d_model)           attn_out = sum_h z_h @ W_O[h] + b_O
``W_in(l)``    (d_model, d_mlp)                     up / fc projection
``W_gate(l)``  (d_model, d_mlp) or None             gated MLPs only
``W_out(l)``   (d_mlp, d_model)                     mlp_out = neurons @ W_out + b_out
``W_U``        (d_model, vocab)                     logits = final_norm(resid) @ W_U
=============  ===================================  ===========================================

Everything family-specific lives in this file, so adding a family touches it alone: besides the
paths and weight views, an adapter says where the hook sites that sit *inside* a module's output
are (``qkv_site``: q/k/v, one of three projections or a slice of a fused one; ``mlp_pre``: the
pre-activation) and how its norms fold into the weights that read them (``norm_spec``). Other
modules ask the adapter and never compare family names or class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import nn

from engramlab.errors import EngramError


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight of a projection as (in_features, out_features), a view of the live parameter:
    out = x @ linear_weight(module) + bias, for nn.Linear (stored (out, in)) and GPT-2's Conv1D
    (stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight
    return w if isinstance(module, Conv1D) else w.t()


def weight_in_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that indexes input features: 1 for nn.Linear (stored (out,
    in)), 0 for GPT-2's Conv1D (stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return 0 if isinstance(module, Conv1D) else 1


def d_model_axis(module: nn.Module, reads: bool) -> int:
    """Axis of ``module.weight`` (as stored) that indexes d_model: the input axis for a projection
    that reads the residual stream (``reads``), the output axis for one that writes it. nn.Linear
    stores (out, in), GPT-2's Conv1D (in, out)."""
    stored_in = weight_in_axis(module)
    return stored_in if reads else 1 - stored_in


# -- views of a tensor inside a module's output ---------------------------------------------------
# A view is a pair (get, put): get(raw) is the site tensor inside the module's raw output; put(raw,
# view) is the raw tensor with ``view`` written back, exactly (an unchanged view gives raw back bit
# for bit). Both also work on the gradient of raw, which has raw's shape.
View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def whole() -> View:
    """The raw tensor itself."""
    return (lambda raw: raw), (lambda raw, view: view)


def split_last(n: int, d: int) -> View:
    """View (..., n*d) as (..., n, d) and back."""
    return (lambda raw: raw.unflatten(-1, (n, d)), lambda raw, view: view.flatten(-2))


def chunk_last(start: int, stop: int) -> View:
    """View a chunk [start:stop) of the last axis; write it back by concatenation."""

    def get(raw):
        return raw[..., start:stop]

    def put(raw, view):
        return torch.cat([raw[..., :start], view, raw[..., stop:]], dim=-1)

    return get, put


def slice_last(start: int, stop: int, n: int, d: int) -> View:
    """View a chunk [start:stop) of the last axis as (..., n, d); write it back by concatenation."""
    get, put = chunk_last(start, stop)
    return (lambda raw: get(raw).unflatten(-1, (n, d)), lambda raw, view: put(raw, view.flatten(-2)))


def _neox_qkv(which: int, n: int, d: int) -> View:
    """NeoX's fused projection output is (..., n_heads, 3, d_head) per position: q, k or v."""

    def get(raw):
        return raw.unflatten(-1, (n, 3, d))[..., which, :]

    def put(raw, view):
        parts = list(raw.unflatten(-1, (n, 3, d)).unbind(-2))
        parts[which] = view
        return torch.stack(parts, dim=-2).flatten(-3)

    return get, put


class ModuleView(NamedTuple):
    """A tensor inside ``module``'s output: ``get(output)`` views it, ``put(output, view)`` writes
    it back (see ``View``)."""

    module: nn.Module
    get: Callable[[torch.Tensor], torch.Tensor]
    put: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- norms ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormSpec:
    """What a norm module computes, for folding it into the weights that read it.

    With x (..., d_model), c = x - mean(x) if ``centred`` else x, and rstd = 1 / sqrt(mean(c^2) + eps):

        norm(x) = gain * c * rstd + bias          (gain, bias: (d_model,) or None = 1 / 0)

    ``kind`` is "layer" (LayerNorm: centred), "rms" (RMSNorm: not centred) or None (a norm this
    adapter does not know: no closed form; apply the module itself). ``gain`` is the *effective*
    elementwise scale (Gemma's RMSNorm stores w and scales by 1 + w), detached float32.
    """

    kind: Literal["layer", "rms"] | None
    gain: torch.Tensor | None = None
    centred: bool = False
    eps: float = 0.0
    bias: torch.Tensor | None = None

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d) -> (x_hat (..., d), rstd (..., 1)) in float32: x_hat = c * rstd, before gain."""
        xf = x.float()
        if self.centred:
            xf = xf - xf.mean(-1, keepdim=True)
        rstd = (xf.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()
        return xf * rstd, rstd

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x) from the formula above, float32 (what the module computes, to rounding)."""
        y = self.normalise(x)[0]
        if self.gain is not None:
            y = y * self.gain
        return y if self.bias is None else y + self.bias


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _layer_norm_spec(norm: nn.Module) -> NormSpec | None:
    """torch's nn.LayerNorm over the last axis, else None."""
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return NormSpec("layer", _detached(norm.weight), True, float(norm.eps), _detached(norm.bias))
    return None


class ArchAdapter:
    """Names the parts of one family of decoder-only HF models. Subclasses fill in the paths."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    # Memory planning (``engramlab.plan``): elements per row and position one layer keeps for
    # backward, per d_model, per d_mlp and per attended position (the mask), counted with autograd's
    # saved-tensor hooks; and what a no-grad forward holds at once inside a layer, per d_model and
    # per d_mlp (fitted on the tiny models). docs/plan.md gives the formulas.
    saved_for_backward: tuple[float, float, float] = (4.0, 3.0, 1.0)
    forward_working_set: tuple[float, float] = (3.9, 2.3)
    has_gated_mlp: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.n_layers: int = len(self.layers)
        self.d_model: int = cfg.hidden_size
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.vocab_size: int = cfg.vocab_size

    # -- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attn(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def attn_o_proj(self, layer: int) -> nn.Module:
        """Module whose input is the per-head outputs concatenated, (b, pos, n_heads*d_head)."""
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp_out_proj(self, layer: int) -> nn.Module:
        """Module whose input is the MLP neurons, (b, pos, d_mlp)."""
        raise NotImplementedError

    def attn_norm(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp_norm(self, layer: int) -> nn.Module:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def block_matrices(self, layer: int) -> dict[str, nn.Module]:
        """The projections of decoder layer ``layer`` (path inside the layer -> module): every
        nn.Linear or Conv1D in it, i.e. q/k/v/o and gate/up/down, GPT-2's c_attn/c_proj/c_fc, or a
        family's fused projections, in registration order. Norms, biases and rotary tables are not
        modules of these types; the embeddings and the unembedding sit outside the layers."""
        from transformers.pytorch_utils import Conv1D

        return {name: m for name, m in self.layers[layer].named_modules()
                if isinstance(m, (nn.Linear, Conv1D)) and m.weight.dim() == 2}

    def block_norms(self, layer: int) -> list[nn.Module]:
        """The residual-stream norms of decoder layer ``layer``: attention norm, MLP norm."""
        return [self.attn_norm(layer), self.mlp_norm(layer)]

    def qkv_site(self, layer: int, which: int) -> ModuleView:
        """Where q (which=0), k (1) or v (2) of ``layer`` sits: the projection module and the view
        of its output as (batch, pos, n_heads or n_kv_heads, d_head), before rotary or q/k norms."""
        raise NotImplementedError

    def mlp_pre(self, layer: int) -> ModuleView:
        """Where the MLP pre-activation (batch, pos, d_mlp) sits: the gate projection's output
        (gated MLPs) or the fc output (plain ones), before the activation function."""
        raise NotImplementedError

    def norm_spec(self, norm: nn.Module) -> NormSpec:
        """What ``norm`` (one of this model's norm modules) computes (``NormSpec``); kind None
        for a module the adapter does not know."""
        return _layer_norm_spec(norm) or NormSpec(None)

    def residual_readers(self, layer: int) -> tuple[nn.Module, ...]:
        """The projections of ``layer`` whose input is the (normed) residual stream, d_model wide:
        q/k/v (or the fused qkv) and the MLP input projections (gate and up, or fc)."""
        raise NotImplementedError

    def residual_writers(self, layer: int) -> tuple[nn.Module, ...]:
        """The projections of ``layer`` whose output is added to the residual stream, d_model wide."""
        return self.attn_o_proj(layer), self.mlp_out_proj(layer)

    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP both read the layer input (no resid_mid exists)."""
        return False

    @property
    def d_mlp(self) -> int:
        return self.W_out(0).shape[0]

    def kv_head(self, head: int) -> int:
        """Index of the key/value head that query head ``head`` reads (grouped-query attention)."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range for {self.n_heads} heads")
        return head // (self.n_heads // self.n_kv_heads)

    # -- weights (views of live parameters) -------------------------------------------------
    def _qkv_in_out(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_q, W_k, W_v) as (d_model, out) matrices; subclasses override."""
        raise NotImplementedError

    def W_Q(self, layer: int) -> torch.Tensor:
        w = self._qkv_in_out(layer)[0]
        return w.reshape(self.d_model, self.n_heads, self.d_head).permute(1, 0, 2)

    def W_K(self, layer: int) -> torch.Tensor:
        w = self._qkv_in_out(layer)[1]
        return w.reshape(self.d_model, self.n_kv_heads, self.d_head).permute(1, 0, 2)

    def W_V(self, layer: int) -> torch.Tensor:
        w = self._qkv_in_out(layer)[2]
        return w.reshape(self.d_model, self.n_kv_heads, self.d_head).permute(1, 0, 2)

    def W_O(self, layer: int) -> torch.Tensor:
        w = linear_weight(self.attn_o_proj(layer))  # (n_heads*d_head, d_model)
        return w.reshape(self.n_heads, self.d_head, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        return getattr(self.attn_o_proj(layer), "bias", None)

    def W_in(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def W_gate(self, layer: int) -> torch.Tensor | None:
        return None

    def W_out(self, layer: int) -> torch.Tensor:
        return linear_weight(self.mlp_out_proj(layer))

    def b_out(self, layer: int) -> torch.Tensor | None:
        return getattr(self.mlp_out_proj(layer), "bias", None)

    @property
    def W_U(self) -> torch.Tensor:
        return self.unembed.weight.t()

    def describe(self) -> dict:
        """Sizes, as a flat dict (for ``engram inspect`` and manifests)."""
        return {
            "family": self.family,
            "model_type": self.model.config.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
            "gated_mlp": self.has_gated_mlp,
            "parallel_residual": self.parallel_residual,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }


class LlamaAdapter(ArchAdapter):
    """Llama-like pre-norm decoders: separate q/k/v projections, gated MLP (gate_proj, up_proj).

    Llama and SmolLM2 (``llama``), Mistral, Qwen2, Qwen3 (per-head q/k norms sit after the q/k
    sites), SmolLM3, OLMo (non-parametric LayerNorm), Gemma (RMSNorm with 1 + weight)."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "gemma")
    has_gated_mlp = True

    # The norm classes of these types (transformers' modeling files), by what they compute:
    # gain * x / sqrt(mean x^2 + eps) with gain = weight (plain) or 1 + weight (Gemma), and OLMo's
    # LayerNorm without weight or bias (its eps, 1e-5, is written in its forward, not stored).
    _PLAIN_RMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm",
                  "Phi3RMSNorm")
    _ONE_PLUS_RMS = ("GemmaRMSNorm",)
    _BARE_LAYER_NORM = {"OlmoLayerNorm": 1e-5}

    @property
    def layers(self):
        return self.model.model.layers

    def attn(self, layer):
        return self.layers[layer].self_attn

    def attn_o_proj(self, layer):
        return self.attn(layer).o_proj

    def mlp(self, layer):
        return self.layers[layer].mlp

    def mlp_out_proj(self, layer):
        return self.mlp(layer).down_proj

    def attn_norm(self, layer):
        return self.layers[layer].input_layernorm

    def mlp_norm(self, layer):
        return self.layers[layer].post_attention_layernorm

    @property
    def final_norm(self):
        return self.model.model.norm

    def norm_spec(self, norm):
        name = type(norm).__name__
        if name in self._PLAIN_RMS or name in self._ONE_PLUS_RMS:
            gain = norm.weight.detach().float()
            eps = getattr(norm, "variance_epsilon", None)
            return NormSpec("rms", 1.0 + gain if name in self._ONE_PLUS_RMS else gain, False,
                            float(norm.eps if eps is None else eps))
        if name in self._BARE_LAYER_NORM:
            return NormSpec("layer", None, True, self._BARE_LAYER_NORM[name])
        return super().norm_spec(norm)

    def qkv_site(self, layer, which):
        proj = (self.attn(layer).q_proj, self.attn(layer).k_proj, self.attn(layer).v_proj)[which]
        return ModuleView(proj, *split_last(self.n_heads if which == 0 else self.n_kv_heads, self.d_head))

    def mlp_pre(self, layer):
        return ModuleView(self.mlp(layer).gate_proj, *whole())

    def residual_readers(self, layer):
        a, m = self.attn(layer), self.mlp(layer)
        return a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj

    def _qkv_in_out(self, layer):
        a = self.attn(layer)
        return a.q_proj.weight.t(), a.k_proj.weight.t(), a.v_proj.weight.t()

    def W_in(self, layer):
        return self.mlp(layer).up_proj.weight.t()

    def W_gate(self, layer):
        return self.mlp(layer).gate_proj.weight.t()


class Phi3Adapter(LlamaAdapter):
    """Phi-3: the Llama layout with fused projections, seen through views of the fused weights.

    ``qkv_proj`` (out = n_heads*d_head + 2*n_kv_heads*d_head) stacks [q | k | v] along its output;
    ``gate_up_proj`` (out = 2*d_mlp) stacks [gate | up] (the MLP computes up * act(gate))."""

    family = "phi3"
    model_types = ("phi3",)

    def qkv_bounds(self) -> tuple[int, int, int, int]:
        """Output-column boundaries of q, k and v in ``qkv_proj``: (0, q_end, k_end, v_end)."""
        q_end = self.n_heads * self.d_head
        k_end = q_end + self.n_kv_heads * self.d_head
        return 0, q_end, k_end, k_end + self.n_kv_heads * self.d_head

    def qkv_site(self, layer, which):
        b, n = self.qkv_bounds(), self.n_heads if which == 0 else self.n_kv_heads
        return ModuleView(self.attn(layer).qkv_proj, *slice_last(b[which], b[which + 1], n, self.d_head))

    def mlp_pre(self, layer):  # the gate half of [gate | up]
        return ModuleView(self.mlp(layer).gate_up_proj, *chunk_last(0, self.d_mlp))

    def residual_readers(self, layer):
        return self.attn(layer).qkv_proj, self.mlp(layer).gate_up_proj

    def _qkv_in_out(self, layer):
        w = self.attn(layer).qkv_proj.weight.t()  # (d_model, q_end + 2 * n_kv_heads * d_head)
        b = self.qkv_bounds()
        return tuple(w[:, b[i]: b[i + 1]] for i in range(3))

    def _gate_up(self, layer: int) -> torch.Tensor:
        return self.mlp(layer).gate_up_proj.weight.t()  # (d_model, 2 * d_mlp): [gate | up]

    def W_in(self, layer):
        w = self._gate_up(layer)
        return w[:, w.shape[1] // 2:]

    def W_gate(self, layer):
        w = self._gate_up(layer)
        return w[:, : w.shape[1] // 2]


class GPT2Adapter(ArchAdapter):
    """GPT-2: LayerNorm, learned positions, Conv1D projections (weights stored (in, out))."""

    family = "gpt2"
    model_types = ("gpt2",)
    saved_for_backward = (5.0, 4.0, 4.0)
    forward_working_set = (5.0, 3.0)

    @property
    def layers(self):
        return self.model.transformer.h

    def attn(self, layer):
        return self.layers[layer].attn

    def attn_o_proj(self, layer):
        return self.attn(layer).c_proj

    def mlp(self, layer):
        return self.layers[layer].mlp

    def mlp_out_proj(self, layer):
        return self.mlp(layer).c_proj

    def attn_norm(self, layer):
        return self.layers[layer].ln_1

    def mlp_norm(self, layer):
        return self.layers[layer].ln_2

    @property
    def final_norm(self):
        return self.model.transformer.ln_f

    def qkv_site(self, layer, which):  # c_attn output is [q | k | v], d_model each
        d = self.d_model
        return ModuleView(self.attn(layer).c_attn, *slice_last(which * d, (which + 1) * d, self.n_heads, self.d_head))

    def mlp_pre(self, layer):
        return ModuleView(self.mlp(layer).c_fc, *whole())

    def residual_readers(self, layer):
        return self.attn(layer).c_attn, self.mlp(layer).c_fc

    def _qkv_in_out(self, layer):
        return self.attn(layer).c_attn.weight.split(self.d_model, dim=1)

    def W_in(self, layer):
        return self.mlp(layer).c_fc.weight


class NeoXAdapter(ArchAdapter):
    """GPT-NeoX / Pythia: fused QKV laid out per head as [q | k | v], usually parallel residual."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)
    saved_for_backward = (4.5, 1.0, 0.0)
    forward_working_set = (3.0, 1.8)

    @property
    def layers(self):
        return self.model.gpt_neox.layers

    def attn(self, layer):
        return self.layers[layer].attention

    def attn_o_proj(self, layer):
        return self.attn(layer).dense

    def mlp(self, layer):
        return self.layers[layer].mlp

    def mlp_out_proj(self, layer):
        return self.mlp(layer).dense_4h_to_h

    def attn_norm(self, layer):
        return self.layers[layer].input_layernorm

    def mlp_norm(self, layer):
        return self.layers[layer].post_attention_layernorm

    @property
    def final_norm(self):
        return self.model.gpt_neox.final_layer_norm

    @property
    def parallel_residual(self):
        return bool(self.model.config.use_parallel_residual)

    def qkv_site(self, layer, which):
        return ModuleView(self.attn(layer).query_key_value, *_neox_qkv(which, self.n_heads, self.d_head))

    def mlp_pre(self, layer):
        return ModuleView(self.mlp(layer).dense_h_to_4h, *whole())

    def residual_readers(self, layer):
        return self.attn(layer).query_key_value, self.mlp(layer).dense_h_to_4h

    def _fused_qkv(self, layer: int, which: int) -> torch.Tensor:
        # The fused output is laid out (n_heads, 3, d_head) per position: slice one of q/k/v per
        # head and transpose to (n_heads, d_model, d_head), staying a view of the parameter.
        w = self.attn(layer).query_key_value.weight  # (n_heads*3*d_head, d_model)
        return w.view(self.n_heads, 3, self.d_head, self.d_model)[:, which].transpose(1, 2)

    def W_Q(self, layer):
        return self._fused_qkv(layer, 0)

    def W_K(self, layer):
        return self._fused_qkv(layer, 1)

    def W_V(self, layer):
        return self._fused_qkv(layer, 2)

    def W_in(self, layer):
        return self.mlp(layer).dense_h_to_4h.weight.t()


ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, Phi3Adapter, GPT2Adapter, NeoXAdapter)

# Types refused with a reason (rather than the generic "unsupported" error). In post-norm layers
# (OLMo2: x + N(attn(x)), x + N(mlp(x)); Gemma 2/3 add such norms to pre-norm ones) the norm sits
# between the heads and the residual, so a head's contribution to the residual is not z_h W_O[h]
# and the heads do not add up: the EAP-IG per-head writers, attn.out/mlp.out as residual terms and
# the DKN write vectors would all be silently wrong.
_POST_NORM = "normalises the attention and MLP outputs before adding them to the residual (post-norm)"
REFUSED: dict[str, str] = {t: _POST_NORM for t in ("olmo2", "olmo3", "gemma2", "gemma3", "gemma3_text")}


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``'s family; a clear error for anything else."""
    return adapter_class(getattr(getattr(model, "config", None), "model_type", None))(model)


def adapter_class(model_type: str | None) -> type[ArchAdapter]:
    """The adapter class of a HF ``model_type`` (its class attributes need no model: the memory
    planner reads them from a config alone); a clear error for anything unsupported."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    if model_type in REFUSED:
        raise EngramError(
            f"unsupported architecture {model_type!r}: it {REFUSED[model_type]}, so per-head "
            "contributions to the residual are not additive and the head, circuit and DKN analyses "
            f"would be wrong; use a pre-norm model ({', '.join(supported_model_types())})"
        )
    raise EngramError(
        f"unsupported architecture {model_type!r}: engramlab supports "
        f"{', '.join(supported_model_types())} (families: GPT-2, Llama-like, Phi-3, GPT-NeoX)"
    )
