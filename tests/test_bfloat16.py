"""``--dtype bfloat16`` end to end: each locator runs on a bf16 model, sums its scores in float32,
and lands where float32 does (EAP-IG and region importance have their own bf16 tests)."""

import torch

from engramlab.data.facts import load_facts
from engramlab.locate.neurons.ig import integrated_gradients
from engramlab.models.loading import wrap_model
from engramlab.models.tiny import tiny_model

from conftest import word_tokenizer


def _model(vocab_size: int):
    """A tiny model whose MLPs matter: at random init a neuron moves P(answer) by ~0.1%, below
    bf16's resolution (2^-8), so per-neuron bf16 attributions would be noise (the per-layer sums
    still agree); with the MLP outputs scaled x10 neurons have effects bf16 resolves, as in a
    trained model (SmolLM2-135M in bf16: cosine 0.9997 with float32 over three layers' IG)."""
    model = tiny_model("llama", vocab_size=vocab_size, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(10.0)
    return model


def _pair():
    facts = load_facts("country_capital_city")[:4]
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])
    f32 = wrap_model(_model(len(tok)), tok)
    bf16 = wrap_model(_model(len(tok)).to(torch.bfloat16), tok)
    return f32, bf16, facts, tok


def test_ig_scores_in_bfloat16_are_float32_and_follow_float32():
    f32, bf16, facts, tok = _pair()
    for fact in facts[:2]:
        ids = tok(fact.prompt(), add_special_tokens=False)["input_ids"]
        target = tok(" " + fact.object, add_special_tokens=False)["input_ids"]
        a = integrated_gradients(f32, ids, target, steps=8)
        b = integrated_gradients(bf16, ids, target, steps=8)
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.999, float(cos)
        # the strongest neurons agree
        top = lambda s: set(s.flatten().topk(10).indices.tolist())  # noqa: E731
        assert len(top(a) & top(b)) >= 8


def test_trace_grid_in_bfloat16_follows_float32():
    from engramlab.locate.trace.config import TraceConfig
    from engramlab.locate.trace.find import find_trace

    f32, bf16, facts, _ = _pair()
    config = TraceConfig(window=1, samples=1)
    a, b = find_trace(f32, facts, config), find_trace(bf16, facts, config)
    assert [r["subject"] for r in a.records()] == [r["subject"] for r in b.records()]
    ea, eb = torch.nan_to_num(a.effects), torch.nan_to_num(b.effects)  # (n, 3, L, T) indirect effects
    assert eb.dtype == torch.float32
    # Every cell within a few bf16 steps of the probabilities it is a difference of (2^-8 relative):
    # at this model's P(answer) ~ 0.04 that is ~1e-4, about a tenth of its largest effect.
    resolution = 2.0 ** -8 * float(a.p_clean.max())
    assert float(ea.abs().max()) > 2 * resolution
    assert float((ea - eb).abs().max()) < 4 * resolution
