"""Named hook sites and the context managers that capture or edit them.

Site names are stable across families (see ``SITE_DOCS`` for the tensor behind each one;
``site_name(kind, layer)`` builds them)::

    blocks.{l}.resid_pre      (batch, pos, d_model)          input of decoder layer l
    blocks.{l}.resid_mid      (batch, pos, d_model)          input of the MLP norm (capture only;
                                                              absent with a parallel residual)
    blocks.{l}.resid_post     (batch, pos, d_model)          output of decoder layer l
    blocks.{l}.attn.in        (batch, pos, d_model)          input of the attention norm, as the
                                                              attention branch reads it
    blocks.{l}.attn.q         (batch, pos, n_heads, d_head)  query projection, before rotary
    blocks.{l}.attn.k         (batch, pos, n_kv_heads, d_head)
    blocks.{l}.attn.v         (batch, pos, n_kv_heads, d_head)
    blocks.{l}.attn.pattern   (batch, n_heads, q_pos, k_pos) softmax attention probabilities
    blocks.{l}.attn.heads     (batch, pos, n_heads, d_head)  per-head outputs z, before W_O
    blocks.{l}.attn.out       (batch, pos, d_model)          sum_h z_h W_O[h] + b_O
    blocks.{l}.mlp.in         (batch, pos, d_model)          input of the MLP norm, as the MLP
                                                              branch reads it
    blocks.{l}.mlp.pre        (batch, pos, d_mlp)            MLP pre-activation: x_norm @ W_gate
                                                              (gated) or x_norm @ W_in + b (not)
    blocks.{l}.mlp.neurons    (batch, pos, d_mlp)            input of the MLP output projection
    blocks.{l}.mlp.out        (batch, pos, d_model)          MLP output
    ln_final.in               (batch, pos, d_model)          input of the final norm
    ln_final.out              (batch, pos, d_model)          input of the unembedding

Every site is a PyTorch forward hook on an ordinary HF module (or, for ``attn.pattern``, an
attention function registered with transformers), installed only inside a ``with`` block, so the
model outside the block is untouched. Where a site lives inside a module's output (q/k/v, the MLP
pre-activation) the architecture adapter says so; this module knows no family. Edits keep the
autograd graph: gradients flow through replaced or scaled activations, which the attribution
methods rely on. ``grad`` hooks a site's gradient in the backward pass (TransformerLens's
``bwd_hooks``).

Branch inputs: ``attn.in`` and ``mlp.in`` hold the same values as the residual stream (resid_pre;
resid_mid, or resid_pre with a parallel residual) but are the *norm's* input: editing them changes
what that branch reads and nothing else, and their gradient is that branch's share of the
residual's gradient (the residual also flows around the branch). ``resid_mid`` is the residual
itself: capture only, and its gradient is the whole gradient of the residual there.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.adapters import ArchAdapter, ModuleView, split_last, whole

Positions = int | Sequence[int] | slice | torch.Tensor | None

SITE_DOCS: dict[str, tuple[str, str]] = {
    # name: (shape, what it is)
    "resid_pre": ("(batch, pos, d_model)", "residual stream entering the layer"),
    "resid_mid": ("(batch, pos, d_model)", "residual after attention, as read by the MLP norm"),
    "resid_post": ("(batch, pos, d_model)", "residual stream leaving the layer"),
    "attn.in": ("(batch, pos, d_model)", "input of the attention norm, as the attention branch reads it"),
    "attn.q": ("(batch, pos, n_heads, d_head)", "query projection output, before rotary"),
    "attn.k": ("(batch, pos, n_kv_heads, d_head)", "key projection output, before rotary"),
    "attn.v": ("(batch, pos, n_kv_heads, d_head)", "value projection output"),
    "attn.pattern": ("(batch, n_heads, q_pos, k_pos)", "attention probabilities after softmax"),
    "attn.heads": ("(batch, pos, n_heads, d_head)", "per-head outputs z before the output projection"),
    "attn.out": ("(batch, pos, d_model)", "attention output projection output (with bias)"),
    "mlp.in": ("(batch, pos, d_model)", "input of the MLP norm, as the MLP branch reads it"),
    "mlp.pre": ("(batch, pos, d_mlp)", "MLP pre-activation: gate projection output (gated MLPs) or fc output"),
    "mlp.neurons": ("(batch, pos, d_mlp)", "input of the MLP output projection"),
    "mlp.out": ("(batch, pos, d_model)", "MLP output added to the residual stream"),
}
GLOBAL_SITES = {
    "ln_final.in": ("(batch, pos, d_model)", "input of the final norm (last layer's output)"),
    "ln_final.out": ("(batch, pos, d_model)", "final norm output, input of the unembedding"),
}


def site_name(kind: str, layer: int | None = None) -> str:
    """The full name of a site: ``site_name("mlp.neurons", 3)`` is "blocks.3.mlp.neurons";
    ``site_name("ln_final.out")`` is "ln_final.out" (global sites take no layer)."""
    if kind in GLOBAL_SITES:
        if layer is not None:
            raise EngramError(f"hook site {kind!r} is not per layer: call site_name({kind!r}) without a layer")
        return kind
    if kind not in SITE_DOCS:
        raise EngramError(f"unknown hook site kind {kind!r}: use one of {', '.join([*SITE_DOCS, *GLOBAL_SITES])}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise EngramError(f"hook site {kind!r} needs a layer index >= 0, got {layer!r}")
    return f"blocks.{layer}.{kind}"


@dataclass
class Site:
    """Where a named site lives and how to view the raw module tensor as the site tensor.

    ``get(raw)`` gives the site view; ``put(raw, view)`` gives the raw tensor with the view
    written back (exactly: writing back an unchanged view reproduces ``raw`` bit for bit).
    ``pos_dim`` is the position axis of the view and ``unit_dim`` the axis that ``index``
    selects (heads or neurons), if any. ``editable`` False: capture only (and ``grad`` hooks the
    tensor itself rather than the module's private alias of it).
    """

    name: str
    module: nn.Module
    kind: str  # "input" (first positional argument), "output", or "pattern"
    get: Callable[[torch.Tensor], torch.Tensor]
    put: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pos_dim: int = 1
    unit_dim: int | None = None
    editable: bool = True


class HookPoints:
    """The named sites of one model, and context managers over them."""

    site_name = staticmethod(site_name)

    def __init__(self, adapter: ArchAdapter):
        self.adapter = adapter
        self._pattern_depth = 0
        self._saved_attn_impl: str | None = None

    # -- naming -------------------------------------------------------------------------
    def names(self, layer: int | None = None) -> list[str]:
        layers = range(self.adapter.n_layers) if layer is None else [layer]
        out = []
        for l in layers:
            for s in SITE_DOCS:
                if s == "resid_mid" and self.adapter.parallel_residual:
                    continue
                out.append(site_name(s, l))
        if layer is None:
            out.extend(GLOBAL_SITES)
        return out

    def shape(self, name: str, batch: int = 1, pos: int = 1) -> tuple[int, ...]:
        """Shape of a site's tensor for a given batch and sequence length."""
        a, sub = self.adapter, self._parse(name)[1]
        if sub in {"resid_pre", "resid_mid", "resid_post", "attn.in", "attn.out", "mlp.in", "mlp.out",
                   *GLOBAL_SITES}:
            return (batch, pos, a.d_model)
        if sub in {"attn.q", "attn.heads"}:
            return (batch, pos, a.n_heads, a.d_head)
        if sub in {"attn.k", "attn.v"}:
            return (batch, pos, a.n_kv_heads, a.d_head)
        if sub == "attn.pattern":
            return (batch, a.n_heads, pos, pos)
        return (batch, pos, a.d_mlp)

    def _parse(self, name: str) -> tuple[int | None, str]:
        if name in GLOBAL_SITES:
            return None, name
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in SITE_DOCS:
            raise EngramError(
                f"unknown hook site {name!r}: use blocks.{{layer}}.<{'|'.join(SITE_DOCS)}> or "
                f"{', '.join(GLOBAL_SITES)} (engram inspect lists them)"
            )
        layer = int(m.group(1))
        if layer >= self.adapter.n_layers:
            raise EngramError(f"hook site {name!r}: layer {layer} out of range, the model has "
                              f"{self.adapter.n_layers} layers (0..{self.adapter.n_layers - 1})")
        return layer, m.group(2)

    def site(self, name: str) -> Site:
        """Resolve a site name to its module and view functions."""
        layer, sub = self._parse(name)
        a = self.adapter
        if sub == "ln_final.in":
            return Site(name, a.final_norm, "input", *whole())
        if sub == "ln_final.out":
            return Site(name, a.unembed, "input", *whole())
        if sub == "resid_pre":
            return Site(name, a.layers[layer], "input", *whole())
        if sub == "resid_post":
            return Site(name, a.layers[layer], "output", *whole())
        if sub == "resid_mid":
            if a.parallel_residual:
                raise EngramError(f"hook site {name!r} does not exist: this {a.family} model uses a "
                                  "parallel residual (attention and MLP both read resid_pre); "
                                  f"{site_name('mlp.in', layer)} is what the MLP reads")
            # Editing the MLP norm's input would not change the residual the MLP output is added
            # to, so this site is for reading only (mlp.in is the editable MLP-branch input).
            return Site(name, a.mlp_norm(layer), "input", *whole(), editable=False)
        if sub == "attn.in":
            return Site(name, a.attn_norm(layer), "input", *whole())
        if sub == "mlp.in":
            return Site(name, a.mlp_norm(layer), "input", *whole())
        if sub == "attn.heads":
            return Site(name, a.attn_o_proj(layer), "input", *split_last(a.n_heads, a.d_head), unit_dim=2)
        if sub == "attn.out":
            return Site(name, a.attn_o_proj(layer), "output", *whole())
        if sub == "mlp.pre":
            return self._view_site(name, a.mlp_pre(layer))
        if sub == "mlp.neurons":
            return Site(name, a.mlp_out_proj(layer), "input", *whole(), unit_dim=2)
        if sub == "mlp.out":
            return Site(name, a.mlp(layer), "output", *whole())
        if sub == "attn.pattern":
            return Site(name, a.attn(layer), "pattern", *whole(), pos_dim=2, unit_dim=1)
        which = {"attn.q": 0, "attn.k": 1, "attn.v": 2}[sub]
        return self._view_site(name, a.qkv_site(layer, which))

    @staticmethod
    def _view_site(name: str, view: ModuleView) -> Site:
        """A site the adapter places inside a module's output (q/k/v, the MLP pre-activation)."""
        return Site(name, view.module, "output", view.get, view.put, unit_dim=2)

    # -- devices ---------------------------------------------------------------------------
    @property
    def home(self) -> torch.device:
        """The device hook functions see site tensors on: that of the model's first parameter (the
        input embeddings), where the inputs go and, under a device map (accelerate), where the
        model's outputs come back. On one device every move below is a no-op (``Tensor.to`` returns
        the tensor itself), so single-device numbers and aliasing are unchanged."""
        return next(self.adapter.model.parameters()).device

    def _to_home(self, t: torch.Tensor) -> torch.Tensor:
        home = self.home
        return t if t.device == home else t.to(home)  # differentiable: gradients flow back across

    # -- the one primitive ---------------------------------------------------------------
    @contextmanager
    def hook(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        """Run ``fn(site_tensor)`` at every forward pass through the site.

        ``fn`` returns a new site tensor to substitute, or None to leave it as it is. Hooks on one
        module run in the order their blocks were entered, each seeing the previous one's result.
        """
        site = self.site(name)
        if site.kind == "pattern":
            with self._pattern_hook(site.module, fn):
                yield
            return

        def apply(raw: torch.Tensor) -> torch.Tensor | None:
            new = fn(self._to_home(site.get(raw)))
            if new is None:
                return None
            if not site.editable:
                raise EngramError(f"hook site {name!r} can be captured but not edited")
            return site.put(raw, new.to(raw.device))

        with _module_hook(site, apply):
            yield

    @contextmanager
    def grad(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        """Run ``fn(g)`` when a backward pass reaches the site: g = dL/d(site tensor), the site's
        shape (TransformerLens's ``bwd_hooks``). ``fn`` may return a tensor to use as that
        gradient from there on (towards earlier layers), or None.

        Forwards run inside the block install the hook; it fires during their backward pass,
        even after the block has closed. Output sites hook the module's output (a view's gradient
        is the same view of the output's gradient). Input and pattern sites hand the module an
        alias of its input (the same values) and hook the alias, so g is what flows through that
        module alone: for ``attn.in``/``mlp.in``/``ln_final.in`` the branch's share, not the
        residual's total. ``resid_mid`` (capture only) hooks the residual tensor itself.

        >>> with hooks.grad("blocks.2.attn.heads", lambda g: grads.append(g)):   # (b, pos, n_heads, d_head)
        ...     loss(model(ids)).backward()
        """
        site = self.site(name)

        def on_grad(g_raw: torch.Tensor) -> torch.Tensor | None:
            new = fn(self._to_home(site.get(g_raw)))
            return None if new is None else site.put(g_raw, new.to(g_raw.device))

        def on_forward(raw: torch.Tensor) -> torch.Tensor | None:
            if not raw.requires_grad:
                return None  # no backward will reach it (no_grad, or nothing upstream needs grad)
            if site.kind == "output" or not site.editable:
                raw.register_hook(on_grad)
                return None
            alias = raw.view_as(raw)
            alias.register_hook(on_grad)
            return alias

        if site.kind == "pattern":
            with self._pattern_hook(site.module, on_forward):
                yield
            return
        with _module_hook(site, on_forward):
            yield

    @contextmanager
    def _pattern_hook(self, module: nn.Module, fn) -> Iterator[None]:
        from engramlab.models import attention

        config = self.adapter.model.config
        if self._pattern_depth == 0:
            self._saved_attn_impl = config._attn_implementation
            config._attn_implementation = attention.ENGRAM_ATTENTION
        self._pattern_depth += 1
        attention.PATTERN_HOOKS.setdefault(module, []).append(fn)
        try:
            yield
        finally:
            attention.PATTERN_HOOKS[module].remove(fn)
            if not attention.PATTERN_HOOKS[module]:
                del attention.PATTERN_HOOKS[module]
            self._pattern_depth -= 1
            if self._pattern_depth == 0:
                config._attn_implementation = self._saved_attn_impl

    # -- capture and edits -----------------------------------------------------------------
    @contextmanager
    def capture(self, names: str | Iterable[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Record site tensors into a dict (the last forward pass wins).

        >>> with hooks.capture(["blocks.3.mlp.neurons"]) as cache:
        ...     model(input_ids)
        >>> cache["blocks.3.mlp.neurons"].shape   # (batch, pos, d_mlp)

        ``detach=False`` keeps the tensors in the graph (call ``retain_grad()`` to read grads);
        then a tensor that the model later modifies in place (OLMo's q/k/v under ``clip_qkv``)
        shows the modified values.
        """
        names = [names] if isinstance(names, str) else list(names)
        cache: dict[str, torch.Tensor] = {}

        def recorder(n):
            def record(t):
                # A copy, not a view: some models modify module outputs in place afterwards
                # (OLMo's clip_qkv clamps q/k/v), which would rewrite a detached view.
                cache[n] = t.detach().clone() if detach else t
                return None
            return record

        with ExitStack() as stack:
            for n in names:
                stack.enter_context(self.hook(n, recorder(n)))
            yield cache

    @contextmanager
    def edit(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], positions: Positions = None,
             index: int | Sequence[int] | torch.Tensor | None = None) -> Iterator[None]:
        """Substitute ``fn(site)`` at the selected positions (and heads/neurons), elsewhere keep it.

        ``positions`` selects along the position axis (query positions for ``attn.pattern``):
        an int, a list, a slice, or a LongTensor of shape (batch,) giving one position per row
        (e.g. the last real token of each padded prompt). ``index`` selects heads
        (``attn.heads``, ``attn.q/k/v``, ``attn.pattern``) or neurons (``mlp.neurons``).
        """
        site = self.site(name)
        if index is not None and site.unit_dim is None:
            raise EngramError(f"hook site {name!r} has no head/neuron axis to index")

        def apply(t: torch.Tensor) -> torch.Tensor:
            new = fn(t)
            mask = _selection_mask(t, positions, site.pos_dim, index, site.unit_dim)
            if mask is None:
                return new.expand_as(t) if new.shape != t.shape else new
            return torch.where(mask, new, t)

        with self.hook(name, apply):
            yield

    def replace(self, name: str, value: torch.Tensor | float, positions: Positions = None, index=None):
        """Set the site to ``value`` (broadcast against the site tensor) at the selection."""
        return self.edit(name, lambda t: torch.as_tensor(value, dtype=t.dtype, device=t.device).expand_as(t),
                         positions, index)

    def scale(self, name: str, factor: float | torch.Tensor, positions: Positions = None, index=None):
        """Multiply the site by ``factor`` at the selection (0 ablates)."""
        return self.edit(name, lambda t: t * factor, positions, index)

    def add(self, name: str, delta: torch.Tensor | float, positions: Positions = None, index=None):
        """Add ``delta`` (broadcast against the site tensor) at the selection (steering)."""
        return self.edit(name, lambda t: t + delta, positions, index)


@contextmanager
def _module_hook(site: Site, apply: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run ``apply(raw)`` on the raw tensor of an input or output site (the module's first
    positional argument / ``hidden_states`` keyword, or its output / first output); a returned
    tensor replaces it."""
    if site.kind == "input":
        def pre_hook(module, args, kwargs):
            if args:
                new = apply(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = apply(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(module, args, output):
            raw = output if isinstance(output, torch.Tensor) else output[0]
            new = apply(raw)
            if new is None:
                return None
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        handle = site.module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def _selection_mask(t: torch.Tensor, positions: Positions, pos_dim: int, index, unit_dim: int | None):
    """Boolean mask broadcastable to ``t`` that is True on the selected entries; None = all."""
    if positions is None and index is None:
        return None
    shape = [1] * t.dim()
    mask = torch.ones(shape, dtype=torch.bool, device=t.device)
    if positions is not None:
        n = t.shape[pos_dim]
        if isinstance(positions, torch.Tensor):
            # A tensor gives one position per batch row; lists/ints/slices apply to every row.
            if positions.dim() != 1 or positions.shape[0] != t.shape[0]:
                raise EngramError(f"positions tensor must have shape (batch,) = ({t.shape[0]},), "
                                  f"got {tuple(positions.shape)}; pass a list for the same positions in every row")
            per_row = torch.zeros(t.shape[0], n, dtype=torch.bool, device=t.device)
            per_row[torch.arange(t.shape[0], device=t.device), positions.to(t.device) % n] = True
            pshape = [1] * t.dim()
            pshape[0], pshape[pos_dim] = t.shape[0], n
            mask = mask & per_row.view(pshape)
        else:
            sel = torch.zeros(n, dtype=torch.bool, device=t.device)
            sel[positions if not isinstance(positions, (list, tuple)) else torch.as_tensor(positions)] = True
            pshape = [1] * t.dim()
            pshape[pos_dim] = n
            mask = mask & sel.view(pshape)
    if index is not None:
        n = t.shape[unit_dim]
        sel = torch.zeros(n, dtype=torch.bool, device=t.device)
        sel[index if not isinstance(index, (list, tuple)) else torch.as_tensor(index)] = True
        ushape = [1] * t.dim()
        ushape[unit_dim] = n
        mask = mask & sel.view(ushape)
    return mask
