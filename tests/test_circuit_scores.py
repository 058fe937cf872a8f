"""MIB CPR / CMD and EAP-IG completeness: each against a direct computation written here.

* CPR / CMD: the trapezoid rule by numpy over a hand-made curve; the sweep's circuits against
  ``prune`` and ``CircuitEvaluator`` called one by one; signed ranking against a sort by -score.
* Completeness: the per-example sum of the input's edge scores against row 0 of the score matrix
  and against a plain forward of both ends of the path; the error shrinking as steps grow, faster
  for Gauss-Legendre than for the right Riemann sum.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import perturbed_tiny_lm, word_tokenizer

from engramlab.data.facts import load_facts
from engramlab.errors import EngramError
from engramlab.locate.circuits import CircuitConfig, CircuitEvaluator, CircuitGraph, attribute_batch, find_circuit, prune
from engramlab.locate.circuits.attribute import completeness_errors
from engramlab.locate.circuits.data import batch_from_ids
from engramlab.locate.circuits.mib import MIB_FRACTIONS, cpr_cmd, mib_scores
from engramlab.models import tiny_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")


# -- CPR / CMD --------------------------------------------------------------------------------------------
def test_cpr_and_cmd_equal_a_direct_trapezoid_on_a_hand_made_curve():
    x = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    f = [-0.2, 0.1, 0.35, 0.6, 0.8, 1.15, 0.95, 1.02, 0.99, 1.0]  # overshoots 1 and starts below 0
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    cpr, cmd = cpr_cmd(x, f)
    assert cpr == pytest.approx(float(trapezoid(f, x)), rel=1e-12)
    assert cmd == pytest.approx(float(trapezoid(np.abs(1 - np.array(f)), x)), rel=1e-12)
    # by hand on three points: widths 0.5, 0.5; f = 0, 0.5, 1.5
    assert cpr_cmd([0.0, 0.5, 1.0], [0.0, 0.5, 1.5]) == pytest.approx((0.5 * 0.25 + 0.5 * 1.0, 0.5 * 0.75 + 0.5 * 0.5))
    assert cpr_cmd([0.1, 1.0], [1.0, 1.0]) == pytest.approx((0.9, 0.0))  # a perfect curve: CMD 0
    with pytest.raises(EngramError, match="two or more"):
        cpr_cmd([0.5], [1.0])


def _capital_lm():
    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), seed=0), tok), facts


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 4, 6, 4)]
    rows[3][:2] = rows[1][:2]
    return batch_from_ids(rows[:2], rows[2:], [3, 5], [7, 9])


def test_signed_ranking_takes_the_most_negative_scores_first():
    lm = perturbed_tiny_lm("gpt2")
    graph = CircuitGraph.from_model(lm)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_writers, graph.n_readers, generator=g) * graph.valid
    n = 7
    kept = prune(scores, graph, "topn", n=n, cleanup=False, signed=True)
    valid = scores[graph.valid]
    assert int(kept.sum()) == n and bool((scores[kept].max() < valid.sort().values[n]))  # the n smallest
    assert not torch.equal(kept, prune(scores, graph, "topn", n=n, cleanup=False))  # not |score|
    with pytest.raises(EngramError, match="topn rule only"):
        prune(scores, graph, "greedy", n=n, signed=True)


@pytest.mark.parametrize("ranking", ["absolute", "signed"])
def test_the_mib_sweep_is_its_circuits_evaluated_one_by_one(ranking):
    lm = perturbed_tiny_lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    scores = attribute_batch(lm, graph, batch, "eap-ig", steps=2)
    fractions = (0.01, 0.05, 0.3, 1.0)
    got = mib_scores(CircuitEvaluator(lm, graph, batch), scores, graph, fractions, ranking)
    fresh = CircuitEvaluator(lm, graph, batch)
    faith = []
    for p, row in zip(fractions, got["curve"]):
        n = int(p * graph.n_edges)  # MIB: int(pct * n_edges)
        kept = prune(scores, graph, "topn", n=n, signed=ranking == "signed")
        assert (row["n"], row["n_kept"]) == (n, int(kept.sum()))
        faith.append(fresh.evaluate(kept)["faithfulness"])
    assert [r["faithfulness"] for r in got["curve"]] == pytest.approx(faith, abs=1e-6)
    assert faith[-1] == pytest.approx(1.0, abs=1e-6)  # every edge: the clean run
    assert (got["cpr"], got["cmd"]) == pytest.approx(cpr_cmd(fractions, faith))
    assert got["mib_ranking"] == ranking and got["mib_fractions"] == list(fractions)


def test_find_circuit_reports_cpr_cmd_and_completeness(tmp_path, caplog):
    lm, facts = _capital_lm()
    config = CircuitConfig(require_correct=False, top_n=20, curve=(0.1, 1.0), steps=2)
    with caplog.at_level(logging.WARNING, logger="engramlab"):
        result = find_circuit(lm, facts, config)
    s = result.summary()
    assert s["mib_fractions"] == "0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1" and s["mib_ranking"] == "absolute"
    assert result.mib["mib_fractions"] == list(MIB_FRACTIONS)
    curve = result.mib["curve"]
    assert [c["n"] for c in curve] == [int(p * result.graph.n_edges) for p in MIB_FRACTIONS]
    assert (s["cpr"], s["cmd"]) == pytest.approx(cpr_cmd(MIB_FRACTIONS, [c["faithfulness"] for c in curve]))
    errors = [r["completeness_error"] for r in result.records() if r["role"] == "discovery"]
    assert errors and all(e is None or e >= 0 for e in errors)
    finite = [e for e in errors if e is not None]
    assert s["mean_completeness_error"] == pytest.approx(sum(finite) / len(finite))
    warned = any("completeness error" in r.getMessage() for r in caplog.records)
    assert warned == (s["mean_completeness_error"] > config.completeness_tolerance)
    result.save(tmp_path)
    assert json.loads((tmp_path / "mib.json").read_text())["cpr"] == pytest.approx(s["cpr"])
    from engramlab.locate.circuits import CircuitResult

    assert CircuitResult.load(tmp_path).summary() == s
    # the signed sweep is another set of circuits; the tolerance option warns when crossed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engramlab"):
        signed = find_circuit(lm, facts, CircuitConfig(require_correct=False, top_n=20, curve=(1.0,), steps=1,
                                                       mib_ranking="signed", completeness_tolerance=1e-9))
    assert signed.summary()["mib_ranking"] == "signed"
    assert any("--ig-rule gauss-legendre" in r.getMessage() for r in caplog.records)


def test_bad_mib_options_are_one_line_errors():
    with pytest.raises(EngramError, match="--mib-fractions"):
        CircuitConfig(mib_fractions=(0.5, 0.1))
    with pytest.raises(EngramError, match="--mib-fractions"):
        CircuitConfig(mib_fractions=(0.0, 1.0))
    with pytest.raises(EngramError, match="--mib-ranking"):
        CircuitConfig(mib_ranking="loud")
    with pytest.raises(EngramError, match="--completeness-tolerance"):
        CircuitConfig(completeness_tolerance=0)


# -- completeness ---------------------------------------------------------------------------------------
def _plain_metric(lm, batch, ids, zero_input=False):
    """logit_diff (b,) of a plain forward of ``ids``; ``zero_input``: with resid_pre of layer 0 set to 0."""
    rows = torch.arange(len(ids))
    with torch.no_grad():
        if zero_input:
            with lm.hooks.hook("blocks.0.resid_pre", lambda x: torch.zeros_like(x)):
                logits = lm.model(input_ids=ids, attention_mask=batch.mask).logits
        else:
            logits = lm.model(input_ids=ids, attention_mask=batch.mask).logits
    last = logits[rows, batch.last].float()
    return last[rows, batch.clean_answer] - last[rows, batch.corrupt_answer]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
@pytest.mark.parametrize("rule", ["right", "left", "gauss-legendre"])
def test_completeness_terms_are_row_zero_of_the_scores_and_the_metric_difference(family, ablation, rule):
    """right: the clean end from its alpha = 1 pass; left: the ablated end from its alpha = 0 pass;
    gauss-legendre visits neither end (zero ablation: one extra forward of the ablated input)."""
    lm = perturbed_tiny_lm(family)
    graph, batch = CircuitGraph.from_model(lm), _batch()
    terms = []
    scores = attribute_batch(lm, graph, batch, "eap-ig", steps=3, rule=rule, ablation=ablation, completeness=terms)
    (t,) = terms
    # sum over the input's edges (row 0 of the summed scores) = the summed per-example attributions
    assert float(scores[0].sum()) == pytest.approx(float(t["attribution"].sum()), rel=1e-4, abs=1e-6)
    start = (_plain_metric(lm, batch, batch.corrupt_ids) if ablation == "corrupted" else
             _plain_metric(lm, batch, batch.clean_ids, zero_input=True))
    expect = start - _plain_metric(lm, batch, batch.clean_ids)
    assert t["difference"] == pytest.approx(expect, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_completeness_error_shrinks_as_steps_grow_and_fastest_for_gauss_legendre(family):
    lm = perturbed_tiny_lm(family)
    graph, batch = CircuitGraph.from_model(lm), _batch()

    def error(rule, steps):
        terms = []
        attribute_batch(lm, graph, batch, "eap-ig", steps=steps, rule=rule, completeness=terms)
        return max(completeness_errors(terms))

    right = [error("right", m) for m in (1, 2, 4, 8, 16)]
    assert all(b < a for a, b in zip(right, right[1:])), right
    assert right[-1] < 0.6 * right[-2]  # first order: the error halves as m doubles
    gauss = [error("gauss-legendre", m) for m in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(gauss[:3], gauss[1:3])), gauss
    assert gauss[2] < right[-1] / 2  # 4 nodes beat 16 right steps
    assert gauss[3] < 1e-3


# -- the shared prompt prefix and the clean outputs taken from the alpha = 1 pass -----------------------------
def _prefixed_batch(seed=2):
    """Three pairs whose clean and corrupted prompts all start with the same 3 tokens (a shared
    prefix), of two lengths (padding)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 64, (3,), generator=g).tolist()
    rows = [head + torch.randint(0, 64, (n,), generator=g).tolist() for n in (4, 2, 3, 4, 2, 3)]
    return batch_from_ids(rows[:3], rows[3:], [3, 5, 8], [7, 9, 11])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["right", "gauss-legendre"])
