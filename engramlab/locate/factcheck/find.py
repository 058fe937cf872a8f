"""Fact-checking with degenerate knowledge neurons (AMIG, Chen et al. 2024 ``hallucination.py``).

``find_factcheck(lm, facts, config)`` judges true and false claims three ways and scores each
checker's verdicts on held-out facts:

1. **Claims** (``engramlab.locate.factcheck.claims``): per fact a true claim (the gold object) and a
   false one (another object of the relation, seeded), each as a simple and a complex statement;
   per relation a seeded test split (``test_fraction``), the rest trains. A relation that cannot
   be checked (one distinct object, or one fact) is skipped with the reason.
2. **Relation-level neurons** from the training facts only: the DKN locator
   (``find_degenerate_neurons`` with ``config.dkn``) gives each fact's DKN (the neurons of its
   verified degenerate components, method ``dkn.method``); the knowledge-neuron locator
   (``find_knowledge_neurons`` with ``config.kn``) its refined neurons. A relation keeps the
   neurons whose count c over its training facts satisfies c > share x max_n c_n
   (``share_of="max"``, the reference's 0.5 x max) or c > share x n_train (``"facts"``).
3. **Scores.** ``dkn`` / ``kn``: the mean integrated-gradients attribution (the knowledge-neuron
   kernel ``integrated_gradients``, the locator's steps / baseline / objective / site / rule) of the
   relation's neurons at the last position of the claim's prompt (simple: the fact prompt; complex:
   the complex text up to the object) with the *claimed* object as the target,

       s(claim) = mean_{(l, i) in N_rel} Attr_{l,i}(prompt -> claimed object)

   Only the layers holding N_rel are attributed. ``prompt``: the model reads
   'Statement: <claim sentence>. Is this true or false? Answer:' and s = log P(" True") -
   log P(" False") (each the teacher-forced probability of the tokens ``target_token_ids`` gives
   for "True" / "False" after that text: one token each on GPT-2 / SmolLM2 BPE); true when s > 0.
4. **Verdicts.** dkn / kn: true when s >= tau, with tau per checker and form fitted on the training
   claims (``metrics.fit_threshold``), the reference's fixed tau, or a given number
   (``threshold``). A relation without relation-level neurons leaves its claims without a verdict
   (null); a checker with no relation-level neurons at all **abstains** (null F1, the reason in
   the summary).
5. **Metrics** on the test split's claims: precision, recall, F1 (true claims positive), accuracy.

Files: ``records.jsonl`` (one row per fact, its four claims nested), ``claims.jsonl`` (one row per
claim), ``checkers.json`` (relation neurons and tau), and the two locator runs it used
(``dkn/``, ``kn/``). See docs/factcheck.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engramlab.config import to_dict
from engramlab.data.facts import FactSet, target_token_ids
from engramlab.errors import EngramError
from engramlab.locate.base import fact_record, model_facts, read_result, short, write_result
from engramlab.locate.factcheck.claims import complex_prompt, false_objects, skip_reason, split_relation
from engramlab.locate.factcheck.config import (CHECKERS, FORMS, NOT_RUN, REFERENCE_TAU, FactcheckConfig,
                                               parse_threshold)
from engramlab.locate.factcheck.metrics import confusion, fit_threshold, judge, scores_of
from engramlab.models.scoring import encode, target_logprobs
from engramlab.progress import progress_bar

STATEMENT = "Statement: {}. Is this true or false? Answer:"
ABSTAIN = {"dkn": "no DKNs found, so the DKN checker abstains",
           "kn": "no knowledge neurons found, so the KN checker abstains"}
NEURON_CHECKERS = ("dkn", "kn")


# -- relation-level neurons -----------------------------------------------------------------------------
def relation_level(neuron_sets: list[list], n_facts: int, share: float, share_of: str) -> list[list[int]]:
    """[layer, index] of the neurons kept for a relation from its facts' neuron sets (one set per
    fact that has one): count c > share x max count ("max") or > share x ``n_facts`` ("facts")."""
    count = Counter((int(n[0]), int(n[1])) for s in neuron_sets for n in {(m[0], m[1]) for m in s})
    if not count:
        return []
    bar = share * (max(count.values()) if share_of == "max" else n_facts)
    return sorted([l, i] for (l, i), c in count.items() if c > bar)


def dkn_sets(dkn_rows: list[dict], method: str) -> dict[str, list[list]]:
    """Per relation, the DKN neurons of each training fact that has a verified DKN."""
    out: dict[str, list[list]] = {}
    for r in dkn_rows:
        entry = (r.get("methods") or {}).get(method)
        if not r["skipped"] and entry and entry.get("dkn") is not None:
            out.setdefault(r["relation"], []).append(entry["dkn_neurons"])
    return out


def kn_sets(kn_rows: list[dict]) -> dict[str, list[list]]:
    """Per relation, the refined knowledge neurons of each attributed training fact (non-empty)."""
    out: dict[str, list[list]] = {}
    for r in kn_rows:
        if r["skipped"] is None and r["neurons"]:
            out.setdefault(r["relation"], []).append(r["neurons"])
    return out


# -- scores -------------------------------------------------------------------------------------------
def ig_settings(config: FactcheckConfig) -> dict[str, dict]:
    """The integrated-gradients arguments of each neuron checker: those its locator attributed with."""
    d, k = config.dkn, config.kn
    return {"dkn": dict(steps=d.steps, baseline=d.baseline, objective="prob", site="neurons", rule="right",
                        batch_layers=d.batch_layers),
            "kn": dict(steps=k.steps, baseline=k.baseline, objective=k.objective, site=k.site, rule=k.ig_rule,
                       batch_layers=k.batch_layers)}


def neuron_scores(lm, prompt: str, claimed: str, neurons: dict[str, list[list[int]]], settings: dict[str, dict]
                  ) -> dict[str, float | None]:
    """s = mean attribution of each checker's neurons for ``prompt`` -> ``claimed`` (None without
    neurons). Checkers with the same IG settings share one attribution over the union of layers."""
    from engramlab.locate.neurons.ig import integrated_gradients

    ids = encode(lm, prompt)
    target = target_token_ids(lm.tokenizer, prompt, claimed)
    out: dict[str, float | None] = {c: None for c in neurons}
    groups: dict[tuple, list[str]] = {}
    for c, ns in neurons.items():
        if ns:
            groups.setdefault(tuple(sorted(settings[c].items())), []).append(c)
    for key, members in groups.items():
        layers = sorted({l for c in members for l, _ in neurons[c]})
        scores = integrated_gradients(lm, ids, target, layers=layers, ends=False, **dict(key))
        for c in members:
            out[c] = short(float(torch.stack([scores[l, i] for l, i in neurons[c]]).double().mean()))
    return out


def prompt_answers_unreadable(tok) -> str | None:
    """Why the prompt checker cannot ask this model (None when it can): " True" and " False" must be
    two different token sequences the tokenizer knows (a world model's word vocabulary has neither:
    both become <unk>, P(" True") = P(" False"), and every verdict would be a tie)."""
    probe = STATEMENT.format("x")
    true, false = target_token_ids(tok, probe, "True"), target_token_ids(tok, probe, "False")
    unk = getattr(tok, "unk_token_id", None)
    if true == false or (unk is not None and (unk in true or unk in false)):
        return ("the model's vocabulary has no ' True' / ' False' tokens (they read as the unknown token), so the "
                "prompt checker abstains")
    return None


@torch.no_grad()
def prompt_scores(lm, sentences: list[str], batch_size: int) -> list[tuple[float, float]]:
    """(log P(" True"), log P(" False")) after ``STATEMENT`` of each claim sentence."""
    prompts = [STATEMENT.format(s) for s in sentences]
    tok = lm.tokenizer
    true = target_logprobs(lm, prompts, [target_token_ids(tok, p, "True") for p in prompts], batch_size=batch_size)
    false = target_logprobs(lm, prompts, [target_token_ids(tok, p, "False") for p in prompts], batch_size=batch_size)
    return list(zip(true.tolist(), false.tolist()))


# -- thresholds and metrics -----------------------------------------------------------------------------
def claims_of(rows: list[dict]) -> list[dict]:
    """One flat row per claim: the fact's head, then claimed, truth, split, form and every checker's
    score and verdict."""
    out = []
    for r in rows:
        for c in r.get("claims") or []:
            flat = {"relation": r["relation"], "subject": r["subject"], "object": r["object"], "claimed": c["claimed"],
                    "truth": c["truth"], "split": r["split"], "form": c["form"], "prompt": c["prompt"]}
            for k in CHECKERS:
                flat[f"{k}.score"], flat[f"{k}.verdict"] = c["scores"].get(k), c["verdicts"].get(k)
            flat["p_true"], flat["p_false"] = c.get("p_true"), c.get("p_false")
            out.append(flat)
    return out


def choose_threshold(mode, checker: str, train_scores: list, train_truths: list) -> float | None:
    """tau of a neuron checker: fitted on the training claims, the reference's, or a number."""
    if mode == "fitted":
        return fit_threshold(train_scores, train_truths)
    if mode == "reference":
        return REFERENCE_TAU[checker]
    return float(mode)


