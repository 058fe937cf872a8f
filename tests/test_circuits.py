"""Circuits: graph sizes, EAP-IG scores against a plain reference, pruning, faithfulness, CLI.

The reference attribution below is deliberately naive: every reader gets its own copy of the
residual stream (x + delta_v, delta_v a zero leaf), every integration step is its own forward and
backward pass, and the gradient with respect to delta_v is read off autograd. The fast code must
agree with it to 1e-4 relative on every family.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
from conftest import perturbed_tiny_lm, word_tokenizer

from engramlab.data.facts import Fact, FactSet, load_facts
from engramlab.errors import EngramError
from engramlab.locate.circuits import (CircuitConfig, CircuitEvaluator, CircuitGraph, CircuitResult, attribute_batch,
                                       attribute_edges, edge_count, find_circuit, greedy, prune, prune_unreachable,
                                       top_n)
from engramlab.locate.circuits.attribute import metric_values
from engramlab.locate.circuits.data import batch_from_ids, split_pairs
from engramlab.locate.circuits.evaluate import patched_logits, writer_activations
from engramlab.models import tiny_model, wrap_model

CASES = [("llama", {}), ("gpt2", {}), ("gpt_neox", {}), ("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = ["llama-gqa", "gpt2", "neox-parallel", "neox-sequential"]


pytestmark = pytest.mark.usefixtures("one_thread")


_lm = perturbed_tiny_lm


def _batch(seed=1):
    """Two pairs of different lengths (padding) with distinct answers; the second pair shares its
    first two tokens (positions where nothing can differ, which the fast code skips)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 4, 6, 4)]
    rows[3][:2] = rows[1][:2]
    return batch_from_ids(rows[:2], rows[2:], [3, 5], [7, 9])


# -- the plain reference ------------------------------------------------------------------------
def _writers(lm, ids, mask):
    a = lm.adapter
    names = ["blocks.0.resid_pre"] + [f"blocks.{l}.{s}" for l in range(a.n_layers) for s in ("attn.heads", "mlp.out")]
    with torch.no_grad(), lm.hooks.capture(names) as c:
        lm.model(input_ids=ids, attention_mask=mask)
    cols = [c["blocks.0.resid_pre"]]
    for l in range(a.n_layers):
        cols += [c[f"blocks.{l}.attn.heads"][:, :, h] @ a.W_O(l)[h] for h in range(a.n_heads)]
        cols.append(c[f"blocks.{l}.mlp.out"])
    return torch.stack(cols, 2).float()


def reference_scores(lm, graph, batch, alphas, metric="logit_diff", weights=None, ablated=None):
    """sum_k w_k sum_pos (a_abl - a_clean) . dM/d(reader's own residual copy) at input point k.

    ``weights``: one per alpha (default: equal, 1/len(alphas)). ``ablated``: None for corrupted
    patching (a_abl = the corrupted run's writers), else the (n_writers, d_model) values every cut
    edge carries (zero/mean ablation); the input point is a_abl[input] + alpha (e_clean - a_abl[input])."""
    a = lm.adapter
    clean = _writers(lm, batch.clean_ids, batch.mask)
    if ablated is None:
        corrupt = _writers(lm, batch.corrupt_ids, batch.mask)
    else:
        corrupt = ablated.float()[None, None].expand_as(clean)
    delta = (corrupt - clean) * batch.mask[:, :, None, None]
    weights = [1.0 / len(alphas)] * len(alphas) if weights is None else weights
    grad_sum = torch.zeros(*batch.clean_ids.shape, graph.n_readers, a.d_model)
    for alpha, w in zip(alphas, weights):
        copies = torch.zeros(*batch.clean_ids.shape, graph.n_readers, a.d_model, requires_grad=True)
        seen = {}

        def own_copy(l, kind):
            weight = {"q": a.W_Q, "k": a.W_K, "v": a.W_V}[kind](l)
            first = {"q": graph.q_reader, "k": graph.k_reader, "v": graph.v_reader}[kind](l)

            def fn(t):  # each head projects its own copy x + delta_r through the norm
                x, norm = seen[l], a.attn_norm(l)
                return torch.stack([t[:, :, h] + (norm.forward(x + copies[:, :, first + h]) - norm.forward(x)) @ weight[h]
                                    for h in range(t.shape[2])], 2)
            return fn

        def plus(reader):
            return lambda mod, args: (args[0] + copies[:, :, reader],)

        point = (corrupt[:, :, 0] + alpha * (clean[:, :, 0] - corrupt[:, :, 0])).to(lm.dtype)
        with ExitStack() as st:
            st.enter_context(lm.hooks.hook("blocks.0.resid_pre", lambda x: point))
            handles = [a.final_norm.register_forward_pre_hook(plus(graph.logits_reader))]
            for l in range(a.n_layers):
                handles.append(a.attn_norm(l).register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0])))
                handles.append(a.mlp_norm(l).register_forward_pre_hook(plus(graph.mlp_reader(l))))
                for kind in "qkv":
                    st.enter_context(lm.hooks.hook(f"blocks.{l}.attn.{kind}", own_copy(l, kind)))
            st.callback(lambda: [h.remove() for h in handles])
            logits = lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask).logits
            last = logits[torch.arange(len(batch)), batch.last]
            (g,) = torch.autograd.grad(metric_values(last, batch, metric).sum(), copies)
        grad_sum += w * g
    return torch.einsum("bpnd,bprd->nr", delta, grad_sum) * graph.valid


