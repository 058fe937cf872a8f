"""Dimension dependency, massive activations and super-weight candidates on tiny models, each
against a plain computation written here: counts by a loop over mask entries, massive dims from
layer outputs gathered by plain forward hooks, super weights from the captured neurons times the
down-projection weight, and one-parameter perplexities on a hand-perturbed deep copy."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from engramlab.errors import EngramError
from engramlab.locate.regions import dimensions as dims_mod
from engramlab.locate.regions.dimensions import (coincide, dimension_counts, dimension_dependency,
                                                 massive_activations, super_weight_candidates)
from engramlab.locate.regions.importance import region_tensors
from engramlab.locate.regions.masks import top_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def chunks(seed, n=3, seq=12, vocab=64):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def random_scores(lm, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in region_tensors(lm).items()}


def d_of(module, entry, reads):
    """The d_model index of a stored-weight entry, written out per layout: nn.Linear is (out, in),
    Conv1D is (in, out); readers take d_model in, writers give it out."""
    r, c = entry
    if isinstance(module, Conv1D):
        return r if reads else c
    return c if reads else r


def matrices(lm):
    """(name, module, reads) for every residual reader and writer."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out = []
    for l in range(lm.adapter.n_layers):
        out += [(names[id(m.weight)], m, True) for m in lm.adapter.residual_readers(l)]
        out += [(names[id(m.weight)], m, False) for m in lm.adapter.residual_writers(l)]
    return out


def snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_identical(lm, before):
    now = dict(lm.model.named_parameters())
    assert [n for n, t in before.items() if not torch.equal(now[n].detach(), t)] == []


def plain_ppl(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


# -- counts ---------------------------------------------------------------------------------------
def test_counts_match_a_plain_loop_over_entries(tiny_lm):
    masks = top_masks(random_scores(tiny_lm), 0.1)
    want = [0] * tiny_lm.adapter.d_model
    for name, module, reads in matrices(tiny_lm):
        for entry in masks[name].nonzero().tolist():
            want[d_of(module, entry, reads)] += 1
    got = dimension_counts(tiny_lm, masks)
    assert got.dtype == torch.long and got.tolist() == want and sum(want) > 0
    per_layer = [dimension_counts(tiny_lm, masks, layers=[l]) for l in range(tiny_lm.adapter.n_layers)]
    assert torch.equal(sum(per_layer), got)


def test_counts_of_a_single_entry_land_on_its_dimension(tiny_lm):
    (name, module, reads), = [m for m in matrices(tiny_lm) if not m[2]][:1]  # the first writer
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in region_tensors(tiny_lm).items()}
    entry = (3, 5) if isinstance(module, Conv1D) else (5, 3)  # d_model index 5 either way
    masks[name][entry] = True
    assert dimension_counts(tiny_lm, masks).nonzero().flatten().tolist() == [5]


def test_counts_refuse_bad_masks(tiny_lm):
    name, p = next(iter(region_tensors(tiny_lm).items()))
    with pytest.raises(EngramError, match="bool tensor of shape"):
        dimension_counts(tiny_lm, {name: torch.zeros(3, 3, dtype=torch.bool)})
    with pytest.raises(EngramError, match="no mask names a matrix"):
        dimension_counts(tiny_lm, {"nope": torch.zeros(3, dtype=torch.bool)})