def assign_verdicts(rows: list[dict], config: FactcheckConfig, neurons: dict) -> dict:
    """Set every claim's verdicts in place; returns {form: {checker: tau}} (tau from the training
    claims of that form only when fitted)."""
    mode = parse_threshold(config.threshold)
    taus: dict = {}
    for form in FORMS:
        mine = [(r, c) for r in rows for c in r.get("claims") or [] if c["form"] == form]
        if not mine:
            continue
        taus[form] = {}
        for checker in NEURON_CHECKERS:
            train = [c for r, c in mine if r["split"] == "train" and c["scores"][checker] is not None]
            tau = choose_threshold(mode, checker, [c["scores"][checker] for c in train],
                                   [c["truth"] for c in train]) if any(neurons[checker].values()) else None
            taus[form][checker] = tau
            for _, c in mine:
                c["verdicts"][checker] = judge([c["scores"][checker]], tau)[0]
        taus[form]["prompt"] = 0.0
        for _, c in mine:
            s = c["scores"]["prompt"]
            c["verdicts"]["prompt"] = None if s is None else bool(s > 0)
    return taus


def checker_summary(claims: list[dict], checker: str, split: str) -> dict:
    mine = [c for c in claims if c["split"] == split]
    verdicts = [c[f"{checker}.verdict"] for c in mine]
    out = scores_of(confusion([c["truth"] for c in mine], verdicts))
    out["n_claims"] = sum(v is not None for v in verdicts)
    out["n_abstained"] = sum(v is None for v in verdicts)
    return out


