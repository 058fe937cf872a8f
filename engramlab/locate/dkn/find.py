"""Degenerate knowledge neurons (DKNs): groups of neurons that each can carry a fact alone.

Pipeline per fact (``find_dkns``):

1. **Candidates**: integrated-gradients attribution of every MLP neuron at the last prompt
   position (``engramlab.locate.neurons.attribute_neurons``); the coarse knowledge neurons are
   those above ``threshold`` x the largest attribution, at most ``max_candidates`` of them.
2. **Neuron graph** (``engramlab.locate.dkn.graph``): distance 1 / |w_out_A . r_B| between a
   neuron A and a neuron B up to ``max_span`` layers later that reads what A writes (with
   ``norm_scale="rms"`` times the reading layer's 1/rms on the fact's prompt); others are
   linked only through paths over other candidates of the fact.
3. **Clusters** by each method of ``engramlab.locate.dkn.clustering`` (persistence by default, in the
   ``cluster.clustering`` parameterisation: engramlab's ``quantile`` or the published
   ``reference`` NTC).
4. **Verification, enforced** (``search_dkn``): a DKN is a set of >= 2 clusters such that
   suppressing any proper subset lowers P(target) by less than ``t_low`` (relative) and
   suppressing all of it lowers it by more than ``t_high``. Only sets that pass are reported;
   a fact without one gets ``dkn: null`` and the reason. ``check`` says whether every proper
   subset of the reported DKN was measured (``exhaustive``) or only a sample (``sampled``).

Suppression multiplies the neurons' activations (site ``blocks.{l}.mlp.neurons``) by 0 at the last
prompt position (``positions="all"``: every position); P(target) is the teacher-forced probability
of the target tokens, prod_j P(t_j | prompt, t_<j), as in ``engramlab.locate.neurons``. See
docs/dkn.md for the choices and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from engramlab.config import to_dict
from engramlab.data.facts import FactSet, target_token_ids
from engramlab.locate.base import RowResult, mean_of, model_facts
from engramlab.locate.dkn.clustering import cluster_neurons
from engramlab.locate.dkn.config import METHODS, NORM_SCALES, POSITIONS, ClusterConfig, DKNConfig  # noqa: F401
from engramlab.locate.dkn.graph import neuron_distances, reader_inv_rms
from engramlab.locate.dkn.robustness import robustness
from engramlab.locate.dkn.search import search_dkn
from engramlab.locate.dkn.suppression import prompt_prefix, scaled_target_probs
from engramlab.locate.neurons.ig import integrated_gradients
from engramlab.locate.neurons.select import coarse_neurons
from engramlab.models.scoring import encode, first_token_ranks
from engramlab.models.context import check_facts_fit
from engramlab.models.loading import LoadedModel
from engramlab.progress import progress_bar

class FactProbe:
    """Relative drops of P(target) for one prompt, cached by neuron set (shared across methods).

    The prompt prefix runs once per fact (``prompt_prefix``): every search over every method's
    clusters scores its neuron sets on the same shared keys/values."""

    def __init__(self, lm: LoadedModel, prompt: str, target_ids: Sequence[int], config: DKNConfig):
        self.lm, self.prompt, self.target_ids, self.config = lm, prompt, list(target_ids), config
        self.ids = encode(lm, prompt)
        self.prefix = prompt_prefix(lm, self.ids, config.positions)
        self._prob: dict[frozenset, float] = {}
        self.base = self.probs([frozenset()])[0]

    def probs(self, sets: Sequence[frozenset]) -> list[float]:
        missing = list(dict.fromkeys(s for s in sets if s not in self._prob))
        if missing:
            p = scaled_target_probs(self.lm, self.ids, self.target_ids, [sorted(s) for s in missing], 0.0,
                                    self.config.positions, self.config.batch_size, prefix=self.prefix)
            self._prob.update(zip(missing, p.tolist()))
        return [self._prob[s] for s in sets]

    def drops(self, sets: Sequence[frozenset]) -> list[float]:
        """(P - P_suppressed) / P per neuron set; negative when suppression helps the target."""
        return [(self.base - p) / self.base for p in self.probs(sets)]


# -- per fact, per method -----------------------------------------------------------------------------
Attribution = Callable[[LoadedModel, str, list[int]], torch.Tensor]  # -> (n_layers, d_mlp)


def ig_attribution(config: DKNConfig) -> Attribution:
    """Integrated-gradients neuron attribution (``engramlab.locate.neurons.ig``: the knowledge-neuron
    kernel, objective "prob", site "neurons") with our steps, baseline and layer batching."""
    return lambda lm, prompt, target_ids: integrated_gradients(
        lm, encode(lm, prompt), list(target_ids), steps=config.steps, baseline=config.baseline,
        batch_layers=config.batch_layers)


def candidate_neurons(attribution: torch.Tensor, threshold: float, max_candidates: int) -> list[tuple[int, int, float]]:
    """Coarse knowledge neurons (layer, index, score) above ``threshold`` x max, the strongest
    ``max_candidates`` of them, strongest first."""
    return coarse_neurons(attribution.detach().float().cpu(), threshold)[:max_candidates]


def analyse_fact(lm: LoadedModel, fact, config: DKNConfig, attribute: Attribution) -> dict:
    """One dkn.jsonl record: candidates, and per method its clusters and the verified DKN (or why not)."""
    tok = lm.tokenizer
    prompt = fact.prompt(config.template)
    target = target_token_ids(tok, prompt, fact.object)
    probe = FactProbe(lm, prompt, target, config)
    rank = first_token_ranks(lm, [prompt], [target])[0]
    rec = {"relation": fact.relation, "subject": fact.subject, "object": fact.object, "prompt": prompt,
           "target_tokens": tok.convert_ids_to_tokens(target), "base_prob": probe.base, "base_rank": rank,
           "skipped": None, "candidates": [], "methods": {}}
    if rank > config.known_rank:
        rec["skipped"] = f"not recalled: target rank {rank} > known_rank {config.known_rank}"
        return rec
    cands = candidate_neurons(attribute(lm, prompt, target), config.threshold, config.max_candidates)
    rec["candidates"] = [[l, i, round(s, 8)] for l, i, s in cands]
    if len(cands) < 2:
        rec["skipped"] = f"{len(cands)} candidate neuron(s) above threshold {config.threshold}; need 2"
        return rec
    neurons = [(l, i) for l, i, _ in cands]
    read_scale = None
    if config.norm_scale == "rms":
        read_scale = reader_inv_rms(lm, prompt)
        rec["reader_rms"] = [round(1.0 / float(v), 6) for v in read_scale]  # per layer, at the last prompt token
    dist = neuron_distances(lm.adapter, neurons, config.max_span, config.fold_norm, read_scale)
    rec["n_edges"] = int(np.isfinite(dist[np.triu_indices(len(neurons), 1)]).sum())
    for method in config.methods:
        clusters = cluster_neurons(dist, method, config.cluster)
        members = [frozenset(neurons[a] for a in c) for c in clusters]

        def drop_of(subsets, members=members):
            return probe.drops([frozenset().union(*(members[c] for c in s)) for s in subsets])

        found = search_dkn(drop_of, len(clusters), config.t_low, config.t_high, 2 if method == "pairs" else None,
                           config.max_subsets, config.subset_samples, config.seed)
        entry = {"clusters": [[list(neurons[a]) for a in c] for c in clusters], **asdict(found)}
        entry["dkn_neurons"] = sorted(list(n) for c in (found.dkn or []) for n in members[c])
        if found.dkn is not None and config.robustness:
            entry["robustness"] = robustness(lm, fact, [tuple(n) for n in entry["dkn_neurons"]], template=config.template,
                                             positions=config.positions, attenuate=config.attenuate,
                                             enhance=config.enhance, seed=config.seed)
        rec["methods"][method] = entry
    return rec


def find_degenerate_neurons(lm: LoadedModel, facts: FactSet, config: DKNConfig | None = None, *,
                            attribute: Attribution | None = None, progress: bool = False,
                            show_progress: bool | None = None) -> "DKNResult":
    """Degenerate knowledge neurons of every fact (see the module docstring).

    ``attribute(lm, prompt, target_ids) -> (n_layers, d_mlp)`` defaults to integrated gradients
    (``ig_attribution``); tests and other attribution methods can pass their own.
    ``show_progress`` is the old name of ``progress``.
    """
    config = config or DKNConfig()
    config.validate()
    progress = progress if show_progress is None else show_progress
    check_facts_fit(lm, facts)
    attribute = attribute or ig_attribution(config)
    records = [analyse_fact(lm, fact, config, attribute) for fact in progress_bar(facts, "dkn", progress)]
    return DKNResult(records, to_dict(config), model=model_facts(lm))


find_dkns = find_degenerate_neurons  # the shorter name the CLI verb uses


# -- the Result ------------------------------------------------------------------------------------------
def method_summary(entries: list[dict]) -> dict:
    """Headline numbers of one method over the evaluated facts' entries."""
    found = [e for e in entries if e["dkn"] is not None]
    # Old records (before "bounded" existed) labelled a DKN "sampled" whenever the search was bounded.
    sampled = [e for e in found if e["check"] == "sampled"]
    rate = (lambda k: k / len(entries)) if entries else (lambda k: None)
    out = {
        "dkn_found_rate": rate(len(found)),
        "dkn_found_rate_exhaustive": rate(len(found) - len(sampled)),  # every proper subset measured
        "dkn_found_rate_sampled": rate(len(sampled)),  # accepted on a sample of its proper subsets
        "n_dkn": len(found),
        "mean_partial_drop": mean_of(e["partial_drop"] for e in found),
        "mean_full_drop": mean_of(e["full_drop"] for e in found),
        "mean_clusters": mean_of(len(e["clusters"]) for e in entries),
        "mean_dkn_clusters": mean_of(len(e["dkn"]) for e in found),
        "mean_dkn_neurons": mean_of(len(e["dkn_neurons"]) for e in found),
        "mean_all_clusters_drop": mean_of(e["all_drop"] for e in entries),
        "mean_max_single_drop": mean_of(e["max_single_drop"] for e in entries),
        "n_sampled_searches": sum(e.get("bounded", e["check"] == "sampled") for e in entries),
    }
    robust = [e["robustness"] for e in found if e.get("robustness")]
    for kind in (robust[0] if robust else {}):
        for condition in robust[0][kind]:
            out[f"robustness.{kind}.{condition}"] = mean_of(r[kind][condition] for r in robust if kind in r)
    return out


