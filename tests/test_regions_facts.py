"""Regions over facts (language vs knowledge): the template/value corpora of fact sentences, importance
and perplexity restricted to marked tokens against plain loops, and each fact's answer with a
region zeroed against a hand-zeroed copy of the model; `engram regions --facts`."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from engramlab.data.facts import load_facts
from engramlab.errors import EngramError
from engramlab.locate.base import select
from engramlab.locate.regions.config import RegionConfig
from engramlab.locate.regions.facts import fact_corpora
from engramlab.locate.regions.find import RegionResult, find_regions
from engramlab.locate.regions.importance import importance, region_tensors
from engramlab.models.perplexity import perplexity
from engramlab.models import tiny_model, wrap_model

from conftest import word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    facts = select(load_facts("country_capital_city,country_language"), limit=4)
    tok = word_tokenizer([f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok), facts


def test_template_and_value_tokens_split_each_sentence(world):
    lm, facts = world
    corpora = fact_corpora(lm, facts)
    t, v = corpora["template"], corpora["value"]
    assert torch.equal(t.chunks, v.chunks)
    assert t.chunks.shape[0] == sum(len(f.templates) for f in facts)
    assert not (t.targets & v.targets).any() and not t.targets[:, 0].any()
    row = 0
    for f in facts:
        for j in range(len(f.templates)):
            prompt = lm.tokenizer(f.prompt(j), add_special_tokens=False)["input_ids"]
            ids = t.chunks[row]
            answer = lm.tokenizer(" " + f.object, add_special_tokens=False)["input_ids"]
            assert ids[v.targets[row]].tolist() == answer
            assert ids[: len(prompt)].tolist() == prompt
            assert t.targets[row].sum() == len(prompt) - 1 and bool(t.targets[row, 1: len(prompt)].all())
            assert not t.targets[row, len(prompt):].any()  # the answer and the padding are not template
            row += 1


def _plain_masked_loss(model, ids, mask):
    logits = model(input_ids=ids).logits[:, :-1]
    keep = mask[:, 1:]
    return F.cross_entropy(logits[keep], ids[:, 1:][keep])


def test_snip_on_marked_tokens_equals_theta_times_the_summed_masked_gradient(world):
    lm, facts = world
    value = fact_corpora(lm, facts)["value"]
    params = region_tensors(lm)
    got = importance(lm, value.chunks, "snip", 3, params, targets=value.targets)
    model = copy.deepcopy(lm.model)
    named = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(value.chunks), 3):  # a plain loop: one batch at a time, gradients added up
        model.zero_grad()
        _plain_masked_loss(model, value.chunks[start: start + 3], value.targets[start: start + 3]).backward()
        for n in total:
            total[n] += named[n].grad
    for n in params:
        assert torch.allclose(got[n], (named[n].detach() * total[n]).abs(), rtol=1e-4, atol=1e-7), n
    other = importance(lm, value.chunks, "snip", 3, params, targets=fact_corpora(lm, facts)["template"].targets)
    assert any(not torch.allclose(other[n], got[n]) for n in params)  # the template tokens score differently


def test_wanda_on_marked_tokens_uses_the_positions_that_predict_them(world):
    lm, facts = world
    value = fact_corpora(lm, facts)["value"]
    name = next(iter(region_tensors(lm)))  # layer 0's first projection reads the normed residual stream
    module = next(m for m in lm.adapter.block_matrices(0).values() if m.weight is dict(lm.model.named_parameters())[name])
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        lm.model(input_ids=value.chunks)
    handle.remove()
    x = seen[0]                                          # (n_rows, width, d_model)
    feeds = torch.cat([value.targets[:, 1:], torch.zeros_like(value.targets[:, :1])], 1)
    norm = x[feeds].norm(dim=0)                          # over the positions before an answer token
    got = importance(lm, value.chunks, "wanda", 4, [name], targets=value.targets)[name]
    assert torch.allclose(got, module.weight.detach().abs() * norm[None, :], rtol=1e-4, atol=1e-6)


def test_perplexity_on_marked_tokens_matches_a_plain_loop(world):
    lm, facts = world
    template = fact_corpora(lm, facts)["template"]
    with torch.no_grad():
        plain = math.exp(float(_plain_masked_loss(lm.model, template.chunks, template.targets)))
    assert perplexity(lm, template.chunks, 3, targets=template.targets) == pytest.approx(plain, rel=1e-5)
    with pytest.raises(EngramError, match="no token is marked"):
        perplexity(lm, template.chunks, 3, targets=torch.zeros_like(template.targets))


def test_each_fact_is_scored_with_each_region_zeroed(world):
    lm, facts = world
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = find_regions(lm, facts, RegionConfig(ratio=0.05, batch_size=4))
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    s = res.summary()
    assert s["n_facts"] == len(facts) and [r["corpus"] for r in res.corpus_rows] == ["template", "value"]
    regions = ["base", "core", "bottom", "random", "top_template", "top_value"]
    assert [k[len("rank_"):] for k in res.records()[0] if k.startswith("rank_")] == regions
    assert "overlap.top_template.top_value" in s and "value.ppl_without_top_template_ratio" in s

    # the answer's rank with the value region zeroed, by hand on a copy of the model
    from engramlab.recall import score_recall

    zeroed = copy.deepcopy(lm)
    named = dict(zeroed.model.named_parameters())
    tops = fact_corpora(lm, facts)
    value_scores = importance(lm, tops["value"].chunks, "snip", 4, targets=tops["value"].targets)
    with torch.no_grad():
        for n, sc in value_scores.items():  # the value region: the top 5% per tensor of the answers' snip
            flat = torch.zeros(sc.numel(), dtype=torch.bool)
            flat[torch.topk(sc.flatten(), int(0.05 * sc.numel())).indices] = True
            named[n][flat.view(sc.shape)] = 0
    plain = score_recall(zeroed, facts).records()
    assert [r["rank_top_value"] for r in res.records()] == [r["target_rank"] for r in plain]
    base = score_recall(lm, facts).records()
    assert [r["rank_base"] for r in res.records()] == [r["target_rank"] for r in base]
    assert s["accuracy.base"] == sum(r["target_rank"] == 1 for r in base) / len(base)


def test_save_and_load_keep_fact_rows_and_corpus_rows(world, tmp_path):
    lm, facts = world
    res = find_regions(lm, facts, RegionConfig(ratio=0.05, batch_size=4))
    res.save(tmp_path)
    back = RegionResult.load(tmp_path)
    assert back.records() == json.loads(json.dumps(res.records())) and back.corpus_rows == res.corpus_rows
    assert back.summary() == res.summary()


def test_the_verb_takes_facts_or_corpora_but_not_both(tiny_hf_dir, tmp_path):
    from engramlab.cli import app

    runner = CliRunner()
    out = tmp_path / "r"
    r = runner.invoke(app, ["regions", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit", "4",
                            "--ratio", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_facts"] == 4 and "accuracy.top_value" in summary
    both = runner.invoke(app, ["regions", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--corpus",
                               f"x={tmp_path}", "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and "not both" in both.output and not (tmp_path / "both").exists()
    neither = runner.invoke(app, ["regions", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "neither")])
    assert neither.exit_code == 2 and "--corpus NAME=PATH" in neither.output
    limit = runner.invoke(app, ["regions", "--model", str(tiny_hf_dir), "--corpus", f"x={tmp_path}", "--limit", "2",
                                "--out", str(tmp_path / "limit")])
    assert limit.exit_code == 2 and "with --facts" in limit.output
