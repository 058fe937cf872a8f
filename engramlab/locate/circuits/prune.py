"""From edge scores to a circuit: a boolean (n_writers, n_readers) mask of kept edges.

Three rules, all tensor operations over the score matrix:

* ``top_n``: the N edges of largest |score| (``signed=True``: of largest -score, EAP-IG's sign:
  the edges whose cut lowers the metric most; see ``mib``);
* ``threshold``: every edge with |score| >= tau;
* ``greedy``: grow from the logits, each time adding the highest-|score| edge into a node already
  in the circuit (so the circuit stays connected to the logits by construction).

``prune_unreachable`` then drops edges that are not on some input -> ... -> logits path: their
writer cannot be reached from the input, or their reader's node cannot reach the logits.
Reachability is a fixed point of boolean matrix products over the node graph, so no recursion.
"""

from __future__ import annotations

import math

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.config import RULES
from engramlab.locate.circuits.graph import CircuitGraph


def _masked_abs(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, scores.abs(), torch.full_like(scores, -1.0))


def top_n(scores: torch.Tensor, graph: CircuitGraph, n: int, signed: bool = False) -> torch.Tensor:
    """The ``n`` valid edges of largest |score|, or with ``signed`` of largest -score (all of them
    if n >= the edge count)."""
    n = min(int(n), graph.n_edges)
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    if n > 0:
        key = (torch.where(graph.valid, -scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
               if signed else _masked_abs(scores, graph.valid))
        kept[key.flatten().topk(n).indices] = True
    return kept.view_as(scores) & graph.valid


def threshold(scores: torch.Tensor, graph: CircuitGraph, tau: float) -> torch.Tensor:
    """Every valid edge with |score| >= ``tau``."""
    return (scores.abs() >= tau) & graph.valid


def greedy(scores: torch.Tensor, graph: CircuitGraph, n: int) -> torch.Tensor:
    """Grow ``n`` edges from the logits, best |score| first among edges into the circuit.

    Exact, with few rounds: the sequential rule would take the current candidates in order of
    |score| until it adds an edge whose writer is new to the circuit (only that can create new
    candidates), so each round takes that whole run at once. Rounds <= number of nodes + 1."""
    n = min(int(n), graph.n_edges)
    absval = scores.abs()
    kept = torch.zeros_like(graph.valid)
    in_circuit = torch.zeros(graph.n_nodes, dtype=torch.bool)
    in_circuit[graph.n_writers] = True  # the logits
    feeds = graph.reader_nodes  # (n_readers, n_nodes)
    has_readers = torch.ones(graph.n_writers, dtype=torch.bool)
    has_readers[0] = False  # the input reads nothing: adding it opens no new edges
    count = 0
    while count < n:
        open_readers = feeds[:, in_circuit].any(1)
        candidates = graph.valid & ~kept & open_readers[None, :]
        flat = torch.where(candidates, absval, torch.full_like(absval, -1.0)).flatten()
        n_cand = int(candidates.sum())
        if n_cand == 0:
            break
        order = flat.topk(min(n_cand, n - count)).indices  # best first
        writers = order // graph.n_readers
        opens = has_readers[writers] & ~in_circuit[writers]
        take = int(opens.nonzero()[0]) + 1 if bool(opens.any()) else len(order)
        chosen = order[:take]
        kept.view(-1)[chosen] = True
        in_circuit[writers[:take]] = True
        count += take
    return kept


def reachable(kept: torch.Tensor, graph: CircuitGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """(from_input, to_logits): (n_nodes,) bool each, over the kept edges."""
    feeds = kept.float() @ graph.reader_nodes.float() > 0  # (n_writers, n_nodes): u feeds node v
    feeds_f = feeds.float()
    forward = torch.zeros(graph.n_nodes, dtype=torch.bool)
    forward[0] = True
    backward = torch.zeros(graph.n_nodes, dtype=torch.bool)
    backward[graph.n_writers] = True
    for _ in range(graph.n_nodes):  # the path length bound; stops far earlier in practice
        new_f = forward | (forward[: graph.n_writers].float() @ feeds_f > 0)
        new_b = backward.clone()
        new_b[: graph.n_writers] |= feeds_f @ backward.float() > 0
        if torch.equal(new_f, forward) and torch.equal(new_b, backward):
            break
        forward, backward = new_f, new_b
    return forward, backward


def prune_unreachable(kept: torch.Tensor, graph: CircuitGraph) -> torch.Tensor:
    """Keep only edges on an input -> logits path: writer reachable from the input, and the reader
    feeding a node that reaches the logits (for a shared key/value reader: any node of its group)."""
    forward, backward = reachable(kept, graph)
    reader_ok = graph.reader_nodes.float() @ backward.float() > 0  # (n_readers,)
    return kept & forward[: graph.n_writers, None] & reader_ok[None, :]


def circuit_nodes(kept: torch.Tensor, graph: CircuitGraph) -> torch.Tensor:
    """(n_nodes,) bool: nodes on some kept input -> logits path (none if no edge is kept)."""
    if not bool(kept.any()):
        return torch.zeros(graph.n_nodes, dtype=torch.bool)
    forward, backward = reachable(kept, graph)
    return forward & backward


def prune(scores: torch.Tensor, graph: CircuitGraph, rule: str = "topn", n: int | None = None,
          tau: float | None = None, cleanup: bool = True, signed: bool = False) -> torch.Tensor:
    """Apply one rule (``n`` for topn/greedy, ``tau`` for threshold), then the reachability cleanup.
    ``signed``: topn ranks by -score instead of |score| (only topn has it)."""
    if rule not in RULES:
        raise EngramError(f"pruning rule {rule!r}: choose one of {', '.join(RULES)}")
    if rule == "threshold":
        if tau is None:
            raise EngramError("the threshold rule needs a threshold (|score| >= tau)")
        kept = threshold(scores, graph, tau)
    else:
        if n is None or n < 0:
            raise EngramError(f"the {rule} rule needs a number of edges n >= 0, got {n!r}")
        if signed and rule != "topn":
            raise EngramError(f"signed ranking applies to the topn rule only, not {rule!r}")
        kept = top_n(scores, graph, n, signed) if rule == "topn" else greedy(scores, graph, n)
    return prune_unreachable(kept, graph) if cleanup else kept
