"""Weight perturbations that always undo themselves: zero, scale or noise a region of parameters,
one parameter, or one hidden dimension of the residual stream.

Every context manager saves the original values of exactly the entries it touches (never a copy
of the whole model), writes the perturbed values in place, and on leaving the block, normally or
by any exception (Ctrl-C included), writes the saved values back: the weights are then
bit-identical to what they were. Inside the block the live model is perturbed, so anything run
there (perplexity, generation) sees the perturbation. The block's value is the number of entries
touched.

An *op* maps the selected values to new ones (``Zero``, ``Scale``, ``Noise``; ``as_op`` also reads
"zero", "scale:C", "noise:STD" and "relnoise:F"). Arithmetic is in float32 and the result is cast
to the parameter's dtype.

``hidden_dimension(lm, d, op)`` perturbs index ``d`` of d_model in every matrix of the transformer
blocks that reads or writes the residual stream: the input columns of the readers (q/k/v or the
fused qkv, gate/up or fc) and the output rows of the writers (attention output and MLP output
projections). Which modules these are and how their weights are stored (nn.Linear (out, in),
GPT-2's Conv1D (in, out)) comes from the architecture adapter. Matrices only: the writers'
biases, the norm gains and position embeddings are never touched; the token embedding and the
unembedding (their d_model column) only with ``include_embeddings=True`` (default off, as in the
paper's perturbations, which cover the block matrices alone); tied, they are one tensor, touched
once.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from engramlab.errors import EngramError
from engramlab.models.adapters import d_model_axis

# A selection inside one tensor: a bool mask of the tensor's shape, or a basic index (ints, slices).
Index = torch.Tensor | tuple


class Op:
    """New values for the selected entries ``values`` of tensor ``tensor`` (named ``name``)."""

    def __call__(self, values: torch.Tensor, tensor: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Zero(Op):
    """Set the entries to 0 (the paper's "removal")."""

    def __call__(self, values, tensor, name):
        return torch.zeros_like(values)


@dataclass(frozen=True)
class Scale(Op):
    """Multiply the entries by ``factor`` (the paper's "Mul by 4")."""

    factor: float

    def __call__(self, values, tensor, name):
        return values.float() * self.factor


@dataclass(frozen=True)
class Noise(Op):
    """Add Gaussian noise N(0, s^2), seeded. ``relative=False``: s = ``std``. ``relative=True``:
    s = ``std`` times the standard deviation of the *whole* tensor before perturbation (not of the
    selected entries, which may be a single one). The draws come from a CPU generator seeded by
    (``seed``, tensor name), so they do not depend on the device or on the order of the tensors."""

    std: float
    seed: int = 0
    relative: bool = False

    def __call__(self, values, tensor, name):
        s = self.std * float(tensor.detach().float().std()) if self.relative else self.std
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        z = torch.randn(values.shape, generator=g, dtype=torch.float32)
        return values.float() + s * z.to(values.device)


def as_op(op: Op | str) -> Op:
    """An ``Op`` as is, or one read from "zero", "scale:C", "noise:STD" or "relnoise:F"."""
    if isinstance(op, Op):
        return op
    kind, _, arg = str(op).partition(":")
    try:
        if kind == "zero" and not arg:
            return Zero()
        if kind == "scale":
            return Scale(float(arg))
        if kind in ("noise", "relnoise"):
            return Noise(float(arg), relative=kind == "relnoise")
    except ValueError:
        pass
    raise EngramError(f"bad perturbation {op!r}: use zero, scale:C, noise:STD or relnoise:F (e.g. scale:4)")


# -- the one mechanism ----------------------------------------------------------------------------
@contextmanager
def perturbed(entries: dict[str, tuple[torch.Tensor, Index]], op: Op | str) -> Iterator[int]:
    """Apply ``op`` to ``tensor[index]`` for every ``name: (tensor, index)``; restore on exit.

    Each entry's original values are saved before it is written, so a failure half-way (in an op,
    or Ctrl-C) still restores everything written so far. Restoring runs in reverse order."""
    op = as_op(op)
    _refuse_aliases({n: t for n, (t, _) in entries.items()})
    saved: list[tuple[torch.Tensor, Index, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, (t, index) in entries.items():
                old = t[index].clone()
                saved.append((t, index, old))
                t[index] = op(old, t, name).to(t.dtype)
        yield sum(old.numel() for _, _, old in saved)
    finally:
        with torch.no_grad():
            for t, index, old in reversed(saved):
                t[index] = old


def _refuse_aliases(tensors: dict[str, torch.Tensor]) -> None:
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), t.device)
        if key in seen:
            raise EngramError(f"parameters {seen[key]!r} and {name!r} are the same tensor (tied weights): "
                              "pass only one of them")
        seen[key] = name


def _masked(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, tuple]:
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise EngramError(f"mask {name!r} names no parameter in params: pass masks keyed by parameter name")
        t = params[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != t.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise EngramError(f"mask {name!r} must be a bool tensor of shape {tuple(t.shape)}, got {got}")
        out[name] = (t, mask.to(t.device))
    return out


# -- regions --------------------------------------------------------------------------------------
def zeroed(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
    """Zero ``params[name][masks[name]]`` for every mask (parameters without a mask: untouched)."""
    return perturbed(_masked(params, masks), Zero())


def scaled(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], factor: float):
    """Multiply the masked entries by ``factor``."""
    return perturbed(_masked(params, masks), Scale(factor))


def noised(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], std: float, seed: int = 0,
           relative: bool = False):
    """Add seeded Gaussian noise to the masked entries (``Noise``: std absolute, or relative to each
    tensor's own std with ``relative=True``)."""
    return perturbed(_masked(params, masks), Noise(std, seed, relative))


def single(params: dict[str, torch.Tensor], name: str, index: int | Sequence[int], op: Op | str):
    """Perturb one entry of ``params[name]``: ``index`` is a flat index or one int per axis."""
    if name not in params:
        raise EngramError(f"parameter {name!r} is not in params: name one of its keys")
    t = params[name]
    if isinstance(index, int):
        if not 0 <= index < t.numel():
            raise EngramError(f"index {index} out of range for {name!r} ({t.numel()} entries)")
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), t.shape))
    else:
        where = tuple(int(i) for i in index)
        if len(where) != t.dim() or not all(0 <= i < n for i, n in zip(where, t.shape)):
            raise EngramError(f"index {list(where)} out of range for {name!r} of shape {tuple(t.shape)}")
    return perturbed({name: (t, where)}, op)