def _close(fast, ref, tol=1e-4):
    fast, ref = fast.detach(), ref.detach()
    return float((fast - ref).abs().max() / ref.abs().max()) <= tol


# -- graph ------------------------------------------------------------------------------------------
def test_graph_sizes_gpt2_small_and_tiny_families():
    from transformers import GPT2Config

    cfg = GPT2Config()
    g = CircuitGraph(cfg.n_layer, cfg.n_head, cfg.n_head, False)
    assert (g.n_nodes, g.n_edges, edge_count(12, 12)) == (158, 32491, 32491)
    # SmolLM2-135M (30 x 9 heads over 3 kv heads), the counts the docs give: 12 more k/v readers per
    # layer when ungrouped, reading sum_l (1 + 10 l) = 4,380 writers in all
    assert (edge_count(30, 9, 3), edge_count(30, 9, 9)) == (70651, 70651 + 12 * 4380) == (70651, 123211)
    for family, kw in CASES:
        g = CircuitGraph.from_model(_lm(family, **kw))
        assert g.n_edges == edge_count(g.n_layers, g.n_heads, g.n_kv_heads, g.parallel_residual)
        # the MLP reads its own layer's heads only without a parallel residual
        assert bool(g.valid[g.head_writer(1, 0), g.mlp_reader(1)]) == (not g.parallel_residual)
        assert not g.valid[g.head_writer(1, 0), g.q_reader(1, 0)]
    gqa = CircuitGraph(2, 4, 2)
    assert gqa.readers_per_layer == 4 + 2 + 2 + 1 and gqa.reader_nodes[gqa.k_reader(0, 1)].sum() == 2


# -- attribution ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eap_ig_matches_plain_reference(case):
    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch()
    fast = attribute_batch(lm, graph, batch, "eap-ig", steps=5)
    reference = reference_scores(lm, graph, batch, [k / 5 for k in range(1, 6)])
    assert _close(fast, reference)
    assert _close(attribute_batch(lm, graph, batch, "eap-ig", steps=5, closed_form=False), reference)
    assert not fast[~graph.valid].any()


def test_methods_match_their_definitions():
    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch(seed=2)
    at_clean = reference_scores(lm, graph, batch, [1.0])
    at_corrupt = reference_scores(lm, graph, batch, [0.0])
    eap = attribute_batch(lm, graph, batch, "eap")
    assert _close(eap, at_clean)
    assert torch.allclose(attribute_batch(lm, graph, batch, "eap-ig", steps=1), eap)
    assert _close(attribute_batch(lm, graph, batch, "clean-corrupted"), (at_clean + at_corrupt) / 2)
    logprob = attribute_batch(lm, graph, batch, "eap-ig", steps=2, metric="logprob")
    assert _close(logprob, reference_scores(lm, graph, batch, [0.5, 1.0], metric="logprob"))


# alphas and weights written out by hand, not taken from engramlab.locate.integration
RULE_POINTS = {"right": ([0.2, 0.4, 0.6, 0.8, 1.0], None, 5), "left": ([0.0, 0.2, 0.4, 0.6, 0.8], None, 5),
               "trapezoid": ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25], 2),
               "midpoint": ([0.25, 0.75], [0.5, 0.5], 2),  # Gauss-Legendre: (1 -+ 1/sqrt 3)/2, half weights
               "gauss-legendre": ([0.5 - 0.5 / 3 ** 0.5, 0.5 + 0.5 / 3 ** 0.5], [0.5, 0.5], 2)}


