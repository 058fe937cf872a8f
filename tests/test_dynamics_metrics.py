"""Change points and comparisons over checkpoints, on hand-made series, circuits and neuron sets."""

import math
from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engramlab.dynamics.changepoints import deep_to_shallow, half_step, knee_fit, settle_step, trend_test
from engramlab.dynamics.circuit_metrics import (circuit_series, edge_jaccard, lens_first_top1_layer, layer_shares,
                                                node_jaccard, role_fractions, role_stability)
from engramlab.dynamics.neuron_metrics import (dkn_neuron_set, dkn_series, neuron_jaccard, neuron_layer_shares,
                                               neuron_series, neuron_set)
from engramlab.locate.circuits.graph import CircuitGraph

# -- knee -----------------------------------------------------------------------------------------------

STEPS = [2 ** i - 1 for i in range(10)]  # log(step + 1) = i log 2: evenly spaced in log-step


def _formation(noise=0.0, seed=0):
    """Rises 2 per unit of log(step + 1) up to step 31 (i = 5), flat after."""
    x = np.log1p(np.asarray(STEPS, dtype=float))
    y = 1.0 + 2.0 * np.minimum(x, x[5])
    return list(y + np.random.default_rng(seed).normal(0, noise, len(y)))


def _reference_knee(x, y):
    """Brute force over the interior observed x's: normal equations of the basis 1, x, relu(x - k)
    (slope before b, after b + c)."""
    best = None
    for k in x[1:-1]:
        a = np.column_stack([np.ones_like(x), x, np.maximum(x - k, 0)])
        coef = np.linalg.solve(a.T @ a, a.T @ y)
        sse = float(((y - a @ coef) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, k, coef[1], coef[1] + coef[2])
    return best


def test_knee_recovered_exactly_without_noise():
    fit = knee_fit(STEPS, _formation())
    assert fit["knee_step"] == 31 and fit["n_points"] == 10
    assert fit["knee_x"] == pytest.approx(math.log(32))
    assert fit["slope_before"] == pytest.approx(2.0, abs=1e-9) and fit["slope_after"] == pytest.approx(0.0, abs=1e-9)
    assert fit["sse"] == pytest.approx(0.0, abs=1e-12) and fit["improvement"] == pytest.approx(1.0)
    # Two separate polyfit lines per split, independently: the exact split is the only perfect one.
    x, y = np.log1p(np.asarray(STEPS, float)), np.asarray(_formation())
    sse = []
    for j in range(1, len(x) - 1):
        total = 0.0
        for xs, ys in ((x[: j + 1], y[: j + 1]), (x[j:], y[j:])):
            total += float(((np.polyval(np.polyfit(xs, ys, 1), xs) - ys) ** 2).sum())
        sse.append(total)
    assert STEPS[1 + int(np.argmin(sse))] == fit["knee_step"]
    line = np.polyfit(x, y, 1)
    assert fit["sse_one_line"] == pytest.approx(float(((np.polyval(line, x) - y) ** 2).sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knee_with_noise_matches_brute_force(seed):
    y = _formation(noise=0.05, seed=seed)
    fit = knee_fit(STEPS, y)
    sse, k, before, after = _reference_knee(np.log1p(np.asarray(STEPS, float)), np.asarray(y))
    assert fit["knee_x"] == pytest.approx(k) and fit["sse"] == pytest.approx(sse)
    assert fit["slope_before"] == pytest.approx(before) and fit["slope_after"] == pytest.approx(after, abs=1e-9)
    assert abs(STEPS.index(fit["knee_step"]) - 5) <= 1
    assert 1.6 < fit["slope_before"] < 2.4 and abs(fit["slope_after"]) < 0.3
    assert fit["improvement"] > 0.9


def test_knee_drops_missing_values_and_needs_four_points():
    y = _formation()
    holes = list(y)
    holes[2], holes[7] = None, float("nan")
    kept = [i for i in range(10) if i not in (2, 7)]
    a, b = knee_fit(STEPS, holes), knee_fit([STEPS[i] for i in kept], [y[i] for i in kept])
    assert a == b and a["n_points"] == 8 and a["knee_step"] == 31
    # Order of the pairs does not matter.
    assert knee_fit(STEPS[::-1], y[::-1]) == knee_fit(STEPS, y)
    assert knee_fit([1, 2, 3], [1, 2, 3]) is None
    assert knee_fit([1, 2, 3, 4], [1, None, 3, 4]) is None


def test_knee_on_a_linear_axis_and_refined_between_points():
    steps = list(range(11))
    fit = knee_fit(steps, [3 * min(s, 6) for s in steps], log_x=False)
    assert fit["knee_step"] == 6 and fit["slope_before"] == pytest.approx(3) and fit["slope_after"] == pytest.approx(0)
    # True knee at 4.3, between observed steps: the grid cannot fit exactly, the refinement can.
    y = [2 * min(s, 4.3) for s in steps]
    grid, fine = knee_fit(steps, y, log_x=False), knee_fit(steps, y, log_x=False, refine=True)
    assert grid["sse"] > 1e-3 and fine["sse"] < 1e-8 and fine["sse"] <= grid["sse"]
    assert fine["knee_x"] == pytest.approx(4.3, abs=1e-4) and fine["knee_step"] == 4
    assert fine["slope_before"] == pytest.approx(2, abs=1e-4) and fine["slope_after"] == pytest.approx(0, abs=1e-4)


# -- half and settle steps -------------------------------------------------------------------------------

def test_half_step_on_hand_sequences():
    steps, vals = [0, 10, 20, 30, 40], [0.0, 0.2, 0.6, 0.9, 1.0]
    assert half_step(steps, vals) == 20
    assert half_step(steps, vals, fraction=0.95) == 40
    assert half_step(steps, vals, fraction=0.1) == 10
    assert half_step(steps, vals, final=2.0) == 40       # 0.5 x 2 = 1.0, reached at the end only
    assert half_step(steps, vals, final=10.0) is None    # 5.0 never reached
    assert half_step(steps, [0.0, 0.3, None, 0.0, 0.0]) is None  # final 0
    assert half_step(steps, [0.0, 0.2, 0.5, None, float("nan")]) == 20  # final: the last number, 0.5
    assert half_step([], []) is None


def _settle_reference(steps, vals, tol):
    final = vals[-1]
    return next(s for i, s in enumerate(steps) if all(abs(v - final) <= tol for v in vals[i:]))


def test_settle_step_on_hand_sequences():
    steps, vals = [0, 1, 2, 3, 4, 5], [0.0, 5.0, 1.0, 0.95, 1.05, 1.0]
    assert settle_step(steps, vals, 0.1) == 2
    assert settle_step(steps, vals, 0.01) == 5
    assert settle_step(steps, vals, 10.0) == 0
    assert settle_step(steps[:4], [0.0, 1.0, 0.0, 1.0], 0.5) == 3  # went back out: only the last step
    assert settle_step(steps, [1.0, None, 1.0, 3.0, 1.0, 1.0], 0.1) == 4
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = list(np.round(rng.random(8), 1))
        for tol in (0.05, 0.2, 0.5):
            assert settle_step(list(range(8)), v, tol) == _settle_reference(list(range(8)), v, tol)
    with pytest.raises(ValueError):
        settle_step(steps, vals, -1)


# -- trends ----------------------------------------------------------------------------------------------

def _tau_by_hand(x, y):
    c = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in combinations(range(len(x)), 2))
    return c / math.comb(len(x), 2)


def test_trend_test_monotone_vs_shuffled():
    x = list(range(10))
    down = [100 - 7 * i for i in x]
    t = trend_test(x, down)
    assert t["stat"] == pytest.approx(-1.0) and t["n"] == 10 and t["p"] < 1e-3
    assert trend_test(x, down, alternative="greater")["p"] > 0.99
    shuffled = [5, 2, 8, 0, 9, 3, 6, 1, 7, 4]
    s = trend_test(x, shuffled)
    assert s["stat"] == pytest.approx(_tau_by_hand(x, shuffled)) and s["p"] > 0.2
    with_gaps = trend_test(x + [10, 11], down + [None, float("nan")])
    assert with_gaps["n"] == 10 and with_gaps["stat"] == pytest.approx(-1.0)
    assert trend_test([1], [2]) == {"stat": None, "p": None, "n": 1}
    assert trend_test([1, 2, 3], [4, 4, 4])["stat"] is None  # a constant side: no tau
    with pytest.raises(ValueError):
        trend_test(x, down, alternative="up")


def test_deep_to_shallow_one_sided():
    got = deep_to_shallow({0: 900, 1: 700, 2: 500, "3": 300, 4: None})
    assert got["n"] == 4 and got["stat"] == pytest.approx(-1.0)
    assert got["p"] == pytest.approx(1 / math.factorial(4))  # exact: 1 of the 4! orders is this extreme
    assert got["settle_step.L0"] == 900 and got["settle_step.L3"] == 300 and got["settle_step.L4"] is None
    assert deep_to_shallow({0: 100, 1: 300, 2: 500})["p"] > 0.8  # shallow settles first: the other way


# -- circuits --------------------------------------------------------------------------------------------

G = CircuitGraph(n_layers=2, n_heads=2, n_kv_heads=2)  # 7 writers, 15 readers, node 7 the logits


def _mask(*edges):
    m = torch.zeros(G.n_writers, G.n_readers, dtype=torch.bool)
    for w, r in edges:
        m[w, r] = True
    return m


A = _mask((0, G.q_reader(0, 0)), (G.head_writer(0, 0), G.logits_reader))      # input -> a0.h0 -> logits
B = _mask((0, G.mlp_reader(0)), (G.mlp_writer(0), G.logits_reader), (0, G.logits_reader))  # input -> m0 -> logits
DANGLING = A | _mask((0, G.q_reader(1, 1)))  # a1.h1 is read into but reaches nothing


def _band_by_hand(w):
    return 0 if w == 0 else (w - 1) // (G.n_heads + 1) + 1


def test_node_jaccard_and_layer_shares_on_hand_masks():
    # A's nodes {input, a0.h0, logits}, B's {input, m0, logits}: 2 shared of 4.
    assert node_jaccard(A, B, G) == pytest.approx(2 / 4)
    assert node_jaccard(A, DANGLING, G) == 1.0 and edge_jaccard(A, DANGLING) == pytest.approx(2 / 3)
    empty = torch.zeros_like(A)
    assert node_jaccard(empty, empty, G) == 1.0 and node_jaccard(A, empty, G) == 0.0
    assert layer_shares(A, G) == pytest.approx([0.5, 0.5, 0.0])
    for kept in (B, DANGLING, A | B):
        counts = [0] * (G.n_layers + 1)
        for w, _ in kept.nonzero().tolist():
            counts[_band_by_hand(w)] += 1
        assert layer_shares(kept, G) == pytest.approx([c / sum(counts) for c in counts])
    # Every writer of layer 1 (heads 0, 1 and the MLP) lands in band 2.
    late = _mask(*[(G.head_writer(1, h), G.logits_reader) for h in range(2)], (G.mlp_writer(1), G.logits_reader))
    assert layer_shares(late, G) == [0.0, 0.0, 1.0]
    assert layer_shares(empty, G) == [None, None, None]


def _head(layer, head, role):
    return {"node": f"a{layer}.h{head}", "layer": layer, "head": head, "role": role}


def test_role_fractions_and_stability_on_hand_heads():
    now = [_head(0, 0, "mover"), _head(1, 1, "mover"), _head(1, 0, "relation")]
    ref = [_head(1, 1, "mover"), _head(0, 1, "mixture")]
    f = role_fractions(now)
    assert f == pytest.approx({"mover_fraction": 2 / 3, "relation_fraction": 1 / 3, "mixture_fraction": 0.0})
    assert role_fractions([]) == {"mover_fraction": None, "relation_fraction": None, "mixture_fraction": None}
    s = role_stability(now, ref)
    assert s["role_held.mover"] is True and s["role_held.relation"] is False and s["role_held.mixture"] is False
    assert s["role_head_jaccard.mover"] == pytest.approx(1 / 2)  # {(1,1)} of {(0,0), (1,1)}
    assert s["role_head_jaccard.relation"] == 0.0 and s["role_head_jaccard.mixture"] == 0.0
    none = role_stability([_head(0, 0, "mover")], [_head(0, 0, "mover")])
    assert none["role_head_jaccard.mover"] == 1.0 and none["role_head_jaccard.relation"] is None
    # The same head with another role is a different role holder.
    moved = role_stability([_head(0, 0, "relation")], [_head(0, 0, "mover")])
    assert moved["role_head_jaccard.mover"] == 0.0 and not moved["role_held.mover"]


def test_lens_first_top1_layer():
    lens = [{"layer": 0, "median_rank": 5.0}, {"layer": 1, "median_rank": 1.0}, {"layer": 2, "median_rank": 1.0}]
    assert lens_first_top1_layer(lens) == 1
    assert lens_first_top1_layer(lens[::-1]) == 1
    assert lens_first_top1_layer([{"layer": 0, "median_rank": 2.0}]) is None and lens_first_top1_layer([]) is None


def test_circuit_series_keys_and_values():
    from engramlab.locate.circuits.find import CircuitResult

    scores = torch.arange(G.n_writers * G.n_readers, dtype=torch.float32).view(G.n_writers, G.n_readers)
    lens_late = [{"layer": 0, "median_rank": 3.0}, {"layer": 1, "median_rank": 1.0}]
    lens_early = [{"layer": 0, "median_rank": 1.0}, {"layer": 1, "median_rank": 1.0}]

    def result(kept, heads, lens):
        return CircuitResult(G, scores, kept, {}, {}, heads=heads, lens=lens)

    series = circuit_series([(100, result(B, [], lens_late)),
                             (200, result(A, [_head(0, 0, "relation")], lens_late)),
                             (300, result(DANGLING, [_head(0, 0, "mover")], lens_early))])
    first, mid, last = series[100], series[200], series[300]
    assert first["node_jaccard_prev"] is None and first["edge_jaccard_prev"] is None
    assert first["node_jaccard_final"] == pytest.approx(2 / 4) and mid["node_jaccard_final"] == 1.0
    assert mid["node_jaccard_prev"] == pytest.approx(2 / 4) and mid["edge_jaccard_final"] == pytest.approx(2 / 3)
    assert [first[f"edge_share.L{b}"] for b in range(3)] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert first["mover_fraction"] is None and first["role_held_final.mover"] is False
    assert first["role_head_jaccard_final.mover"] == 0.0 and first["role_head_jaccard_final.relation"] is None
    assert mid["relation_fraction"] == 1.0 and mid["role_head_jaccard_final.mover"] == 0.0
    assert last["mover_fraction"] == 1.0 and last["role_head_jaccard_final.mover"] == 1.0
    assert last["role_held_final.mover"] is True
    assert first["lens_top1_layer"] == 1 and last["lens_top1_layer"] == 0
    assert last["entropy"] is not None
    for row in series.values():  # straight into evolution.jsonl
        assert all(v is None or isinstance(v, (bool, int, float)) for v in row.values())
    # Results without graph / heads / lens still give the edge keys alone.
    bare = circuit_series([(1, SimpleNamespace(kept=A, scores=scores)), (2, SimpleNamespace(kept=B, scores=scores))])
    assert set(bare[1]) == {"edge_jaccard_final", "edge_jaccard_prev", "entropy"}


# -- neurons ---------------------------------------------------------------------------------------------

def _kn_result(*facts, n_layers=3):
    from engramlab.locate.neurons.find import NeuronResult

    rows = [{"relation": "r", "subject": f"s{i}", "object": "o", "neurons": [list(n) for n in neurons],
             "skipped": skipped} for i, (neurons, skipped) in enumerate(facts)]
    return NeuronResult(rows, {}, {}, model={"n_layers": n_layers})


R1 = _kn_result(([(0, 5, 0.9), (2, 1, 0.5)], None), ([(0, 5, 0.3), (1, 7, 0.2)], None),
                ([(1, 1, 0.1)], "not recalled"))
R2 = _kn_result(([(0, 5, 0.8), (1, 7, 0.4)], None), ([(1, 8, 0.2)], None))


def test_neuron_sets_overlap_and_layer_shares():
    assert neuron_set(R1) == {(0, 5), (2, 1), (1, 7)}  # a skipped fact's neurons do not count
    assert neuron_jaccard(neuron_set(R1), neuron_set(R2)) == pytest.approx(2 / 4)
    assert neuron_jaccard(set(), set()) == 1.0 and neuron_jaccard({(0, 1)}, set()) == 0.0
    assert neuron_layer_shares(R1, 3) == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert neuron_layer_shares(R2, 3) == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert neuron_layer_shares(_kn_result(([], None)), 2) == [None, None]
    with pytest.raises(ValueError):
        neuron_layer_shares(R1, 2)  # a neuron in layer 2 of a two-layer model
    series = neuron_series([(10, R1), (20, R2)])  # n_layers from the results' model
    assert series[10]["jaccard_final"] == pytest.approx(0.5) and series[10]["jaccard_prev"] is None
    assert series[20]["jaccard_final"] == 1.0 and series[20]["jaccard_prev"] == pytest.approx(0.5)
    assert series[10]["n_neurons"] == 3 and series[20]["layer_share.L1"] == pytest.approx(2 / 3)
    assert set(series[20]) == {"jaccard_final", "jaccard_prev", "n_neurons", "layer_share.L0", "layer_share.L1",
                               "layer_share.L2"}


def _dkn_entry(dkn_neurons, partial=None, full=None):
    found = bool(dkn_neurons)
    return {"clusters": [[n] for n in dkn_neurons] or [[[0, 0]]], "dkn": list(range(len(dkn_neurons))) if found else None,
            "partial_drop": partial, "full_drop": full, "all_drop": 0.5, "max_single_drop": 0.1,
            "check": "exhaustive", "bounded": False, "dkn_neurons": [list(n) for n in dkn_neurons]}


def _dkn_result(*entries):
    from engramlab.locate.dkn.find import DKNResult

    rows = [{"relation": "r", "subject": f"s{i}", "object": "o", "skipped": None, "candidates": [[0, 0, 1.0]],
             "methods": {"persistence": e}} for i, e in enumerate(entries)]
    rows.append({"relation": "r", "subject": "x", "object": "o", "skipped": "not recalled", "candidates": [],
                 "methods": {}})
    return DKNResult(rows, {"method": "persistence", "methods": ["persistence"]})


def test_dkn_series_from_hand_records():
    early = _dkn_result(_dkn_entry([(0, 1), (1, 2)], 0.02, 0.6), _dkn_entry([]), _dkn_entry([]))
    late = _dkn_result(_dkn_entry([(0, 1), (2, 3)], 0.04, 0.8), _dkn_entry([(1, 2)], 0.0, 0.9), _dkn_entry([]))
    assert dkn_neuron_set(late) == {(0, 1), (2, 3), (1, 2)}
    series = dkn_series([(5, early), (9, late)])
    assert series[5]["found_rate"] == pytest.approx(1 / 3) and series[9]["found_rate"] == pytest.approx(2 / 3)
    assert series[5]["mean_partial_drop"] == pytest.approx(0.02) and series[9]["mean_partial_drop"] == pytest.approx(0.02)
    assert series[9]["mean_full_drop"] == pytest.approx(0.85)
    assert series[5]["dkn_neuron_jaccard_final"] == pytest.approx(2 / 3) and series[5]["dkn_neuron_jaccard_prev"] is None
    assert series[9]["dkn_neuron_jaccard_prev"] == pytest.approx(2 / 3) and series[9]["n_dkn_neurons"] == 3
    assert dkn_series([(1, early)], method="pairs")[1]["found_rate"] is None  # a method that did not run


def test_bool_columns_are_series():
    held = [False, False, True, True, True]
    assert half_step([0, 1, 2, 3, 4], held) == 2 and settle_step([0, 1, 2, 3, 4], held, 0.0) == 2


def test_deep_to_shallow_from_hand_made_logit_lenses():
    """The answer ranks first at the deepest layers first, then at shallower ones: every layer's
    surface step is the first checkpoint from which its median rank stays 1, and the trend is
    deep -> shallow (tau -1, p = 1/4! for four layers)."""
    from engramlab.dynamics.compare import compare_over_time, lens_surface_steps

    # median rank per (step, layer); layer 1 ranks first once at step 10, loses it, then keeps it from 40
    table = {0: [90, 50, 9, 4], 10: [80, 1, 5, 1], 20: [60, 7, 1, 1], 40: [30, 1, 1, 1], 80: [1, 1, 1, 1]}
    results = [(step, SimpleNamespace(lens=[{"layer": l, "median_rank": r} for l, r in enumerate(ranks)]))
               for step, ranks in table.items()]
    want = {}
    for layer in range(4):  # by hand: the first step after which the rank never leaves 1
        flags = [table[s][layer] == 1 for s in table]
        want[layer] = next(s for i, s in enumerate(table) if all(flags[i:]))
    assert lens_surface_steps(results) == want == {0: 80, 1: 40, 2: 20, 3: 10}
    rows = [{"step": s} for s in table]
    summary = compare_over_time(rows, {"circuit": []}, {})
    assert "deep_to_shallow_stat" not in summary  # no circuits, no lens: nothing claimed
    got = deep_to_shallow(lens_surface_steps(results))
    assert got["stat"] == pytest.approx(-1.0) and got["p"] == pytest.approx(1 / 24)
    shallow_last = [(s, SimpleNamespace(lens=[{"layer": 0, "median_rank": 3}, {"layer": 1, "median_rank": 1}]))
                    for s in (0, 5)]
    assert lens_surface_steps(shallow_last) == {0: None, 1: 0}  # never first at layer 0: left out
