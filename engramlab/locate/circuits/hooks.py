"""Hooks the circuit code shares: writer outputs, reader inputs, and the norm Jacobian.

* ``writer_hooks`` reports every writer's contribution to the residual stream as a forward pass
  makes it: the input embedding (``blocks.0.resid_pre``), each head's ``z_h @ W_O[h]`` (from
  ``attn.heads``; the output bias ``b_O`` is the same in every run, so it is left out: it cancels in
  every clean-minus-corrupted difference and in every patch) and each MLP output (``mlp.out``).
* ``norm_pre_hook`` runs a function on the input of a norm module. The attention norm and the MLP
  norm are read by their own branch only, so their inputs are exactly "the input of reader v".
* ``norm_vjp`` pulls many cotangents back through one norm at once (vmap over the reader axis),
  which is how per-head gradients reach the residual without a per-head copy of it.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from engramlab.locate.circuits.graph import CircuitGraph


@contextmanager
def norm_pre_hook(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(x)`` on the hidden-states input of ``module``; a returned tensor replaces it."""

    def pre(mod, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def writer_hooks(lm, graph: CircuitGraph, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``sink(first_writer_index, acts)`` with acts (batch, pos, n, d_model) for every writer
    group as the forward pass produces it: the input (n=1), a layer's heads (n=n_heads), an MLP (n=1)."""
    a = lm.adapter

    def heads(layer: int):
        def fn(z):  # (b, pos, n_heads, d_head) -> per-head residual contributions
            sink(graph.head_writer(layer), torch.einsum("bphe,hed->bphd", z, a.W_O(layer).detach()))
        return fn

    def mlp(layer: int):
        def fn(out):
            sink(graph.mlp_writer(layer), out.unsqueeze(2))
        return fn

    with ExitStack() as stack:
        stack.enter_context(lm.hooks.hook("blocks.0.resid_pre", lambda x: sink(0, x.unsqueeze(2))))
        for l in range(graph.n_layers):
            stack.enter_context(lm.hooks.hook(f"blocks.{l}.attn.heads", heads(l)))
            stack.enter_context(lm.hooks.hook(f"blocks.{l}.mlp.out", mlp(l)))
        yield


def norm_vjp(norm: nn.Module, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """J_norm(x)^T applied to each reader's cotangent, for any norm module (torch.func, vmap).

    x (b, pos, d_model); cotangents (b, pos, R, d_model) -> (b, pos, R, d_model).
    ``norm.forward``, not ``norm(...)``: hooks on the norm must not fire again."""
    _, pull = torch.func.vjp(norm.forward, x.detach())
    return torch.func.vmap(lambda c: pull(c)[0], in_dims=2, out_dims=2)(cotangents.to(x.dtype)).detach()


# RMSNorms computed as weight * x / sqrt(mean(x^2) + eps) (Gemma's 1 + weight is not one of them).
_PLAIN_RMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def norm_kind(norm: nn.Module) -> str | None:
    """"layer" (LayerNorm over the last axis), "rms" (plain RMSNorm) or None (anything else)."""
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return "layer"
    if type(norm).__name__ in _PLAIN_RMS:
        return "rms"
    return None


class AttentionReaders:
    """One layer's q/k/v readers: their gradients with respect to the residual stream.

    With x_hat the normalised residual, rstd = 1/rms (of the centred x for LayerNorm) and
    W~_r = P diag(w) W_r (P centres over d_model; LayerNorm only), reader r's gradient is

        g_x,r = W~_r g'_r - x_hat * dots_r / d,   g'_r = rstd * dL/dq_r,   dots_r = (x_hat W~_r) . g'_r

    and x_hat W~_r is the projection output minus a constant (its bias, plus the norm's bias
    through W_r), so ``dots`` costs nothing beyond what the forward pass already made. Because the
    first term is linear in g' with fixed weights, the integration steps can sum g' in the small
    head space and expand it to d_model once per batch (``expand``). Readers are ordered q heads,
    k heads, v heads. Norms other than LayerNorm and the plain RMSNorm (or ``closed_form=False``)
    use ``pull``: the full per-reader gradient through ``norm_vjp``, every step."""

    def __init__(self, lm, layer: int, closed_form: bool = True):
        self.norm = lm.adapter.attn_norm(layer)
        self.kind = norm_kind(self.norm) if closed_form else None
        w = torch.cat(qkv_weights(lm, layer), 0).float()  # (R, d_model, d_head)
        if self.kind is not None:
            if getattr(self.norm, "weight", None) is not None:
                w = w * self.norm.weight.detach().float()[None, :, None]
            if self.kind == "layer":
                w = w - w.mean(1, keepdim=True)
        self.w = w
        self.offset: torch.Tensor | None = None  # (R, d_head): projection output minus x_hat W~

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, pos, d) -> x_hat (b*pos, d) and rstd (b*pos, 1), float32."""
        xf = x.detach().float().reshape(-1, x.shape[-1])
        if self.kind == "layer":
            xf = xf - xf.mean(-1, keepdim=True)
        eps = getattr(self.norm, "eps", None) or getattr(self.norm, "variance_epsilon", 1e-6)
        rstd = (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        return xf * rstd, rstd

    def head_terms(self, x: torch.Tensor, grads: torch.Tensor, proj: torch.Tensor):
        """x (b, pos, d); grads and proj (b, pos, R, d_head) -> x_hat (bp, d), g' (bp, R, e), dots (bp, R)."""
        x_hat, rstd = self.normalise(x)
        n_readers, d_head = grads.shape[2], grads.shape[3]
        g = grads.float().reshape(-1, n_readers, d_head) * rstd[:, :, None]
        proj = proj.float().reshape(-1, n_readers, d_head)
        if self.offset is None:  # the same at every position: measure it on a few
            few = min(len(x_hat), 16)
            self.offset = (proj[:few] - torch.einsum("kd,rde->kre", x_hat[:few], self.w)).mean(0)
        dots = ((proj - self.offset) * g).sum(-1)
        return x_hat, g, dots

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        """(bp, R, d_head) summed g' -> W~_r g'_r as (bp, d_model, R)."""
        return torch.bmm(g.transpose(0, 1), self.w.transpose(1, 2)).permute(1, 2, 0)

    def pull(self, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Any norm: x (b, pos, d), grads (b, pos, R, d_head) -> gradients (b*pos, d_model, R)."""
        to_normed = torch.einsum("bpre,rde->bprd", grads.float(), self.w).to(x.dtype)
        out = norm_vjp(self.norm, x, to_normed).float()  # (b, pos, R, d)
        return out.reshape(-1, *out.shape[2:]).transpose(1, 2)


def qkv_weights(lm, layer: int) -> list[torch.Tensor]:
    """W_Q (n_heads, d_model, d_head), W_K and W_V (n_kv_heads, d_model, d_head), detached."""
    a = lm.adapter
    return [a.W_Q(layer).detach(), a.W_K(layer).detach(), a.W_V(layer).detach()]
