"""``find_circuit(lm, facts, config) -> CircuitResult``: the circuit locator end to end.

1. Pairs: filter facts (answer tokenizes, model gets it right), split subjects into discovery and
   evaluation, corrupt each prompt with another subject of its side (``data.split_pairs``).
2. Scores: edge attribution on the discovery pairs (``attribute.attribute_edges``), with the
   differences of the ablation that evaluates (``score_ablation``, by default ``ablation``).
3. Circuit: prune by top-N, threshold or greedy growth, then drop unreachable edges. Without an
   explicit N, the smallest N (at most ``max_fraction`` of the edges) whose circuit reaches
   ``target_faithfulness`` *on the discovery pairs* is used, so the evaluation pairs stay unseen.
4. Evaluation on the held-out pairs: faithfulness, Hit@10 and a faithfulness-versus-N curve, all
   under one named ablation (the one N was chosen under); head roles and a logit lens.

Edge counts are of this graph, whose key/value readers are per key/value head: with grouped-query
attention it has fewer edges than EAP-IG's ungrouped graph (SmolLM2-135M: 70,651 against
123,211); ``summary()["n_edges_ungrouped"]`` gives the latter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engramlab.config import to_dict
from engramlab.data.facts import FactSet
from engramlab.errors import EngramError
from engramlab.locate.circuits.attribute import attribute_edges
from engramlab.locate.circuits.components import head_roles, logit_lens
from engramlab.locate.circuits.config import ABLATIONS, METHODS, METRICS, RULES, CircuitConfig, check_method  # noqa: F401
from engramlab.locate.circuits.data import encode_pairs, split_pairs
from engramlab.locate.circuits.evaluate import CircuitEvaluator, faithfulness_curve
from engramlab.locate.circuits.graph import CircuitGraph, edge_count
from engramlab.locate.circuits.prune import circuit_nodes, prune
from engramlab.locate.base import model_facts
from engramlab.models.context import check_facts_fit
from engramlab.models.loading import LoadedModel
from engramlab.progress import progress_bar


@dataclass
class CircuitResult:
    """Scores, the circuit and its evaluation (the Result shape every locator shares)."""

    graph: CircuitGraph
    scores: torch.Tensor          # (n_writers, n_readers) float32, averaged over discovery pairs
    kept: torch.Tensor            # (n_writers, n_readers) bool, the circuit
    config: dict
    metrics: dict                 # evaluation on held-out pairs (faithfulness, Hit@10, ...)
    curve: list[dict] = field(default_factory=list)       # faithfulness vs N on held-out pairs
    heads: list[dict] = field(default_factory=list)       # roles of the circuit's heads
    lens: list[dict] = field(default_factory=list)        # logit lens per layer
    pairs: dict = field(default_factory=dict)             # discovery / evaluation subjects
    skipped: list[dict] = field(default_factory=list)     # facts left out, with reasons
    stats: dict = field(default_factory=dict)             # counts and seconds
    model: dict = field(default_factory=dict)             # spec and sizes of the model

    def records(self) -> list[dict]:
        """One row per fact: ``role`` discovery | evaluation (with its corrupted subject and
        answer) or skipped (with the reason)."""
        rows = []
        for role in ("discovery", "evaluation"):
            for p in self.pairs.get(role, []):
                rows.append({"relation": p["relation"], "subject": p["subject"], "object": p["object"], "role": role,
                             "corrupt_subject": p["corrupt_subject"], "corrupt_object": p["corrupt_object"]})
        for s in self.skipped:
            rows.append({"relation": s.get("relation"), "subject": s.get("subject"), "object": s.get("object"),
                         "role": "skipped", "reason": s.get("reason")})
        return rows

    def summary(self) -> dict:
        roles = [h["role"] for h in self.heads]
        g = self.graph
        out = {"n_nodes": g.n_nodes, "n_edges_total": g.n_edges,
               "n_edges_ungrouped": edge_count(g.n_layers, g.n_heads, g.n_heads, g.parallel_residual),
               "n_edges_kept": int(self.kept.sum()),
               "n_nodes_kept": int(circuit_nodes(self.kept, self.graph).sum()),
               "edge_fraction": int(self.kept.sum()) / self.graph.n_edges}
        for key in ("faithfulness", "hit_at_10_model", "hit_at_10_circuit", "ablation"):
            out[key] = self.metrics.get(key)
        out["score_ablation"] = self.config.get("score_ablation") or self.config.get("ablation")
        out["ig_rule"] = self.config.get("ig_rule", "right")
        out["discovery_faithfulness"] = self.metrics.get("discovery_faithfulness")
        out.update({f"n_{r}_heads": roles.count(r) for r in ("mover", "relation", "mixture")})
        out.update(self.stats)
        return out

    def edges(self) -> list[dict]:
        """Kept edges, largest |score| first: from, to, kind, score."""
        from engramlab.locate.circuits.graph import READER_KINDS

        w_names, r_names = self.graph.writer_names(), self.graph.reader_names()
        rows = []
        for w, r in self.kept.nonzero().tolist():
            rows.append({"from": w_names[w], "to": r_names[r], "kind": READER_KINDS[int(self.graph.reader_kind[r])],
                         "score": float(self.scores[w, r])})
        return sorted(rows, key=lambda e: -abs(e["score"]))

    def save(self, directory: str | Path) -> None:
        """Write the shared files and those listed in ``store`` (``store.write_eapig`` adds the
        EAP-IG JSON of every edge)."""
        from engramlab.locate.circuits import store

        store.save_result(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "CircuitResult":
        from engramlab.locate.circuits import store

        return store.load_result(cls, Path(directory))


def _auto_n(evaluator: CircuitEvaluator, scores: torch.Tensor, graph: CircuitGraph, config: CircuitConfig) -> int:
    """Smallest N <= max_fraction * edges whose circuit reaches the target on ``evaluator``'s pairs:
    the curve grid first, then bisection between the last grid point below and the first above."""
    cap = max(1, int(config.max_fraction * graph.n_edges))
    grid = sorted({max(1, min(cap, round(f * graph.n_edges))) for f in config.curve} | {cap})

    def ok(n: int) -> bool:
        f = evaluator.evaluate(prune(scores, graph, config.rule, n=n))["faithfulness"]
        return not math.isnan(f) and f >= config.target_faithfulness

    low = 0
    for n in grid:
        if ok(n):
            high = n
            break
        low = n
    else:
        return cap
    while high - low > max(1, high // 20):  # 5% resolution is plenty
        mid = (low + high) // 2
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high


def find_circuit(lm: LoadedModel, facts: FactSet, config: CircuitConfig | None = None, *, progress: bool = False,
                 show_progress: bool | None = None) -> CircuitResult:
    """Find the circuit behind ``facts`` in ``lm`` and evaluate it on held-out facts.

    ``show_progress`` is the old name of ``progress``."""
    config = config or CircuitConfig()
    progress = progress if show_progress is None else show_progress
    start = time.time()
    if len(facts) == 0:
        raise EngramError(f"{facts.source}: no facts to work on (check --relation / --limit)")
    check_facts_fit(lm, facts)
    split = split_pairs(lm, facts, config.split, config.template, config.seed, config.require_correct)
    discovery = encode_pairs(lm, split.discovery, config.template)
    evaluation = encode_pairs(lm, split.evaluation, config.template)
    graph = CircuitGraph.from_model(lm)

    t0 = time.time()
    bar = (lambda chunks: progress_bar(chunks, f"attribute ({config.method})")) if progress else None
    scores = attribute_edges(lm, graph, discovery, config.method, config.steps, config.metric,
                             config.batch_size, progress=bar, rule=config.ig_rule,
                             ablation=config.score_ablation or config.ablation)
    attribute_seconds = time.time() - t0

    disc_eval = CircuitEvaluator(lm, graph, discovery, config.ablation, config.metric, config.batch_size)
    if config.rule == "threshold":
        kept = prune(scores, graph, "threshold", tau=config.threshold)
        n = int(kept.sum())
    else:
        n = config.top_n if config.top_n is not None else _auto_n(disc_eval, scores, graph, config)
        kept = prune(scores, graph, config.rule, n=n)
    held_out = CircuitEvaluator(lm, graph, evaluation, config.ablation, config.metric, config.batch_size)
    metrics = held_out.evaluate(kept)
    metrics["discovery_faithfulness"] = disc_eval.evaluate(kept)["faithfulness"]
    sizes = [max(1, round(f * graph.n_edges)) for f in config.curve]
    curve = faithfulness_curve(held_out, scores, graph, sizes, "greedy" if config.rule == "greedy" else "topn")

    nodes = circuit_nodes(kept, graph)
    heads = [(l, h) for l in range(graph.n_layers) for h in range(graph.n_heads) if nodes[graph.head_writer(l, h)]]
    roles = head_roles(lm, graph, evaluation, heads, config.mover_ratio, config.relation_ratio, config.batch_size)
    lens = logit_lens(lm, evaluation, config.batch_size)
    total = time.time() - start
    stats = {"n_facts": split.n_facts, "n_wrong": split.n_wrong, "n_skipped": len(split.skipped),
             "n_discovery": len(discovery), "n_evaluation": len(evaluation), "top_n": n,
             "seconds": round(total, 3), "attribute_seconds": round(attribute_seconds, 3),
             "attribute_seconds_per_example": round(attribute_seconds / len(discovery), 4)}
    pairs = {side: [{"subject": p.fact.subject, "object": p.fact.object, "corrupt_subject": p.corrupt_subject,
                     "corrupt_object": p.corrupt_object, "relation": p.fact.relation} for p in ps]
             for side, ps in (("discovery", split.discovery), ("evaluation", split.evaluation))}
    return CircuitResult(graph, scores, kept, to_dict(config), metrics, curve, roles, lens, pairs, split.skipped, stats,
                         model_facts(lm))
