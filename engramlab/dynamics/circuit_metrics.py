"""How a circuit changes between checkpoints: edge and node Jaccard, entropy, layer shares, head roles.

For kept-edge masks A and B (``CircuitResult.kept``, (n_writers, n_readers) bool)::

    jaccard(A, B) = |A and B| / |A or B|          (1 when both are empty)

and for a circuit with edge scores s_e over its kept edges K (``CircuitResult.scores``)::

    p_e = |s_e| / sum_{f in K} |s_f|,   entropy = -sum_{e in K} p_e log p_e   (nats)

so a circuit whose attribution sits on a few edges has low entropy, and one spread evenly over n
edges has log n (Ou et al. 2025 track the same two quantities over continual pre-training).

Node Jaccard is the same index over the circuits' node masks (``prune.circuit_nodes``: the nodes
on some kept input -> logits path), so it ignores which of a node's edges were kept.

Layer bands. Band 0 is the input embedding, band l + 1 the writers of layer l (its heads and its
MLP); ``layer_shares`` gives, per band b, the share of the kept edges whose *writer* is in b::

    share_b = #{kept (w, r) : band(w) = b} / #{kept}          (None for every band when none kept)

Head roles (``CircuitResult.heads``: records with layer, head, role in mover | relation | mixture).
``role_fractions`` is the share of the circuit's heads holding each role. ``role_stability``
follows Tigges et al. 2024 (circuits keep their functional components while the heads holding a
role change): per role r, ``role_held.r`` says whether both circuits have a head with role r, and
``role_head_jaccard.r`` is the Jaccard index of the two sets of (layer, head) holding r (None when
neither has one: nothing to compare). ``lens_first_top1_layer`` is the first layer at which the
logit lens ranks the answer first for at least half the examples (median rank 1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from engramlab.locate.circuits.prune import circuit_nodes

ROLES = ("mover", "relation", "mixture")


def edge_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two kept-edge masks of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"kept-edge masks of different graphs: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def circuit_entropy(scores: torch.Tensor, kept: torch.Tensor) -> float | None:
    """Entropy (nats) of the normalised |scores| of the kept edges; None without kept weight."""
    w = scores.abs().double()[kept.bool()]  # (n_kept,)
    total = float(w.sum())
    if total <= 0:
        return None
    p = w[w > 0] / total
    return float(-(p * p.log()).sum())


def _mask_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def node_jaccard(kept_a: torch.Tensor, kept_b: torch.Tensor, graph) -> float:
    """Jaccard index of the node sets of two circuits of ``graph`` (kept masks (n_writers,
    n_readers)); 1 when both are empty."""
    if kept_a.shape != kept_b.shape:
        raise ValueError(f"kept-edge masks of different graphs: {tuple(kept_a.shape)} vs {tuple(kept_b.shape)}")
    return _mask_jaccard(circuit_nodes(kept_a.bool(), graph), circuit_nodes(kept_b.bool(), graph))


def layer_bands(graph) -> torch.Tensor:
    """(n_writers,) long: the band of each writer, 0 for the input and l + 1 for layer l."""
    return graph.layer_of_writer + 1


def layer_shares(kept: torch.Tensor, graph) -> list[float | None]:
    """Share of the kept edges by their writer's band (n_layers + 1 entries, summing to 1; all
    None when no edge is kept). kept: (n_writers, n_readers) bool."""
    if kept.shape[0] != graph.n_writers:
        raise ValueError(f"kept-edge mask has {kept.shape[0]} writers, the graph {graph.n_writers}")
    per_writer = kept.bool().sum(1)  # (n_writers,) kept edges out of each writer
    total = int(per_writer.sum())
    if total == 0:
        return [None] * (graph.n_layers + 1)
    per_band = torch.zeros(graph.n_layers + 1, dtype=torch.long).index_add_(0, layer_bands(graph), per_writer)
    return [int(c) / total for c in per_band]


def edge_activation(kept: torch.Tensor, graph) -> list[float | None]:
    """Per band, the share of the graph's edges out of that band that the circuit keeps:
    rho(b) = |kept edges from band b| / |edges from band b| (Ou et al.'s "edge activation ratio";
    ``layer_shares`` instead divides by the circuit's size). kept: (n_writers, n_readers) bool."""
    valid = graph.valid.to(kept.device)
    bands = layer_bands(graph)
    n_bands = graph.n_layers + 1
    kept_per = torch.zeros(n_bands, dtype=torch.long).index_add_(0, bands, (kept.bool() & valid).sum(1).cpu())
    all_per = torch.zeros(n_bands, dtype=torch.long).index_add_(0, bands, valid.sum(1).cpu())
    return [int(k) / int(a) if int(a) else None for k, a in zip(kept_per, all_per)]


def role_fractions(heads: Sequence[dict]) -> dict:
    """``{role}_fraction`` for mover / relation / mixture: the share of ``heads`` (role records)
    holding that role; None for each when there are no heads."""
    roles = [h["role"] for h in heads]
    return {f"{r}_fraction": (roles.count(r) / len(roles) if roles else None) for r in ROLES}


def _heads_with(heads: Sequence[dict], role: str) -> set[tuple[int, int]]:
    return {(int(h["layer"]), int(h["head"])) for h in heads if h["role"] == role}


def role_stability(heads: Sequence[dict], ref_heads: Sequence[dict]) -> dict:
    """Per role r: ``role_held.r`` (bool: both have a head with role r) and ``role_head_jaccard.r``
    (Jaccard of the (layer, head) sets holding r; None when neither has one)."""
    out = {}
    for r in ROLES:
        mine, ref = _heads_with(heads, r), _heads_with(ref_heads, r)
        out[f"role_held.{r}"] = bool(mine) and bool(ref)
        union = mine | ref
        out[f"role_head_jaccard.{r}"] = len(mine & ref) / len(union) if union else None
    return out


def lens_first_top1_layer(lens: Sequence[dict]) -> int | None:
    """The first layer (in layer order) whose logit-lens median rank is 1; None if there is none."""
    for rec in sorted(lens, key=lambda r: int(r["layer"])):
        if rec.get("median_rank") is not None and float(rec["median_rank"]) <= 1:
            return int(rec["layer"])
    return None


def circuit_series(results: list[tuple[int, object]]) -> dict[int, dict]:
    """Per step, for (step, CircuitResult) pairs in step order (the last is the final circuit),
    scalar values only:

    * ``edge_jaccard_final`` / ``edge_jaccard_prev`` (None at the first step), ``entropy``;
    * ``node_jaccard_final`` / ``node_jaccard_prev``, ``edge_share.L{band}`` for bands
      0..n_layers (see the module docstring) and ``edge_activation.L{band}`` - when the result
      has a ``graph``;
    * ``mover_fraction`` / ``relation_fraction`` / ``mixture_fraction``,
      ``role_held_final.{role}`` and ``role_head_jaccard_final.{role}`` against the final
      circuit's heads - when it has ``heads``;
    * ``lens_top1_layer`` - when it has ``lens``.
    """
    if not results:
        return {}
    final = results[-1][1]
    final_nodes = _nodes(final)
    out, prev, prev_nodes = {}, None, None
    for step, r in results:
        row = {"edge_jaccard_final": edge_jaccard(r.kept, final.kept),
               "edge_jaccard_prev": None if prev is None else edge_jaccard(r.kept, prev),
               "entropy": circuit_entropy(r.scores, r.kept)}
        nodes = _nodes(r)
        if nodes is not None:
            row["node_jaccard_final"] = None if final_nodes is None else _node_index(nodes, final_nodes)
            row["node_jaccard_prev"] = None if prev_nodes is None else _node_index(nodes, prev_nodes)
            row.update({f"edge_share.L{b}": v for b, v in enumerate(layer_shares(r.kept, r.graph))})
            row.update({f"edge_activation.L{b}": v for b, v in enumerate(edge_activation(r.kept, r.graph))})
        if getattr(r, "heads", None) is not None:
            row.update(role_fractions(r.heads))
            stable = role_stability(r.heads, getattr(final, "heads", None) or [])
            row.update({f"role_held_final.{k}": stable[f"role_held.{k}"] for k in ROLES})
            row.update({f"role_head_jaccard_final.{k}": stable[f"role_head_jaccard.{k}"] for k in ROLES})
        if getattr(r, "lens", None) is not None:
            row["lens_top1_layer"] = lens_first_top1_layer(r.lens)
        out[step] = row
        prev, prev_nodes = r.kept, nodes
    return out


def _nodes(result) -> torch.Tensor | None:
    """(n_nodes,) bool node mask of a result, or None when it carries no graph."""
    graph = getattr(result, "graph", None)
    return None if graph is None else circuit_nodes(result.kept.bool(), graph)


def _node_index(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"circuits of different graphs: {a.shape[0]} vs {b.shape[0]} nodes")
    return _mask_jaccard(a, b)
