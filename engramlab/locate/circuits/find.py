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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engramlab.config import check, option, validate
from engramlab.data.facts import FactSet
from engramlab.errors import EngramError
from engramlab.locate import integration
from engramlab.locate.circuits.attribute import ABLATIONS, METHODS, METRICS, attribute_edges, check_method
from engramlab.locate.circuits.components import head_roles, logit_lens
from engramlab.locate.circuits.data import encode_pairs, split_pairs
from engramlab.locate.circuits.evaluate import CircuitEvaluator, faithfulness_curve
from engramlab.locate.circuits.graph import CircuitGraph, edge_count
from engramlab.locate.circuits.prune import RULES, circuit_nodes, prune
from engramlab.models.context import check_facts_fit
from engramlab.progress import progress_bar


@dataclass
class CircuitConfig:
    """Settings of ``find_circuit``; defaults follow EAP-IG (Hanna et al. 2024)."""

    relation: str | list[str] | None = None  # keep only these relations (None: all)
    limit: int | None = None          # at most this many facts (after ``relation``)
    method: str = option("eap-ig", "Edge attribution: eap | eap-ig | clean-corrupted.", choices=METHODS)
    steps: int = option(5, "m, EAP-IG integration steps.", range=(1, None))
    ig_rule: str = option("right", "EAP-IG points k/m: right k = 1..m (Hanna et al., DKC) | left k = 0..m-1 "
                          "(upstream EAP-IG v2) | trapezoid k = 0..m (m + 1 passes).", choices=integration.RULES)
    metric: str = option("logit_diff", "logit_diff (clean vs corrupted answer) | logprob (clean answer).",
                         choices=METRICS)
    rule: str = option("topn", "Pruning: topn | threshold | greedy.", choices=RULES)
    top_n: int | None = option(None, "Edges to keep; None: chosen on the discovery pairs (see module doc).",
                               range=(1, None), integer=True)
    threshold: float | None = option(None, "|score| cut for rule=threshold.", range=(0, None))
    # What the automatic N aims for on discovery pairs (a margin: held-out pairs usually come out a
    # little lower), with at most max_fraction of the edges.
    target_faithfulness: float = option(0.9, "Faithfulness the automatic N aims for on discovery pairs.",
                                        range=(0, None), open_low=True)
    max_fraction: float = option(0.1, "Automatic N: at most this share of the edges.", range=(0, 1), open_low=True)
    ablation: str = option("corrupted", "What a missing edge carries: corrupted | zero | mean.", choices=ABLATIONS)
    score_ablation: str | None = option(None, "The differences edges are scored with (None: ablation).",
                                        choices=ABLATIONS, optional=True)
    split: float = option(0.5, "Share of each relation's subjects used for discovery.", range=(0, 1),
                          open_low=True, open_high=True)
    template: int = option(0, "Prompt template index.")
    seed: int = 0
    require_correct: bool = True      # skip facts whose answer is not the model's top-1 token
    batch_size: int = option(8, "Pairs per attribution batch.", range=(1, None))
    curve: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # edge shares
    mover_ratio: float = option(10.0, "Head roles: |subject| / |relation| direct effect above this: mover.",
                                range=(0, None), open_low=True)
    relation_ratio: float = option(0.1, "...below this: relation head.", range=(0, None), open_low=True)

    def __post_init__(self):
        validate(self)
        check_method(self.method, self.steps, self.metric, self.ig_rule, self.ablation)
        check(self, "rule", self.rule != "threshold" or self.threshold is not None,
              "rule 'threshold' needs --threshold (keep edges with |score| >= it)")
        self.curve = tuple(float(c) for c in self.curve)


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

    def save(self, directory: str | Path, eapig: bool = False) -> None:
        """Write the files listed in ``store``; ``eapig`` adds circuit_eapig.json (every edge)."""
        from engramlab.locate.circuits import store

        store.save_result(self, Path(directory), eapig)

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


def find_circuit(lm, facts: FactSet, config: CircuitConfig | None = None,
                 show_progress: bool = False) -> CircuitResult:
    """Find the circuit behind ``facts`` in ``lm`` and evaluate it on held-out facts."""
    config = config or CircuitConfig()
    start = time.time()
    facts = facts.filter(relation=config.relation, limit=config.limit)
    if len(facts) == 0:
        raise EngramError(f"{facts.source}: no facts to work on (check --relation / --limit)")
    check_facts_fit(lm, facts)
    split = split_pairs(lm, facts, config.split, config.template, config.seed, config.require_correct)
    discovery = encode_pairs(lm, split.discovery, config.template)
    evaluation = encode_pairs(lm, split.evaluation, config.template)
    graph = CircuitGraph.from_model(lm)

    t0 = time.time()
    bar = (lambda chunks: progress_bar(chunks, f"attribute ({config.method})")) if show_progress else None
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
    meta = {**asdict(config), "model": getattr(lm, "spec", None), "dtype": str(lm.dtype).replace("torch.", ""),
            "d_model": lm.adapter.d_model}
    return CircuitResult(graph, scores, kept, meta, metrics, curve, roles, lens, pairs, split.skipped, stats)
