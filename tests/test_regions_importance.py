"""Importance scores for parameter regions against plain loops written here, on tiny models of
every family; the model is left exactly as it was, also when a pass raises."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from engramlab.errors import EngramError
from engramlab.locate.regions import importance, region_tensors
from engramlab.models import tiny_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")

# What the default region of each family is, spelled out by hand (the code asks the adapter).
EXPECTED = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}
PREFIX = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def family(lm):
    return lm.model.config.model_type


def chunks_for(lm, n=5, seq_len=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.adapter.vocab_size, (n, seq_len), generator=g)


def plain_grad_sums(model, chunks, batch_size, names):
    """Per batch: loss.backward() with every parameter trainable, clone the grads, sum them here."""
    model = copy.deepcopy(model).eval()
    model.requires_grad_(True)
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    per_batch = []
    for start in range(0, len(chunks), batch_size):
        ids = chunks[start: start + batch_size]
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: params[n].grad.detach().clone().float() for n in names}
        per_batch.append(grads)
        for n in names:
            sums[n] += grads[n]
    return {n: params[n].detach().float() for n in names}, sums, per_batch


def test_region_tensors_are_the_block_matrices(tiny_lm):
    fam = family(tiny_lm)
    want = [f"{PREFIX[fam]}.{l}.{m}.weight" for l in range(2) for m in EXPECTED[fam]]
    got = region_tensors(tiny_lm)
    assert list(got) == want
    assert all(p.dim() == 2 for p in got.values())
    with_norms = region_tensors(tiny_lm, include_norms=True)
    extra = [n for n in with_norms if n not in got]
    assert len(extra) == 4 and all(with_norms[n].dim() == 1 for n in extra)


def test_snip_and_snip_abs_match_a_plain_loop(tiny_lm):
    chunks = chunks_for(tiny_lm)
    names = list(region_tensors(tiny_lm))
    theta, sums, per_batch = plain_grad_sums(tiny_lm.model, chunks, 2, names)  # batches of 2, 2, 1
    snip = importance(tiny_lm, chunks, "snip", batch_size=2)
    snip_abs = importance(tiny_lm, chunks, "snip-abs", batch_size=2)
    assert list(snip) == names
    for n in names:
        assert snip[n].dtype == torch.float32 and snip[n].shape == theta[n].shape
        torch.testing.assert_close(snip[n], (theta[n] * sums[n]).abs(), rtol=1e-4, atol=1e-7)
        want_abs = sum((theta[n] * g[n]).abs() for g in per_batch)
        torch.testing.assert_close(snip_abs[n], want_abs, rtol=1e-4, atol=1e-7)
    # abs after the sum cancels what abs per batch keeps: never more, and less somewhere
    assert all(bool((snip[n] <= snip_abs[n] + 1e-6).all()) for n in names)
    assert any(bool((snip[n] < snip_abs[n] - 1e-6).any()) for n in names)


def test_snip_in_bfloat16_accumulates_in_float32():
    lm = wrap_model(tiny_model("llama", seed=0).to(torch.bfloat16))
    chunks = chunks_for(lm, n=4)
    names = list(region_tensors(lm))
    theta, sums, _ = plain_grad_sums(lm.model, chunks, 1, names)
    got = importance(lm, chunks, "snip", batch_size=1)
    for n in names:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], (theta[n] * sums[n]).abs(), rtol=1e-3, atol=1e-6)


def test_wanda_matches_inputs_captured_by_a_plain_hook(tiny_lm):
    chunks = chunks_for(tiny_lm)
    model = tiny_lm.model
    captured, handles = {}, []
    named = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) in named:
            name = named[id(module.weight)]

            def hook(mod, args, out, name=name):
                captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, 5, 2):
            model(chunks[start: start + 2])
    for h in handles:
        h.remove()
    got = importance(tiny_lm, chunks, "wanda", batch_size=3)
    conv = family(tiny_lm) == "gpt2"
    params = dict(model.named_parameters())
    for n, score in got.items():
        col_norm = torch.cat(captured[n]).norm(dim=0)  # ||X_j||_2 over every token, per input feature
        w = params[n].detach().abs()
        want = w * col_norm[:, None] if conv else w * col_norm[None, :]  # Conv1D (in, out); Linear (out, in)
        torch.testing.assert_close(score, want, rtol=1e-4, atol=1e-6)


def snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.grad for n, p in model.named_parameters()}, model.training)


def assert_unchanged(model, before):
    weights, flags, grads, training = before
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        assert p.requires_grad == flags[n], n
        assert p.grad is grads[n], n  # the very same tensor object (or None)
    assert model.training == training


def dirty_state(lm):
    """A state a caller might be in: training mode, mixed flags, stale .grad on some tensors."""
    model = lm.model.train()
    params = dict(model.named_parameters())
    region = list(region_tensors(lm))
    model.requires_grad_(False)
    params[region[0]].requires_grad_(True)
    params[region[0]].grad = torch.full_like(params[region[0]], 7.0)
    emb = lm.adapter.embed.weight
    emb.requires_grad_(True)
    emb.grad = torch.ones_like(emb)
    return model


@pytest.mark.parametrize("method", ["snip", "snip-abs", "wanda"])
def test_model_state_is_left_as_it_was(tiny_lm, method):
    model = dirty_state(tiny_lm)
    before = snapshot(model)
    grad0 = before[2][list(region_tensors(tiny_lm))[0]].clone()
    importance(tiny_lm, chunks_for(tiny_lm), method, batch_size=2)
    assert_unchanged(model, before)
    assert torch.equal(model.get_parameter(list(region_tensors(tiny_lm))[0]).grad, grad0)  # not added into


@pytest.mark.parametrize("method", ["snip", "snip-abs", "wanda"])
def test_model_state_is_restored_when_a_batch_raises(tiny_lm, method):
    model = dirty_state(tiny_lm)
    before = snapshot(model)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 2:  # the second batch, after the first one's gradients landed
            raise KeyboardInterrupt
    handle = tiny_lm.adapter.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            importance(tiny_lm, chunks_for(tiny_lm), method, batch_size=2)
    finally:
        handle.remove()
    assert len(calls) == 2
    assert_unchanged(model, before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # wanda's hooks gone


def test_a_subset_of_tensors_by_name(tiny_lm):
    names = list(region_tensors(tiny_lm))[:2]
    chunks = chunks_for(tiny_lm)
    got = importance(tiny_lm, chunks, "snip", batch_size=5, tensors=names)
    full = importance(tiny_lm, chunks, "snip", batch_size=5)
    assert list(got) == names
    for n in names:
        torch.testing.assert_close(got[n], full[n])


def test_bad_input_is_one_line_naming_the_option():
    lm = wrap_model(tiny_model("llama", seed=0))
    chunks = chunks_for(lm)
    cases = [
        (dict(method="fisher"), "fisher"),
        (dict(batch_size=0), "--batch-size"),
        (dict(chunks=chunks.float()), "LongTensor"),
        (dict(chunks=chunks[:, :1]), "seq-len"),
        (dict(chunks=chunks + lm.adapter.vocab_size), "tokenizer"),
        (dict(tensors=["model.layers.0.nope.weight"]), "nope"),
        (dict(method="wanda", tensors=region_tensors(lm, include_norms=True)), "norms"),
    ]
    for kwargs, word in cases:
        args = {"chunks": chunks, "method": "snip", "batch_size": 2, **kwargs}
        with pytest.raises(EngramError, match=word):
            importance(lm, args.pop("chunks"), **args)