@pytest.mark.parametrize("rule", sorted(RULE_POINTS))
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_each_integration_rule_matches_plain_reference(case, rule):
    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch()
    alphas, weights, steps = RULE_POINTS[rule]
    fast = attribute_batch(lm, graph, batch, "eap-ig", steps=steps, rule=rule)
    assert _close(fast, reference_scores(lm, graph, batch, alphas, weights=weights))
    if rule != "right":  # the rule matters: it is not the default in disguise
        right = reference_scores(lm, graph, batch, [k / steps for k in range(1, steps + 1)])
        assert not _close(fast, right, tol=1e-3)


def _hand_ablated(lm, batch, ablation):
    """(n_writers, d_model) values a cut edge carries, by hand: 0, or each writer's mean over the
    real tokens of the batch's clean prompts."""
    acts = _writers(lm, batch.clean_ids, batch.mask)  # (b, pos, n_writers, d)
    if ablation == "zero":
        return torch.zeros(acts.shape[2:])
    weights = batch.mask[:, :, None, None].float()
    return (acts * weights).sum((0, 1)) / weights.sum()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_zero_and_mean_scores_match_plain_reference(case, ablation):
    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch()
    ablated = _hand_ablated(lm, batch, ablation)
    ig = attribute_batch(lm, graph, batch, "eap-ig", steps=3, rule="left", ablation=ablation)
    assert _close(ig, reference_scores(lm, graph, batch, [0.0, 1 / 3, 2 / 3], ablated=ablated))
    eap = attribute_batch(lm, graph, batch, "eap", ablation=ablation)
    assert _close(eap, reference_scores(lm, graph, batch, [1.0], ablated=ablated))
    assert not _close(eap, reference_scores(lm, graph, batch, [1.0]), tol=1e-2)  # not the corrupted scores
    # attribute_edges takes the means over every example, not per chunk of --batch-size
    per_example = attribute_edges(lm, graph, batch, "eap", batch_size=1, ablation=ablation)
    assert _close(per_example, eap / len(batch))


def test_bfloat16_scores_follow_float32():
    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    f32 = attribute_batch(lm, graph, batch, "eap-ig", steps=3)
    lm.model.to(torch.bfloat16)
    bf16 = attribute_batch(lm, graph, batch, "eap-ig", steps=3)
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(f32.flatten(), bf16.flatten(), dim=0) > 0.99


# -- evaluation -------------------------------------------------------------------------------------
def _plain_metric(lm, batch, replace: dict, corrupted=False):
    """The metric of a plain forward pass with hook sites set by hand: ``replace`` maps
    ("input" | (layer, "heads") | (layer, "mlp")) to a function of the site tensor."""
    sites = {"input": "blocks.0.resid_pre"}
    with torch.no_grad(), ExitStack() as st:
        for key, fn in replace.items():
            st.enter_context(lm.hooks.hook(sites.get(key) or f"blocks.{key[0]}.{'attn.heads' if key[1] == 'heads' else 'mlp.out'}", fn))
        logits = lm.model(input_ids=batch.corrupt_ids if corrupted else batch.clean_ids, attention_mask=batch.mask).logits
    return metric_values(logits[torch.arange(len(batch)), batch.last], batch, "logit_diff")


