"""Knowledge neurons (Dai et al., 2022): which MLP neurons hold a fact, and what editing them does.

``find_knowledge_neurons(lm, facts, config)`` runs, per fact:

1. a rank check: a fact whose first target token ranks beyond ``max_rank`` after its main prompt
   is skipped with the reason recorded (attributing what the model does not know is noise);
   paraphrases beyond it are left out of the selection;
2. attribution at the last prompt position, for each paraphrase (the fact's templates), by
   ``method``: integrated gradients over every layer's MLP neurons ("ig", the default - see
   ``engramlab.locate.neurons.ig``), the one-forward static score ("static",
   ``engramlab.locate.neurons.static``) or the static score choosing the layers IG verifies
   ("screen", ``engramlab.locate.neurons.screen``); each record keeps the IG completeness error
   (mean over its paraphrases) and the passes spent;
3. selection: coarse neurons score > ``threshold`` x max per paraphrase; refined neurons are
   those in the coarse sets of at least a share p of the paraphrases, by one of two rules
   (``refine``):
   - "fact" (engramlab's default): p starts at ``p_start`` (0.5) and moves by 0.05 per fact
     towards ``min_neurons``..``max_neurons`` kept; what remains is ranked by paraphrase count,
     then mean score, and cut to ``max_neurons`` (``refine_neurons``);
   - "dai" (Dai et al. 2022's code): a neuron needs at least max(p * n, ``min_prompts`` = 3)
     of the fact's n paraphrases; p starts at 0.7 and moves by 0.05 per *relation* until the
     relation's mean count per fact is in ``min_neurons``..``max_neurons`` (at most 6 tries);
     no cap (``refine_relation_dai``);
4. interventions on the refined set at the last prompt position: suppress (x0) and enhance (x2),
   measured as the relative change (p' - p) / p of the target probability (teacher-forced, the
   product over the target tokens: the quantity the default objective "prob" attributes) on the
   fact, on other facts of its relation, on facts of other relations, and for as many random
   neurons drawn from the same layers.

Relation neurons are those in the refined sets of at least ``relation_share`` of a relation's
attributed facts. The consistency of a fact is the mean pairwise Jaccard index of its
paraphrases' coarse sets (None with one paraphrase).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from engramlab.config import to_dict
from engramlab.data.facts import FactSet, target_token_ids
from engramlab.locate.base import mean_of, model_facts, read_result, short, write_result
from engramlab.locate.neurons.effects import measure_effects
from engramlab.locate.neurons.config import (BASELINES, COMPLETENESS_TOLERANCE, METHODS,  # noqa: F401 (re-exported)
                                             OBJECTIVES, REFINE, SITES, NeuronConfig)
from engramlab.locate.neurons.ig import integrated_gradients  # noqa: F401 (re-exported)
from engramlab.locate.neurons.screen import attribute_prompt
from engramlab.locate.neurons.select import _tally, coarse_neurons, consistency, refine_neurons, refine_relation_dai, relation_neurons
from engramlab.models.context import check_facts_fit
from engramlab.models.scoring import encode, first_token_ranks
from engramlab.progress import progress_bar
from engramlab.models.loading import LoadedModel
from engramlab.runs import atomic_write_json, load_json

log = logging.getLogger("engramlab")


def attribute_neurons(lm, prompt: str | Sequence[int], target_ids: Sequence[int], config: NeuronConfig,
                      layers: Sequence[int] | None = None) -> torch.Tensor:
    """Scores (n_layers, d_mlp) of every MLP neuron at the last prompt position for the target
    tokens by ``config.method`` (by default integrated gradients of ``config.objective``, the
    targets' joint probability). Layers not in ``layers`` (or, for "screen", not verified) are 0.
    ``engramlab.locate.neurons.screen.attribute_prompt`` also gives the completeness error and
    the pass count."""
    return attribute_prompt(lm, encode(lm, prompt), list(target_ids), config, layers).scores


def apply_refinement(records: list[dict], config: NeuronConfig) -> dict[str, list[list[int]]]:
    """Set ``neurons`` and ``p`` of every attributed record from its saved ``coarse`` sets by
    ``config.refine`` (and its p_start, min_prompts, min/max_neurons), and return the relation
    neurons ({relation: [[layer, index], ...]}, ``config.relation_share``). Paraphrases left out
    (``None``) do not count. Works on the records of a saved run, so refinement variants need no
    new attribution."""
    done = [r for r in records if r["skipped"] is None]
    by_relation: dict[str, list[dict]] = {}
    for r in done:
        by_relation.setdefault(r["relation"], []).append(r)

    def usable(r: dict) -> list[list[tuple]]:
        return [[tuple(n) for n in c] for c in r["coarse"] if c is not None]

    def store(r: dict, neurons: list, share: float) -> None:
        r.update(neurons=[[l, i, short(s)] for l, i, s in neurons], p=share)

    for mine in by_relation.values():
        if config.refine == "dai":
            refined, share = refine_relation_dai([usable(r) for r in mine], config.p_start, config.min_prompts,
                                                 config.min_neurons, config.max_neurons)
            for r, neurons in zip(mine, refined):
                store(r, neurons, share)
            continue
        for r in mine:
            sets = usable(r)
            if config.min_prompts > 1:  # drop neurons in fewer paraphrases before adapting p
                count, _ = _tally(sets)
                sets = [[n for n in c if count[(n[0], n[1])] >= config.min_prompts] for c in sets]
            store(r, *refine_neurons(sets, config.p_start, config.min_neurons, config.max_neurons))
    return {rel: relation_neurons([[(l, i) for l, i, _ in r["neurons"]] for r in mine], config.relation_share)
            for rel, mine in by_relation.items()}



@dataclass
class NeuronResult:
    """Per-fact knowledge neurons and intervention effects (one record per fact, in order).

    A record: relation, subject, object, ``prompts`` (the paraphrases), ``ranks`` (first target
    token after each), ``neurons`` ([layer, index, mean score] refined, best first), ``coarse``
    (per paraphrase: [layer, index, score] lists, None where left out), ``p`` (the final share),
    ``consistency``, ``skipped`` (reason or None), ``effects`` (see ``measure_effects``),
    ``method``, ``completeness_error`` (the mean over the attributed paraphrases of IG's sum-rule
    error, ``IGRun.completeness_error``; None for "static"), ``n_passes`` (forward / backward
    passes of the attribution, all paraphrases), ``layers_scored`` (per paraphrase: the layers
    attributed; "screen" verifies only some)."""

    rows: list[dict]
    relation_neurons: dict[str, list[list[int]]]
    config: dict
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def records(self) -> list[dict]:
        return self.rows

    def attributed(self) -> list[dict]:
        return [r for r in self.rows if r["skipped"] is None]

    def summary(self) -> dict:
        done = self.attributed()
        effects = [r["effects"] for r in done if r.get("effects")]

        out = {"n_facts": len(self.rows), "n_attributed": len(done),
               "n_skipped": len(self.rows) - len(done), **_effect_means(effects)}
        out["mean_neurons_per_fact"] = mean_of([len(r["neurons"]) for r in done])
        out["n_without_neurons"] = sum(not r["neurons"] for r in done)
        out["mean_prompts_per_fact"] = mean_of([sum(c is not None for c in r["coarse"]) for r in done])
        out["mean_coarse_per_prompt"] = mean_of([len(c) for r in done for c in r["coarse"] if c is not None])
        out["mean_consistency"] = mean_of([r["consistency"] for r in done])
        out["n_relation_neurons"] = sum(len(v) for v in self.relation_neurons.values())
        out["method"] = self.config.get("method", "ig")
        out["mean_completeness_error"] = mean_of([r.get("completeness_error") for r in done])
        out["max_completeness_error"] = max((r["completeness_error"] for r in done
                                             if r.get("completeness_error") is not None), default=None)
        out["n_passes"] = sum(r.get("n_passes") or 0 for r in done)
        out["mean_passes_per_fact"] = mean_of([r.get("n_passes") for r in done])
        out["seconds_per_fact"] = self.stats.get("seconds_per_fact")
        out["cpu_seconds_per_fact"] = self.stats.get("cpu_seconds_per_fact")
        for rel in sorted({r["relation"] for r in done}):
            mine = [r for r in done if r["relation"] == rel]
            out[f"relation.{rel}.n_attributed"] = len(mine)
            for key, value in _effect_means([r["effects"] for r in mine if r.get("effects")]).items():
                if key.endswith("_drop"):
                    out[f"relation.{rel}.{key}"] = value
        return out

    def save(self, directory: str | Path) -> None:
        """The shared files (records also as ``neurons.jsonl``, its name before the contract) and
        ``relation_neurons.json``."""
        d = write_result(directory, "neurons", self, records_alias="neurons.jsonl")
        atomic_write_json(d / "relation_neurons.json", self.relation_neurons)

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronResult":
        d = Path(directory)
        got = read_result(d, "neurons", old_config=("neurons_config.json",), old_records=("neurons.jsonl",))
        return cls(got.records, load_json(d / "relation_neurons.json", "relation neurons"), got.config, got.stats,
                   got.model)


def _effect_means(effects: list[dict]) -> dict:
    """Mean drop (minus the relative change under suppression: 1 = the probability went to zero)
    and mean relative change under enhancement, per kind of target."""
    out = {}
    for key in ("own", "same_relation", "other_relation", "random"):
        out[f"mean_{key}_drop"] = mean_of([None if e["suppress"][key] is None else -e["suppress"][key]
                                         for e in effects])
        out[f"mean_{key}_enhance"] = mean_of([e["enhance"][key] for e in effects])
    return out


def _warn_completeness(records: list[dict], config: NeuronConfig) -> None:
    """A warning when the mean IG completeness error exceeds ``config.completeness_tolerance``."""
    errors = [r["completeness_error"] for r in records if r.get("completeness_error") is not None]
    if errors and sum(errors) / len(errors) > config.completeness_tolerance:
        worst = max(errors)
        log.warning(f"knowledge neurons: mean IG completeness error {sum(errors) / len(errors):.3f} (worst fact "
                    f"{worst:.3f}) exceeds --completeness-tolerance {config.completeness_tolerance:g}: the scores do not add up to the change of "
                    f"the objective; use more --steps (now {config.steps}) or --ig-rule gauss-legendre "
                    f"(now {config.ig_rule})")


def find_knowledge_neurons(lm: LoadedModel, facts: FactSet, config: NeuronConfig | None = None, *,
                           progress: bool = False, show_progress: bool | None = None) -> NeuronResult:
    """Attribute, select and test the knowledge neurons of every fact (see module docstring).

    ``show_progress`` is the old name of ``progress``."""
    config = config or NeuronConfig()
    progress = progress if show_progress is None else show_progress
    check_facts_fit(lm, facts)
    start, cpu_start = time.time(), time.process_time()
    tok = lm.tokenizer
    prompts = [[fact.prompt(j) for j in range(len(fact.templates))] for fact in facts]
    targets = [[target_token_ids(tok, p, fact.object) for p in ps] for fact, ps in zip(facts, prompts)]
    flat_ranks = iter(first_token_ranks(lm, [p for ps in prompts for p in ps], [t for ts in targets for t in ts]))
    ranks = [[next(flat_ranks) for _ in ps] for ps in prompts]

    records = []
    for fact, ps, ts, rs in progress_bar(list(zip(facts, prompts, targets, ranks)), "knowledge neurons",
                                         enabled=progress):
        record = {"relation": fact.relation, "subject": fact.subject, "object": fact.object, "prompts": ps,
                  "target_tokens": tok.convert_ids_to_tokens(ts[0]), "ranks": rs, "neurons": [], "coarse": [],
                  "p": None, "consistency": None, "skipped": None, "effects": None, "method": config.method,
                  "completeness_error": None, "n_passes": 0, "layers_scored": []}
        records.append(record)
        if rs[0] > config.max_rank:
            record["skipped"] = (f"object {fact.object!r} ranks {rs[0]} after {ps[0]!r}, beyond max_rank "
                                 f"{config.max_rank}: the model does not predict it")
            continue
        coarse: list[list | None] = []
        errors = []
        for p, t, r in zip(ps, ts, rs):
            if r > config.max_rank:
                coarse.append(None)
                record["layers_scored"].append(None)
                continue
            got = attribute_prompt(lm, encode(lm, p), t, config)
            coarse.append(coarse_neurons(got.scores, config.threshold))
            record["n_passes"] += got.n_passes
            record["layers_scored"].append(got.layers)
            if got.completeness_error is not None:
                errors.append(got.completeness_error)
        record["completeness_error"] = short(sum(errors) / len(errors)) if errors else None
        # Rounded as saved, so that refining a saved run (apply_refinement) gives the same result.
        coarse = [None if c is None else [[l, i, short(s)] for l, i, s in c] for c in coarse]
        record.update(coarse=coarse, consistency=consistency([c for c in coarse if c is not None]))
    attributed_seconds = time.time() - start

    _warn_completeness(records, config)
    rel_neurons = apply_refinement(records, config)
    measure_effects(lm, records, [ts[0] for ts in targets], config.n_compare, config.n_random_repeats,
                    config.seed)
    n_done = sum(r["skipped"] is None for r in records)
    total, cpu = time.time() - start, time.process_time() - cpu_start
    # CPU seconds (all threads of this process) are the steadier figure on a shared machine.
    stats = {"attribution_seconds": round(attributed_seconds, 3), "total_seconds": round(total, 3),
             "cpu_seconds": round(cpu, 3), "seconds_per_fact": round(total / n_done, 3) if n_done else None,
             "cpu_seconds_per_fact": round(cpu / n_done, 3) if n_done else None}
    return NeuronResult(records, rel_neurons, to_dict(config), stats, model_facts(lm))


