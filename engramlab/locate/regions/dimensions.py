"""Dimension dependency of the core region, and the massive activations / super weights it is
cross-checked against.

Zhang et al. (ACL 2024) observe that the top-importance entries of the output projections line up
in whole rows or columns: a few hidden (residual-stream, d_model) dimensions, on which perturbing a
single parameter breaks the model. Here:

``dimension_counts(lm, masks)``
    c[d] = Σ_matrices Σ_entries mask[entry] · [entry's d_model index == d], over every matrix that
    reads or writes the residual stream (``perturb.hidden_dimension_entries``: the readers' input
    columns, the writers' output rows). A LongTensor (d_model,).
``dimension_dependency(lm, params, core_masks, score, held_out, ...)``
    for the ``top`` dimensions by c[d]: perturb the single most important core parameter lying on
    that dimension (``perturb.single``) and measure perplexity on every held-out corpus; as a
    control, the same with the most important parameter of the *same matrix* whose d_model index
    is none of the top dimensions (the paper's control: "Mul by 4 on L1-N4200", the same layer
    off the outlier dimension).
``massive_activations(lm, chunks, ratio=100)``
    per dimension d, M[d] = max over layers l, chunks and positions of |resid_post_l[..., d]|; the
    massive dimensions are those with M[d] > ratio · median_d M[d] (Sun et al. 2024; see the
    function for how this differs from their per-activation rule).
``super_weight_candidates(lm, chunks)``
    Yu et al. 2024's super weight: in the MLP down projection of the layers with the largest
    output spike, W_down[i, j] with j the input channel and i the output channel of largest |·|.
``coincide(dep_dims, massive_dims)``
    the one rule summaries use to say whether two lists of dimensions agree.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Mapping, Sequence

import torch

from engramlab.errors import EngramError
from engramlab.models.perplexity import perplexity
from engramlab.locate.regions.perturb import Op, Scale, Zero, as_op, hidden_dimension_entries, single
from engramlab.models.adapters import weight_in_axis
from engramlab.models.hooks import site_name
from engramlab.progress import progress_bar


# -- which matrices, and their d_model axis -------------------------------------------------------
def residual_matrices(lm, layers: Sequence[int] | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """``name: (weight, axis)`` for every matrix of ``layers`` (default all) that reads or writes the
    residual stream, ``axis`` being the axis of the stored weight that indexes d_model. Taken from
    ``perturb.hidden_dimension_entries`` (the index it builds for one dimension holds an int on
    exactly that axis), so a dimension here is the same one ``hidden_dimension`` perturbs."""
    out = {}
    for name, (weight, index) in hidden_dimension_entries(lm, 0, layers).items():
        out[name] = (weight, next(i for i, s in enumerate(index) if isinstance(s, int)))
    return out


def dimension_counts(lm, masks: Mapping[str, torch.Tensor], layers: Sequence[int] | None = None) -> torch.Tensor:
    """How many region entries lie on each residual-stream dimension: a LongTensor (d_model,).

    ``masks`` {parameter name: bool tensor shaped like it} (``masks.top_masks`` over
    ``region_tensors``). For a matrix W with d_model on axis a, entry e = (e_0, e_1) counts for
    dimension e_a; c = Σ_W mask_W.sum(over the other axis). Masks of tensors that are not residual
    readers or writers of ``layers`` (norm vectors, other layers) are ignored."""
    mats = residual_matrices(lm, layers)
    counts = torch.zeros(lm.adapter.d_model, dtype=torch.long)
    used = 0
    for name, mask in masks.items():
        if name not in mats:
            continue
        weight, axis = mats[name]
        _check_like(mask, weight, name, "mask", torch.bool)
        counts += mask.detach().cpu().sum(dim=1 - axis)
        used += 1
    if used == 0:
        raise EngramError("dimension counts: no mask names a matrix that reads or writes the residual stream; "
                          "pass masks keyed by parameter name (masks.top_masks over region_tensors(lm))")
    return counts


def _check_like(t, weight: torch.Tensor, name: str, what: str, dtype=None) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != weight.shape or (dtype is not None and t.dtype != dtype):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = f"{'a bool' if dtype is torch.bool else 'a'} tensor of shape {tuple(weight.shape)}"
        raise EngramError(f"{what} {name!r} must be {want}, got {got}")


def _check_chunks(lm, chunks, batch_size: int, what: str) -> torch.Tensor:
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype != torch.long or not len(chunks):
        raise EngramError(f"{what}: chunks must be a non-empty LongTensor (n_chunks, seq_len) of token ids")
    if int(chunks.min()) < 0 or int(chunks.max()) >= lm.adapter.vocab_size:
        raise EngramError(f"{what}: token ids outside [0, {lm.adapter.vocab_size}): the chunks were made with "
                          "another tokenizer than this model's")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EngramError(f"--batch-size {batch_size!r}: must be a whole number >= 1")
    return chunks


def _forward_all(lm, chunks: torch.Tensor, batch_size: int, on_batch=None) -> None:
    """Run the model over ``chunks`` in eval mode without gradients (hooks observe it);
    ``on_batch(start)`` is called before the batch whose first chunk is ``start``."""
    model, training = lm.model, lm.model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(chunks), batch_size):
                if on_batch is not None:
                    on_batch(start)
                model(input_ids=chunks[start: start + batch_size].to(lm.device), use_cache=False)
    finally:
        model.train(training)


# -- massive activations --------------------------------------------------------------------------
def massive_activations(lm, chunks: torch.Tensor, batch_size: int = 8, ratio: float = 100.0,
                        report: int = 8) -> dict:
    """Residual-stream dimensions with massive activations (Sun et al. 2024), from one pass.

    h_l = the output of decoder layer l (site ``blocks.{l}.resid_post``), (batch, pos, d_model),
    for l = 0..n_layers-1 (the embeddings and the final norm's output are not included). Per
    dimension d: M[d] = max_{l, chunk, pos} |h_l[chunk, pos, d]|, with the (layer, chunk, position)
    where it is reached (first one on ties). m = median_d M[d] (``torch.median``: the lower of the
    two middle values for even d_model). Massive: M[d] > ratio * m, ranked by M[d] descending.

    Sun et al. call *an activation* massive when its magnitude exceeds 100 (absolute) and is about
    1,000 times the median magnitude of its hidden state (the median over all tokens and dimensions
    of that layer). This rule is per *dimension*, has no absolute floor (tiny or untrained models
    have no fixed scale) and compares with the median of the per-dimension maxima, which is much
    larger than the median of all activations; so ratio=100 here is a stricter relative bar than
    their 1,000× over the all-activation median would be on the same model. Every dimension's M[d]
    is returned as ``max_per_dim`` so another rule can be applied afterwards.

    Returns {"dims": massive dims (ranked), "top": the ``report`` largest dims (ranked, massive or
    not), "magnitude" / "layer" / "chunk" / "position": {d: ...} for the dims of both lists,
    "median": m, "ratio": ratio, "max_per_dim": M as a list, "layer_max": max_{chunk,pos} |h_l[.., d]|
    as an (n_layers, d_model) list}."""
    chunks = _check_chunks(lm, chunks, batch_size, "massive activations")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise EngramError(f"massive activations: ratio {ratio!r} must be a number > 0 (100 means 100x the median)")
    a = lm.adapter
    best = torch.full((a.n_layers, a.d_model), -1.0)  # per layer, dim: max |h|
    where = torch.zeros((a.n_layers, a.d_model, 2), dtype=torch.long)  # (chunk, position) of it
    offset = [0]  # index of the current batch's first chunk

    def observer(layer: int):
        def fn(h: torch.Tensor):
            mag = h.detach().float().abs().cpu()  # (b, pos, d)
            b, pos, d = mag.shape
            val, flat = mag.reshape(b * pos, d).max(dim=0)  # first maximum on ties
            better = val > best[layer]
            best[layer][better] = val[better]
            where[layer][better, 0] = offset[0] + flat[better] // pos
            where[layer][better, 1] = flat[better] % pos
            return None
        return fn

    with ExitStack() as stack:
        for l in range(a.n_layers):
            stack.enter_context(lm.hooks.hook(site_name("resid_post", l), observer(l)))
        _forward_all(lm, chunks, batch_size, on_batch=lambda start: offset.__setitem__(0, start))

    magnitude, layer = best.max(dim=0)  # (d_model,), first layer on ties
    median = float(magnitude.median())
    order = sorted(range(a.d_model), key=lambda d: (-float(magnitude[d]), d))
    dims = [d for d in order if float(magnitude[d]) > ratio * median]
    top = order[:report]
    shown = list(dict.fromkeys([*dims, *top]))
    return {"dims": dims, "top": top,
            "magnitude": {d: float(magnitude[d]) for d in shown},
            "layer": {d: int(layer[d]) for d in shown},
            "chunk": {d: int(where[layer[d], d, 0]) for d in shown},
            "position": {d: int(where[layer[d], d, 1]) for d in shown},
            "median": median, "ratio": float(ratio),
            "max_per_dim": magnitude.tolist(), "layer_max": best.tolist()}


def super_weight_candidates(lm, chunks: torch.Tensor, top: int = 3, batch_size: int = 8) -> list[dict]:
    """Candidate super weights (Yu et al. 2024, "The Super Weight"), from one pass.

    For every layer l, with X_l (tokens, d_mlp) the input of the MLP down projection (the neurons)
    and Y_l = X_l W_down (tokens, d_model) its output: j_l = argmax_j max_t |X_l[t, j]| (the input
    spike channel), i_l = argmax_i max_t |Y_l[t, i]| (the output spike channel, a residual
    dimension). The candidate is W_down[i_l, j_l] (the weight from neuron j_l to dimension i_l) at
    the ``top`` layers with the largest output spike max |Y_l|. Yu et al. read the two channels off
    the same spiking token; here each is the max over all tokens (they coincide when one token
    spikes, which is the case they describe).

    Rows, largest output spike first: {"layer", "param", "index" (into the stored weight: (i, j)
    for nn.Linear, (j, i) for GPT-2's Conv1D), "in_channel": j, "out_channel": i, "in_max",
    "out_max", "value": the weight}."""
    chunks = _check_chunks(lm, chunks, batch_size, "super weights")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise EngramError(f"super weights: top {top!r} must be a whole number >= 1")
    a = lm.adapter
    names = {id(p): n for n, p in lm.model.named_parameters()}
    in_max = [None] * a.n_layers   # (d_mlp,) max_t |X|
    out_max = [None] * a.n_layers  # (d_model,) max_t |Y|

    def observer(layer: int):
        def fn(module, args, output):
            x = args[0].detach().float().abs().flatten(0, -2).amax(0).cpu()
            y = output.detach().float().abs().flatten(0, -2).amax(0).cpu()
            in_max[layer] = x if in_max[layer] is None else torch.maximum(in_max[layer], x)
            out_max[layer] = y if out_max[layer] is None else torch.maximum(out_max[layer], y)
        return fn

    handles = [a.mlp_out_proj(l).register_forward_hook(observer(l)) for l in range(a.n_layers)]
    try:
        _forward_all(lm, chunks, batch_size)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for l in range(a.n_layers):
        module = a.mlp_out_proj(l)
        j, i = int(in_max[l].argmax()), int(out_max[l].argmax())
        index = (i, j) if weight_in_axis(module) == 1 else (j, i)
        rows.append({"layer": l, "param": names[id(module.weight)], "index": list(index), "in_channel": j,
                     "out_channel": i, "in_max": float(in_max[l][j]), "out_max": float(out_max[l][i]),
                     "value": float(module.weight.detach()[index])})
    rows.sort(key=lambda r: (-r["out_max"], r["layer"]))
    return rows[:top]


# -- dimension dependency -------------------------------------------------------------------------
def _op_name(op: Op) -> str:
    if isinstance(op, Zero):
        return "zero"
    if isinstance(op, Scale):
        return f"scale:{op.factor:g}"
    return repr(op)


def _argmax_entry(score: torch.Tensor, allowed: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the largest ``score`` among the ``allowed`` entries (first on ties), or None."""
    if not bool(allowed.any()):
        return None
    s = score.detach().float().cpu().masked_fill(~allowed, -math.inf).flatten()
    flat = int(s.argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), score.shape))


