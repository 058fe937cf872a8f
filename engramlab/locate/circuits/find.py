"""``find_circuit(lm, facts, config) -> CircuitResult``: the circuit locator end to end.

1. Pairs: filter facts (answer tokenizes, model gets it right), split subjects into discovery and
   evaluation, corrupt each prompt with another subject of its side (``data.split_pairs``); or
   take the sides and partners of an earlier result (``config.pairs``, ``data.fixed_pairs``).
2. Scores: edge attribution on the discovery pairs (``attribute.attribute_edges``), with the
   differences of the ablation that evaluates (``score_ablation``, by default ``ablation``).
3. Circuit: prune by top-N, threshold or greedy growth, then drop unreachable edges. Without an
   explicit N, the smallest N (at most ``max_fraction`` of the edges) whose circuit reaches
   ``target_faithfulness`` *on the discovery pairs* is used, so the evaluation pairs stay unseen.
4. Evaluation on the held-out pairs: faithfulness, Hit@10 and a faithfulness-versus-N curve, all
   under one named ablation (the one N was chosen under); head roles and a logit lens.

Cost. Everything after the attribution is forward passes without gradients, so it is kept to a
few times the attribution's m forward+backward passes: each evaluator runs its clean and corrupted
prompts once; a circuit costs about one forward pass (``evaluate``: through the kept or the missing
edges, whichever are fewer per reader); the automatic N bisects the grid (one circuit when even
the cap misses the target); the curve's circuits share each chunk's activations, and the full
circuit is the clean run; head roles and the logit lens share one pass.

Edge counts are of this graph, whose key/value readers are per key/value head: with grouped-query
attention it has fewer edges than EAP-IG's ungrouped graph (SmolLM2-135M: 70,651 against
123,211); ``summary()["n_edges_ungrouped"]`` gives the latter.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engramlab.config import to_dict
from engramlab.data.facts import FactSet
from engramlab.errors import EngramError
from engramlab.locate.circuits.attribute import (attribute_edges, completeness_errors, metric_differences,
                                                 pooled_completeness_error)
from engramlab.locate.circuits.components import capture, head_roles, logit_lens
from engramlab.locate.circuits.config import ABLATIONS, METHODS, METRICS, RULES, CircuitConfig, check_method  # noqa: F401
from engramlab.locate.circuits.data import encode_pairs, split_pairs
from engramlab.locate.circuits.evaluate import CircuitEvaluator, cache_fits, faithfulness_curve
from engramlab.locate.circuits.mib import mib_scores, sweep_circuits
from engramlab.locate.circuits.graph import CircuitGraph, edge_count
from engramlab.locate.circuits.prune import circuit_nodes, prune
from engramlab.locate.base import model_facts
from engramlab.models.context import check_facts_fit
from engramlab.models.loading import LoadedModel
from engramlab.progress import progress_bar

log = logging.getLogger("engramlab")


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
    mib: dict = field(default_factory=dict)               # MIB CPR / CMD and their sweep (``mib.mib_scores``)

    def records(self) -> list[dict]:
        """One row per fact: ``role`` discovery | evaluation (with its corrupted subject and
        answer, and ``correct``: the model ranks the answer's first token first) or skipped (with
        the reason). A result's records.jsonl gives ``CircuitConfig.pairs``."""
        rows = []
        for role in ("discovery", "evaluation"):
            for p in self.pairs.get(role, []):
                rows.append({"relation": p["relation"], "subject": p["subject"], "object": p["object"], "role": role,
                             "corrupt_subject": p["corrupt_subject"], "corrupt_object": p["corrupt_object"]})
                if "correct" in p:  # whether the model's top-1 first token is the answer (older results lack it)
                    rows[-1]["correct"] = p["correct"]
                if "completeness_error" in p:  # discovery pairs: the attribution's IG completeness error
                    rows[-1]["completeness_error"] = p["completeness_error"]
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
        for key in ("cpr", "cmd", "mib_ranking"):
            if key in self.mib:
                out[key] = self.mib[key]
        if "mib_fractions" in self.mib:  # summary values are scalars: the list as "0.001,0.002,..."
            out["mib_fractions"] = ",".join(f"{f:g}" for f in self.mib["mib_fractions"])
        discovery = [p for p in self.pairs.get("discovery", []) if p.get("completeness_error") is not None]
        errors = [p["completeness_error"] for p in discovery]
        if errors:
            out["mean_completeness_error"] = sum(errors) / len(errors)
            out["max_completeness_error"] = max(errors)
            if all("metric_difference" in p for p in discovery):  # results saved before it lack the weights
                out["completeness_error"] = pooled_completeness_error(errors, [p["metric_difference"] for p in discovery])
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


