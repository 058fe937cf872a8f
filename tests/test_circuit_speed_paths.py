"""The circuit locator's fast paths against the obvious slow computations, and frozen pairs.

Each fast path of ``evaluate`` / ``components`` / ``find`` has a reference here written
independently and as plainly as possible: a patched forward pass that gives every reader its own
input x + sum over missing u -> v of (a_u(ablated) - a_u(this run)), one reader and one writer at a
time; a logit lens that unembeds one layer at a time; the automatic N by a scan of the grid.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
from conftest import perturbed_tiny_lm, word_tokenizer

from engramlab.data.facts import load_facts
from engramlab.errors import EngramError
from engramlab.locate.circuits import CircuitConfig, CircuitEvaluator, CircuitGraph, find_circuit
from engramlab.locate.circuits.attribute import attribute_edges, metric_values
from engramlab.locate.circuits.data import batch_from_ids, split_pairs
from engramlab.locate.circuits.evaluate import CircuitPlan, patched_logits
from engramlab.locate.circuits.hooks import writer_activations
from engramlab.models import tiny_model, wrap_model

CASES = [("llama", {}), ("gpt2", {}), ("gpt_neox", {})]  # grouped-query attention; fused qkv; parallel residual
CASE_IDS = ["llama-gqa", "gpt2", "neox-parallel"]
FLOATS = ("faithfulness", "hit_at_10_circuit", "metric_clean", "metric_empty", "metric_circuit")


pytestmark = pytest.mark.usefixtures("one_thread")


_lm = perturbed_tiny_lm


def _batch(n=5, prefix=0, seed=1):
    """``n`` pairs of lengths 4..7 (padding), distinct answers; with ``prefix`` every clean and
    corrupted prompt starts with the same ``prefix`` tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 64, (prefix,), generator=g).tolist()
    lengths = [4 + i % 4 for i in range(n)]
    clean = [head + torch.randint(0, 64, (k,), generator=g).tolist() for k in lengths]
    corrupt = [head + torch.randint(0, 64, (k,), generator=g).tolist() for k in lengths]
    return batch_from_ids(clean, corrupt, [3 + i for i in range(n)], [20 + i for i in range(n)])


def _mask(graph, density, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(graph.valid.shape, generator=g) < density) & graph.valid


# -- the plain patched forward pass ---------------------------------------------------------------
def plain_patched_logits(lm, graph, batch, missing, ablated):
    """Last-token logits of the clean prompts where each edge in ``missing`` carries ``ablated``
    ((b, pos, n_writers, d)), built reader by reader: each reader's input is this run's residual
    plus, for every missing edge into it, ablated minus this run's output of its writer; a q/k/v
    reader's projection is recomputed from its own input as t + (N(x_r) - N(x)) W_r."""
    a = lm.adapter
    outputs = {}  # writer -> (b, pos, d) this run's output

    def own_input(x, reader, up):
        for u in range(up):
            if missing[u, reader]:
                x = x + (ablated[:, :, u] - outputs[u]).to(x.dtype)
        return x

    def heads_hook(l):
        def fn(z):
            for h in range(a.n_heads):
                outputs[graph.head_writer(l, h)] = (z[:, :, h] @ a.W_O(l)[h]).float()
        return fn

    def mlp_hook(l):
        def fn(out):
            outputs[graph.mlp_writer(l)] = out.float()
        return fn

    def residual(reader, up):
        return lambda x: own_input(x, reader, up)

    seen = {}

    def projection(l, kind):
        weight = {"q": a.W_Q, "k": a.W_K, "v": a.W_V}[kind](l)
        first = {"q": graph.q_reader, "k": graph.k_reader, "v": graph.v_reader}[kind](l)
        norm = a.attn_norm(l)

        def fn(t):
            x, up = seen[l], graph.writers_before(l)
            cols = []
            for h in range(t.shape[2]):
                x_r = own_input(x, first + h, up)
                cols.append(t[:, :, h] + (norm.forward(x_r) - norm.forward(x)) @ weight[h])
            return torch.stack(cols, 2)
        return fn

    with torch.no_grad(), ExitStack() as st:
        st.enter_context(lm.hooks.hook("blocks.0.resid_pre", lambda x: outputs.__setitem__(0, x.float())))
        for l in range(a.n_layers):
            st.enter_context(lm.hooks.hook(f"blocks.{l}.attn.heads", heads_hook(l)))
            st.enter_context(lm.hooks.hook(f"blocks.{l}.mlp.out", mlp_hook(l)))
            st.enter_context(lm.hooks.hook(f"blocks.{l}.attn.in", lambda x, l=l: seen.__setitem__(l, x)))
            for kind in "qkv":
                st.enter_context(lm.hooks.hook(f"blocks.{l}.attn.{kind}", projection(l, kind)))
            st.enter_context(lm.hooks.hook(f"blocks.{l}.mlp.in", residual(graph.mlp_reader(l), graph.mlp_reads_up_to(l))))
        st.enter_context(lm.hooks.hook("ln_final.in", residual(graph.logits_reader, graph.n_writers)))
        logits = lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask).logits
    return logits[torch.arange(len(batch)), batch.last]


