"""Samplers over individuals: determinism per (seed, step), distributions, bad specs; corpus frequencies."""

import random

import numpy as np
import pytest

from engramlab.data.frequencies import draw_frequencies, frequency_bucket, frequency_pmf
from engramlab.data.samplers import make_sampler
from engramlab.data.world import build_world
from engramlab.errors import EngramError

SPECS = ["uniform", "powerlaw:alpha=0.7", "celebrities:k=10,w=8", "warmup:size=30,epochs=2",
         "sequential:groups=4,steps=5", "replay:old=50,weight=0.2"]


def _counts(sampler, steps, batch_size=500):
    draws = np.concatenate([sampler.indices(s, batch_size) for s in range(steps)])
    return np.bincount(draws, minlength=sampler.n_indices)


@pytest.mark.parametrize("spec", SPECS)
def test_pure_function_of_seed_and_step(spec):
    a = make_sampler(spec, n_people=200, seed=7)
    b = make_sampler(spec, n_people=200, seed=7)
    late_first = [b.indices(s, 16) for s in (9, 3, 0)]  # call order must not matter
    assert all(np.array_equal(a.indices(s, 16), x) for s, x in zip((9, 3, 0), late_first))
    assert a.indices(3, 16).dtype == np.int64 and a.indices(3, 16).shape == (16,)
    assert not np.array_equal(a.indices(3, 16), a.indices(4, 16))
    assert not np.array_equal(a.indices(3, 16), make_sampler(spec, 200, seed=8).indices(3, 16))
    assert np.isclose(a.probabilities().sum(), 1.0)


def test_powerlaw_follows_rank_to_the_minus_alpha():
    n, alpha = 20, 0.7
    sampler = make_sampler(f"powerlaw:alpha={alpha}", n_people=n, seed=1)
    expected = np.arange(1, n + 1) ** -alpha
    expected /= expected.sum()
    assert np.allclose(sampler.probabilities()[sampler.order], expected)
    assert sorted(sampler.order) == list(range(n))
    counts = _counts(sampler, steps=400)[sampler.order]
    total = counts.sum()
    chi2 = (((counts - total * expected) ** 2) / (total * expected)).sum()
    assert chi2 < 50  # 19 degrees of freedom: p < 1e-4 only if the sampler is wrong


def test_celebrities_are_drawn_w_times_more_often():
    sampler = make_sampler("celebrities:k=5,w=8", n_people=100, seed=2)
    counts = _counts(sampler, steps=400)
    others = np.setdiff1d(np.arange(100), sampler.celebrities)
    ratio = counts[sampler.celebrities].mean() / counts[others].mean()
    assert len(sampler.celebrities) == 5 and abs(ratio - 8) < 0.5


def test_warmup_draws_only_the_subset_in_exact_epochs():
    sampler = make_sampler("warmup:size=50,epochs=2", n_people=500, seed=3)
    assert sampler.warmup_steps(10) == 10
    subset = set(sampler.subset.tolist())
    epoch0 = np.concatenate([sampler.indices(s, 10) for s in range(5)])
    epoch1 = np.concatenate([sampler.indices(s, 10) for s in range(5, 10)])
    assert sorted(epoch0) == sorted(subset) == sorted(epoch1)  # each member once per epoch
    later = np.concatenate([sampler.indices(s, 10) for s in range(10, 60)])
    assert len(set(later.tolist()) - subset) > 100
    # A batch straddling the end of warm-up (sequence 100): positions 96-99 still warm up.
    straddle = sampler.indices(4, 24)[: 100 - 96]
    assert set(straddle.tolist()) <= subset
    p = sampler.probabilities(step=0, batch_size=10)
    assert np.isclose(p[sampler.subset].sum(), 1.0)
    assert np.allclose(sampler.probabilities(), 1 / 500)


def test_sequential_trains_groups_in_turn():
    sampler = make_sampler("sequential:groups=4,steps=10", n_people=100, seed=0)
    for step, group in [(0, 0), (9, 0), (10, 1), (35, 3), (1000, 3)]:
        draws = sampler.indices(step, 64)
        assert draws.min() >= 25 * group and draws.max() < 25 * (group + 1)
    assert np.isclose(sampler.probabilities(step=12)[25:50].sum(), 1.0)