# -- massive activations --------------------------------------------------------------------------
def layer_outputs(lm, ids):
    """Every decoder layer's output, (n_layers, batch, pos, d_model), by plain forward hooks."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o if torch.is_tensor(o) else o[0]).detach()))
             for layer in lm.adapter.layers]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs)


def test_planted_activation_is_found_where_it_was_planted(tiny_lm):
    ids = chunks(1, n=3)
    ids[1, 4] = 7  # token 7 at chunk 1, position 4 only
    ids[ids == 7] = 8
    ids[1, 4] = 7
    d = 11
    with torch.no_grad():
        tiny_lm.adapter.embed.weight[7, d] = 3000.0
    got = massive_activations(tiny_lm, ids, batch_size=2)
    assert got["dims"] == [d]
    assert (got["chunk"][d], got["position"][d]) == (1, 4)
    # against the layer outputs gathered by hand
    h = layer_outputs(tiny_lm, ids).abs()  # (L, b, pos, d_model)
    per_dim = h.amax(dim=(0, 1, 2))
    median = sorted(per_dim.tolist())[(len(per_dim) - 1) // 2]
    assert got["median"] == pytest.approx(median, rel=1e-6)
    assert got["magnitude"][d] == pytest.approx(float(per_dim[d]), rel=1e-6)
    assert got["layer"][d] == int(h[:, :, :, d].amax(dim=(1, 2)).argmax())
    assert [x for x in range(len(per_dim)) if per_dim[x] > 100 * median] == [d]
    assert got["top"][0] == d and got["max_per_dim"] == pytest.approx(per_dim.tolist(), rel=1e-6)


def test_no_massive_dimension_without_a_plant(tiny_lm):
    ids = chunks(2)
    got = massive_activations(tiny_lm, ids, batch_size=2)
    assert got["dims"] == []
    h = layer_outputs(tiny_lm, ids).abs().amax(dim=(0, 1, 2))
    assert got["top"][0] == int(h.argmax()) and len(got["top"]) == 8
    assert max(got["magnitude"].values()) < 100 * got["median"]


def test_massive_activations_refuse_bad_input(tiny_lm):
    with pytest.raises(EngramError, match="ratio"):
        massive_activations(tiny_lm, chunks(1), ratio=0)
    with pytest.raises(EngramError, match="token ids outside"):
        massive_activations(tiny_lm, chunks(1) + 1000)


# -- super weights --------------------------------------------------------------------------------
def test_super_weight_candidates_match_neurons_times_the_down_weight(tiny_lm):
    ids = chunks(4)
    a = tiny_lm.adapter
    rows = super_weight_candidates(tiny_lm, ids, top=a.n_layers, batch_size=2)
    assert len(rows) == a.n_layers
    with tiny_lm.hooks.capture([f"blocks.{l}.mlp.neurons" for l in range(a.n_layers)]) as cache:
        with torch.no_grad():
            tiny_lm.model(input_ids=ids)
    spikes = []
    for l in range(a.n_layers):
        module = a.mlp_out_proj(l)
        w = module.weight.detach()
        w_in_out = w if isinstance(module, Conv1D) else w.t()  # (d_mlp, d_model)
        x = cache[f"blocks.{l}.mlp.neurons"].flatten(0, 1)
        y = x @ w_in_out + (module.bias.detach() if module.bias is not None else 0)
        j, i = int(x.abs().amax(0).argmax()), int(y.abs().amax(0).argmax())
        spikes.append((float(y.abs().max()), l, j, i, float(w_in_out[j, i])))
    spikes.sort(key=lambda s: -s[0])
    for row, (out_max, l, j, i, value) in zip(rows, spikes):
        assert (row["layer"], row["in_channel"], row["out_channel"]) == (l, j, i)
        assert row["out_max"] == pytest.approx(out_max, rel=1e-5) and row["value"] == value
        stored = dict(tiny_lm.model.named_parameters())[row["param"]]
        assert float(stored.detach()[tuple(row["index"])]) == value


# -- dimension dependency -------------------------------------------------------------------------
def setup(lm, ratio=0.05, planted=5):
    """Random scores, tripled on d_model index ``planted`` of every residual matrix: that dimension
    then holds the most core entries and every matrix's best score, so a control that did not
    avoid the top dimensions would land on it."""
    params = region_tensors(lm)
    score = random_scores(lm)
    for name, module, reads in matrices(lm):
        for x in torch.ones_like(score[name]).nonzero().tolist():
            if d_of(module, x, reads) == planted:
                score[name][tuple(x)] *= 3
    return params, top_masks(score, ratio), score, {"a": chunks(5), "b": chunks(6)}


def test_dependency_perturbs_one_core_parameter_on_the_dimension_and_restores(tiny_lm):
    params, core, score, held_out = setup(tiny_lm)
    before = snapshot(tiny_lm)
    counts = dimension_counts(tiny_lm, core).tolist()
    mods = {name: (module, reads) for name, module, reads in matrices(tiny_lm)}
    for op, factor in (("zero", 0.0), ("scale:100", 100.0)):
        rows = dimension_dependency(tiny_lm, params, core, score, held_out, top=2, op=op, batch_size=2)
        assert_identical(tiny_lm, before)
        top_dims = sorted(range(len(counts)), key=lambda d: (-counts[d], d))[:2]
        assert top_dims[0] == 5
        assert [r["dim"] for r in rows] == top_dims and [r["core_count"] for r in rows] == [counts[d] for d in top_dims]
        base = {c: plain_ppl(tiny_lm.model, x) for c, x in held_out.items()}
        for r in rows:
            module, reads = mods[r["param"]]
            e = tuple(r["index"])
            assert d_of(module, e, reads) == r["dim"] and bool(core[r["param"]][e])
            # the most important core entry on that dimension, over every matrix
            best = max(float(score[n][tuple(x)]) for n, (m, rd) in mods.items()
                       for x in core[n].nonzero().tolist() if d_of(m, x, rd) == r["dim"])
            assert float(score[r["param"]][e]) == best and r["value"] == float(before[r["param"]][e])
            # control: same matrix, off the top dimensions, the best score there
            c = tuple(r["control_index"])
            assert r["control_param"] == r["param"] and d_of(module, c, reads) == r["control_dim"] not in top_dims
            off = [float(score[r["param"]][tuple(x)]) for x in torch.ones_like(core[r["param"]]).nonzero().tolist()
                   if d_of(module, x, reads) not in top_dims]
            assert float(score[r["param"]][c]) == max(off)
            for key, entry in (("ppl", e), ("control_ppl", c)):
                twin = copy.deepcopy(tiny_lm.model)
                with torch.no_grad():
                    w = dict(twin.named_parameters())[r["param"]]
                    w[entry] = w[entry] * factor
                for corpus, x in held_out.items():
                    want = plain_ppl(twin, x)
                    assert r[key][corpus] == pytest.approx(want, rel=1e-5)
                    ratio_key = "ppl_ratio" if key == "ppl" else "control_ppl_ratio"
                    assert r[ratio_key][corpus] == pytest.approx(want / base[corpus], rel=1e-5)
            assert r["ppl"]["a"] != pytest.approx(base["a"], rel=1e-9)  # the perturbation did something


def test_dependency_restores_the_weights_when_perplexity_raises(tiny_lm, monkeypatch):
    params, core, score, held_out = setup(tiny_lm)
    before = snapshot(tiny_lm)
    seen = []

    def boom(lm, *a, **k):
        seen.append([n for n, t in before.items() if not torch.equal(dict(lm.model.named_parameters())[n], t)])
        raise KeyboardInterrupt

    monkeypatch.setattr(dims_mod, "perplexity", boom)
    with pytest.raises(KeyboardInterrupt):
        dimension_dependency(tiny_lm, params, core, score, held_out, top=1, op="scale:-10",
                             base_ppl={"a": 1.0, "b": 1.0})
    assert len(seen) == 1 and len(seen[0]) == 1  # it raised with exactly one parameter perturbed
    assert_identical(tiny_lm, before)


def test_dependency_refuses_bad_input(tiny_lm):
    params, core, score, held_out = setup(tiny_lm)
    with pytest.raises(EngramError, match="top"):
        dimension_dependency(tiny_lm, params, core, score, held_out, top=0)
    with pytest.raises(EngramError, match="bad perturbation"):
        dimension_dependency(tiny_lm, params, core, score, held_out, op="double")
    name = next(iter(score))
    with pytest.raises(EngramError, match="missing from score"):
        dimension_dependency(tiny_lm, params, core, {n: s for n, s in score.items() if n != name}, held_out)
    with pytest.raises(EngramError, match="base_ppl lacks"):
        dimension_dependency(tiny_lm, params, core, score, held_out, base_ppl={"a": 2.0})


def test_coincide():
    assert coincide([3, 7, 9], [7, 9, 12, 1]) == {"both": [7, 9], "only_dependency": [3], "only_massive": [1, 12],
                                                   "jaccard": 2 / 5, "n_dependency": 3, "n_massive": 4}
    assert coincide([], [])["jaccard"] is None and coincide([1], [])["jaccard"] == 0.0
