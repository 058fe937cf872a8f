"""Region masks: exact sizes, deterministic ties, the core score, set difference, specificity,
Jaccard and mask files, on hand-made examples."""

import pytest
import torch

from engramlab.errors import EngramError
from engramlab.locate.regions import (bottom_mask, bottom_masks, core_scores, jaccard, load_masks, overlap_matrix,
                                      random_mask, random_masks, region_size, save_masks, specific_region,
                                      specificity, top_mask, top_masks)


def flat_true(mask):
    return mask.flatten().nonzero().flatten().tolist()


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 6, 5), (96, 32)])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.33, 0.5, 0.99])
def test_masks_have_exactly_the_requested_size(shape, ratio):
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, shape, generator=g).float()  # many ties
    n = int(ratio * torch.Size(shape).numel())
    top, bottom = top_mask(score, ratio), bottom_mask(score, ratio)
    rand = random_mask(shape, ratio, torch.Generator().manual_seed(1))
    for m in (top, bottom, rand):
        assert m.dtype == torch.bool and m.shape == torch.Size(shape) and int(m.sum()) == n
    if 0 < n < score.numel():
        assert score[top].min() >= score[~top].max()
        assert score[bottom].max() <= score[~bottom].min()


def test_ties_go_to_the_first_entries():
    score = torch.tensor([[1.0, 2.0, 2.0, 0.0], [2.0, 2.0, 0.0, 1.0]])
    assert flat_true(top_mask(score, 0.5)) == [1, 2, 4, 5]
    assert flat_true(top_mask(score, 0.3)) == [1, 2]  # int(0.3 * 8) = 2 of the four 2.0s: the first two
    assert flat_true(bottom_mask(score, 0.3)) == [3, 6]
    assert flat_true(bottom_mask(score, 0.4)) == [0, 3, 6]  # 3 entries: both zeros, then the first 1.0


def test_global_scope_selects_across_tensors():
    scores = {"a": torch.tensor([5.0, 1.0, 1.0]), "b": torch.tensor([[4.0, 1.0], [0.0, 6.0]])}
    top = top_masks(scores, 0.45, scope="global")  # int(0.45 * 7) = 3: 6, 5, 4
    assert flat_true(top["a"]) == [0] and flat_true(top["b"]) == [0, 3]
    ties = top_masks(scores, 0.6, scope="global")  # 4 entries: 6, 5, 4 and the first 1.0 (in "a")
    assert flat_true(ties["a"]) == [0, 1] and flat_true(ties["b"]) == [0, 3]
    bottom = bottom_masks(scores, 0.3, scope="global")  # 2: the 0.0, then the first 1.0
    assert flat_true(bottom["a"]) == [1] and flat_true(bottom["b"]) == [2]
    per_tensor = top_masks(scores, 0.5)
    assert flat_true(per_tensor["a"]) == [0] and flat_true(per_tensor["b"]) == [0, 3]


def test_random_masks_are_seeded_and_exact():
    shapes = {"a": (10, 10), "b": torch.zeros(37)}
    one, again, other = random_masks(shapes, 0.2, seed=3), random_masks(shapes, 0.2, seed=3), random_masks(shapes, 0.2, seed=4)
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)
    assert [int(m.sum()) for m in one.values()] == [20, 7]
    glob = random_masks(shapes, 0.2, seed=3, scope="global")
    assert region_size(glob) == int(0.2 * 137)


def test_core_scores_normalise_each_corpus_by_its_total():
    per_corpus = {"big": {"w": torch.tensor([30.0, 10.0, 0.0, 60.0])}, "small": {"w": torch.tensor([0.0, 3.0, 1.0, 0.0])}}
    torch.testing.assert_close(core_scores(per_corpus)["w"], torch.tensor([0.3, 0.85, 0.25, 0.6]))
    torch.testing.assert_close(core_scores(per_corpus, normalize="none")["w"], torch.tensor([30.0, 13.0, 1.0, 60.0]))
    # with the raw sum the big corpus decides the top entry alone; normalised, both corpora count
    assert flat_true(top_mask(core_scores(per_corpus)["w"], 0.25)) == [1]
    assert flat_true(top_mask(core_scores(per_corpus, "none")["w"], 0.25)) == [3]


