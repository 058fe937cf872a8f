"""How knowledge neurons and degenerate knowledge neurons change between checkpoints.

A neuron is (layer, index): MLP neuron ``index`` of layer ``layer``. A knowledge-neuron result
(``NeuronResult``) keeps per fact its refined set, ``row["neurons"] = [[layer, index, score],
...]``; its neuron set is the union over the attributed facts (rows with ``skipped`` None)::

    N = U_f {(l, i) : [l, i, _] in neurons_f}
    jaccard(A, B) = |A & B| / |A | B|                          (1 when both are empty)
    layer_share_l = #{(l', i) in N : l' = l} / |N|             (None for every layer when N is empty)

(here the layer is the model's, 0..n_layers-1: MLP neurons have no input band, unlike circuit
edges). A DKN result (``DKNResult``) keeps per fact and clustering method the neurons of its
verified DKN, ``row["methods"][method]["dkn_neurons"] = [[layer, index], ...]`` (empty when none
was found); its DKN neuron set is their union over the evaluated facts, compared the same way.
"""

from __future__ import annotations

from typing import Iterable


def _rows(result) -> list[dict]:
    return result.rows if hasattr(result, "rows") else result.records()


def neuron_set(result) -> set[tuple[int, int]]:
    """(layer, index) of every refined knowledge neuron of the attributed facts of ``result``."""
    return {(int(n[0]), int(n[1])) for r in _rows(result) if r.get("skipped") is None
            for n in r.get("neurons") or []}


def neuron_jaccard(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> float:
    """Jaccard index of two neuron sets; 1 when both are empty."""
    a, b = set(a), set(b)
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def _shares(neurons: set[tuple[int, int]], n_layers: int) -> list[float | None]:
    if not neurons:
        return [None] * n_layers
    counts = [0] * n_layers
    for layer, _ in neurons:
        if not 0 <= layer < n_layers:
            raise ValueError(f"neuron in layer {layer}, but the model has {n_layers} layers")
        counts[layer] += 1
    return [c / len(neurons) for c in counts]


def neuron_layer_shares(result, n_layers: int) -> list[float | None]:
    """Share of ``neuron_set(result)`` in each of the ``n_layers`` layers (sums to 1)."""
    return _shares(neuron_set(result), n_layers)


def _n_layers(results, n_layers: int | None) -> int:
    if n_layers is not None:
        return int(n_layers)
    got = (getattr(results[-1][1], "model", None) or {}).get("n_layers")
    if got is None:
        raise ValueError("n_layers not given and the final result does not record the model's n_layers")
    return int(got)


def neuron_series(results: list[tuple[int, object]], n_layers: int | None = None) -> dict[int, dict]:
    """Per step, for (step, NeuronResult) pairs in step order (the last is the final): scalar
    ``jaccard_final``, ``jaccard_prev`` (None at the first step), ``n_neurons`` and
    ``layer_share.L{l}`` for l in 0..n_layers-1 (default n_layers: the final result's model)."""
    if not results:
        return {}
    n_layers = _n_layers(results, n_layers)
    sets = [(step, neuron_set(r)) for step, r in results]
    final = sets[-1][1]
    out, prev = {}, None
    for step, s in sets:
        row = {"jaccard_final": neuron_jaccard(s, final),
               "jaccard_prev": None if prev is None else neuron_jaccard(s, prev), "n_neurons": len(s)}
        row.update({f"layer_share.L{l}": v for l, v in enumerate(_shares(s, n_layers))})
        out[step] = row
        prev = s
    return out


def _method(result, method: str | None) -> str:
    return method or (getattr(result, "config", None) or {}).get("method") or "persistence"


def dkn_neuron_set(result, method: str | None = None) -> set[tuple[int, int]]:
    """(layer, index) of every neuron of a verified DKN of ``method`` (default: the result's
    configured method) over the evaluated facts."""
    method = _method(result, method)
    return {(int(n[0]), int(n[1])) for r in _rows(result) if not r.get("skipped")
            for n in ((r.get("methods") or {}).get(method) or {}).get("dkn_neurons") or []}


#: dkn_series key -> the DKN summary key (of the method, ``<method>.<key>``) it copies.
DKN_SUMMARY_KEYS = {"found_rate": "dkn_found_rate", "mean_partial_drop": "mean_partial_drop",
                    "mean_full_drop": "mean_full_drop"}


def dkn_series(results: list[tuple[int, object]], method: str | None = None) -> dict[int, dict]:
    """Per step, for (step, DKNResult) pairs in step order (the last is the final): from the
    summary of ``method`` (default: each result's configured one) ``found_rate`` (share of the
    evaluated facts with a verified DKN), ``mean_partial_drop`` (largest relative drop of
    P(target) over a DKN's checked proper subsets, mean over found DKNs) and ``mean_full_drop``
    (drop with the whole DKN suppressed); and over the DKN neuron sets ``dkn_neuron_jaccard_final``,
    ``dkn_neuron_jaccard_prev`` (None at the first step) and ``n_dkn_neurons``."""
    if not results:
        return {}
    sets = [dkn_neuron_set(r, method) for _, r in results]
    out, prev = {}, None
    for (step, r), s in zip(results, sets):
        summary, m = r.summary(), _method(r, method)
        row = {key: summary.get(f"{m}.{src}") for key, src in DKN_SUMMARY_KEYS.items()}
        row.update(dkn_neuron_jaccard_final=neuron_jaccard(s, sets[-1]),
                   dkn_neuron_jaccard_prev=None if prev is None else neuron_jaccard(s, prev), n_dkn_neurons=len(s))
        out[step] = row
        prev = s
    return out


__all__ = ["DKN_SUMMARY_KEYS", "dkn_neuron_set", "dkn_series", "neuron_jaccard", "neuron_layer_shares",
           "neuron_series", "neuron_set"]