# -- the Result -----------------------------------------------------------------------------------------
@dataclass
class FactcheckResult:
    """What ``find_factcheck`` found: per-fact rows (claims nested), the relation neurons and tau.

    ``dkn`` / ``kn`` are the locator results the neurons came from (in memory after a run, saved in
    ``dkn/`` and ``kn/``; not loaded back: load them with their own locators)."""

    rows: list[dict]
    relation_neurons: dict  # {"dkn": {relation: [[layer, index], ...]}, "kn": {...}}
    thresholds: dict        # {form: {checker: tau or None}}
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    dkn: object = None
    kn: object = None

    NAME = "factcheck"
    FILES = ("claims.jsonl", "checkers.json")

    def records(self) -> list[dict]:
        return self.rows

    def claims(self) -> list[dict]:
        return claims_of(self.rows)

    def abstain_reason(self, checker: str) -> str | None:
        if checker == "prompt":
            return self.stats.get("prompt_abstain")
        return None if any(self.relation_neurons.get(checker, {}).values()) else ABSTAIN[checker]

    def summary(self) -> dict:
        checked = [r for r in self.rows if not r["skipped"]]
        skipped_rel = sorted({r["relation"] for r in self.rows if r["skipped"]})
        claims = self.claims()
        out: dict = {"n_facts": len(self.rows), "n_checked_facts": len(checked),
                     "n_train_facts": sum(r["split"] == "train" for r in checked),
                     "n_test_facts": sum(r["split"] == "test" for r in checked),
                     "n_claims": len(claims), "n_test_claims": sum(c["split"] == "test" for c in claims),
                     "n_skipped_relations": len(skipped_rel), "skipped_relations": ", ".join(skipped_rel) or None}
        for form in FORMS:
            mine = [c for c in claims if c["form"] == form]
            if not mine:
                continue
            prefix = "" if form == "simple" else "complex."
            for checker in CHECKERS:
                key = f"{prefix}{checker}."
                test = checker_summary(mine, checker, "test")
                out.update({key + k: v for k, v in test.items()})
                out[key + "train_f1"] = checker_summary(mine, checker, "train")["f1"]
                out[key + "threshold"] = (self.thresholds.get(form) or {}).get(checker)
                out[key + "abstain"] = self.abstain_reason(checker)
        for checker in NEURON_CHECKERS:
            per_rel = self.relation_neurons.get(checker, {})
            out[f"n_relation_{checker}"] = sum(len(v) for v in per_rel.values())
            out[f"{checker}.relations_without_neurons"] = ", ".join(sorted(r for r, v in per_rel.items() if not v)) \
                or None
        for k in ("dkn_found_rate", "dkn_n_evaluated", "kn_n_attributed", "seconds"):
            out[k] = self.stats.get(k)
        return out

    def save(self, directory: str | Path) -> None:
        from engramlab.runs import atomic_write_json, atomic_write_jsonl

        d = write_result(directory, self.NAME, self)
        atomic_write_jsonl(d / "claims.jsonl", self.claims())
        atomic_write_json(d / "checkers.json", {"relation_neurons": self.relation_neurons,
                                                "thresholds": self.thresholds})
        if self.dkn is not None:
            self.dkn.save(d / "dkn")
        if self.kn is not None:
            self.kn.save(d / "kn")

    @classmethod
    def load(cls, directory: str | Path) -> "FactcheckResult":
        from engramlab.runs import load_json

        got = read_result(directory, cls.NAME)
        path = Path(directory) / "checkers.json"
        if not path.is_file():
            raise EngramError(f"{path}: missing; is this a complete `engram factcheck` result directory?")
        saved = load_json(path, "fact-check checkers")
        return cls(got.records, saved["relation_neurons"], saved["thresholds"], got.config, got.stats, got.model)