def test_replay_combined_index_space(tmp_path):
    sampler = make_sampler("replay:old=300,weight=0.2", n_people=100, seed=0)
    counts = _counts(sampler, steps=200)
    assert sampler.n_indices == 400 and len(counts) == 400
    assert abs(counts[:300].sum() / counts.sum() - 0.2) < 0.01
    world = build_world("tiny", n_people=120, n_heldout=10)
    world.save(tmp_path / "old")
    from_path = make_sampler(f"replay:old={tmp_path / 'old'},weight=0.5", n_people=80, seed=0)
    assert from_path.n_old == 120 and from_path.n_indices == 200


@pytest.mark.parametrize("spec", ["bogus", "powerlaw", "powerlaw:alpha=x", "powerlaw:alpha",
                                  "celebrities:k=10", "celebrities:k=1000,w=2", "uniform:x=1",
                                  "warmup:size=0,epochs=1", "replay:weight=0.2",
                                  "replay:old=10,weight=2", "replay:old=/no/such,weight=0.1",
                                  "sequential:groups=2"])
def test_bad_specs_quote_the_spec_and_grammar(spec):
    with pytest.raises(EngramError) as err:
        make_sampler(spec, n_people=100, seed=0)
    message = str(err.value)
    assert repr(spec) in message and "\n" not in message
    if "/no/such" not in spec:
        assert "powerlaw:alpha=A" in message


def test_frequency_specs():
    assert frequency_pmf("3") == {3: 1.0}
    assert frequency_pmf("choice:1,3,8") == pytest.approx({1: 1 / 3, 3: 1 / 3, 8: 1 / 3})
    zipf = frequency_pmf("zipf:a=1.5,max=20")
    assert list(zipf) == list(range(1, 21)) and sum(zipf.values()) == pytest.approx(1.0)
    assert zipf[1] / zipf[4] == pytest.approx(8.0)
    draws = draw_frequencies("zipf:a=1.5,max=20", 2000, random.Random(0))
    assert min(draws) >= 1 and max(draws) <= 20 and draws.count(1) > 600
    assert [frequency_bucket(f) for f in (0, 1, 2, 5, 6)] == \
        ["unseen", "low", "medium", "medium", "high"]
    for bad in ["zipf:a=1.5", "choice:", "choice:0,2", "poisson:3", "0"]:
        with pytest.raises(EngramError, match="grammar"):
            frequency_pmf(bad)


def test_samplers_and_world_do_not_import_each_other():
    """samplers sits below world (it reads a world's size from its header); the corpus
    frequencies world draws live in data.frequencies, so neither module imports the other."""
    import ast
    import inspect

    import engramlab.data.frequencies as frequencies
    import engramlab.data.samplers as samplers
    import engramlab.data.world as world

    def imported(module):
        tree = ast.parse(inspect.getsource(module))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "engramlab.data.world" not in imported(samplers) | imported(frequencies)
    assert "engramlab.data.samplers" not in imported(world)
    assert "engramlab.data.frequencies" in imported(world)


def test_a_config_accepts_a_subset_larger_than_ten_and_the_world_bounds_it():
    """The config checks a spec before its world is known: a warm-up subset of 250 people is
    valid there (it used to be checked against 10 people), and refused once the world has fewer."""
    from engramlab.train.config import TrainConfig

    assert TrainConfig(sampler="warmup:size=250,epochs=40").sampler == "warmup:size=250,epochs=40"
    assert TrainConfig(sampler="celebrities:k=64,w=8").sampler == "celebrities:k=64,w=8"
    with pytest.raises(EngramError, match=r"'size'=0 is out of range \(>= 1\)"):
        TrainConfig(sampler="warmup:size=0,epochs=4")
    with pytest.raises(EngramError, match=r"'size'=250 is out of range \(\[1, 100\]\)"):
        make_sampler("warmup:size=250,epochs=4", 100)
