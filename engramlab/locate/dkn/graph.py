"""The neuron graph of a fact: how strongly the weights connect two MLP neurons.

Neuron A in layer i writes ``w_out_A`` (its row of W_out, (d_model,)) into the residual stream per
unit of activation. Neuron B in layer j > i reads the residual stream through the MLP norm and its
input column(s) of W_in (and W_gate). The *connection strength* is what A's output adds to B's
pre-activation(s) per unit of A's activation, from the weights alone:

    plain MLP:   s(A, B) = |w_out_A . r_B|                       r_B = norm-folded column of W_in
    gated MLP:   s(A, B) = sqrt((w_out_A . r_up_B)^2 + (w_out_A . r_gate_B)^2)

The gated form is the length of A's push on B's two inputs (up, gate): it reduces to the plain
form when there is one input, does not prefer either projection, and does not let the two cancel
(a sum of signed dot products would). The direction is always earlier layer writes, later layer
reads; nothing flows backwards.

Norm folding (default on): the MLP norm multiplies the normalised residual elementwise by its
gain before W_in reads it, so ``r_B = gain * w_in_B`` (the adapter's ``norm_spec``: the weight, or
Gemma's ``1 + weight``); a LayerNorm also subtracts the mean, so ``r_B`` is centred.

The norm's 1/rms factor depends on the input, not the weights. By default it is left out: it
scales every edge into one layer alike at a position, but the clustering thresholds are global
quantiles over edges into *different* layers, whose rms differ by orders of magnitude (SmolLM2:
0.15 at layer 0, ~2 at layer 1, ~29 at layer 29). ``read_scale`` (from ``reader_inv_rms``: the
fact's own MLP-norm input at its last prompt position) multiplies every edge into layer j by
1/rms_j, which is what A's output adds to B's pre-activation on that prompt (to first order: the
rms itself moves a little with A's output):

    s_rms(A, B) = s(A, B) / rms_j,   rms_j = sqrt(mean_k (x_k - [mean x])^2 + eps)

(x: the residual the norm of layer j reads; the mean is subtracted for a LayerNorm only).

The graph: distance ``1 / s(A, B)`` for 0 < j - i <= ``max_span``; same-layer pairs and pairs
further apart have no direct edge (``inf``): they are linked only through paths over other
neurons of the fact, which is what single-linkage (persistence) clustering and the shortest-path
distances of the baselines do (``engramlab.locate.dkn.clustering``). The published DKN code instead
puts a direct edge only between *adjacent* layers and links gaps of 2-3 layers through the fact's
other neurons in every intermediate layer; here any earlier writer connects to any reader up to
``max_span`` layers later, since the residual stream carries A's output to every later layer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engramlab.models.adapters import ArchAdapter
from engramlab.models.hooks import site_name
from engramlab.models.loading import LoadedModel
from engramlab.models.scoring import Neuron, encode  # noqa: F401  (Neuron: (layer, index), re-exported)


def read_vectors(adapter: ArchAdapter, layer: int, index: Sequence[int], fold_norm: bool = True) -> list[torch.Tensor]:
    """The directions neurons ``index`` of ``layer`` read from the residual stream.

    Returns [up (k, d_model)] or, for gated MLPs, [up, gate]. With ``fold_norm`` the MLP norm's
    elementwise weight multiplies each read vector, and a LayerNorm's mean subtraction is applied
    to it (centring the read vector is the same as centring what is written, since the centring
    matrix is symmetric); the norm's data-dependent 1/rms factor is not static and is left out.
    """
    mats = [adapter.W_in(layer)] + ([adapter.W_gate(layer)] if adapter.has_gated_mlp else [])
    spec = adapter.norm_spec(adapter.mlp_norm(layer)) if fold_norm else None
    gain, centres = (spec.gain, spec.centred) if spec is not None else (None, False)
    out = []
    for w in mats:
        r = w.detach().float()[:, list(index)].t()  # (k, d_model)
        if gain is not None:
            r = r * gain
        if centres:
            r = r - r.mean(dim=1, keepdim=True)
        out.append(r)
    return out


@torch.no_grad()
def reader_inv_rms(lm: LoadedModel, prompt: str) -> torch.Tensor:
    """(n_layers,) 1/rms of what each layer's MLP norm reads at the last token of ``prompt``.

    rms_l = sqrt(mean_k (x_k - [mean x])^2 + eps) with x (d_model,) the norm's input
    (``mlp.in``: resid_mid, or resid_pre with a parallel residual), the mean subtracted for a
    LayerNorm only and eps the norm's own (``norm_spec``), so x / rms_l is exactly what the norm
    scales by its gain.
    """
    a = lm.adapter
    names = [site_name("mlp.in", l) for l in range(a.n_layers)]
    ids = encode(lm, prompt)
    with lm.hooks.capture(names) as cache:
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    out = []
    for l, name in enumerate(names):
        spec = a.norm_spec(a.mlp_norm(l))
        x = cache[name][0, -1].double()
        if spec.centred:
            x = x - x.mean()
        out.append(1.0 / torch.sqrt(x.pow(2).mean() + spec.eps))
    return torch.stack(out).float().cpu()


def connection_strengths(adapter: ArchAdapter, neurons: Sequence[Neuron], max_span: int = 3,
                         fold_norm: bool = True, read_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric (n, n) strengths of the direct connections between ``neurons``; 0 = no edge.

    For A in layer i and B in layer j with 0 < j - i <= max_span the strength is the size of what
    A's output adds to B's pre-activation(s) per unit of A's activation (module docstring).
    ``read_scale`` (n_layers,), e.g. ``reader_inv_rms``, multiplies every edge into layer j by
    ``read_scale[j]``.
    """
    if not neurons:
        return torch.zeros(0, 0)
    writes = torch.stack([adapter.W_out(l).detach().float()[i] for l, i in neurons])  # (n, d_model)
    per_neuron = [read_vectors(adapter, l, [i], fold_norm) for l, i in neurons]
    reads = [torch.cat(kind) for kind in zip(*per_neuron)]  # [up (n, d_model)] (+ gate)
    # dots[k, a, b] = w_out_A . read_k(B); up and gate combine as the length of the 2-vector.
    dots = torch.stack([writes @ r.t() for r in reads])
    strength = dots.pow(2).sum(0).sqrt()  # (n, n), directed: row writes, column reads
    layers = torch.tensor([l for l, _ in neurons])
    if read_scale is not None:
        strength = strength * read_scale.float()[layers][None, :]  # the reader's (column's) layer
    gap = layers[None, :] - layers[:, None]
    directed = torch.where((gap > 0) & (gap <= max_span), strength, torch.zeros_like(strength))
    return directed + directed.t()  # each pair has at most one direction (the later one reads)


def neuron_distances(adapter: ArchAdapter, neurons: Sequence[Neuron], max_span: int = 3,
                     fold_norm: bool = True, read_scale: torch.Tensor | None = None) -> np.ndarray:
    """(n, n) distances 1 / strength (``inf`` = no direct edge, 0 on the diagonal)."""
    s = connection_strengths(adapter, neurons, max_span, fold_norm, read_scale).double().numpy()
    dist = np.full_like(s, np.inf)
    dist[s > 0] = 1.0 / s[s > 0]
    np.fill_diagonal(dist, 0.0)
    return dist
