"""``LOCATORS``: every analysis the pipeline can run, by name (the one place they are registered).

A new locator adds one ``Locator(...)`` line here (see docs/architecture.md) and passes the contract
suite in tests/test_locators.py; ``engram evolve``, ``engram study`` and the report then run it.
"""

from __future__ import annotations

from engramlab.errors import EngramError
from engramlab.locate.base import Locator
from engramlab.locate.circuits.find import CircuitConfig, CircuitResult, find_circuit
from engramlab.locate.dkn.find import DKNConfig, DKNResult, find_degenerate_neurons
from engramlab.locate.factcheck.find import FactcheckConfig, FactcheckResult, find_factcheck
from engramlab.locate.neurons.find import NeuronConfig, NeuronResult, find_knowledge_neurons
from engramlab.locate.regions.find import RegionConfig, RegionResult, find_regions
from engramlab.locate.trace.find import TraceConfig, TraceResult, find_trace
from engramlab.recall import RecallConfig, RecallResult, score_recall

LOCATORS: dict[str, Locator] = {}


def register(locator: Locator) -> Locator:
    """Add ``locator`` under its name (a name is registered once)."""
    if locator.name in LOCATORS:
        raise ValueError(f"locator {locator.name!r} is registered twice")
    LOCATORS[locator.name] = locator
    return locator


def get_locator(name: str) -> Locator:
    """The locator called ``name``; a one-line error lists the others."""
    try:
        return LOCATORS[name]
    except KeyError:
        raise EngramError(f"unknown analysis {name!r}; choose from {', '.join(LOCATORS)}") from None


register(Locator(
    "recall", RecallConfig, score_recall, RecallResult,
    help="Does the model know each fact? Rank and probability of the answer, greedy exact match.",
    summary_keys=("n_facts", "top1_accuracy", "top10_accuracy", "exact_match", "mean_target_prob"),
    quick={}))
register(Locator(
    "neurons", NeuronConfig, find_knowledge_neurons, NeuronResult,
    help="Knowledge neurons by integrated gradients, tested by suppressing and enhancing them.",
    summary_keys=("n_facts", "n_attributed", "n_skipped", "mean_own_drop", "mean_same_relation_drop",
                  "mean_other_relation_drop", "mean_random_drop", "mean_own_enhance", "mean_prompts_per_fact",
                  "mean_neurons_per_fact", "n_without_neurons", "mean_consistency", "n_relation_neurons",
                  "seconds_per_fact", "method", "mean_completeness_error", "n_passes"),
    files=("relation_neurons.json",),
    quick={"steps": 3, "max_rank": 100000, "n_compare": 2, "n_random_repeats": 1}))
register(Locator(
    "dkn", DKNConfig, find_degenerate_neurons, DKNResult,
    help="Degenerate knowledge neurons: clusters of neurons that back each other up.",
    summary_keys=("n_facts", "n_evaluated", "dkn_found_rate", "mean_partial_drop", "mean_full_drop",
                  "mean_clusters", "mean_dkn_neurons"),
    quick={"steps": 3, "known_rank": 100000, "max_candidates": 6, "robustness": False}))
register(Locator(
    "circuit", CircuitConfig, find_circuit, CircuitResult,
    help="The edges of the head/MLP graph that carry facts, by EAP-IG, evaluated on held-out facts.",
    summary_keys=("n_nodes", "n_edges_total", "n_edges_ungrouped", "n_edges_kept", "edge_fraction", "faithfulness",
                  "discovery_faithfulness", "hit_at_10_model", "hit_at_10_circuit", "n_discovery", "n_evaluation",
                  "n_wrong", "n_skipped", "n_mover_heads", "n_relation_heads", "n_mixture_heads", "cpr", "cmd",
                  "mib_ranking", "mean_completeness_error", "seconds"),
    files=("scores.safetensors", "circuit.json", "evaluation.json", "components.json", "pairs.json", "skipped.jsonl",
           "mib.json"),
    quick={"steps": 2, "require_correct": False, "top_n": 20}))

register(Locator(
    "regions", RegionConfig, find_regions, RegionResult,
    help="Parameter regions: the top --ratio of the block weights by importance (snip / wanda) over the facts' "
         "template tokens and answer tokens (or over corpora), what zeroing each does, and their overlap.",
    summary_keys=("n_facts", "accuracy.base", "accuracy.core", "accuracy.top_template", "accuracy.top_value",
                  "accuracy.random", "template.ppl_top_ratio", "value.ppl_top_ratio", "overlap.top_template.top_value",
                  "region_size", "seconds"),
    files=("corpora.jsonl", "core.safetensors", "bottom.safetensors", "random.safetensors", "overlap.json"),
    quick={"ratio": 0.05, "batch_size": 4}))

register(Locator(
    "trace", TraceConfig, find_trace, TraceResult,
    help="Causal tracing (ROME): noise on the subject's embeddings, then each clean hidden state, MLP and "
         "attention output (over a window of layers) restored at every token and layer; the indirect effects.",
    summary_keys=("n_facts", "n_skipped", "trace.peak_mlp_layer", "trace.peak_attn_layer",
                  "trace.mean_max_indirect_effect", "trace.mean_max_mlp_effect", "trace.mean_max_attn_effect",
                  "trace.mean_total_effect", "trace.noise_std", "seconds"),
    files=("trace.safetensors", "skipped.jsonl"),
    quick={"window": 2, "batch_size": 8}))

register(Locator(
    "factcheck", FactcheckConfig, find_factcheck, FactcheckResult,
    help="Fact-checking (AMIG / Chen et al. 2024): true and false claims, simple and complex, judged by "
         "relation-level DKNs, relation-level knowledge neurons (mean IG attribution below tau: false) and by "
         "asking the model; precision / recall / F1 on a held-out split.",
    summary_keys=("n_checked_facts", "n_test_claims", "n_skipped_relations", "dkn_found_rate", "n_relation_dkn",
                  "n_relation_kn", "dkn.f1", "kn.f1", "prompt.f1", "complex.dkn.f1", "complex.kn.f1",
                  "complex.prompt.f1", "dkn.threshold", "kn.threshold", "dkn.abstain", "kn.abstain", "seconds"),
    files=FactcheckResult.FILES,
    quick={"dkn": DKNConfig(steps=3, known_rank=100000, max_candidates=6, robustness=False),
           "kn": NeuronConfig(steps=3, max_rank=100000, n_compare=0, n_random_repeats=0)}))

__all__ = ["LOCATORS", "Locator", "get_locator", "register"]