def _close(fast, ref, clean, tol=1e-3):
    """|fast - ref| within ``tol`` of the patching's own effect |ref - clean| (tiny random models
    move their logits by 1e-3..1e-1 when edges are cut; float32 noise is about 1e-7)."""
    effect = max(float((ref - clean).abs().max()), 1e-4)
    return float((fast - ref).abs().max()) <= tol * effect


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_patched_run_matches_plain_reader_by_reader(case):
    """Every way of summing (sparse, a slice of writers, gathered writers; the cheapest), with and
    without the x + T base of the attention sites, at densities from nearly empty to nearly full."""
    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch()
    ablated, corrupt = writer_activations(lm, graph, batch, corrupted=True)
    clean = plain_patched_logits(lm, graph, batch, torch.zeros_like(graph.valid), ablated)
    assert torch.allclose(plain_patched_logits(lm, graph, batch, graph.valid, ablated), corrupt, atol=1e-5)
    for i, density in enumerate((0.0, 0.05, 0.3, 0.6, 0.95, 1.0)):
        missing = _mask(graph, density, seed=i)
        ref = plain_patched_logits(lm, graph, batch, missing, ablated)
        for way in (None, "sparse", "slice", "gather"):
            for base in (True, False):
                plan = CircuitPlan.build(graph, missing, way=way, base=base)
                fast = patched_logits(lm, graph, batch, None, ablated, plan=plan)
                assert _close(fast, ref, clean), (case, density, way, base)
        if 0 < density < 0.9:  # the edges matter: a different mask gives other logits (100x the noise)
            other = plain_patched_logits(lm, graph, batch, _mask(graph, density, seed=99), ablated)
            assert float((other - ref).abs().max()) > 1e-5


def test_base_is_chosen_where_most_readers_miss_everything():
    graph = CircuitGraph(2, 2, 2)
    missing = graph.valid.clone()
    missing[0, graph.q_reader(1, 0)] = False  # one kept edge: every other layer-1 reader misses all
    plan = CircuitPlan.build(graph, missing)
    assert plan.attn[1].base_total and plan.attn[1].readers.tolist() == [0]
    assert not CircuitPlan.build(graph, torch.zeros_like(missing)).attn[1].changed  # nothing missing: clean


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_evaluator_sorted_prefixed_cached_or_not_matches_plain(ablation, monkeypatch):
    """The evaluator (rows sorted by length, chunks of 2, a shared prefix under corrupted
    ablation, the activation cache on and off, several circuits at once) against the plain run."""
    import engramlab.locate.circuits.evaluate as evaluate
    from engramlab.locate.circuits.hooks import ablated_values

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch(n=5, prefix=2)
    circuits = [~_mask(graph, d, seed=i) & graph.valid for i, d in enumerate((0.1, 0.5, 0.9))]
    if ablation == "corrupted":
        ablated = writer_activations(lm, graph, batch, corrupted=True)[0]
    else:
        ablated = ablated_values(lm, graph, [batch], ablation)[None, None].expand(*batch.clean_ids.shape, -1, -1)
    refs = [metric_values(plain_patched_logits(lm, graph, batch, graph.valid & ~k, ablated), batch, "logit_diff")
            for k in circuits]
    for cache in (True, False):
        monkeypatch.setattr(evaluate, "CACHE_BYTES", 2**40 if cache else 0)
        ev = CircuitEvaluator(lm, graph, batch, ablation, batch_size=2)
        assert ev.cache == cache
        if ablation == "corrupted":  # every chunk shares the two prefix tokens, and runs past them only
            assert all(p is not None and p.length == 2 for p in ev.prefixes)
        together = ev.run_many(circuits)
        for (m, _), ref, kept in zip(together, refs, circuits):
            assert torch.allclose(m, ref, atol=1e-4)
            assert torch.equal(ev.run(kept)[0], m)  # one at a time: the same numbers
    # the full circuit is the clean run, without a pass
    assert torch.equal(ev.run(graph.valid)[0], ev.m_clean)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_evaluator_without_prefix_agrees_and_evaluations_are_remembered(case, monkeypatch):
    """(GPT-2's learned positions: the prefix cache must place the rest at the right positions.)"""
    import engramlab.locate.circuits.evaluate as evaluate

    lm = _lm(case[0], **case[1])
    graph, batch = CircuitGraph.from_model(lm), _batch(n=4, prefix=3)
    kept = ~_mask(graph, 0.4, seed=3) & graph.valid
    with_prefix = CircuitEvaluator(lm, graph, batch).evaluate(kept)
    monkeypatch.setattr(evaluate, "shared_prefix", lambda lm, batch: None)
    ev = CircuitEvaluator(lm, graph, batch)
    without = ev.evaluate(kept)
    assert {k: without[k] for k in FLOATS} == pytest.approx({k: with_prefix[k] for k in FLOATS}, rel=1e-5, abs=1e-5)
    calls = []
    monkeypatch.setattr(evaluate, "patched_logits", lambda *a, **k: calls.append(1) or pytest.fail("run again"))
    assert ev.evaluate_many([kept, kept.clone()]) == [ev.evaluate(kept)] * 2 and not calls


