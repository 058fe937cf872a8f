"""``engram factcheck``: tau from the training claims only, F1 against a hand-made confusion matrix,
complex statements that keep the subject and the object slot, skipped relations, the abstaining
DKN checker, and the CLI's summary keys."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.data.facts import Fact, FactSet, load_facts
from engramlab.errors import EngramError
from engramlab.locate import select
from engramlab.locate.dkn.config import DKNConfig
from engramlab.locate.factcheck.claims import APPOSITIONS, LEADS, complex_prompt, false_objects, split_relation
from engramlab.locate.factcheck.config import FactcheckConfig
from engramlab.locate.factcheck.find import ABSTAIN, STATEMENT, assign_verdicts, claims_of, find_factcheck
from engramlab.locate.factcheck.metrics import confusion, fit_threshold, judge, scores_of
from engramlab.locate.neurons.config import NeuronConfig
from engramlab.models import tiny_model, wrap_model

from conftest import word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(dkn=DKNConfig(steps=3, known_rank=100000, max_candidates=6, robustness=False),
             kn=NeuronConfig(steps=3, max_rank=100000, n_compare=0, n_random_repeats=0))
_LM: dict = {}


def _lm(facts):
    key = tuple(facts)
    if key not in _LM:
        texts = [f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))]
        texts += list(LEADS) + list(APPOSITIONS) + [STATEMENT + " True False ( ) ,"]
        tok = word_tokenizer(texts)
        _LM[key] = wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok)
    return _LM[key]


def _facts():
    return select(load_facts("country_capital_city,country_language"), limit=6)


# -- metrics -----------------------------------------------------------------------------------------
def test_f1_against_a_hand_computed_confusion_matrix():
    # TP 3, FP 1, FN 2, TN 4, and two claims without a verdict (not counted)
    truths = [True] * 3 + [False] + [True] * 2 + [False] * 4 + [True, False]
    verdicts = [True] * 3 + [True] + [False] * 2 + [False] * 4 + [None, None]
    c = confusion(truths, verdicts)
    assert c == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    m = scores_of(c)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6)) and m["accuracy"] == pytest.approx(7 / 10)
    # nothing judged true although true claims exist: precision undefined, F1 0; nothing judged: all None
    assert scores_of(confusion([True, False], [False, False]))["f1"] == 0.0
    assert scores_of(confusion([True], [None])) == {"precision": None, "recall": None, "f1": None, "accuracy": None}


def _reference_best_f1(scores, truths):
    """The best training F1 over every threshold that can separate the scores, by brute force."""
    best = 0.0
    for tau in sorted(set(scores)) + [max(scores) + 1.0]:
        tp = sum(s >= tau and t for s, t in zip(scores, truths))
        fp = sum(s >= tau and not t for s, t in zip(scores, truths))
        fn = sum(s < tau and t for s, t in zip(scores, truths))
        best = max(best, 2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return best


def test_fit_threshold_by_hand_and_against_brute_force():
    # true 3, 5; false 1, 4: tau = 2 (midpoint of 1 and 3) gives TP 2, FP 1: F1 0.8, the best
    assert fit_threshold([3.0, 5.0, 1.0, 4.0], [True, True, False, False]) == pytest.approx(2.0)
    import random

    rng = random.Random(0)
    for _ in range(50):
        scores = [rng.choice([rng.random(), 0.5]) for _ in range(rng.randint(2, 9))]
        truths = [rng.random() < 0.5 for _ in scores]
        if not any(truths):
            continue
        tau = fit_threshold(scores, truths)
        got = scores_of(confusion(truths, judge(scores, tau)))["f1"]
        assert got == pytest.approx(_reference_best_f1(scores, truths))


def _rows(train, test):
    """Hand-made rows of one relation: (score, truth) per claim of the train / test split."""
    def row(split, claims):
        return {"relation": "r", "subject": "s", "object": "o", "split": split, "skipped": None,
                "claims": [{"claimed": "o" if t else "x", "truth": t, "form": "simple", "prompt": "p",
                            "scores": {"dkn": s, "kn": s, "prompt": s}, "verdicts": {}} for s, t in claims]}
    return [row("train", train), row("test", test)]


def test_the_threshold_is_fitted_on_the_training_split_only():
    neurons = {"dkn": {"r": [[0, 1]]}, "kn": {"r": [[0, 1]]}}
    train = [(3.0, True), (5.0, True), (1.0, False), (4.0, False)]
    clean = _rows(train, [(2.5, True), (0.5, False)])
    poisoned = _rows(train, [(-1e9, True), (1e9, False), (7.0, True), (3.9, False)])
    taus = assign_verdicts(clean, FactcheckConfig(), neurons)
    assert taus == assign_verdicts(poisoned, FactcheckConfig(), neurons)
    assert taus["simple"]["dkn"] == pytest.approx(2.0) and taus["simple"]["prompt"] == 0.0
    # the test claims are judged with it: 2.5 >= 2 true, 0.5 false; the poisoned ones as tau says
    assert [c["verdicts"]["dkn"] for c in clean[1]["claims"]] == [True, False]
    assert [c["verdicts"]["kn"] for c in poisoned[1]["claims"]] == [False, True, True, True]
    # the reference's fixed tau and a given number are used as they are
    assert assign_verdicts(_rows(train, []), FactcheckConfig(threshold="reference"), neurons)["simple"] == \
        {"dkn": 5e-7, "kn": 5e-6, "prompt": 0.0}
    assert assign_verdicts(_rows(train, []), FactcheckConfig(threshold="4.5"), neurons)["simple"]["kn"] == 4.5
    with pytest.raises(EngramError, match=r"FactcheckConfig.threshold.*--threshold"):
        FactcheckConfig(threshold="best")


def test_the_run_fits_tau_on_its_training_claims():
    facts = _facts()
    result = find_factcheck(_lm(facts), facts, FactcheckConfig(**QUICK))
    claims = claims_of(result.records())
    for form in ("simple", "complex"):
        train = [c for c in claims if c["form"] == form and c["split"] == "train" and c["kn.score"] is not None]
        tau = result.thresholds[form]["kn"]
        assert tau == pytest.approx(fit_threshold([c["kn.score"] for c in train], [c["truth"] for c in train]))
        got = scores_of(confusion([c["truth"] for c in train], judge([c["kn.score"] for c in train], tau)))["f1"]
        assert got == pytest.approx(_reference_best_f1([c["kn.score"] for c in train], [c["truth"] for c in train]))
        test = [c for c in claims if c["form"] == form and c["split"] == "test"]
        prefix = "" if form == "simple" else "complex."
        want = scores_of(confusion([c["truth"] for c in test], [c["kn.verdict"] for c in test]))["f1"]
        assert result.summary()[prefix + "kn.f1"] == want


# -- claims ------------------------------------------------------------------------------------------
def test_complex_statements_keep_the_subject_and_the_object_slot():
    facts = load_facts("lre")
    shapes = set()
    for k, f in enumerate(facts):
        for j, template in enumerate(f.templates):
            text = complex_prompt(template, f.subject, seed=k % 3, key=str(j))
            simple = f.prompt(j)
            assert f.subject in text and len(text) > len(simple), (template, text)
            tail = template.rpartition("{}")[2]
            assert text.endswith(tail), (template, text)  # the object follows exactly where it did
            shapes.add((any(text.startswith(lead) for lead in LEADS), any(a in text for a in APPOSITIONS)))
    assert shapes == {(True, False), (False, True), (True, True)}
    assert complex_prompt("The capital of {} is", "France", 0, "a") == complex_prompt("The capital of {} is", "France",
                                                                                      0, "a")


def test_the_split_and_false_objects_are_seeded_and_valid():
    s = split_relation(10, 0.25, 3, "r")
    assert s == split_relation(10, 0.25, 3, "r") and s.count("test") == 2 and s.count("train") == 8
    assert split_relation(2, 0.9, 0, "r").count("test") == 1 and split_relation(3, 0.01, 0, "r").count("test") == 1
    objects = ["a", "b", "a", "c"]
    wrong = false_objects(objects, 0, "r")
    assert all(w != o and w in objects for w, o in zip(wrong, objects)) and wrong == false_objects(objects, 0, "r")


def test_the_records_hold_four_claims_per_fact_with_the_subject():
    facts = _facts()
    result = find_factcheck(_lm(facts), facts, FactcheckConfig(**QUICK))
    for r in result.records():
        assert [(c["form"], c["truth"]) for c in r["claims"]] == [("simple", True), ("simple", False),
                                                                 ("complex", True), ("complex", False)]
        assert all(r["subject"] in c["prompt"] for c in r["claims"])
        assert r["claims"][0]["claimed"] == r["object"] != r["claims"][1]["claimed"] == r["false_object"]
    # every relation has a test fact, and the summary counts the test claims of both forms
    s = result.summary()
    assert s["n_test_claims"] == 4 * s["n_test_facts"] and s["n_test_facts"] >= 2


# -- skipping and abstaining ----------------------------------------------------------------------------
def _one_object_relation():
    same = [Fact(c, "same_capital", "Paris", ("The capital city of {} is",)) for c in ("France", "Spain", "Italy")]
    return same


def test_a_relation_with_a_single_object_is_skipped_with_the_reason():
    facts = FactSet(_one_object_relation() + list(select(load_facts("country_capital_city"), limit=4)))
    result = find_factcheck(_lm(facts), facts, FactcheckConfig(**QUICK))
    skipped = [r for r in result.records() if r["skipped"]]
    assert [r["subject"] for r in skipped] == ["France", "Spain", "Italy"]
    assert all("single distinct object" in r["skipped"] and r["claims"] == [] for r in skipped)
    s = result.summary()
    assert s["n_skipped_relations"] == 1 and s["skipped_relations"] == "same_capital" and s["n_checked_facts"] == 4
    with pytest.raises(EngramError, match="every relation was skipped.*single distinct object"):
        find_factcheck(_lm(facts), FactSet(_one_object_relation()), FactcheckConfig(**QUICK))


def test_without_dkns_the_dkn_checker_abstains():
    facts = _facts()
    # threshold 1.0: no neuron scores above the maximum, so no candidates and no DKN for any fact
    config = FactcheckConfig(dkn=DKNConfig(threshold=1.0, steps=2, known_rank=100000, robustness=False),
                             kn=QUICK["kn"])
    result = find_factcheck(_lm(facts), facts, config)
    s = result.summary()
    assert s["dkn_n_evaluated"] == 0 and s["dkn_found_rate"] is None and s["n_relation_dkn"] == 0
    for prefix in ("", "complex."):
        assert s[prefix + "dkn.f1"] is None and s[prefix + "dkn.threshold"] is None
        assert s[prefix + "dkn.abstain"] == ABSTAIN["dkn"] == "no DKNs found, so the DKN checker abstains"
        assert s[prefix + "kn.abstain"] is None and s[prefix + "kn.n_claims"] == s["n_test_claims"] // 2
        assert s[prefix + "prompt.n_claims"] == s["n_test_claims"] // 2
    assert all(c["dkn.verdict"] is None and c["dkn.score"] is None for c in result.claims())
    assert all(c["kn.verdict"] is not None for c in result.claims())


# -- the command ----------------------------------------------------------------------------------------
def test_the_cli_writes_the_summary_keys(tiny_hf_dir, tmp_path):
    out = tmp_path / "fc"
    r = CliRunner().invoke(app, ["factcheck", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                 "--limit", "4", "--threshold", "reference", "--set", "dkn.steps=2",
                                 "--set", "dkn.known_rank=100000", "--set", "kn.steps=2",
                                 "--set", "kn.max_rank=100000", "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    for key in ("dkn.f1", "kn.f1", "prompt.f1", "complex.dkn.f1", "complex.kn.f1", "complex.prompt.f1",
                "dkn.precision", "complex.kn.recall", "dkn.threshold", "n_claims", "dkn.abstain"):
        assert key in s, key
    assert s["kn.threshold"] == 5e-6 and s["n_claims"] == 16
    for name in ("records.jsonl", "claims.jsonl", "checkers.json", "factcheck.png", "dkn/records.jsonl",
                 "kn/records.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["dkn"]["steps"] == 2 and saved["threshold"] == "reference"
    bad = CliRunner().invoke(app, ["factcheck", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                   "--threshold", "best", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--threshold" in bad.output
    # the report section of that run: the table, one figure, the finding
    from engramlab.report.runs import Report, RunView
    from engramlab.report.sections import renderers

    view = RunView("fc", out, json.loads((out / "manifest.json").read_text()), s)
    (section,) = renderers()["factcheck"]([view], Report(out, [view]))
    assert section.body.count("<figure") == 1 and "complex" in section.body
    assert [f.key for f in section.findings] == ["dkn_factcheck"]


def test_the_finding_rule_reaches_every_verdict():
    from engramlab.report.sections.factcheck import verdict

    def summary(dkn, kn, prompt, cdkn=None, ckn=None, cprompt=None, judged=12, abstain=None):
        return {"dkn.f1": dkn, "kn.f1": kn, "prompt.f1": prompt, "complex.dkn.f1": cdkn, "complex.kn.f1": ckn,
                "complex.prompt.f1": cprompt, "dkn.n_claims": judged, "dkn.abstain": abstain}

    assert verdict(summary(0.9, 0.5, 0.6, 0.8, 0.4, 0.7))[0] == "reproduced"
    assert verdict(summary(0.9, 0.5, 0.6, 0.3, 0.4, 0.7))[0] == "partly reproduced"  # not on complex
    assert verdict(summary(0.5, 0.6, 0.4, 0.1, 0.2, 0.3))[0] == "partly reproduced"  # beats prompt only
    assert verdict(summary(0.4, 0.6, 0.5, 0.1, 0.2, 0.3))[0] == "not reproduced"
    assert verdict(summary(None, 0.6, None, None, 0.2, None))[0] == "not reproduced"  # undefined F1 counts 0
    v, text = verdict(summary(None, 0.6, 0.5, abstain="no DKNs found, so the DKN checker abstains"))
    assert v == "inconclusive" and "abstained" in text
    assert verdict(summary(0.9, 0.5, 0.6, 0.8, 0.4, 0.7, judged=4))[0] == "inconclusive"


def test_the_prompt_checker_abstains_when_true_and_false_are_not_words_of_the_model():
    from engramlab.locate.factcheck.find import prompt_answers_unreadable

    facts = select(load_facts("country_capital_city"), limit=4)
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])  # a world model's kind of vocabulary
    assert "abstains" in prompt_answers_unreadable(tok)
    assert prompt_answers_unreadable(_lm(_facts()).tokenizer) is None  # this one has " True" / " False"
    lm = wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok)
    s = find_factcheck(lm, facts, FactcheckConfig(**QUICK)).summary()
    for prefix in ("", "complex."):
        assert s[prefix + "prompt.f1"] is None and "abstains" in s[prefix + "prompt.abstain"]