def test_specific_region_is_the_set_difference():
    per_corpus = {
        "ar": {"w": torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0])},
        "es": {"w": torch.tensor([9.0, 0, 0, 0, 0, 0, 0, 0, 0, 8])},
        "ru": {"w": torch.tensor([0.0, 0, 9, 0, 0, 0, 0, 0, 8, 0])},
    }
    # top 40% of ar = {0, 1, 2, 3}; top 20% of es = {0, 9}, of ru = {2, 8}: {0,1,2,3} - {0,9} - {2,8} = {1, 3}
    assert flat_true(specific_region(per_corpus, "ar", q=0.4, p=0.2)["w"]) == [1, 3]
    # es: top 30% {0, 9, 1 (first 0)} minus ar's top 20% {0, 1} minus ru's {2, 8} = {9}
    assert flat_true(specific_region(per_corpus, "es", q=0.3, p=0.2)["w"]) == [9]
    with pytest.raises(EngramError, match="fr"):
        specific_region(per_corpus, "fr", 0.1, 0.1)
    with pytest.raises(EngramError, match="--q"):
        specific_region(per_corpus, "ar", 1.5, 0.1)


def test_specificity_is_target_rank_minus_best_other_rank():
    per_corpus = {"x": {"w": torch.tensor([3.0, 2.0, 1.0, 0.0])}, "y": {"w": torch.tensor([0.0, 1.0, 2.0, 2.0])},
                  "z": {"w": torch.tensor([0.0, 0.0, 0.0, 3.0])}}
    # ranks (fraction strictly below): x [.75 .5 .25 0]; y [0 .25 .5 .5]; z [0 0 0 .75]
    torch.testing.assert_close(specificity(per_corpus, "x")["w"], torch.tensor([0.75, 0.25, -0.25, -0.75]))
    torch.testing.assert_close(specificity(per_corpus, "z")["w"], torch.tensor([-0.75, -0.5, -0.5, 0.25]))


def test_jaccard_and_overlap_matrix():
    a = {"p": torch.tensor([True, True, False]), "q": torch.tensor([[True, False], [False, False]])}
    b = {"p": torch.tensor([False, True, False]), "q": torch.tensor([[True, True], [False, True]])}
    c = {"p": torch.zeros(3, dtype=torch.bool), "q": torch.zeros(2, 2, dtype=torch.bool)}
    # A = {p0, p1, q0}, B = {p1, q0, q1, q3}: 2 shared of 5
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, c) == 0.0 and jaccard(c, c) == 1.0
    labels, m = overlap_matrix({"a": a, "b": b, "c": c})
    assert labels == ["a", "b", "c"]
    assert m == [[1.0, pytest.approx(0.4), 0.0], [pytest.approx(0.4), 1.0, 0.0], [0.0, 0.0, 1.0]]
    with pytest.raises(EngramError, match="different tensors"):
        jaccard(a, {"p": a["p"]})


def test_save_load_round_trip_is_bit_packed(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {"model.layers.0.mlp.up_proj.weight": torch.rand(13, 7, generator=g) > 0.5,
             "b": torch.rand(5, generator=g) > 0.5, "c": torch.rand(2, 3, 4, generator=g) > 0.9}
    path = tmp_path / "core.safetensors"
    save_masks(path, masks)
    back = load_masks(path)
    assert list(back) == list(masks)
    for n in masks:
        assert back[n].dtype == torch.bool and torch.equal(back[n], masks[n])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # packed: one bit per entry
        assert {n: f.get_tensor(n).numel() for n in f.keys()} == {n: -(-m.numel() // 8) for n, m in masks.items()}
    assert not [p for p in tmp_path.iterdir() if p.name != "core.safetensors"]  # no temp file left


def test_bad_mask_files_and_ratios(tmp_path):
    with pytest.raises(EngramError, match="no such mask file"):
        load_masks(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(EngramError, match="junk.safetensors"):
        load_masks(junk)
    for ratio in (0, 1, -0.1, 1.5, True):
        with pytest.raises(EngramError, match="--ratio"):
            top_mask(torch.ones(4), ratio)
    with pytest.raises(EngramError, match="NaN"):
        top_masks({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(EngramError, match="--normalize"):
        core_scores({"a": {"w": torch.ones(2)}}, normalize="max")
