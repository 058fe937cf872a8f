"""Degenerate knowledge neurons: graph distances by hand, persistence clustering on a known graph,
the enforced verifier on a model built so that two neuron groups each carry a fact alone."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engramlab.data.facts import Fact, FactSet
from engramlab.locate import topology
from engramlab.locate.degenerate import (DKNConfig, DKNResult, FactProbe, find_dkns,
                                         scaled_target_probs, search_dkn)
from engramlab.locate.neuron_graph import neuron_distances
from engramlab.locate.dkn_analyses import EvolveConfig, evolvability, neuron_param_masks, perturb
from engramlab.locate.neurons import intervene, target_probability
from engramlab.locate.topology import ClusterConfig, cluster_neurons, persistence_diagram
from engramlab.models import tiny_model, wrap_model

from conftest import word_tokenizer

INF = np.inf


# -- the neuron graph, computed by hand -------------------------------------------------------------
def _unit(d, entries):
    v = torch.zeros(d)
    for k, x in entries.items():
        v[k] = x
    return v


@torch.no_grad()
def test_distances_gpt2_by_hand():
    lm = wrap_model(tiny_model("gpt2", n_layers=3))
    a = lm.adapter
    d = a.d_model
    a.W_out(0)[5] = _unit(d, {0: 1.0, 1: 2.0})              # neuron A = (0, 5) writes [1, 2, 0, ...]
    a.W_in(1)[:, 7] = _unit(d, {0: 1.0, 1: 1.0})            # neuron B = (1, 7) reads [1, 1, 0, ...]
    a.mlp_norm(1).weight.copy_(_unit(d, {k: 1.0 for k in range(d)}))
    a.mlp_norm(1).weight[0] = 2.0                            # ln_2 gain: [2, 1, 1, ...]
    neurons = [(0, 5), (1, 7), (0, 9), (2, 3)]
    dist = neuron_distances(a, neurons, max_span=1)
    # Folded read vector v = gain * w_in = [2, 1, 0, ...], centred by the LayerNorm: v - mean(v).
    # w_out . (v - mean v) = (1*2 + 2*1) - (3/d) * (1 + 2) = 4 - 9/d.
    assert dist[0, 1] == pytest.approx(1.0 / (4 - 9 / d), rel=1e-5)
    assert dist[1, 0] == dist[0, 1]                          # undirected graph
    assert dist[0, 2] == INF                                 # same layer: no edge
    assert dist[0, 3] == INF                                 # two layers apart, max_span 1: no direct edge
    assert np.all(np.diag(dist) == 0)
    raw = neuron_distances(a, neurons, max_span=1, fold_norm=False)
    assert raw[0, 1] == pytest.approx(1.0 / 3.0, rel=1e-5)   # plain w_out . w_in = 1 + 2
    assert np.isfinite(neuron_distances(a, neurons, max_span=2)[0, 3])


@torch.no_grad()
def test_distances_gated_mlp_by_hand_and_direction():
    lm = wrap_model(tiny_model("llama", n_layers=2))
    a = lm.adapter
    d = a.d_model
    a.W_out(0)[5] = _unit(d, {0: 1.0, 1: 2.0})               # A = (0, 5) writes [1, 2, 0, ...]
    a.W_in(1)[:, 7] = _unit(d, {0: 1.0, 1: 1.0})             # B = (1, 7): up reads [1, 1, 0, ...]
    a.W_gate(1)[:, 7] = _unit(d, {1: 1.5})                   #            gate reads [0, 1.5, 0, ...]
    a.mlp_norm(1).weight.copy_(torch.ones(d))
    a.mlp_norm(1).weight[0] = 2.0                             # RMSNorm gain [2, 1, ...], no centring
    # The reverse direction (B's output read by A's input) must not be what is measured:
    a.W_out(1)[7] = _unit(d, {2: 100.0})
    a.W_in(0)[:, 5] = _unit(d, {2: 100.0})
    a.W_gate(0)[:, 5] = _unit(d, {2: 100.0})
    dist = neuron_distances(a, [(0, 5), (1, 7)], max_span=3)
    # up: [1, 2] . [2, 1] = 4; gate: [1, 2] . [0, 1.5] = 3; combined sqrt(4^2 + 3^2) = 5.
    assert dist[0, 1] == pytest.approx(0.2, rel=1e-5)
    assert neuron_distances(a, [(0, 5), (1, 7)], fold_norm=False)[0, 1] == pytest.approx(1 / np.hypot(3, 3), rel=1e-5)


# -- persistence clustering on a graph with a known answer ---------------------------------------------
def _two_triangles():
    """Nodes 0-1-2 (edges 1, 1, 3) and 3-4-5 (edges 2, 2) joined by one long edge 2-3 (10); node 6 alone."""
    dist = np.full((7, 7), INF)
    np.fill_diagonal(dist, 0.0)
    for x, y, w in [(0, 1, 1), (1, 2, 1), (0, 2, 3), (3, 4, 2), (4, 5, 2), (2, 3, 10)]:
        dist[x, y] = dist[y, x] = w
    return dist


def test_persistence_on_hand_made_graph():
    dist = _two_triangles()
    deaths = sorted(persistence_diagram(dist)[:, 1])
    assert deaths == [1, 1, 2, 2, 10, INF, INF]            # the 3-cycle edge (3) kills nothing
    assert topology.persistence_threshold(dist, 0.9) == pytest.approx(2 + 0.6 * 8)
    assert cluster_neurons(dist, "persistence") == [[0, 1, 2], [3, 4, 5], [6]]
    assert cluster_neurons(dist, "persistence", ClusterConfig(quantile=1.0)) == [[0, 1, 2, 3, 4, 5], [6]]
    assert cluster_neurons(dist, "persistence", ClusterConfig(quantile=0.0)) == [[0, 1, 2], [3], [4], [5], [6]]
    assert cluster_neurons(dist, "persistence", ClusterConfig(outliers="drop")) == [[0, 1, 2], [3, 4, 5]]


def test_baselines_on_hand_made_graph():
    dist = _two_triangles()
    for method in ("hierarchical", "dbscan", "kmeans"):
        assert cluster_neurons(dist, method) == [[0, 1, 2], [3, 4, 5], [6]], method
    assert cluster_neurons(dist, "pairs") == [[k] for k in range(7)]
    # DBSCAN with denser cores: nothing has 4 neurons within eps, so all are noise -> singletons
    assert cluster_neurons(dist, "dbscan", ClusterConfig(dbscan_min_samples=4)) == [[k] for k in range(7)]
    assert cluster_neurons(dist, "dbscan", ClusterConfig(dbscan_min_samples=4, outliers="drop")) == []


def test_single_linkage_equals_persistence_on_random_graphs():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 14))
        w = rng.random((n, n)) * 10
        w = np.where(rng.random((n, n)) < 0.5, INF, np.minimum(w, w.T))
        w = np.minimum(w, w.T)
        np.fill_diagonal(w, 0)
        q = float(rng.random())
        single = ClusterConfig(quantile=q, linkage="single")
        assert cluster_neurons(w, "persistence", single) == cluster_neurons(w, "hierarchical", single)


# -- the search, on drop functions with a known answer -----------------------------------------------
def test_search_finds_the_redundant_set_and_skips_an_essential_cluster():
    def drops(subsets):  # clusters 0 and 1 back each other up; cluster 2 matters alone
        return [(1.0 if {0, 1} <= s else 0.01) + (0.5 if 2 in s else 0.0) for s in subsets]

    found = search_dkn(drops, 4)
    assert found.dkn == [0, 1] and found.check == "exhaustive"
    assert found.partial_drop == pytest.approx(0.01) and found.full_drop == pytest.approx(1.0)
    assert search_dkn(lambda ss: [1.0 if {0, 1, 2} <= s else 0.0 for s in ss], 5).dkn == [0, 1, 2]
    nothing = search_dkn(lambda ss: [0.09 * len(s) for s in ss], 3)
    assert nothing.dkn is None and "no set of clusters" in nothing.reason


def test_search_is_bounded_and_says_so():
    seen = []

    def drops(subsets):
        seen.extend(subsets)
        return [1.0 if {3, 7} <= s else 0.0 for s in subsets]

    found = search_dkn(drops, 16, max_subsets=100)
    assert found.dkn == [3, 7] and found.check == "sampled" and found.n_shed > 0
    assert len(seen) < 2**16 // 20
    pairs = search_dkn(drops, 30, max_dkn_clusters=2, max_subsets=200)
    assert pairs.dkn == [3, 7] and pairs.check == "sampled"


# -- a model built so that two neuron groups each carry the fact alone -----------------------------------
VOCAB_WORDS = "alpha beta gamma delta " + " ".join(f"w{k}" for k in range(60))  # 1/vocab is small


@torch.no_grad()
def redundant_model(with_b: bool = True):
    """Llama, 2 layers, attention off. Path A: neuron (0, 0) reads the embedding direction e0 and
    writes eA; neuron (1, 0) reads eA and writes eT, the target's unembedding direction. Path B:
    (0, 1) -> eB -> (1, 1) -> eT. Either path alone drives P("delta") to ~1 (the softmax saturates);
    with both paths cut it is 1/vocab. The graph links (0,0)-(1,0) and (0,1)-(1,1) only."""
    tok = word_tokenizer([VOCAB_WORDS])
    lm = wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, d_model=16, d_mlp=8), tok)
    a, d = lm.adapter, lm.adapter.d_model
    e0, eA, eB, eT = (_unit(d, {k: 1.0}) for k in range(4))
    for p in lm.model.parameters():
        p.zero_()
    for layer in range(2):
        a.attn_norm(layer).weight.fill_(1.0)
        a.mlp_norm(layer).weight.fill_(1.0)
    a.final_norm.weight.fill_(1.0)
    a.embed.weight[:] = e0
    paths = [(0, eA)] + ([(1, eB)] if with_b else [])
    for n, mid in paths:
        a.W_gate(0)[:, n], a.W_in(0)[:, n], a.W_out(0)[n] = e0, e0, 0.3 * mid
        a.W_gate(1)[:, n], a.W_in(1)[:, n], a.W_out(1)[n] = mid, mid, 5.0 * eT
    a.W_U[:, tok.convert_tokens_to_ids("delta")] = 4.0 * eT
    return lm


def _fact():
    return Fact("beta", "test_relation", "delta", ("alpha {} gamma",))


def test_redundant_model_is_what_it_claims():
    lm = redundant_model()
    probe = FactProbe(lm, "alpha beta gamma", lm.tokenizer.convert_tokens_to_ids(["delta"]), DKNConfig())
    A, B = frozenset({(0, 0), (1, 0)}), frozenset({(0, 1), (1, 1)})
    assert probe.base > 0.99
    drop_a, drop_b, drop_ab, drop_cross = probe.drops([A, B, A | B, frozenset({(0, 0), (1, 1)})])
    assert drop_a < 0.01 and drop_b < 0.01 and drop_ab > 0.9 and drop_cross > 0.9


def test_verifier_finds_the_two_groups_and_rejects_a_lone_group():
    fact = _fact()
    attribution = lambda lm, prompt, target: torch.tensor([[1.0, 0.9] + [0.0] * 6, [0.8, 0.7] + [0.0] * 6])
    config = DKNConfig(known_rank=1, robustness=True)
    result = find_dkns(redundant_model(), FactSet([fact]), config, attribute=attribution)
    rec = result.records[0]
    assert rec["skipped"] is None and rec["n_edges"] == 2
    persistence = rec["methods"]["persistence"]
    assert sorted(persistence["clusters"]) == [[[0, 0], [1, 0]], [[0, 1], [1, 1]]]
    assert persistence["dkn"] == [0, 1] and persistence["check"] == "exhaustive"
    assert persistence["partial_drop"] < 0.05 and persistence["full_drop"] > 0.3
    assert rec["methods"]["pairs"]["dkn"] is not None and len(rec["methods"]["pairs"]["dkn"]) == 2
    robust = persistence["robustness"]
    assert robust["clean"]["attenuated"] < 0.1 < 0.9 < robust["clean"]["enhanced"]
    summary = result.summary()
    assert summary["dkn_found_rate"] == summary["persistence.dkn_found_rate"] == 1.0
    assert summary["mean_full_drop"] > 0.9 and summary["mean_partial_drop"] < 0.05

    # Without path B, group A carries the fact alone: suppressing it kills the fact -> no DKN.
    lone = find_dkns(redundant_model(with_b=False), FactSet([fact]), config, attribute=attribution).records[0]
    entry = lone["methods"]["persistence"]
    assert entry["dkn"] is None and entry["max_single_drop"] > 0.9 and "proper subset" in entry["reason"]
    assert lone["methods"]["pairs"]["dkn"] is None


def test_result_save_load_roundtrip(tmp_path):
    attribution = lambda lm, prompt, target: torch.tensor([[1.0, 0.9] + [0.0] * 6, [0.8, 0.7] + [0.0] * 6])
    facts = FactSet([_fact(), Fact("alpha", "test_relation", "delta", ("{} beta gamma",))])
    result = find_dkns(redundant_model(), facts, DKNConfig(methods=("persistence", "kmeans"), robustness=False),
                       attribute=attribution)
    result.save(tmp_path)
    again = DKNResult.load(tmp_path)
    assert again.records == json.loads(json.dumps(result.records))
    assert again.summary() == result.summary()
    assert set(again.summary()) >= {"kmeans.dkn_found_rate", "persistence.mean_full_drop", "dkn_found_rate"}


# -- batched suppression agrees with the knowledge-neuron interventions ---------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_scaled_probs_match_intervene(family):
    tok = word_tokenizer(["the capital of france is paris city"])
    lm = wrap_model(tiny_model(family, vocab_size=len(tok), n_layers=3, seed=1), tok)
    prompt, target = "the capital of france is", tok.convert_tokens_to_ids(["paris", "city"])
    sets = [[], [(0, 3)], [(1, 5), (2, 7), (0, 1)]]
    for factor, positions, theirs in ((0.0, "last", -1), (2.0, "last", -1), (0.0, "all", None)):
        ours = scaled_target_probs(lm, prompt, target, sets, factor, positions, batch_size=2)
        for s, p in zip(sets, ours):
            with intervene(lm, s, factor, positions=theirs):
                assert p == pytest.approx(target_probability(lm, prompt, target), rel=1e-4)


# -- analyses -------------------------------------------------------------------------------------------
def test_perturbations_keep_subject_and_last_word():
    rng = random.Random(0)
    for _ in range(20):
        for kind in ("insert", "delete", "replace"):
            out = perturb("The capital city of {} is", kind, rng)
            assert "{}" in out and out.endswith(" is") and out != "The capital city of {} is"
    assert perturb("{} is", "delete", rng) is None


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_param_masks_select_exactly_the_neurons(family):
    lm = wrap_model(tiny_model(family, n_layers=2))
    masks = neuron_param_masks(lm.adapter, [(1, 3), (1, 5), (0, 2)])
    with torch.no_grad():
        for p, m in masks.values():
            p.add_(m * 1000.0)
    a = lm.adapter
    assert (a.W_in(1)[:, [3, 5]] > 100).all() and (a.W_out(1)[[3, 5]] > 100).all() and (a.W_in(0)[:, 2] > 100).all()
    assert (a.W_in(1)[:, 4].abs() < 100).all() and (a.W_out(0)[3].abs() < 100).all()
    if a.W_gate(1) is not None:
        assert (a.W_gate(1)[:, [3, 5]] > 100).all() and (a.W_gate(1)[:, 0].abs() < 100).all()
    n_marked = sum(int(m.sum()) for _, m in masks.values())
    assert n_marked == 3 * a.d_model * (3 if a.W_gate(0) is not None else 2)


def test_evolvability_runs_and_restores_the_model():
    lm = redundant_model()
    attribution = lambda lm, prompt, target: torch.tensor([[1.0, 0.9] + [0.0] * 6, [0.8, 0.7] + [0.0] * 6])
    facts = [_fact()]
    result = find_dkns(lm, FactSet(facts), DKNConfig(methods=("persistence",), robustness=False), attribute=attribution)
    lm.model.requires_grad_(False)  # as load_model leaves it
    lm.adapter.mlp_out_proj(1).weight.requires_grad_(True)  # ...but one, whose flag must survive too
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in lm.model.named_parameters()}
    evo = evolvability(lm, result, facts, EvolveConfig(n_new=2, steps=2))
    assert set(evo["arms"]) == {"dkn", "kn", "random", "full"}
    assert evo["arms"]["dkn"]["n_neurons"] == 4 and evo["arms"]["random"]["n_neurons"] == 4
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1], name
    result.evolvability = evo
    assert "evolvability.full.new_top1" in result.summary()


# -- the command ------------------------------------------------------------------------------------------
def test_dkn_command_on_tiny_model(tmp_path, tiny_hf_dir):
    from engramlab.cli import app
    import engramlab.cli.dkn  # noqa: F401  (registers the verb until the CLI package imports it)

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["dkn", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                   "--limit", "2", "--known-rank", "100000", "--steps", "2", "--threshold", "0.5",
                                   "--max-candidates", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_facts"] == 2 and "persistence.dkn_found_rate" in summary and "dkn_found_rate" in summary
    assert len((out / "dkn.jsonl").read_text().splitlines()) == 2
    bad = CliRunner().invoke(app, ["dkn", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                   "--method", "nope", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "error:" in bad.output
