"""The MIB circuit-localisation scores CPR and CMD (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark"; the circuit track's ``evaluate_area_under_curve``).

The sweep. For each edge fraction p_i of ``fractions`` (MIB's list by default, ``MIB_FRACTIONS``:
0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), the circuit is the top N_i = floor(p_i E)
edges (E = the graph's edge count, MIB's ``int(pct * n_edges)``), ranked by

* ``absolute``: |score| (engramlab's pruning rule, ``prune.top_n``), or
* ``signed``: the score with EAP-IG's sign, largest first. EAP-IG attributes a loss
  (-logit_diff), so its score of an edge estimates metric(clean) - metric(edge cut), how much
  the edge *helps*; engramlab's scores estimate metric(edge cut) - metric(clean), so ``signed``
  ranks by -score. Edges that hurt the metric come last.

then the unreachable-edge cleanup (MIB's ``prune=True``), and its faithfulness

    f_i = (m(circuit_i) - m(empty)) / (m(clean) - m(empty))

(means over the evaluation examples; m(empty): every edge ablated, the corrupted run under
``corrupted``) is measured with ``evaluate.CircuitEvaluator``, the evaluation every other number
uses. The x axis is the requested fraction p_i (MIB's, not the share kept after the cleanup).

The scores, trapezoid rule over the sweep (linear x, as MIB's default ``log_scale=False``):

    CPR = sum_i (p_{i+1} - p_i) (f_i + f_{i+1}) / 2                  area under f; higher is better
    CMD = sum_i (p_{i+1} - p_i) (|1 - f_i| + |1 - f_{i+1}|) / 2      area between f and 1; lower is better

The ranking changes both numbers, which is why ``summary.json`` records ``mib_ranking`` beside them
(MIB's ``evaluate_area_under_curve`` defaults to absolute, its evaluation script to signed, whose
``--absolute`` is a flag; engramlab defaults to absolute, the ranking its pruning uses).
"""

from __future__ import annotations

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.config import MIB_FRACTIONS, MIB_RANKINGS, check_fractions  # noqa: F401 (re-exported)
from engramlab.locate.circuits.graph import CircuitGraph


def cpr_cmd(fractions, faithfulness) -> tuple[float, float]:
    """(CPR, CMD) of a faithfulness curve: ``fractions`` (n,) increasing x, ``faithfulness`` (n,) f(x);
    the trapezoid rule of the module docstring. NaN in f gives NaN."""
    x = [float(v) for v in fractions]
    f = [float(v) for v in faithfulness]
    if len(x) != len(f) or len(x) < 2:
        raise EngramError(f"cpr_cmd: {len(x)} fractions and {len(f)} faithfulness values; give two or more of each")
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(zip(x, f), zip(x[1:], f[1:])):
        width = x1 - x0
        cpr += width * (f0 + f1) / 2
        cmd += width * (abs(1 - f0) + abs(1 - f1)) / 2
    return cpr, cmd


def check_ranking(ranking: str) -> None:
    """Raise a one-line ``EngramError`` unless ``ranking`` is one of ``MIB_RANKINGS``."""
    if ranking not in MIB_RANKINGS:
        raise EngramError(f"mib_ranking {ranking!r}: choose one of {', '.join(MIB_RANKINGS)} (--mib-ranking)")


def sweep_circuits(scores: torch.Tensor, graph: CircuitGraph, fractions, ranking: str = "absolute"
                   ) -> list[tuple[int, torch.Tensor]]:
    """(N_i, kept_i) per fraction: the top floor(p_i E) edges by ``ranking``, after the cleanup."""
    from engramlab.locate.circuits.prune import prune

    check_ranking(ranking)
    out = []
    for p in check_fractions(fractions):
        n = int(p * graph.n_edges)
        out.append((n, prune(scores, graph, "topn", n=n, signed=ranking == "signed")))
    return out


def mib_scores(evaluator, scores: torch.Tensor, graph: CircuitGraph, fractions=MIB_FRACTIONS,
               ranking: str = "absolute", progress=None) -> dict:
    """The MIB sweep on ``evaluator``'s pairs (every circuit in one ``evaluate_many`` pass):
    ``{"cpr", "cmd", "mib_ranking", "mib_fractions", "curve": [{"fraction", "n", "n_kept",
    "faithfulness"}]}``."""
    fractions = check_fractions(fractions)
    circuits = sweep_circuits(scores, graph, fractions, ranking)
    results = evaluator.evaluate_many([kept for _, kept in circuits], progress)
    curve = [{"fraction": p, "n": n, "n_kept": int(kept.sum()), "faithfulness": r["faithfulness"]}
             for p, (n, kept), r in zip(fractions, circuits, results)]
    cpr, cmd = cpr_cmd(fractions, [c["faithfulness"] for c in curve])
    return {"cpr": cpr, "cmd": cmd, "mib_ranking": ranking, "mib_fractions": list(fractions), "curve": curve}
