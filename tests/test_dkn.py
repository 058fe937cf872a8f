"""Degenerate knowledge neurons: graph distances by hand, persistence clustering on a known graph,
the enforced verifier on a model built so that two neuron groups each carry a fact alone."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engramlab.data.facts import Fact, FactSet
from engramlab.errors import EngramError
from engramlab.locate.dkn import clustering as topology
from engramlab.locate.dkn import (DKNConfig, DKNResult, FactProbe, find_dkns,
                                         scaled_target_probs, search_dkn)
from engramlab.locate.dkn.graph import neuron_distances
from engramlab.locate.dkn.evolvability import EvolveConfig, evolvability, neuron_param_masks, perturb
from engramlab.locate.neurons import target_probability
from engramlab.models.scoring import NeuronScale
from engramlab.locate.dkn.clustering import ClusterConfig, cluster_neurons, persistence_diagram
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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@torch.no_grad()
def test_rms_norm_scale_by_hand(family):
    from engramlab.locate.dkn.graph import reader_inv_rms

    tok = word_tokenizer(["the capital of france is paris"])
    lm = wrap_model(tiny_model(family, vocab_size=len(tok), n_layers=3, seed=2), tok)
    a = lm.adapter
    seen = {}
    handles = [a.mlp_norm(l).register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0][0, -1]))
               for l in range(a.n_layers)]
    try:
        lm.model(input_ids=torch.tensor([tok("the capital of france is", add_special_tokens=False)["input_ids"]]))
    finally:
        for h in handles:
            h.remove()
    rms = []
    for l in range(a.n_layers):
        x = seen[l].double()
        if family == "llama":  # RMSNorm: x / sqrt(mean x^2 + eps)
            rms.append(float(torch.sqrt((x * x).mean() + a.mlp_norm(l).variance_epsilon)))
        else:  # LayerNorm: (x - mean) / sqrt(var + eps)
            rms.append(float(torch.sqrt(x.var(unbiased=False) + a.mlp_norm(l).eps)))
    inv = reader_inv_rms(lm, "the capital of france is")
    assert inv.tolist() == pytest.approx([1 / r for r in rms], rel=1e-5)
    assert max(rms) / min(rms) > 1.01  # the layers differ, so the scaling is not a no-op
    neurons = [(0, 5), (1, 7), (2, 3), (0, 9)]
    plain = neuron_distances(a, neurons, max_span=3)
    scaled = neuron_distances(a, neurons, max_span=3, read_scale=inv)
    for x in range(4):
        for y in range(4):
            reader = max(neurons[x][0], neurons[y][0])  # the later neuron reads
            if x != y and np.isfinite(plain[x, y]):
                assert scaled[x, y] == pytest.approx(plain[x, y] * rms[reader], rel=1e-5)
            else:
                assert scaled[x, y] == plain[x, y]


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


def _reference_graph():
    """11 neurons. Nine short edges (sorted): 0-1 1, 3-4 1.5, 1-2 2, 5-6 6.2, 2-3 6.3, 6-7 6.4,
    0-2 6.5, 7-8 6.6, 4-8 7; every other pair of 0..9 is long (100, 101, ...) except 9-0, 9-1, 9-2
    (no edge); neuron 10 has no edge. 42 finite edges."""
    dist = np.full((11, 11), INF)
    np.fill_diagonal(dist, 0.0)
    short = {(0, 1): 1, (3, 4): 1.5, (1, 2): 2, (5, 6): 6.2, (2, 3): 6.3, (6, 7): 6.4, (0, 2): 6.5, (7, 8): 6.6,
             (4, 8): 7}
    long = iter(range(100, 200))
    for x in range(10):
        for y in range(x + 1, 10):
            if (x, y) not in {(0, 9), (1, 9), (2, 9)}:
                dist[x, y] = dist[y, x] = short[(x, y)] if (x, y) in short else next(long)
    return dist


def test_reference_ntc_on_hand_made_graph():
    from engramlab.locate.dkn.clustering import reference_ntc

    dist = _reference_graph()
    # By hand: 42 finite edges, 0.2 quantile at position 0.2 * 41 = 8.2 of the sorted distances:
    # 7 + 0.2 * (100 - 7) = 25.6. The nine short edges lie below it; the shortest int(0.5 * 9) = 4
    # are swept: 0-1 (births 0, 1 -> 1), 3-4 (3, 4 -> 1.5), 1-2 (2 -> 2; 1 is no longer alone),
    # 5-6 (5, 6 -> 6.2). Births of all 11: [1, 1, 2, 1.5, 1.5, 6.2, 6.2, 0, 0, 0, 0], median 1.
    # Persistence = last kept edge 7 - earliest birth: {0,1,2} 6 > 1, {3,4} 5.5 > 1, {5,6} 0.8 <= 1.
    ntc = reference_ntc(dist)
    assert ntc.distance_threshold == pytest.approx(25.6)
    assert (ntc.n_edges_kept, ntc.n_edges_swept, ntc.last_edge, ntc.birth_threshold) == (9, 4, 7.0, 1.0)
    assert ntc.births.tolist() == [1, 1, 2, 1.5, 1.5, 6.2, 6.2, 0, 0, 0, 0]
    ref = ClusterConfig(clustering="reference", outliers="drop")
    assert cluster_neurons(dist, "persistence", ref) == [[0, 1, 2], [3, 4]]
    # Neurons in no kept cluster follow --outliers, like DBSCAN noise.
    assert cluster_neurons(dist, "persistence", ClusterConfig(clustering="reference")) == \
        [[0, 1, 2], [3, 4]] + [[k] for k in range(5, 11)]
    # Sweeping all nine: 2-3 joins {0,1,2} and {3,4}; 6-7 (7 -> 6.4), 7-8 (8 -> 6.6), 4-8 joins all.
    # Births [1, 1, 2, 1.5, 1.5, 6.2, 6.2, 6.4, 6.6, 0, 0]: median 1.5 < 7 - 1.
    whole = ClusterConfig(clustering="reference", outliers="drop", edge_fraction=1.0)
    assert cluster_neurons(dist, "persistence", whole) == [list(range(9))]
    # A stricter persistence bar (the 0.95 quantile of the births: 6.2) keeps none.
    strict = ClusterConfig(clustering="reference", outliers="drop", birth_quantile=0.95)
    assert cluster_neurons(dist, "persistence", strict) == []
    # engramlab's rule on the same graph: deaths 1, 1.5, 2, 6.2, 6.3, 6.4, 6.6, 7 and neuron 9's
    # (its shortest edge, >= 100); the 0.9 quantile 7 + 0.2 * (that - 7) joins all of 0..8 only.
    assert cluster_neurons(dist, "persistence") == [list(range(9)), [9], [10]]
    with pytest.raises(EngramError, match="--clustering"):
        cluster_neurons(dist, "persistence", ClusterConfig(clustering="paper"))
    with pytest.raises(EngramError, match="--edge-fraction"):
        cluster_neurons(dist, "persistence", ClusterConfig(clustering="reference", edge_fraction=2.0))


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
    # Bounded (clusters were shed), but the DKN itself came out of the exhaustive phase.
    assert found.dkn == [3, 7] and found.bounded and found.n_shed > 0
    assert found.check == "exhaustive" and found.n_verified == 2
    assert len(seen) < 2**16 // 20
    pairs = search_dkn(drops, 30, max_dkn_clusters=2, max_subsets=200)
    assert pairs.dkn == [3, 7] and pairs.bounded and pairs.check == "exhaustive"


def test_sampled_verification_is_labelled_and_sound():
    """16 clusters: all of them together drop P(target) by 1; one hidden pair {4, 9} drops it by
    0.5, every other proper subset by 0. An exhaustive check rejects the 16-set; the sampled check
    measures the singletons, leave-one-outs and 64 random subsets, misses the pair, and accepts."""
    measured = {}

    def drops(subsets):
        out = [1.0 if len(s) == 16 else 0.5 if s == {4, 9} else 0.0 for s in subsets]
        measured.update(zip(subsets, out))
        return out

    found = search_dkn(drops, 16, max_subsets=100, subset_samples=64, seed=0)
    assert found.dkn == list(range(16)) and found.check == "sampled" and found.bounded
    # Sound for what it claims: every proper subset it measured passes, and it says how many.
    whole = frozenset(range(16))
    proper = {s: d for s, d in measured.items() if s and s < whole}
    assert len(proper) == found.n_verified and 32 <= found.n_verified <= 32 + 64 < 2**16 - 2
    assert all(d < 0.05 for d in proper.values()) and found.partial_drop == max(proper.values())
    assert found.full_drop == measured[whole] == 1.0 > 0.3
    # ... but it is not exhaustive: the pair it never drew fails the partial-drop test.
    assert frozenset({4, 9}) not in measured and drops([frozenset({4, 9})]) == [0.5]


def test_found_rate_counts_sampled_dkns_apart():
    from engramlab.locate.dkn import method_summary

    def entry(dkn, check, bounded):
        return {"dkn": dkn, "check": check, "bounded": bounded, "partial_drop": 0.01 if dkn else None,
                "full_drop": 0.9 if dkn else None, "clusters": [[[0, 0]], [[1, 0]]], "dkn_neurons": [[0, 0], [1, 0]],
                "all_drop": 0.9, "max_single_drop": 0.01}

    entries = [entry([0, 1], "exhaustive", False), entry([0, 1], "exhaustive", True),
               entry([0, 1], "sampled", True), entry(None, "sampled", True), entry(None, "exhaustive", False)]
    out = method_summary(entries)
    assert out["dkn_found_rate"] == pytest.approx(3 / 5)
    assert out["dkn_found_rate_exhaustive"] == pytest.approx(2 / 5)
    assert out["dkn_found_rate_sampled"] == pytest.approx(1 / 5)
    assert out["n_sampled_searches"] == 3 and out["n_dkn"] == 3


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
    rec = result.records()[0]
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
    lone = find_dkns(redundant_model(with_b=False), FactSet([fact]), config, attribute=attribution).records()[0]
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
    assert again.records() == json.loads(json.dumps(result.records()))
    assert again.summary() == result.summary()
    assert set(again.summary()) >= {"kmeans.dkn_found_rate", "persistence.mean_full_drop", "dkn_found_rate"}


# -- batched suppression agrees with the knowledge-neuron interventions ---------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_scaled_probs_match_intervene(family):
    tok = word_tokenizer(["the capital of france is paris city"])
    lm = wrap_model(tiny_model(family, vocab_size=len(tok), n_layers=3, seed=1), tok)
    prompt, target = "the capital of france is", tok.convert_tokens_to_ids(["paris", "city"])
    sets = [[], [(0, 3)], [(1, 5), (2, 7), (0, 1)]]
    for factor, positions, theirs in ((0.0, "last", "prompt_end"), (2.0, "last", "prompt_end"), (0.0, "all", "all")):
        ours = scaled_target_probs(lm, prompt, target, sets, factor, positions, batch_size=2)
        for s, p in zip(sets, ours):
            assert p == pytest.approx(target_probability(lm, prompt, target, edits=NeuronScale(s, factor, theirs)),
                                      rel=1e-4)


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


def test_matched_kn_by_layer_with_a_shortfall():
    from engramlab.locate.dkn.evolvability import matched_kn, matched_random

    dkn = [(3, 0), (3, 1), (5, 0)]
    cands = {(3, 0): 1.0, (3, 1): 0.9, (5, 0): 0.8, (3, 2): 0.5, (3, 4): 0.6, (4, 7): 0.9, (6, 1): 0.8, (2, 3): 0.7}
    # Layer 3 needs 2 and has (3, 4), (3, 2) besides the DKN; layer 5 has none: the nearest layers
    # are 4 and 6 (tie: the earlier, 4).
    assert matched_kn(dkn, cands) == ([(3, 2), (3, 4), (4, 7)], 1)
    cands.pop((3, 4))
    assert matched_kn(dkn, cands) == ([(2, 3), (3, 2), (4, 7)], 2)  # layer 3 borrows from 2 (tie with 4)
    rnd = matched_random(dkn, set(cands), d_mlp=6, seed=0)
    assert [l for l, _ in rnd] == [3, 3, 5] and not set(rnd) & set(cands)


def _train_batch_model(family):
    tok = word_tokenizer([VOCAB_WORDS])
    lm = wrap_model(tiny_model(family, vocab_size=len(tok), n_layers=2, d_model=16, d_mlp=8, seed=3), tok)
    return lm, [_fact(), Fact("alpha", "test_relation", "gamma", ("{} beta delta",))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_moves_only_the_masked_neurons(family):
    from engramlab.locate.dkn.evolvability import _batch, trained

    lm, facts = _train_batch_model(family)
    a = lm.adapter
    neurons = [(0, 2), (1, 5), (1, 6)]

    def slices():  # each neuron's weights, read through the adapter's views: in/gate column, out row
        cols = [w(l)[:, i] for l, i in neurons for w in (a.W_in, a.W_gate) if w(l) is not None]
        return cols + [a.W_out(l)[i] for l, i in neurons]

    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    neuron_before = [t.detach().clone() for t in slices()]
    masks = neuron_param_masks(a, neurons)
    with trained(lm, masks, _batch(lm, facts, 0), EvolveConfig(steps=3, lr=1e-2)) as n_params:
        moved_in_neurons = sum(int((t.detach() != t0).sum()) for t, t0 in zip(slices(), neuron_before))
        moved_anywhere = sum(int((p.detach() != before[n]).sum()) for n, p in lm.model.named_parameters())
        # Everything that moved is in the neurons' weights, and most of those entries did move.
        assert moved_anywhere == moved_in_neurons > 0.5 * n_params
        assert n_params == len(neurons) * a.d_model * (3 if a.W_gate(0) is not None else 2)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_evolvability_arms_are_matched_and_the_model_restored():
    lm = redundant_model()
    # Eight candidates: the two paths (the DKN) and four neurons with no weights (no edges).
    attribution = lambda lm, prompt, target: torch.tensor([[1.0, 0.9, 0.5, 0.6] + [0.0] * 4,
                                                           [0.8, 0.7, 0.4, 0.3] + [0.0] * 4])
    facts = [_fact()]
    result = find_dkns(lm, FactSet(facts), DKNConfig(methods=("persistence",), robustness=False), attribute=attribution)
    assert result.records()[0]["methods"]["persistence"]["dkn_neurons"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    lm.model.requires_grad_(False)  # as load_model leaves it
    lm.adapter.mlp_out_proj(1).weight.requires_grad_(True)  # ...but one, whose flag must survive too
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in lm.model.named_parameters()}
    evo = evolvability(lm, result, facts, EvolveConfig(n_new=2, steps=2,
                                                       arms=("dkn", "kn", "random", "kn_all", "random_any", "full")))
    arms = evo["arms"]
    assert set(arms) == {"dkn", "kn", "random", "kn_all", "random_any", "full"}
    per_entry = 3 * lm.adapter.d_model  # up column, gate column, down row
    for arm in ("dkn", "kn", "random"):  # matched: 2 neurons in layer 0, 2 in layer 1
        assert arms[arm]["n_neurons"] == 4 and arms[arm]["layers"] == {"0": 2, "1": 2}, arm
        assert arms[arm]["n_params"] == 4 * per_entry
    assert arms["kn"]["neurons"] == [[0, 2], [0, 3], [1, 2], [1, 3]] and arms["kn"]["n_unmatched"] == 0
    assert all(i >= 4 for _, i in arms["random"]["neurons"])  # never a candidate
    assert arms["kn_all"]["n_neurons"] == 8 and arms["random_any"]["n_neurons"] == 4
    assert arms["full"]["n_params"] == sum(p.numel() for p in lm.model.parameters())
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1], name
    from engramlab.locate.dkn.evolvability import EvolvabilityResult

    summary = EvolvabilityResult(evo).summary()  # the dkn verb files these under evolvability.*
    assert summary["kn.n_neurons"] == 4 and "kn.layers" not in summary
    with pytest.raises(EngramError, match="--evolve-arms"):
        evolvability(lm, result, facts, EvolveConfig(arms=("dkn", "nope")))


# -- the command ------------------------------------------------------------------------------------------
def test_dkn_command_on_tiny_model(tmp_path, tiny_hf_dir):
    from engramlab.cli import app
    import engramlab.cli.dkn  # noqa: F401  (registers the verb until the CLI package imports it)
    from engramlab.models import load_model

    common = ["dkn", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit", "2",
              "--known-rank", "100000", "--steps", "2", "--threshold", "0.5", "--max-candidates", "6"]
    out = tmp_path / "run"
    res = CliRunner().invoke(app, common + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "dkn.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if not r["skipped"]]
    assert summary["n_facts"] == len(records) == 2 and summary["n_evaluated"] == len(evaluated) >= 1
    assert summary["mean_candidates"] == pytest.approx(np.mean([len(r["candidates"]) for r in evaluated]))
    for m in ("persistence", "pairs", "hierarchical", "dbscan", "kmeans"):
        entries = [r["methods"][m] for r in evaluated]
        found = [e for e in entries if e["dkn"] is not None]
        assert summary[f"{m}.dkn_found_rate"] == pytest.approx(len(found) / len(entries))
        assert summary[f"{m}.dkn_found_rate_exhaustive"] + summary[f"{m}.dkn_found_rate_sampled"] == \
            pytest.approx(summary[f"{m}.dkn_found_rate"])
        assert summary[f"{m}.mean_all_clusters_drop"] == pytest.approx(np.mean([e["all_drop"] for e in entries]))
    assert summary["dkn_found_rate"] == summary["persistence.dkn_found_rate"]

    # The recorded numbers against a plain computation on the same model.
    lm = load_model(str(tiny_hf_dir))
    for r in evaluated:
        scores = [c[2] for c in r["candidates"]]
        assert 2 <= len(scores) <= 6 and scores == sorted(scores, reverse=True) and min(scores) > 0.5 * scores[0]
        target = lm.tokenizer.convert_tokens_to_ids(r["target_tokens"])
        assert r["base_prob"] == pytest.approx(target_probability(lm, r["prompt"], target), rel=1e-4)
        entry = r["methods"]["persistence"]
        every = [tuple(n) for c in entry["clusters"] for n in c]
        p_all = target_probability(lm, r["prompt"], target, edits=NeuronScale(every, 0.0, "prompt_end"))
        assert entry["all_drop"] == pytest.approx((r["base_prob"] - p_all) / r["base_prob"], rel=1e-3, abs=1e-6)

    # The published NTC with rms-scaled edges: same edges, only clusters of > 1 neuron, rms recorded.
    ref = tmp_path / "ref"
    res = CliRunner().invoke(app, common + ["--methods", "persistence", "--clustering", "reference", "--outliers",
                                            "drop", "--norm-scale", "rms", "--out", str(ref)])
    assert res.exit_code == 0, res.output
    again = [json.loads(line) for line in (ref / "dkn.jsonl").read_text().splitlines()]
    assert [r.get("n_edges") for r in again] == [r.get("n_edges") for r in records]
    for r in again:
        if not r["skipped"]:
            assert all(len(c) > 1 for c in r["methods"]["persistence"]["clusters"])
            assert len(r["reader_rms"]) == lm.adapter.n_layers and min(r["reader_rms"]) > 0
    config = json.loads((ref / "config.json").read_text())["config"]  # the shared layout (was dkn_config.json)
    assert config["cluster"]["clustering"] == "reference" and config["norm_scale"] == "rms"

    for flag, value in (("--method", "nope"), ("--clustering", "paper"), ("--norm-scale", "layer")):
        bad = CliRunner().invoke(app, ["dkn", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                       flag, value, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and "error:" in bad.output and flag in bad.output, (flag, bad.output)