@dataclass
class DKNResult(RowResult):
    """Per-fact DKN records (``records.jsonl``, also as ``dkn.jsonl``) and the config.

    The evolvability analysis is its own step with its own result
    (``engramlab.locate.dkn.evolvability.evaluate_evolvability``)."""

    NAME = "dkn"
    OLD_CONFIG = ("dkn_config.json",)
    OLD_RECORDS = ("dkn.jsonl",)

    @property
    def methods(self) -> list[str]:
        return list(self.config.get("methods") or dict.fromkeys(m for r in self.rows for m in r["methods"]))

    def summary(self) -> dict:
        """Flat numbers per method (``persistence.dkn_found_rate``...) plus the default method's unprefixed."""
        evaluated = [r for r in self.rows if not r["skipped"]]
        out = {"n_facts": len(self.rows), "n_evaluated": len(evaluated),
               "n_skipped": len(self.rows) - len(evaluated),
               "mean_candidates": mean_of(len(r["candidates"]) for r in evaluated)}
        for method in self.methods:
            for k, v in method_summary([r["methods"][method] for r in evaluated]).items():
                out[f"{method}.{k}"] = v
        default = self.config.get("method", "persistence")
        out.update({k: out[f"{default}.{k}"] for k in method_summary([]) if f"{default}.{k}" in out})
        return out