# -- hidden dimensions ----------------------------------------------------------------------------
def hidden_dimension_entries(lm, d: int, layers: Sequence[int] | None = None,
                             include_embeddings: bool = False) -> dict[str, tuple[torch.Tensor, tuple]]:
    """``name: (parameter, index)`` for index ``d`` of d_model in every residual reader and writer
    of ``layers`` (default all), plus the embedding/unembedding columns with ``include_embeddings``."""
    a = lm.adapter
    if not 0 <= d < a.d_model:
        raise EngramError(f"hidden dimension {d} out of range: d_model is {a.d_model}")
    layers = range(a.n_layers) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < a.n_layers]
    if bad:
        raise EngramError(f"layers {bad} out of range: the model has {a.n_layers} layers (0..{a.n_layers - 1})")
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out: dict[str, tuple[torch.Tensor, tuple]] = {}

    def add(weight: torch.Tensor, axis: int) -> None:
        index = tuple(d if i == axis else slice(None) for i in range(weight.dim()))
        out.setdefault(names[id(weight)], (weight, index))

    for l in layers:
        for module in a.residual_readers(l):
            add(module.weight, d_model_axis(module, reads=True))
        for module in a.residual_writers(l):
            add(module.weight, d_model_axis(module, reads=False))
    if include_embeddings:
        add(a.embed.weight, 1)  # (vocab, d_model)
        if a.unembed is not None:
            add(a.unembed.weight, 1)  # lm_head (vocab, d_model); the same tensor when tied
    return out


def hidden_dimension(lm, d: int, op: Op | str, layers: Sequence[int] | None = None,
                     include_embeddings: bool = False):
    """Perturb index ``d`` of d_model in every matrix that reads or writes the residual stream
    (see the module docstring; ``layers`` restricts it to some layers)."""
    return perturbed(hidden_dimension_entries(lm, d, layers, include_embeddings), op)
