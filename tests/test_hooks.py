"""Hook sites and adapters, checked against plain recomputation on tiny random models."""

import pytest
import torch

from engramlab import EngramError
from engramlab.models import get_adapter, tiny_model, wrap_model

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 2], [7, 7, 1, 30, 12, 60, 4, 11]])


def logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids).logits


def test_capture_and_write_back_is_bit_identical(tiny_lm):
    ref = logits(tiny_lm)
    for name in tiny_lm.hooks.names():
        site = tiny_lm.hooks.site(name)
        if not site.editable:
            continue
        with tiny_lm.hooks.capture(name) as cache:
            base = logits(tiny_lm)  # pattern capture runs the eager path: compare like with like
        with tiny_lm.hooks.replace(name, cache[name]):
            again = logits(tiny_lm)
        assert torch.equal(again, base), name
        if site.kind != "pattern":
            assert torch.equal(base, ref), name


def test_editing_changes_logits(tiny_lm):
    ref = logits(tiny_lm)
    for name in ["blocks.0.attn.heads", "blocks.1.mlp.neurons", "blocks.0.mlp.pre", "blocks.0.attn.pattern",
                 "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.resid_pre", "ln_final.out"]:
        with tiny_lm.hooks.scale(name, 0.5):
            assert not torch.allclose(logits(tiny_lm), ref, atol=1e-6), name


def test_heads_through_output_projection_sum_to_attention_output(tiny_lm):
    a = tiny_lm.adapter
    for layer in range(a.n_layers):
        heads, out = f"blocks.{layer}.attn.heads", f"blocks.{layer}.attn.out"
        with tiny_lm.hooks.capture([heads, out]) as c:
            logits(tiny_lm)
        per_head = torch.einsum("bphd,hdm->bphm", c[heads], a.W_O(layer))  # (batch, pos, heads, d_model)
        total = per_head.sum(2) + (a.b_O(layer) if a.b_O(layer) is not None else 0)
        assert torch.allclose(total, c[out], atol=1e-5)


def test_q_k_v_sites_match_weight_views(tiny_lm):
    a = tiny_lm.adapter
    for layer in range(a.n_layers):
        sites = [f"blocks.{layer}.resid_pre"] + [f"blocks.{layer}.attn.{x}" for x in "qkv"]
        with tiny_lm.hooks.capture(sites) as c:
            logits(tiny_lm)
        x = a.attn_norm(layer)(c[sites[0]])
        for site, w in zip(sites[1:], (a.W_Q(layer), a.W_K(layer), a.W_V(layer))):
            got = torch.einsum("bpm,hmd->bphd", x, w)
            bias = c[site] - got
            # Any remaining difference must be a per-(head, dim) constant: the projection bias.
            assert torch.allclose(bias, bias[:1, :1].expand_as(bias), atol=1e-5), site


def test_mlp_and_unembed_weights(tiny_lm):
    a = tiny_lm.adapter
    with tiny_lm.hooks.capture(["blocks.1.mlp.neurons", "blocks.1.mlp.out", "ln_final.out"]) as c:
        out = logits(tiny_lm)
    b = a.b_out(1) if a.b_out(1) is not None else 0
    assert torch.allclose(c["blocks.1.mlp.neurons"] @ a.W_out(1) + b, c["blocks.1.mlp.out"], atol=1e-5)
    assert torch.allclose(c["ln_final.out"] @ a.W_U, out, atol=1e-5)


def test_zeroing_neurons_at_one_position_only_changes_later_logits(tiny_lm):
    ref = logits(tiny_lm)
    p = 3
    with tiny_lm.hooks.scale("blocks.0.mlp.neurons", 0.0, positions=p):
        out = logits(tiny_lm)
    assert torch.equal(out[:, :p], ref[:, :p])
    changed = (out - ref).abs().amax(-1)  # (batch, pos)
    assert (changed[:, p:] > 0).all()


def test_index_and_per_row_positions(tiny_lm):
    name = "blocks.0.attn.heads"
    with tiny_lm.hooks.capture(name) as c:
        logits(tiny_lm)
    with tiny_lm.hooks.scale(name, 0.0, positions=torch.tensor([2, 5]), index=[1]):
        with tiny_lm.hooks.capture(name) as edited:
            logits(tiny_lm)
    diff = (edited[name] != c[name]).any(-1)  # (batch, pos, heads)
    expected = torch.zeros_like(diff)
    expected[0, 2, 1] = expected[1, 5, 1] = True
    expected &= c[name].abs().amax(-1) > 0
    assert torch.equal(diff, expected)


def test_gqa_heads_read_their_kv_head():
    lm = wrap_model(tiny_model("llama", seed=1, n_heads=4, n_kv_heads=2))
    a = lm.adapter
    assert [a.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    site = "blocks.0.attn.heads"
    with lm.hooks.capture(site) as before:
        logits(lm)
    with torch.no_grad():
        a.W_V(0)[1] += 0.5  # perturb kv head 1 through the adapter's view of the live weight
    with lm.hooks.capture(site) as after:
        logits(lm)
    moved = (after[site] - before[site]).abs().amax(dim=(0, 1, 3))  # per query head
    assert moved[0] == 0 and moved[1] == 0
    assert moved[2] > 0 and moved[3] > 0


def test_pattern_site_is_a_distribution_and_can_be_patched(tiny_lm):
    site = "blocks.1.attn.pattern"
    with tiny_lm.hooks.capture(site) as c:
        logits(tiny_lm)
    pat = c[site]
    assert torch.allclose(pat.sum(-1), torch.ones_like(pat.sum(-1)), atol=1e-6)
    assert torch.all(pat.triu(1) == 0)  # causal
    uniform = torch.tril(torch.ones_like(pat))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    ref = logits(tiny_lm)
    with tiny_lm.hooks.replace(site, uniform):
        patched = logits(tiny_lm)
    assert not torch.allclose(patched, ref, atol=1e-5)
    # The attention implementation is restored after the block.
    assert tiny_lm.model.config._attn_implementation != "engram_eager"


def test_gradients_flow_through_edits(tiny_lm):
    site = "blocks.0.mlp.neurons"
    with tiny_lm.hooks.capture(site) as c:
        logits(tiny_lm)
    x = c[site].clone().requires_grad_(True)
    with tiny_lm.hooks.replace(site, x):
        out = tiny_lm.model(IDS).logits
    out[:, -1, 0].sum().backward()
    assert x.grad is not None and x.grad[:, -1].abs().sum() > 0


def test_bad_site_names():
    lm = wrap_model(tiny_model("gpt_neox"))
    with pytest.raises(EngramError, match="unknown hook site"):
        lm.hooks.site("blocks.0.mlp.hook_post")
    with pytest.raises(EngramError, match="out of range"):
        lm.hooks.site("blocks.9.mlp.out")
    with pytest.raises(EngramError, match="parallel residual"):
        lm.hooks.site("blocks.0.resid_mid")
    with pytest.raises(EngramError, match="no head/neuron axis"):
        with lm.hooks.scale("blocks.0.mlp.out", 0.0, index=[1]):
            pass


def test_unsupported_architecture_lists_supported_ones():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=8))
    with pytest.raises(EngramError, match="unsupported architecture 'bert'.*gpt2.*llama"):
        get_adapter(model)
