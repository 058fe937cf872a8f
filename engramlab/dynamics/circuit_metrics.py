"""How a circuit changes between checkpoints: edge Jaccard and circuit entropy.

For kept-edge masks A and B (``CircuitResult.kept``, (n_writers, n_readers) bool)::

    jaccard(A, B) = |A and B| / |A or B|          (1 when both are empty)

and for a circuit with edge scores s_e over its kept edges K (``CircuitResult.scores``)::

    p_e = |s_e| / sum_{f in K} |s_f|,   entropy = -sum_{e in K} p_e log p_e   (nats)

so a circuit whose attribution sits on a few edges has low entropy, and one spread evenly over n
edges has log n (Ou et al. 2025 track the same two quantities over continual pre-training).
"""

from __future__ import annotations

import torch


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


def circuit_series(results: list[tuple[int, object]]) -> dict[int, dict]:
    """Per step: ``edge_jaccard_final`` / ``edge_jaccard_prev`` (None at the first) and ``entropy``
    for (step, CircuitResult) pairs in step order; the last is the final circuit."""
    if not results:
        return {}
    final = results[-1][1].kept
    out, prev = {}, None
    for step, r in results:
        out[step] = {"edge_jaccard_final": edge_jaccard(r.kept, final),
                     "edge_jaccard_prev": None if prev is None else edge_jaccard(r.kept, prev),
                     "entropy": circuit_entropy(r.scores, r.kept)}
        prev = r.kept
    return out