def test_evaluator_from_attribution_runs_and_given_clean_logits_agrees():
    from engramlab.locate.circuits.components import capture

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch(n=5)
    runs = []
    attribute_edges(lm, graph, batch, "eap", batch_size=2, runs=runs)
    assert len(runs) == 3 and runs[0].acts.shape[:2] == (graph.n_writers, 2)
    plain = CircuitEvaluator(lm, graph, batch, batch_size=4)
    reused = CircuitEvaluator(lm, graph, batch, batch_size=4, runs=runs)
    given = CircuitEvaluator(lm, graph, batch, batch_size=4, clean_logits=capture(lm, batch, (), 3).clean_logits(lm))
    kept = ~_mask(graph, 0.5, seed=1) & graph.valid
    for ev in (reused, given):
        for name in ("m_clean", "m_empty"):
            assert torch.allclose(getattr(ev, name), getattr(plain, name), atol=1e-5), name
        assert torch.equal(ev.rank_clean, plain.rank_clean)
        assert torch.allclose(ev.run(kept)[0], plain.run(kept)[0], atol=1e-5)
    with pytest.raises(EngramError, match="ablation zero"):
        CircuitEvaluator(lm, graph, batch, "zero", runs=runs)


# -- components -------------------------------------------------------------------------------------
def test_heads_of_a_layer_together_equal_one_at_a_time_and_lens_equals_plain():
    from engramlab.locate.circuits.components import capture, head_roles, logit_lens

    lm = _lm("llama")
    graph, batch = CircuitGraph.from_model(lm), _batch(n=5)
    batch.subject[:] = torch.tensor([0, 2])
    heads = [(0, 1), (0, 3), (1, 0), (1, 2)]
    together = head_roles(lm, graph, batch, heads, batch_size=2)
    for (l, h), row in zip(heads, together):
        (alone,) = head_roles(lm, graph, batch, [(l, h)], batch_size=5)
        assert (row["subject_effect"], row["relation_effect"]) == pytest.approx(
            (alone["subject_effect"], alone["relation_effect"]), rel=1e-5, abs=1e-7)
    # the lens by hand: one layer at a time, the plain model's residuals
    a, rows = lm.adapter, torch.arange(len(batch))
    names = [f"blocks.{l}.resid_post" for l in range(a.n_layers)]
    with torch.no_grad(), lm.hooks.capture(names) as c:
        lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask)
    captured = capture(lm, batch, (), 2)
    for l, row in enumerate(logit_lens(lm, batch, captured=captured)):
        with torch.no_grad():
            logits = a.unembed(a.final_norm(c[names[l]][rows, batch.last]))
        target = logits[rows, batch.clean_answer]
        rank = (logits > target[:, None]).sum(-1) + 1
        assert row["mean_rank"] == pytest.approx(float(rank.float().mean()))
        assert row["mean_prob"] == pytest.approx(float(logits.softmax(-1)[rows, batch.clean_answer].mean()), rel=1e-5)
    with torch.no_grad():
        full = lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask).logits[rows, batch.last]
    assert torch.allclose(captured.clean_logits(lm), full, atol=1e-5)  # in the batch's own order