def _hand_site_values(lm, batch, ablation):
    """Per site, what zero/mean ablation puts there, from a capture of the clean run: the input
    (d_model), each layer's head outputs z (n_heads, d_head) and MLP output (d_model)."""
    a = lm.adapter
    names = ["blocks.0.resid_pre"] + [f"blocks.{l}.{s}" for l in range(a.n_layers) for s in ("attn.heads", "mlp.out")]
    with torch.no_grad(), lm.hooks.capture(names) as c:
        lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask)
    real = batch.mask.bool()
    scale = 0.0 if ablation == "zero" else 1.0
    return {name: scale * t[real].mean(0) for name, t in c.items()}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empty_and_cut_circuits_equal_ablating_by_hand(case):
    """An empty circuit, and a circuit without every edge of one head and one MLP, against plain
    forward passes whose writer outputs are set by hand (b_O stays: it is no writer's)."""
    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch()
    n_layers = lm.adapter.n_layers
    empty, cut = torch.zeros_like(graph.valid), graph.valid.clone()
    cut[graph.head_writer(0, 1)] = cut[graph.mlp_writer(0)] = False
    ev = CircuitEvaluator(lm, graph, batch, "corrupted")
    assert torch.allclose(ev.run(empty)[0], _plain_metric(lm, batch, {}, corrupted=True), atol=1e-4)
    for ablation in ("zero", "mean"):
        v = _hand_site_values(lm, batch, ablation)
        everything = {"input": lambda x, v=v: v["blocks.0.resid_pre"].expand_as(x)}
        for l in range(n_layers):
            everything[(l, "heads")] = lambda z, t=v[f"blocks.{l}.attn.heads"]: t.expand_as(z)
            everything[(l, "mlp")] = lambda m, t=v[f"blocks.{l}.mlp.out"]: t.expand_as(m)

        def one_head(z, t=v["blocks.0.attn.heads"][1]):
            z = z.clone()
            z[:, :, 1] = t
            return z

        some = {(0, "heads"): one_head, (0, "mlp"): everything[(0, "mlp")]}
        ev = CircuitEvaluator(lm, graph, batch, ablation)
        assert torch.allclose(ev.m_empty, _plain_metric(lm, batch, everything), atol=1e-4), ablation
        assert torch.allclose(ev.run(cut)[0], _plain_metric(lm, batch, some), atol=1e-4), ablation
        assert (ev.m_empty - ev.m_clean).abs().max() > 1e-3  # the ablation does something (10x the tolerance)


def test_evaluation_without_the_activation_cache_agrees(monkeypatch):
    import engramlab.locate.circuits.evaluate as evaluate

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    kept = top_n(attribute_batch(lm, graph, batch, "eap"), graph, 30)
    cached = CircuitEvaluator(lm, graph, batch).evaluate(kept)
    monkeypatch.setattr(evaluate, "CACHE_BYTES", 0)
    assert CircuitEvaluator(lm, graph, batch).evaluate(kept) == pytest.approx(cached)


def test_cutting_all_edges_of_a_head_equals_patching_that_head():
    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    kept = graph.valid.clone()
    kept[graph.head_writer(0, 2)] = False
    patched = patched_logits(lm, graph, batch, ~kept, writer_activations(lm, graph, batch, corrupted=True)[0])
    with torch.no_grad():
        with lm.hooks.capture(["blocks.0.attn.heads"]) as c:
            lm.model(input_ids=batch.corrupt_ids, attention_mask=batch.mask)
        with lm.hooks.replace("blocks.0.attn.heads", c["blocks.0.attn.heads"], index=[2]):
            plain = lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask).logits
    assert torch.allclose(patched, plain[torch.arange(len(batch)), batch.last], atol=1e-5)


def _plain_head_effects(lm, batch, layer, head):
    """(S, R) of one head by hand, means over examples: the head's output at the last position,
    z_h W_O[h] . g with g = d logit_answer / d final residual (autograd), once with the values of
    every position and once with the values outside the subject zeroed (S); R = total - S."""
    a, rows = lm.adapter, torch.arange(len(batch))
    final = f"blocks.{a.n_layers - 1}.resid_post"
    with torch.no_grad(), lm.hooks.capture([final, f"blocks.{layer}.attn.heads"]) as c:
        lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask)
    x = c[final][rows, batch.last].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(a.unembed(a.final_norm(x))[rows, batch.clean_answer].sum(), x)
    total = c[f"blocks.{layer}.attn.heads"][rows, batch.last, head] @ a.W_O(layer)[head].detach()
    pos = torch.arange(batch.clean_ids.shape[1])
    in_subject = (pos[None] >= batch.subject[:, :1]) & (pos[None] < batch.subject[:, 1:])

    def subject_values_only(v):  # (b, pos, n_kv, d_head)
        return v * in_subject[:, :, None, None]

    with torch.no_grad(), lm.hooks.hook(f"blocks.{layer}.attn.v", subject_values_only), \
            lm.hooks.capture([f"blocks.{layer}.attn.heads"]) as c2:
        lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask)
    subject = c2[f"blocks.{layer}.attn.heads"][rows, batch.last, head] @ a.W_O(layer)[head].detach()
    s_, t_ = (subject * g).sum(-1).mean(), (total * g).sum(-1).mean()
    return float(s_), float(t_ - s_)