# -- the locator ----------------------------------------------------------------------------------------
def plan_claims(facts: FactSet, config: FactcheckConfig) -> tuple[list[dict], dict[str, str]]:
    """Per fact (in order) its row: split, false object, simple / complex prompts, the claims
    without scores; and {relation: why skipped}."""
    rows: list[dict | None] = [None] * len(facts)
    by_relation: dict[str, list[int]] = {}
    for k, f in enumerate(facts):
        by_relation.setdefault(f.relation, []).append(k)
    skipped = {}
    for relation, where in by_relation.items():
        group = [facts[k] for k in where]
        objects = [f.object for f in group]
        reason = skip_reason(objects)
        if reason:
            skipped[relation] = reason
            for k, f in zip(where, group):
                rows[k] = fact_record(f, split=None, skipped=reason, claims=[])
            continue
        splits = split_relation(len(group), config.test_fraction, config.seed, relation)
        falses = false_objects(objects, config.seed, relation)
        for k, (at, f, split, wrong) in enumerate(zip(where, group, splits, falses)):
            simple = f.prompt(config.template)
            prompts = {"simple": simple}
            if config.complex:
                prompts["complex"] = complex_prompt(f.template(config.template), f.subject, config.seed,
                                                    f"{relation}:{k}")
            claims = [{"claimed": obj, "truth": truth, "form": form, "prompt": p, "scores": {}, "verdicts": {}}
                      for form, p in prompts.items() for obj, truth in ((f.object, True), (wrong, False))]
            rows[at] = fact_record(f, split=split, skipped=None, false_object=wrong, claims=claims)
    return rows, skipped


