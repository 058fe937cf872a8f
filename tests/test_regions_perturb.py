"""Perturbation context managers restore weights bit-identically; perplexity matches a plain loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from engramlab.errors import EngramError
from engramlab.models.perplexity import perplexity
from engramlab.locate.regions.perturb import (Noise, Op, Scale, as_op, hidden_dimension, noised, perturbed,
                                              scaled, single, zeroed)
from engramlab.models import tiny_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_identical(lm, before):
    now = dict(lm.model.named_parameters())
    assert now.keys() == before.keys()
    changed = [n for n, t in before.items() if not torch.equal(now[n].detach(), t)]
    assert not changed, f"not restored: {changed}"


def region(lm, frac=0.1, seed=1):
    """Random bool masks over the block matrices (2-D parameters inside the layers)."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in lm.model.named_parameters()
              if p.dim() == 2 and any(s in n for s in (".h.", ".layers."))}
    masks = {n: torch.rand(p.shape, generator=g) < frac for n, p in params.items()}
    return params, masks


def test_zeroed_sets_exactly_the_masked_entries_and_restores(tiny_lm):
    before = snapshot(tiny_lm)
    params, masks = region(tiny_lm)
    with zeroed(params, masks) as n:
        assert n == sum(int(m.sum()) for m in masks.values()) > 0
        for name, m in masks.items():
            now = params[name].detach()
            assert (before[name][m] != 0).all() and (now[m] == 0).all()
            assert torch.equal(now[~m], before[name][~m])
    assert_identical(tiny_lm, before)


def test_scaled_multiplies_the_masked_entries_and_restores(tiny_lm):
    before = snapshot(tiny_lm)
    params, masks = region(tiny_lm)
    with scaled(params, masks, 3.0):
        for name, m in masks.items():
            now = params[name].detach()
            assert torch.equal(now[m], before[name][m] * 3.0)
            assert torch.equal(now[~m], before[name][~m])
    assert_identical(tiny_lm, before)


def test_noised_is_seeded_local_and_relative_to_the_tensor_std(tiny_lm):
    before = snapshot(tiny_lm)
    params, masks = region(tiny_lm)
    name = next(iter(masks))
    m, w = masks[name], before[name]

    def delta(**kw):
        with noised(params, masks, **kw):
            d = params[name].detach() - w
        return d

    d1, d1_again, d2 = delta(std=0.5, seed=3), delta(std=0.5, seed=3), delta(std=0.5, seed=4)
    assert torch.equal(d1, d1_again) and not torch.equal(d1, d2)
    assert (d1[m] != 0).all() and (d1[~m] == 0).all()
    rel = delta(std=0.5, seed=3, relative=True)
    assert torch.allclose(rel[m], d1[m] * float(w.std()), rtol=1e-4, atol=1e-6)
    assert_identical(tiny_lm, before)


@pytest.mark.parametrize("make", [lambda p, m: zeroed(p, m), lambda p, m: scaled(p, m, -2.0),
                                  lambda p, m: noised(p, m, 1.0, seed=0)])
def test_an_exception_inside_still_restores(tiny_lm, make):
    before = snapshot(tiny_lm)
    params, masks = region(tiny_lm)
    with pytest.raises(KeyboardInterrupt):
        with make(params, masks):
            assert not torch.equal(next(iter(params.values())).detach(), before[next(iter(params))])
            raise KeyboardInterrupt
    assert_identical(tiny_lm, before)


def test_a_failure_while_applying_restores_what_was_written(tiny_lm):
    class FailsOnSecond(Op):
        calls = 0

        def __call__(self, values, tensor, name):
            FailsOnSecond.calls += 1
            if FailsOnSecond.calls == 2:
                raise RuntimeError("boom")
            return values * 0

    before = snapshot(tiny_lm)
    params, masks = region(tiny_lm)
    entries = {n: (params[n], masks[n]) for n in masks}
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(entries, FailsOnSecond()):
            pass
    assert FailsOnSecond.calls == 2
    assert_identical(tiny_lm, before)


def test_single_touches_one_entry(tiny_lm):
    before = snapshot(tiny_lm)
    params, _ = region(tiny_lm)
    name = sorted(params)[0]
    rows, cols = params[name].shape
    for index in [(1, 2), 1 * cols + 2]:
        with single(params, name, index, "scale:5"):
            diff = params[name].detach() != before[name]
            assert diff.sum() == 1 and diff[1, 2]
            assert params[name].detach()[1, 2] == before[name][1, 2] * 5
            assert all(torch.equal(p.detach(), before[n]) for n, p in params.items() if n != name)
    assert_identical(tiny_lm, before)


# Which entries of which block matrices carry hidden dimension d, written out per family by hand:
# (name suffix, axis of the stored weight that indexes d_model).
EXPECTED_AXES = {
    "llama": {"q_proj.weight": 1, "k_proj.weight": 1, "v_proj.weight": 1, "gate_proj.weight": 1,
              "up_proj.weight": 1, "o_proj.weight": 0, "down_proj.weight": 0},
    "gpt2": {"attn.c_attn.weight": 0, "mlp.c_fc.weight": 0, "attn.c_proj.weight": 1, "mlp.c_proj.weight": 1},
    "gpt_neox": {"query_key_value.weight": 1, "dense_h_to_4h.weight": 1, "attention.dense.weight": 0,
                 "dense_4h_to_h.weight": 0},
}