def test_logit_lens_last_layer_is_the_model_and_head_roles_match_a_plain_computation():
    from engramlab.locate.circuits.components import head_roles, logit_lens
    from engramlab.locate.circuits.hooks import answer_logits

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    batch.subject[:] = torch.tensor([1, 3])
    logits = answer_logits(lm, batch.clean_ids, batch.mask, batch.last)
    rank = (logits > logits[torch.arange(2), batch.clean_answer][:, None]).sum(-1) + 1
    assert logit_lens(lm, batch)[-1]["mean_rank"] == pytest.approx(float(rank.float().mean()))
    for layer, head in ((0, 0), (1, 3)):
        subj, rel = _plain_head_effects(lm, batch, layer, head)
        ratio = abs(subj) / abs(rel)
        (r,) = head_roles(lm, graph, batch, [(layer, head)])
        assert (r["subject_effect"], r["relation_effect"]) == pytest.approx((subj, rel), rel=1e-4, abs=1e-6)
        assert r["direct_effect"] == pytest.approx(subj + rel, rel=1e-4, abs=1e-6)
        # thresholds just either side of the plain ratio give each role
        for mover, relation, role in ((ratio * 0.99, 0.0, "mover"), (ratio * 1.01, ratio * 0.99, "mixture"),
                                      (float("inf"), ratio * 1.01, "relation")):
            (r,) = head_roles(lm, graph, batch, [(layer, head)], mover_ratio=mover, relation_ratio=relation)
            assert r["role"] == role, (layer, head, ratio, mover, relation)


def test_curve_reports_the_share_of_edges_kept_after_cleanup():
    """D3: requested N = 3, one of them dangling (a1.h3 reads the input but feeds nothing), so the
    circuit that is evaluated has 2 edges."""
    from engramlab.locate.circuits.evaluate import faithfulness_curve

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch()
    s = torch.zeros(graph.n_writers, graph.n_readers)
    s[0, graph.q_reader(1, 3)] = 10.0
    s[0, graph.mlp_reader(0)] = 5.0
    s[graph.mlp_writer(0), graph.logits_reader] = -4.0
    (row,) = faithfulness_curve(CircuitEvaluator(lm, graph, batch), s, graph, [3])
    assert (row["n"], row["n_kept"]) == (3, 2)
    assert row["edge_fraction"] == pytest.approx(2 / graph.n_edges)
    assert row["requested_fraction"] == pytest.approx(3 / graph.n_edges)


# -- pruning ----------------------------------------------------------------------------------------
def _hand_scores():
    """2 layers x 2 heads: a chain input -> a0.h1 -> m0 -> m1 -> logits plus input -> a1.h0 -> logits,
    and one strong edge into a0.h0, which nothing downstream reads."""
    g = CircuitGraph(2, 2, 2)
    s = torch.zeros(g.n_writers, g.n_readers)
    s[g.mlp_writer(1), g.logits_reader] = 5.0
    s[g.head_writer(1, 0), g.logits_reader] = -4.0
    s[0, g.q_reader(1, 0)] = 3.0
    s[0, g.k_reader(0, 0)] = 3.2  # dangling: a0.h0 never reaches the logits
    s[g.mlp_writer(0), g.mlp_reader(1)] = 2.5
    s[g.head_writer(0, 1), g.mlp_reader(0)] = -2.0
    s[0, g.v_reader(0, 1)] = 1.5
    s[0, g.logits_reader] = 0.1
    return g, s


def test_greedy_and_top_n_agree_on_a_hand_made_matrix():
    g, s = _hand_scores()
    by_top_n = prune(s, g, "topn", n=7)
    by_greedy = prune(s, g, "greedy", n=6)
    assert int(by_top_n.sum()) == 6 and torch.equal(by_top_n, by_greedy)
    assert not by_top_n[0, g.k_reader(0, 0)]
    assert torch.equal(greedy(s, g, 6), by_greedy)  # greedy never takes the dangling edge


def test_vectorised_greedy_equals_one_edge_at_a_time():
    g = CircuitGraph(3, 3, 3)
    s = torch.randn(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0)) * g.valid
    kept = torch.zeros_like(g.valid)
    inside = torch.zeros(g.n_nodes, dtype=torch.bool)
    inside[-1] = True
    for _ in range(40):
        open_ = g.valid & ~kept & g.reader_nodes[:, inside].any(1)[None]
        w, r = divmod(int(torch.where(open_, s.abs(), torch.tensor(-1.0)).argmax()), g.n_readers)
        kept[w, r], inside[w] = True, True
    assert torch.equal(greedy(s, g, 40), kept)