def test_shared_prefix_and_reused_clean_pass_change_nothing(family, rule):
    from test_circuits import reference_scores

    from engramlab.locate.circuits.hooks import shared_prefix
    from engramlab.locate.integration import integration_points

    lm = perturbed_tiny_lm(family)
    graph, batch = CircuitGraph.from_model(lm), _prefixed_batch()
    assert shared_prefix(lm, batch).length == 3
    out = {}
    for share in (True, False):
        runs, terms = [], []
        scores = attribute_batch(lm, graph, batch, "eap-ig", steps=3, rule=rule, runs=runs, completeness=terms,
                                 share_prefix=share)
        out[share] = scores, runs[0], terms[0]
    (s1, r1, t1), (s0, r0, t0) = out[True], out[False]
    tol = dict(rel=1e-4, abs=1e-6)
    assert s1.flatten().tolist() == pytest.approx(s0.flatten().tolist(), **tol)
    for a, b in ((r1.clean_logits, r0.clean_logits), (r1.corrupt_logits, r0.corrupt_logits), (r1.acts, r0.acts),
                 (t1["attribution"], t0["attribution"]), (t1["difference"], t0["difference"])):
        assert a.shape == b.shape and a.flatten().tolist() == pytest.approx(b.flatten().tolist(), **tol)
    points = integration_points(rule, 3)
    ref = reference_scores(lm, graph, batch, [p for p, _ in points], weights=[w for _, w in points]).detach()
    assert float((s1 - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # the runs serve an evaluator exactly as its own forward passes do
    fresh, reused = CircuitEvaluator(lm, graph, batch), CircuitEvaluator(lm, graph, batch, runs=[r1])
    kept = prune(s1, graph, "topn", n=15)
    assert reused.evaluate(kept)["faithfulness"] == pytest.approx(fresh.evaluate(kept)["faithfulness"], abs=1e-5)


def test_pooled_completeness_error_weights_each_pair_by_its_metric_change():
    from engramlab.locate.circuits.attribute import pooled_completeness_error

    # pair 1: attribution 0.9 for a change of 1.0 (10% off); pair 2: 0.002 for 0.001 (100% off);
    # pair 3: no path to integrate. By hand: (|0.9 - 1| + |0.002 - 0.001|) / (1 + 0.001).
    errors, diffs = [0.1, 1.0, None], [1.0, 0.001, 0.0]
    assert pooled_completeness_error(errors, diffs) == pytest.approx(0.101 / 1.001)
    assert sum(e for e in errors if e is not None) / 2 == pytest.approx(0.55)  # the plain mean it replaces
    assert pooled_completeness_error([None], [0.0]) is None