# -- the automatic N ---------------------------------------------------------------------------------
def _scan(grid, ok, resolution=20):
    """The automatic N as a scan: the first grid point that passes, refined by bisection below it."""
    low = 0
    for n in grid:
        if ok(n):
            high = n
            break
        low = n
    else:
        return grid[-1]
    while high - low > max(1, high // resolution):
        mid = (low + high) // 2
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high


def test_bisected_grid_equals_the_scan_for_monotone_faithfulness_with_fewer_circuits():
    from engramlab.locate.circuits.find import smallest_passing

    grid = [7, 14, 35, 70, 141, 353, 707]
    bisected, scanned = [], []
    for threshold in [1, 7, 8, 13, 14, 50, 140, 141, 300, 500, 700, 707, 708, 10**6]:
        calls, scan_calls = [], []
        assert smallest_passing(grid, lambda n: calls.append(n) or n >= threshold) == \
            _scan(grid, lambda n: scan_calls.append(n) or n >= threshold), threshold
        bisected.append(len(calls))
        scanned.append(len(scan_calls))
    # the cap, then log2 of the grid, then the same refinement: fewer circuits at worst and in all
    assert max(bisected) < max(scanned) and sum(bisected) < sum(scanned)
    one = []
    assert smallest_passing(grid, lambda n: one.append(n) or False) == 707 and one == [707]  # the cap misses: done


# -- end to end, frozen pairs --------------------------------------------------------------------------
def _capital_lm(seed=0):
    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), seed=seed), tok), facts


def test_find_circuit_stats_stages_and_correct_flags(capsys):
    lm, facts = _capital_lm()
    result = find_circuit(lm, facts, CircuitConfig(require_correct=False, curve=(0.1, 1.0)), progress=True)
    stats = result.stats
    stages = ("filter", "attribute", "search", "evaluate", "curve", "heads", "lens")
    assert all(stats[f"{s}_seconds"] >= 0 for s in stages)
    assert sum(stats[f"{s}_seconds"] for s in stages) <= stats["seconds"] + 1e-2
    err = capsys.readouterr().err
    assert all(name in err for name in ("attribute", "search N", "evaluate", "curve", "heads", "lens"))
    rows = [r for r in result.records() if r["role"] != "skipped"]
    assert all(isinstance(r["correct"], bool) for r in rows)
    assert stats["n_wrong"] == sum(not r["correct"] for r in rows)  # without the filter, counted


def test_frozen_pairs_on_another_model_keep_sides_and_partners(tmp_path):
    lm, facts = _capital_lm(seed=0)
    first = find_circuit(lm, facts, CircuitConfig(require_correct=False, top_n=10, curve=(1.0,)))
    first.save(tmp_path / "first")
    other, _ = _capital_lm(seed=3)
    # the filter would drop facts the other model gets wrong; frozen pairs keep every one
    config = CircuitConfig(pairs=str(tmp_path / "first"), top_n=10, curve=(1.0,), split=0.3, seed=7)
    again = find_circuit(other, facts, config)
    keys = ("relation", "subject", "object", "role", "corrupt_subject", "corrupt_object")
    sides = lambda result: [{k: r[k] for k in keys} for r in result.records() if r["role"] != "skipped"]  # noqa: E731
    assert sides(again) == sides(first)
    assert again.stats["n_wrong"] == sum(not r["correct"] for r in again.records() if r["role"] != "skipped")
    # the records file itself works too
    split = split_pairs(other, facts, pairs=tmp_path / "first" / "records.jsonl")
    assert [p.corrupt_subject for p in split.evaluation] == [r["corrupt_subject"] for r in first.records()
                                                               if r["role"] == "evaluation"]


def test_bad_pairs_files_are_one_line_errors(tmp_path):
    lm, facts = _capital_lm()
    with pytest.raises(EngramError, match="no such pairs file") as err:
        split_pairs(lm, facts, pairs=tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    good = {"relation": facts[0].relation, "subject": facts[0].subject, "object": facts[0].object,
            "corrupt_subject": facts[1].subject, "corrupt_object": facts[1].object}
    path = tmp_path / "records.jsonl"
    stranger = dict(good, subject="Atlantis", role="evaluation")
    path.write_text("\n".join(json.dumps(r) for r in (dict(good, role="discovery"), stranger)) + "\n")
    with pytest.raises(EngramError, match=r"records.jsonl line 2: .*'Atlantis'.* not a fact") as err:
        split_pairs(lm, facts, pairs=path)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({**good, "role": "discovery", "corrupt_subject": None}) + "\n")
    with pytest.raises(EngramError, match="line 1: a discovery row without corrupt_subject"):
        split_pairs(lm, facts, pairs=path)
    path.write_text(json.dumps({**good, "role": "discovery"}) + "\n")
    with pytest.raises(EngramError, match="needs discovery and evaluation rows"):
        split_pairs(lm, facts, pairs=tmp_path)
    with pytest.raises(EngramError, match="--pairs"):
        split_pairs(lm, facts, pairs=tmp_path / "none.jsonl")