def test_unreachable_edges_are_removed():
    g = CircuitGraph(2, 2, 2)
    kept = torch.zeros_like(g.valid)
    kept[g.head_writer(0, 0), g.logits_reader] = True  # a0.h0 has no input -> it is dropped
    kept[0, g.q_reader(1, 1)] = True  # a1.h1 reaches nothing -> dropped
    kept[0, g.mlp_reader(0)] = kept[g.mlp_writer(0), g.logits_reader] = True  # a real path
    out = prune_unreachable(kept, g)
    assert out.sum() == 2 and out[0, g.mlp_reader(0)] and out[g.mlp_writer(0), g.logits_reader]
    assert torch.equal(top_n(torch.ones_like(kept, dtype=torch.float), g, g.n_edges), g.valid)


# -- data and bad input -------------------------------------------------------------------------------
def _capital_lm():
    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), seed=0), tok), facts


def test_split_keeps_evaluation_away_from_discovery_and_bad_input_is_clear():
    lm, facts = _capital_lm()
    split = split_pairs(lm, facts, 0.5, require_correct=False)
    disc = {p.fact.subject for p in split.discovery} | {p.corrupt_subject for p in split.discovery}
    held = {p.fact.subject for p in split.evaluation} | {p.corrupt_subject for p in split.evaluation}
    assert disc and held and not disc & held
    with pytest.raises(EngramError, match="corrupted prompt has 3 tokens, the clean one 2"):
        batch_from_ids([[1, 2]], [[1, 2, 3]], [4], [5], names=["fact 'X'"])
    lonely = FactSet([Fact("France", "capital", "Paris", ("The capital of {} is",))])
    with pytest.raises(EngramError, match="relation 'capital' has 1 subject"):
        split_pairs(lm, lonely, require_correct=False)


def test_answer_that_tokenizes_to_nothing_is_skipped_with_its_reason():
    from tokenizers import normalizers

    lm, facts = _capital_lm()
    lm.tokenizer.backend_tokenizer.normalizer = normalizers.Replace("#", "")
    odd = Fact(facts[0].subject, facts[0].relation, "##", facts[0].templates)
    split = split_pairs(lm, FactSet([odd, *facts[1:]]), require_correct=False)
    assert [s["reason"].startswith("answer tokenizes to nothing") for s in split.skipped if s["object"] == "##"] == [True]


# -- end to end -------------------------------------------------------------------------------------------
def test_find_circuit_saves_and_loads(tmp_path):
    lm, facts = _capital_lm()
    config = CircuitConfig(require_correct=False, top_n=20, curve=(0.1, 1.0))
    result = find_circuit(lm, facts, config)
    summary = result.summary()
    for key in ("n_nodes", "n_edges_total", "n_edges_kept", "faithfulness", "hit_at_10_model", "hit_at_10_circuit",
                "seconds"):
        assert key in summary
    g = result.graph
    assert summary["n_edges_total"] == g.n_edges and 0 < summary["n_edges_kept"] <= 20
    # tiny llama: 2 layers x 4 heads over 2 kv heads; EAP-IG's ungrouped graph has 4 k and 4 v readers
    assert (summary["n_edges_total"], summary["n_edges_ungrouped"]) == (edge_count(2, 4, 2), edge_count(2, 4, 4))
    # 2 * (4 - 2) more k/v readers per layer; layer 0's read 1 writer, layer 1's 1 + 5
    assert summary["n_edges_ungrouped"] - summary["n_edges_total"] == 4 * (1 + 6)
    for row in result.curve:  # the share is of the edges the evaluated circuit has
        assert row["n_kept"] == int(prune(result.scores, g, "topn", n=row["n"]).sum())
        assert row["edge_fraction"] == pytest.approx(row["n_kept"] / g.n_edges)
    assert len(result.lens) == lm.adapter.n_layers and all(h["role"] in ("mover", "relation", "mixture")
                                                           for h in result.heads)
    for rule, extra in (("greedy", {"top_n": 10}), ("threshold", {"threshold": 0.0})):
        other = find_circuit(lm, facts, CircuitConfig(require_correct=False, rule=rule, curve=(1.0,), **extra))
        assert other.summary()["n_edges_kept"] <= (10 if rule == "greedy" else result.graph.n_edges)
    from engramlab.locate.circuits.store import write_eapig

    result.save(tmp_path)
    write_eapig(tmp_path / "circuit_eapig.json", result)
    again = CircuitResult.load(tmp_path)
    assert torch.equal(again.kept, result.kept) and again.summary() == summary
    eapig = json.loads((tmp_path / "circuit_eapig.json").read_text())
    assert len(eapig["edges"]) == result.graph.n_edges
    w, r = g.mlp_writer(0), g.logits_reader  # EAP-IG's sign: scores of -logit_diff
    assert eapig["edges"]["m0->logits"]["score"] == pytest.approx(-float(result.scores[w, r]))
    assert eapig["edges"]["input->a0.h0<q>"]["score"] == pytest.approx(-float(result.scores[0, g.q_reader(0, 0)]))
    assert eapig["nodes"]["logits"] == {"in_graph": True}  # EAP-IG's Graph.from_json reads node["in_graph"]


