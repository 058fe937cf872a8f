"""Per-head reader gradients: from q/k/v projection gradients to the residual stream.

Every q/k/v reader of a layer reads the same residual x through the attention norm N, so reader r's
gradient is J_N(x)^T W_r dL/dq_r: the projection gradient taken to d_model by the reader's own
weights, then back through the norm's Jacobian. Nothing here copies the residual per head.
"""

from __future__ import annotations

import torch
from torch import nn

from engramlab.locate.circuits.hooks import qkv_weights
from engramlab.models.adapters import linear_weight


def norm_vjp(norm: nn.Module, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """J_norm(x)^T applied to each reader's cotangent, for any norm module (torch.func, vmap).

    x (..., d_model); cotangents (..., R, d_model) -> (..., R, d_model).
    ``norm.forward``, not ``norm(...)``: hooks on the norm must not fire again."""
    _, pull = torch.func.vjp(norm.forward, x.detach())
    return torch.func.vmap(lambda c: pull(c)[0], in_dims=-2, out_dims=-2)(cotangents.to(x.dtype)).detach()


class AttentionReaders:
    """One layer's q/k/v readers: their gradients with respect to the residual stream.

    With x_hat the normalised residual, rstd = 1/rms (of the centred x for LayerNorm) and
    W~_r = P diag(w) W_r (P centres over d_model; LayerNorm only), reader r's gradient is

        g_x,r = W~_r g'_r - x_hat * dots_r / d,   g'_r = rstd * dL/dq_r,   dots_r = (x_hat W~_r) . g'_r

    (the LayerNorm/RMSNorm Jacobian with the norm gain and centring folded into the projection
    weights; the adapter's ``norm_spec`` says which norm it is and what its effective gain w is).
    Because the first term is linear in g' with fixed weights, integration steps can sum g' in
    the small head space and expand it to d_model once per batch (``expand``); the second needs
    each step's x_hat and dots. Readers are ordered q heads, k heads, v heads. Norms the adapter
    has no closed form for (or ``closed_form=False``) use ``pull``: the full per-reader gradient
    through ``norm_vjp``, every step."""

    def __init__(self, lm, layer: int, closed_form: bool = True):
        self.lm, self.layer = lm, layer
        self.norm = lm.adapter.attn_norm(layer)
        self.spec = lm.adapter.norm_spec(self.norm)
        self.kind = self.spec.kind if closed_form else None

    def weights(self) -> torch.Tensor:
        """W~ (R, d_model, d_head) float32; built when needed, not kept (it is as large as the
        layer's q/k/v weights, for every layer)."""
        w = torch.cat(qkv_weights(self.lm, self.layer), 0).float()
        if self.kind is not None:
            if self.spec.gain is not None:
                w = w * self.spec.gain[None, :, None]
            if self.spec.centred:
                w = w - w.mean(1, keepdim=True)
        return w

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, d) -> x_hat (n, d) and rstd (n, 1), float32."""
        return self.spec.normalise(x.detach())

    def head_terms(self, x: torch.Tensor, grads: torch.Tensor, sites: list, values: dict | None = None):
        """x (n, d); grads (n, R, d_head) -> x_hat (n, d), g' (n, R, d_head), dots (n, R).

        x_hat W~_r is (w * x_hat) W_r, since x_hat is already centred. ``values`` maps a q/k/v
        site's name to its tensor at these rows, (n, heads, d_head), where the forward pass kept
        it: that minus its constant part (the projection bias, plus the norm's bias through W) is
        x_hat W~. Otherwise it is recomputed with the module's own weights, without bias (holding
        separate projection outputs until the backward pass would cost more memory than the sums)."""
        x_hat, rstd = self.normalise(x)
        g = grads.float() * rstd[:, :, None]
        gain, bias = self.spec.gain, self.spec.bias
        outputs, projected = {}, []
        for site in sites:  # GPT-2 and NeoX have one fused module for q, k and v
            module = site.module
            if values and site.name in values:
                constant = torch.zeros(linear_weight(module).shape[1], device=x.device)  # (out,)
                if getattr(module, "bias", None) is not None:
                    constant = constant + module.bias.detach().float()
                if bias is not None:
                    constant = constant + bias @ linear_weight(module).detach().float()
                projected.append(values[site.name].float() - site.get(constant))
                continue
            if id(module) not in outputs:
                w_in = linear_weight(module).detach().float()  # (d_model, out)
                outputs[id(module)] = (x_hat if gain is None else x_hat * gain) @ w_in
            projected.append(site.get(outputs[id(module)]))
        projected = torch.cat(projected, 1)  # (n, R, d_head)
        return x_hat, g, (projected * g).sum(-1)

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        """(n, R, d_head) summed g' -> W~_r g'_r as (n, d_model, R), contiguous."""
        return torch.bmm(g.transpose(0, 1), self.weights().transpose(1, 2)).permute(1, 2, 0).contiguous()

    def pull(self, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Any norm: x (n, d), grads (n, R, d_head) -> reader gradients (n, d_model, R)."""
        to_normed = torch.einsum("kre,rde->krd", grads.float(), self.weights()).to(x.dtype)
        return norm_vjp(self.norm, x, to_normed).float().transpose(1, 2).contiguous()