def find_factcheck(lm, facts: FactSet, config: FactcheckConfig | None = None, *,
                   progress: bool = False) -> FactcheckResult:
    """Build the claims, find relation-level DKNs and knowledge neurons on the training facts,
    score every claim with the three checkers and judge it (module docstring)."""
    from engramlab.locate.dkn.find import find_degenerate_neurons
    from engramlab.locate.neurons.find import find_knowledge_neurons

    config = config or FactcheckConfig()
    t0 = time.perf_counter()
    rows, skipped = plan_claims(facts, config)
    checked = [r for r in rows if not r["skipped"]]
    if not checked:
        why = "; ".join(f"{rel}: {reason}" for rel, reason in skipped.items())
        raise EngramError(f"factcheck: every relation was skipped ({why}); give relations with at least two facts "
                          f"and two distinct objects (--relation / --limit)")
    train = FactSet([f for f, r in zip(facts, rows) if r["split"] == "train"], facts.source)
    stats: dict = {"skipped_relations": skipped}
    # 1. the neurons, from the training facts only
    dkn_cfg = dataclasses.replace(config.dkn, methods=(config.dkn.method,), **NOT_RUN["dkn"])
    kn_cfg = dataclasses.replace(config.kn, **NOT_RUN["kn"])
    dkn = find_degenerate_neurons(lm, train, dkn_cfg, progress=progress)
    stats["dkn_seconds"] = time.perf_counter() - t0
    kn = find_knowledge_neurons(lm, train, kn_cfg, progress=progress)
    stats["kn_seconds"] = time.perf_counter() - t0 - stats["dkn_seconds"]
    dkn_summary = dkn.summary()
    stats.update(dkn_found_rate=dkn_summary.get("dkn_found_rate"), dkn_n_evaluated=dkn_summary.get("n_evaluated"),
                 kn_n_attributed=len(kn.attributed()), dkn_config_run=to_dict(dkn_cfg), kn_config_run=to_dict(kn_cfg))
    n_train = Counter(f.relation for f in train)
    sets = {"dkn": dkn_sets(dkn.records(), dkn_cfg.method), "kn": kn_sets(kn.records())}
    relations = [rel for rel in facts.relations if rel not in skipped]
    neurons = {c: {rel: relation_level(sets[c].get(rel, []), n_train[rel], config.share, config.share_of)
                   for rel in relations} for c in NEURON_CHECKERS}
    # 2. the scores
    settings = ig_settings(config)
    claims = [(r, c) for r in checked for c in r["claims"]]
    for r, c in progress_bar(claims, "factcheck claims", enabled=progress):
        c["scores"].update(neuron_scores(lm, c["prompt"], c["claimed"],
                                         {k: neurons[k][r["relation"]] for k in NEURON_CHECKERS}, settings))
    stats["prompt_abstain"] = prompt_answers_unreadable(lm.tokenizer)
    if stats["prompt_abstain"] is None:
        logps = prompt_scores(lm, [c["prompt"] + " " + c["claimed"] for _, c in claims], config.batch_size)
        for (_, c), (lp_true, lp_false) in zip(claims, logps):
            c["p_true"], c["p_false"] = short(math.exp(lp_true)), short(math.exp(lp_false))
            c["scores"]["prompt"] = short(lp_true - lp_false)
    else:
        for _, c in claims:
            c["scores"]["prompt"] = None
    # 3. verdicts
    thresholds = assign_verdicts(rows, config, neurons)
    stats["seconds"] = time.perf_counter() - t0
    stats["seconds_per_claim"] = stats["seconds"] / len(claims) if claims else None
    return FactcheckResult(rows, neurons, thresholds, to_dict(config), stats, model_facts(lm), dkn=dkn, kn=kn)


__all__ = ["ABSTAIN", "STATEMENT", "FactcheckConfig", "FactcheckResult", "assign_verdicts", "claims_of",
           "find_factcheck", "plan_claims", "relation_level"]