def test_cli_writes_a_run_directory_with_the_options_it_was_given(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    import engramlab.cli.circuit  # noqa: F401  (registers the verb)
    from engramlab.cli.common import app
    from engramlab.data.facts import load_facts
    from engramlab.locate.circuits.data import encode_pairs
    from engramlab.models import load_model

    out = tmp_path / "run"
    args = ["circuit", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--keep-wrong",
            "--top-n", "15", "--steps", "2", "--ig-rule", "left", "--ablation", "zero", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for name in ("summary.json", "manifest.json", "scores.safetensors", "circuit.json", "circuit.svg", "circuit.dot"):
        assert (out / name).is_file(), name
    assert "ungrouped" in res.output  # the note next to the edge counts
    summary = json.loads((out / "summary.json").read_text())
    saved = load_file(out / "scores.safetensors")
    # the numbers: the same scores, circuit and held-out faithfulness as the API with these options
    lm = load_model(str(tiny_hf_dir))
    graph = CircuitGraph.from_model(lm)
    split = split_pairs(lm, load_facts("country_capital_city"), 0.5, require_correct=False)
    scores = attribute_edges(lm, graph, encode_pairs(lm, split.discovery), "eap-ig", 2, rule="left", ablation="zero")
    assert torch.allclose(saved["scores"], scores, atol=1e-6)
    kept = prune(scores, graph, "topn", n=15)
    assert torch.equal(saved["kept"].bool(), kept) and summary["n_edges_kept"] == int(kept.sum())
    held_out = CircuitEvaluator(lm, graph, encode_pairs(lm, split.evaluation), "zero").evaluate(kept)
    assert summary["faithfulness"] == pytest.approx(held_out["faithfulness"], abs=1e-6)
    assert (summary["ablation"], summary["score_ablation"], summary["ig_rule"]) == ("zero", "zero", "left")
    assert summary["n_edges_ungrouped"] == edge_count(2, 4, 4)
    res = CliRunner().invoke(app, args[:5] + ["--relation", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown relation 'nope'" in res.output
    res = CliRunner().invoke(app, args[:5] + ["--ig-rule", "middle", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--ig-rule" in res.output and "trapezoid" in res.output


def test_bad_rule_and_ablation_options_are_clear():
    with pytest.raises(EngramError, match="applies to --method eap-ig only"):
        CircuitConfig(method="eap", ig_rule="left")
    with pytest.raises(EngramError, match="--score-ablation"):
        CircuitConfig(score_ablation="noise")
    with pytest.raises(EngramError, match="--ablation"):
        CircuitConfig(ablation="noise")


def test_scores_that_overflow_at_the_zero_input_are_an_error():
    """With eps = 0 a bias-free RMSNorm model has an infinite norm Jacobian at the zero input, the
    alpha = 0 point of --ig-rule left under zero ablation; right never evaluates there."""
    lm = wrap_model(tiny_model("llama", seed=0, rms_norm_eps=0.0))
    graph, batch = CircuitGraph.from_model(lm), _batch()
    assert torch.isfinite(attribute_batch(lm, graph, batch, "eap-ig", steps=2, rule="right", ablation="zero")).all()
    with pytest.raises(EngramError, match="not finite .* use --ig-rule right"):
        attribute_batch(lm, graph, batch, "eap-ig", steps=2, rule="left", ablation="zero")