def smallest_passing(grid: list[int], ok: Callable[[int], bool], resolution: int = 20) -> int:
    """The smallest N of ``grid`` (ascending) with ``ok(N)``, then refined by bisection between it
    and the grid point below down to N/``resolution``; the largest grid point when none passes.

    Assumes ``ok`` is monotone in N (more edges, more faithful), so the grid is searched by
    bisection too: the largest point first (when it fails nothing smaller is tried), then the
    first passing point in about log2(len(grid)) more calls, where a scan from the bottom would
    take up to len(grid). For a monotone ``ok`` the answer is the scan's, call for call the same
    refinement. Where faithfulness overshoots and falls back (seen on tiny random models) the two
    can differ: a cap that misses the target is the answer here, even when a smaller grid point
    reached it (the scan stopped there)."""
    if not ok(grid[-1]):
        return grid[-1]
    fails, passes = -1, len(grid) - 1  # grid[passes] passes; grid[fails] fails (-1: N = 0)
    while passes - fails > 1:
        mid = (fails + passes) // 2
        fails, passes = (fails, mid) if ok(grid[mid]) else (mid, passes)
    low, high = (grid[fails] if fails >= 0 else 0), grid[passes]
    while high - low > max(1, high // resolution):  # 5% resolution is plenty
        mid = (low + high) // 2
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high


def _auto_n(evaluator: CircuitEvaluator, scores: torch.Tensor, graph: CircuitGraph, config: CircuitConfig,
            tick: Callable[[], None] = lambda: None) -> int:
    """Smallest N <= max_fraction * edges whose circuit reaches the target on ``evaluator``'s pairs
    (``smallest_passing`` over the curve's grid, capped); ``tick`` is called once per circuit tried."""
    cap = max(1, int(config.max_fraction * graph.n_edges))
    grid = sorted({max(1, min(cap, round(f * graph.n_edges))) for f in config.curve} | {cap})

    def ok(n: int) -> bool:
        tick()
        f = evaluator.evaluate(prune(scores, graph, config.rule, n=n))["faithfulness"]
        return not math.isnan(f) and f >= config.target_faithfulness

    return smallest_passing(grid, ok)


class _Stages:
    """Seconds per stage of ``find_circuit`` and, with ``progress``, a bar per stage."""

    def __init__(self, progress: bool):
        self.progress, self.seconds = progress, {}

    def bar(self, name: str):
        """A wrapper for the stage's iterator (None without progress)."""
        return (lambda items: progress_bar(items, name)) if self.progress else None

    @contextmanager
    def timed(self, key: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0

    @contextmanager
    def ticker(self, name: str):
        """A callable that advances a bar of unknown length by one (a no-op without progress)."""
        if not self.progress:
            yield lambda: None
            return
        steps = progress_bar(itertools.count(), name, total=None)
        try:
            yield lambda: next(steps)
        finally:
            steps.close()


def find_circuit(lm: LoadedModel, facts: FactSet, config: CircuitConfig | None = None, *, progress: bool = False,
                 show_progress: bool | None = None) -> CircuitResult:
    """Find the circuit behind ``facts`` in ``lm`` and evaluate it on held-out facts.

    Stages, each timed in ``stats`` (``<stage>_seconds``) and with a progress bar under
    ``progress``: filter (pairs), attribute, search (the discovery pairs' evaluator: the automatic
    N and the discovery faithfulness), heads and lens (one clean pass of the evaluation pairs),
    evaluate (the held-out evaluation of the circuit), curve. ``show_progress`` is the old name
    of ``progress``."""
    config = config or CircuitConfig()
    progress = progress if show_progress is None else show_progress
    stages = _Stages(progress)
    start = time.time()
    if len(facts) == 0:
        raise EngramError(f"{facts.source}: no facts to work on (check --relation / --limit)")
    check_facts_fit(lm, facts)
    with stages.timed("filter"):
        split = split_pairs(lm, facts, config.split, config.template, config.seed, config.require_correct,
                            pairs=config.pairs, progress=stages.bar("filter"))
        discovery = encode_pairs(lm, split.discovery, config.template)
        evaluation = encode_pairs(lm, split.evaluation, config.template)
    graph = CircuitGraph.from_model(lm)

    # Evaluation runs no backward pass: twice the attribution's rows per chunk cost no more memory
    # and run a tenth faster (fewer, larger products).
    eval_rows = 2 * config.batch_size
    score_ablation = config.score_ablation or config.ablation
    # The attribution's forward of the clean and corrupted discovery prompts serves their evaluator.
    runs = ([] if config.ablation == score_ablation == "corrupted" and cache_fits(lm, graph, discovery, eval_rows)
            else None)
    with stages.timed("attribute"):
        bar = (lambda chunks: progress_bar(chunks, f"attribute ({config.method})")) if progress else None
        terms: list = []
        scores = attribute_edges(lm, graph, discovery, config.method, config.steps, config.metric,
                                 config.batch_size, progress=bar, rule=config.ig_rule, ablation=score_ablation,
                                 runs=runs, completeness=terms)
        errors, differences = completeness_errors(terms), metric_differences(terms)
        pooled = pooled_completeness_error(errors, differences)
        if config.method == "eap-ig" and pooled is not None and pooled > config.completeness_tolerance:
            n_pairs = sum(e is not None for e in errors)
            log.warning(f"EAP-IG completeness error {pooled:.3f} (over {n_pairs} discovery pairs, weighted by "
                        f"|M(abl) - M(clean)|) is above "
                        f"--completeness-tolerance {config.completeness_tolerance:g}: the integral is not converged; "
                        f"raise --steps (now {config.steps}) or use --ig-rule gauss-legendre")

    with stages.timed("search"):
        disc_eval = CircuitEvaluator(lm, graph, discovery, config.ablation, config.metric, eval_rows, runs=runs)
        del runs
        if config.rule == "threshold":
            kept = prune(scores, graph, "threshold", tau=config.threshold)
            n = int(kept.sum())
        else:
            if config.top_n is not None:
                n = config.top_n
            else:
                with stages.ticker("search N") as tick:
                    n = _auto_n(disc_eval, scores, graph, config, tick)
            kept = prune(scores, graph, config.rule, n=n)
        discovery_faithfulness = disc_eval.evaluate(kept, stages.bar("search N"))["faithfulness"]
    # Head roles and the logit lens read one clean pass of the evaluation pairs, which also gives
    # the held-out evaluator its clean logits.
    nodes = circuit_nodes(kept, graph)
    heads = [(l, h) for l in range(graph.n_layers) for h in range(graph.n_heads) if nodes[graph.head_writer(l, h)]]
    with stages.timed("heads"):
        captured = capture(lm, evaluation, sorted({l for l, _ in heads}), eval_rows, stages.bar("heads"))
        roles = head_roles(lm, graph, evaluation, heads, config.mover_ratio, config.relation_ratio,
                           config.batch_size, captured=captured)
    with stages.timed("lens"):
        lens = logit_lens(lm, evaluation, config.batch_size, captured=captured, progress=stages.bar("lens"))
    with stages.timed("evaluate"):
        held_out = CircuitEvaluator(lm, graph, evaluation, config.ablation, config.metric, eval_rows,
                                    clean_logits=captured.clean_logits(lm))
        del captured
        metrics = held_out.evaluate(kept, stages.bar("evaluate"))
        metrics["discovery_faithfulness"] = discovery_faithfulness
    with stages.timed("curve"):
        sizes = [max(1, round(f * graph.n_edges)) for f in config.curve]
        curve_rule = "greedy" if config.rule == "greedy" else "topn"
        # The curve's and the MIB sweep's circuits in one pass over the pairs (the evaluator
        # remembers them, so each call below only reads its results; shared circuits run once).
        held_out.evaluate_many([prune(scores, graph, curve_rule, n=n) for n in sorted(set(sizes))] +
                               [kept for _, kept in sweep_circuits(scores, graph, config.mib_fractions,
                                                                   config.mib_ranking)],
                               progress=stages.bar("curve"))
        curve = faithfulness_curve(held_out, scores, graph, sizes, curve_rule)
        mib = mib_scores(held_out, scores, graph, config.mib_fractions, config.mib_ranking)
    total = time.time() - start
    correct = {side: (ev.rank_clean == 1).tolist() for side, ev in (("discovery", disc_eval), ("evaluation", held_out))}
    # Without the filter, the pairs the model gets wrong are counted here (with it they were left out).
    n_wrong = split.n_wrong if split.filtered else sum(not c for side in correct.values() for c in side)
    sec = stages.seconds
    stats = {"n_facts": split.n_facts, "n_wrong": n_wrong, "n_skipped": len(split.skipped),
             "n_discovery": len(discovery), "n_evaluation": len(evaluation), "top_n": n,
             "seconds": round(total, 3), "attribute_seconds": round(sec["attribute"], 3),
             "attribute_seconds_per_example": round(sec["attribute"] / len(discovery), 4),
             **{f"{k}_seconds": round(sec[k], 3) for k in ("filter", "search", "evaluate", "curve", "heads", "lens")}}
    pairs = {side: [{"subject": p.fact.subject, "object": p.fact.object, "corrupt_subject": p.corrupt_subject,
                     "corrupt_object": p.corrupt_object, "relation": p.fact.relation, "correct": ok}
                    for p, ok in zip(ps, correct[side])]
             for side, ps in (("discovery", split.discovery), ("evaluation", split.evaluation))}
    for row, error, d in zip(pairs["discovery"], errors, differences):  # attribute_edges keeps the discovery order
        row["completeness_error"] = error
        row["metric_difference"] = d  # |M(abl) - M(clean)|: the weight of its error in completeness_error
    return CircuitResult(graph, scores, kept, to_dict(config), metrics, curve, roles, lens, pairs, split.skipped, stats,
                         model_facts(lm), mib)
