"""Causal tracing (``engram trace``): the batched grid against the one-forward-per-cell reference on
every supported family, the noise, the span, the token kinds, skipping and refusing bad input."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.data.facts import Fact, FactSet, load_facts
from engramlab.errors import EngramError
from engramlab.locate import LOCATORS, select
from engramlab.locate.trace import TraceConfig, TraceResult, find_trace
from engramlab.locate.trace.find import token_kind_map
from engramlab.locate.trace.grid import trace_grid, window_layers
from engramlab.locate.trace.noise import embedding_std, fact_noise
from engramlab.locate.trace.plain import trace_plain
from engramlab.locate.trace.span import subject_span
from engramlab.models import supported_model_types, tiny_model, wrap_model

from conftest import word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [5, 9, 11, 3, 7, 2, 8]
SPAN = (2, 5)
ANSWER = 13


def _lm(model_type, n_layers=3):
    model = tiny_model(model_type, seed=0, n_layers=n_layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # larger weights than the init, so the answer's probability moves visibly
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(0.3 * torch.randn(p.shape, generator=g))
    return wrap_model(model)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_batched_grid_equals_one_forward_per_cell(model_type):
    lm = _lm(model_type)
    noise = fact_noise(0, 0, 2, SPAN[1] - SPAN[0], lm.adapter.d_model, 2.0)
    fast = trace_grid(lm, IDS, SPAN, ANSWER, noise, window=2, batch_size=5)  # batches cut across kinds
    plain = trace_plain(lm, IDS, SPAN, ANSWER, noise, window=2)
    assert fast.p_clean == pytest.approx(plain.p_clean, abs=1e-7)
    assert fast.p_corrupt == pytest.approx(plain.p_corrupt, abs=1e-7)
    diff = (fast.restored - plain.restored).abs().max().item()
    size = plain.effect.abs().max().item()
    assert size > 1e-4, "the noise should move P(answer) on this model"
    assert diff <= 1e-6 and diff <= 1e-3 * size, (diff, size)
    # before the subject nothing is corrupted: restoring there has no effect at all
    assert (fast.effect[..., :SPAN[0]] == 0).all()
    # the last layer's output at the last token is all the logits read: restoring it gives P_clean
    assert fast.restored[0, -1, -1].item() == pytest.approx(fast.p_clean, abs=1e-6)


def test_batch_size_does_not_change_the_grid():
    lm = _lm("llama")
    noise = fact_noise(1, 4, 1, 3, lm.adapter.d_model, 1.5)
    one = trace_grid(lm, IDS, SPAN, ANSWER, noise, window=3, batch_size=1)
    many = trace_grid(lm, IDS, SPAN, ANSWER, noise, window=3, batch_size=64)
    assert torch.allclose(one.restored, many.restored, atol=1e-7, rtol=0)


def test_window_is_centred_and_cut_at_the_ends():
    assert list(window_layers(5, 10, 30)) == list(range(0, 10))      # ROME: [l - 5, l + 5)
    assert list(window_layers(12, 10, 30)) == list(range(7, 17))
    assert list(window_layers(28, 10, 30)) == list(range(23, 30))    # cut, not shifted
    assert list(window_layers(4, 3, 8)) == [3, 4, 5]
    assert list(window_layers(4, 1, 8)) == [4]
    assert list(window_layers(0, 2, 2)) == [0]                       # [l - 1, l + 1)
    assert list(window_layers(1, 2, 2)) == [0, 1]


def test_noise_is_fixed_per_fact_and_scaled():
    a = fact_noise(3, 7, 4, 5, 16, 0.5)
    assert torch.equal(a, fact_noise(3, 7, 4, 5, 16, 0.5))
    assert not torch.equal(a, fact_noise(3, 8, 4, 5, 16, 0.5))     # another fact, other noise
    assert not torch.equal(a, fact_noise(4, 7, 4, 5, 16, 0.5))     # another seed
    big = fact_noise(0, 0, 1, 400, 64, 0.5)
    assert big.std().item() == pytest.approx(0.5, rel=0.05)


def test_embedding_std_is_the_std_of_the_sample():
    lm = _lm("gpt2")
    w = lm.adapter.embed.weight.detach().double()
    assert embedding_std(lm, "embedding") == pytest.approx(w.std().item(), rel=1e-9)
    sub = [[3, 4], [9]]
    assert embedding_std(lm, "subjects", sub) == pytest.approx(w[[3, 4, 9]].std().item(), rel=1e-9)


def test_token_kinds_follow_the_paper():
    eff = torch.arange(2 * 1 * 9, dtype=torch.float32).view(2, 1, 9)   # value = token index (+9 for kind 1)
    m = token_kind_map(eff, (2, 6), 9)                                 # subject tokens 2..5, T = 9
    assert m[0, 0].tolist() == [2, 3.5, 5, 6, 7, 8]                  # first, mean(3, 4), last, 6, mean(7), 8
    one = token_kind_map(eff, (1, 2), 3)                               # one-token subject, then the last token
    assert one[0, 0, 0] == one[0, 0, 2] == 1 and torch.isnan(one[0, 0, 1]) and torch.isnan(one[0, 0, 4])
    assert one[0, 0, 3] == one[0, 0, 5] == 2
    end = token_kind_map(eff, (1, 3), 3)                               # the subject ends the prompt
    assert torch.isnan(end[0, 0, 3]) and end[0, 0, 5] == 2


def _facts_and_lm(extra_words=()):
    facts = select(load_facts("country_capital_city"), limit=3)
    texts = [f.prompt(0) + " " + f.object for f in facts] + list(extra_words)
    tok = word_tokenizer(texts)
    return facts, wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok), tok


def test_subject_span_with_and_without_offsets():
    facts, lm, tok = _facts_and_lm()
    f = facts[0]
    prompt, template = f.prompt(0), f.template(0)
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    span, reason = subject_span(tok, ids, prompt, f.subject, template)
    assert reason is None and tok.decode(ids[span[0]:span[1]]).replace(" ", "") == f.subject.replace(" ", "")

    class NoOffsets:  # a tokenizer that only decodes: the piece-by-piece path must agree
        def __call__(self, *a, **k):
            raise TypeError("no offsets")

        def decode(self, ids):
            return tok.decode(ids)
    assert subject_span(NoOffsets(), ids, prompt, f.subject, template) == (span, None)


def test_an_unknown_subject_is_skipped_with_the_reason(tmp_path):
    facts, lm, tok = _facts_and_lm()
    stranger = Fact("Zzyzxland", "country_capital_city", facts[0].object, facts[0].templates)
    mixed = FactSet([*facts, stranger], source="test")
    result = find_trace(lm, mixed, TraceConfig(window=2))
    rows = result.records()
    assert len(rows) == 4 and rows[-1]["subject"] == "Zzyzxland"
    assert "not found in the prompt's tokens" in rows[-1]["skipped"]
    s = result.summary()
    assert s["n_facts"] == 3 and s["n_skipped"] == 1 and isinstance(s["trace.peak_mlp_layer"], int)
    result.save(tmp_path)
    skipped = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["subject"] for r in skipped] == ["Zzyzxland"]


def test_a_window_larger_than_the_model_is_one_line_naming_the_option():
    facts, lm, _ = _facts_and_lm()
    with pytest.raises(EngramError) as err:
        find_trace(lm, facts, TraceConfig(window=3))
    msg = str(err.value)
    assert "\n" not in msg and "TraceConfig.window=3" in msg and "--window" in msg and "2 layers" in msg


def test_find_trace_equals_the_plain_reference_and_round_trips(tmp_path):
    facts, lm, tok = _facts_and_lm()
    config = TraceConfig(window=1, samples=2, seed=5, batch_size=3)
    result = find_trace(lm, facts, config)
    assert result.p_restored.shape[:3] == (3, 3, 2)
    from engramlab.models.scoring import encode
    from engramlab.data.facts import target_token_ids

    sigma = result.stats["noise_std"]
    for j, f in enumerate(facts):  # each fact's stored grid is the plain reference's with that fact's noise
        ids = encode(lm, f.prompt(0))
        b, e = result.spans[j].tolist()
        noise = fact_noise(5, j, 2, e - b, lm.adapter.d_model, sigma)
        plain = trace_plain(lm, ids, (b, e), target_token_ids(tok, f.prompt(0), f.object)[0], noise, 1)
        got = result.p_restored[j, :, :, :len(ids)]
        assert torch.allclose(got, plain.restored, atol=1e-6, rtol=0)
        assert torch.isnan(result.p_restored[j, :, :, len(ids):]).all()
        assert result.records()[j]["p_clean"] == pytest.approx(plain.p_clean, rel=1e-5)
    # summary: the peak is the argmax of the mean MLP effect at the last subject token
    eff = result.effects
    col = torch.stack([eff[j, 1, :, result.spans[j, 1] - 1] for j in range(3)]).mean(0)
    assert result.summary()["trace.peak_mlp_layer"] == int(col.argmax())
    maxes = [eff[j, 0, :, :int(result.n_tokens[j])].max().item() for j in range(3)]
    assert result.summary()["trace.mean_max_indirect_effect"] == pytest.approx(sum(maxes) / 3, rel=1e-5)
    result.save(tmp_path)
    again = TraceResult.load(tmp_path)
    assert again.summary() == json.loads(json.dumps(result.summary()))
    assert torch.equal(torch.nan_to_num(again.p_restored, nan=-1), torch.nan_to_num(result.p_restored, nan=-1))
    assert LOCATORS["trace"].load(tmp_path).records() == json.loads(json.dumps(result.records()))


def test_the_trace_finding_rule():
    from engramlab.report.sections.trace import verdict

    s = {"trace.peak_mlp_layer": 5, "trace.mean_total_effect": 0.25}
    assert verdict(s, 30, 0.2)[0] == "reproduced"                    # depth 5/29, peak 0.2 >= 0.25 / 4
    assert verdict(s, 30, 0.03)[0] == "partly reproduced"            # early, but a small share
    assert verdict({**s, "trace.peak_mlp_layer": 25}, 30, 0.2)[0] == "not reproduced"
    assert verdict({**s, "trace.mean_total_effect": 0.001}, 30, 0.2)[0] == "inconclusive"
    assert verdict({"trace.peak_mlp_layer": None}, 30, None)[0] == "inconclusive"