def _expected(lm, family, d, layers):
    out = {}
    for name, p in lm.model.named_parameters():
        axis = next((a for suffix, a in EXPECTED_AXES[family].items() if name.endswith(suffix)), None)
        layer = next((int(x) for x in name.split(".") if x.isdigit()), None)
        mask = torch.zeros(p.shape, dtype=torch.bool)
        if axis is not None and layer in layers:
            mask.select(axis, d).fill_(True)
        out[name] = mask
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("layers", [None, [1]])
def test_hidden_dimension_touches_exactly_the_readers_columns_and_writers_rows(family, layers):
    lm = wrap_model(tiny_model(family, seed=0))
    before, d = snapshot(lm), 5
    expected = _expected(lm, family, d, layers or range(lm.adapter.n_layers))
    assert sum(int(m.sum()) for m in expected.values()) > 0
    with hidden_dimension(lm, d, Scale(2.0), layers=layers) as n:
        for name, p in lm.model.named_parameters():
            changed = p.detach() != before[name]
            assert torch.equal(changed, expected[name]), name
        assert n == sum(int(m.sum()) for m in expected.values())
    assert_identical(lm, before)


def test_hidden_dimension_with_tied_embeddings_scales_the_shared_column_once():
    lm = wrap_model(tiny_model("gpt2", seed=0))  # GPT-2 ties wte and lm_head
    assert lm.adapter.embed.weight is lm.adapter.unembed.weight
    before = snapshot(lm)
    with hidden_dimension(lm, 3, Scale(2.0), include_embeddings=True):
        w = lm.adapter.embed.weight.detach()
        assert torch.equal(w[:, 3], before["transformer.wte.weight"][:, 3] * 2)
        assert torch.equal(w[:, 4], before["transformer.wte.weight"][:, 4])
    assert_identical(lm, before)


def test_bad_inputs_raise_one_line_errors(tiny_lm):
    params, masks = region(tiny_lm)
    name = next(iter(masks))
    with pytest.raises(EngramError, match="shape"):
        zeroed(params, {name: masks[name].T.contiguous()[:1]}).__enter__()
    with pytest.raises(EngramError, match="names no parameter"):
        zeroed(params, {"nope": masks[name]}).__enter__()
    with pytest.raises(EngramError, match="out of range"):
        hidden_dimension(tiny_lm, tiny_lm.adapter.d_model, "zero").__enter__()
    with pytest.raises(EngramError, match="scale:C"):
        as_op("scale:x")
    tied = {"a": params[name], "b": params[name]}
    with pytest.raises(EngramError, match="same tensor"):
        zeroed(tied, {"a": masks[name], "b": masks[name]}).__enter__()
    assert isinstance(as_op("relnoise:0.1"), Noise) and as_op("relnoise:0.1").relative


# -- perplexity -----------------------------------------------------------------------------------
def _plain_losses(lm, chunks):
    """Per chunk, one at a time, without padding: (sum of next-token CE, number of targets)."""
    out = []
    with torch.no_grad():
        for c in chunks:
            ids = torch.tensor([c])
            logits = lm.model(input_ids=ids).logits[0, :-1].double()
            out.append((float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")), len(c) - 1))
    return out


def test_perplexity_matches_a_plain_loop_in_both_modes(tiny_lm):
    g = torch.Generator().manual_seed(0)
    lengths = [9, 12, 5, 12, 7, 10, 3]  # 7 chunks in batches of 3: the last batch holds one short chunk
    chunks = [torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]
    plain = _plain_losses(tiny_lm, chunks)
    token = math.exp(sum(s for s, _ in plain) / sum(n for _, n in plain))
    batches = [plain[i: i + 3] for i in range(0, len(plain), 3)]
    batch_mean = math.exp(sum(sum(s for s, _ in b) / sum(n for _, n in b) for b in batches) / len(batches))
    assert abs(token - batch_mean) / token > 1e-3  # the example tells the two modes apart
    assert perplexity(tiny_lm, chunks, batch_size=3) == pytest.approx(token, rel=1e-5)
    assert perplexity(tiny_lm, chunks, batch_size=3, mode="batch_mean") == pytest.approx(batch_mean, rel=1e-5)
    # a (n, seq_len) tensor of equal-length chunks: the same as the lists
    t = torch.tensor([c[:5] for c in chunks[:6]])
    assert perplexity(tiny_lm, t, batch_size=4) == pytest.approx(perplexity(tiny_lm, t.tolist(), batch_size=2),
                                                                 rel=1e-5)


def test_perplexity_sees_a_perturbation_inside_the_block_only(tiny_lm):
    chunks = torch.randint(2, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    base = perplexity(tiny_lm, chunks, batch_size=2)
    with hidden_dimension(tiny_lm, 0, Scale(50.0)):
        assert perplexity(tiny_lm, chunks, batch_size=2) != pytest.approx(base, rel=1e-3)
    assert perplexity(tiny_lm, chunks, batch_size=2) == base


def test_perplexity_rejects_bad_input(tiny_lm):
    for chunks, kw, match in [([], {}, "at least one chunk"), ([[3]], {}, "2 tokens"),
                              ([[3, 4]], {"mode": "mean"}, "batch_mean"), ([[3, 4]], {"batch_size": 0}, "batch size")]:
        with pytest.raises(EngramError, match=match):
            perplexity(tiny_lm, chunks, **kw)