def _ppl_all(lm, held_out, batch_size, ppl_mode) -> dict[str, float]:
    return {c: perplexity(lm, chunks, batch_size, ppl_mode) for c, chunks in held_out.items()}


def _ratios(ppl: dict, base: dict) -> dict:
    return {c: (ppl[c] / base[c] if math.isfinite(base[c]) and base[c] > 0 else None) for c in ppl}


def dimension_dependency(lm, params: Mapping[str, torch.Tensor], core_masks: Mapping[str, torch.Tensor],
                         score: Mapping[str, torch.Tensor], held_out: Mapping[str, torch.Tensor], top: int = 4,
                         op: Op | str = "zero", batch_size: int = 8, ppl_mode: str = "token",
                         base_ppl: Mapping[str, float] | None = None, avoid: Sequence[int] = (),
                         progress: bool = False) -> list[dict]:
    """Perplexity after perturbing one core parameter on each of the most core-dense dimensions.

    ``params`` {name: parameter} (``region_tensors``), ``core_masks`` the core region over them,
    ``score`` the core score (``masks.core_scores``), ``held_out`` {corpus: LongTensor (n, seq_len)}.

    1. c = ``dimension_counts(lm, core_masks)``; D = the ``top`` dimensions by c (ties: the lower
       index), dimensions with c[d] = 0 left out.
    2. For d in D: over the residual matrices W (d_model on axis a), the entry
       e* = argmax {score_W[e] : core_W[e], e_a = d}; perturb W[e*] alone with ``op`` ("zero",
       "scale:C" or an ``Op``; ``perturb.single``, restored bit-identically on leaving, also on an
       exception) and measure every corpus's perplexity.
    3. Control, in the same matrix W: e° = argmax {score_W[e] : e_a ∉ D ∪ ``avoid``} (core or not),
       perturbed the same way; pass the massive-activation dimensions as ``avoid`` so that a
       control never lands on an outlier dimension that is not among the top ``top``. It is as important as anything in that matrix off the top dimensions, so a
       jump for e* and none for e° points at the dimension rather than at the parameter's score.

    ``base_ppl`` {corpus: perplexity of the unperturbed model} or None to compute it once here.
    Rows, one per d in D: {"dim", "core_count", "op", "param", "index" (into the stored weight),
    "value" (its original value), "ppl", "ppl_ratio", "control_param", "control_index",
    "control_dim", "control_value", "control_ppl", "control_ppl_ratio"} (per-corpus dicts;
    a ratio is None when the base is not a positive finite number)."""
    op = as_op(op)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise EngramError(f"dimension dependency: top {top!r} must be a whole number >= 1")
    if not held_out:
        raise EngramError("dimension dependency: no held-out corpora given; pass {corpus: chunks}")
    mats = {n: wa for n, wa in residual_matrices(lm).items() if n in core_masks}
    for name in mats:
        if name not in params or name not in score:
            raise EngramError(f"dimension dependency: {name!r} has a core mask but is missing from "
                              f"{'params' if name not in params else 'score'}; pass all three over the same tensors")
        weight = mats[name][0]
        if params[name] is not weight:
            raise EngramError(f"dimension dependency: params[{name!r}] is not that parameter of this model; "
                              "take params from region_tensors(lm)")
        _check_like(score[name], weight, name, "score")
    counts = dimension_counts(lm, core_masks)
    order = sorted(range(len(counts)), key=lambda d: (-int(counts[d]), d))
    dims = [d for d in order[:top] if int(counts[d]) > 0]
    base = dict(base_ppl) if base_ppl is not None else _ppl_all(lm, held_out, batch_size, ppl_mode)
    missing = [c for c in held_out if c not in base]
    if missing:
        raise EngramError(f"dimension dependency: base_ppl lacks corpora {missing}; pass every held-out corpus")

    def on_dim(mask: torch.Tensor, axis: int, which: Sequence[int]) -> torch.Tensor:
        sel = torch.zeros(mask.shape[axis], dtype=torch.bool)
        sel[list(which)] = True
        return sel[:, None].expand(mask.shape) if axis == 0 else sel[None, :].expand(mask.shape)

    rows = []
    for d in progress_bar(dims, "dimension dependency", enabled=progress):
        best = None  # (score, name, index)
        for name, (weight, axis) in mats.items():
            allowed = core_masks[name].detach().cpu() & on_dim(core_masks[name], axis, [d])
            e = _argmax_entry(score[name], allowed)
            if e is not None:
                s = float(score[name][e])
                if best is None or s > best[0]:
                    best = (s, name, e)
        _, name, e = best
        axis = mats[name][1]
        with single(params, name, e, op):
            ppl = _ppl_all(lm, held_out, batch_size, ppl_mode)
        c = _argmax_entry(score[name], ~on_dim(core_masks[name], axis, sorted({*dims, *avoid})))
        row = {"dim": d, "core_count": int(counts[d]), "op": _op_name(op), "param": name, "index": list(e),
               "value": float(params[name].detach()[e]), "ppl": ppl, "ppl_ratio": _ratios(ppl, base),
               "control_param": None, "control_index": None, "control_dim": None, "control_value": None,
               "control_ppl": None, "control_ppl_ratio": None}
        if c is not None:  # None only when every dimension of the matrix is a top one
            with single(params, name, c, op):
                cppl = _ppl_all(lm, held_out, batch_size, ppl_mode)
            row.update(control_param=name, control_index=list(c), control_dim=c[axis],
                       control_value=float(params[name].detach()[c]), control_ppl=cppl,
                       control_ppl_ratio=_ratios(cppl, base))
        rows.append(row)
    return rows


# -- agreement ------------------------------------------------------------------------------------
def coincide(dep_dims: Sequence[int], massive_dims: Sequence[int]) -> dict:
    """Whether the dependency dimensions and the massive-activation dimensions agree, by one rule:
    A = set(dep_dims), B = set(massive_dims); {"both": sorted A ∩ B, "only_dependency": A \\ B,
    "only_massive": B \\ A, "jaccard": |A ∩ B| / |A ∪ B| (None when both are empty: nothing to
    compare), "n_dependency": |A|, "n_massive": |B|}."""
    a, b = {int(d) for d in dep_dims}, {int(d) for d in massive_dims}
    union = a | b
    return {"both": sorted(a & b), "only_dependency": sorted(a - b), "only_massive": sorted(b - a),
            "jaccard": len(a & b) / len(union) if union else None, "n_dependency": len(a), "n_massive": len(b)}
