"""Input that cannot be scored is refused up front: bad text, over-long prompts, bad options."""

import json
import time

import pytest
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.data.facts import Fact, FactSet, load_facts
from engramlab.models import tiny_model, wrap_model
from engramlab.models.context import check_facts_fit, context_length
from engramlab.recall import score_recall

from conftest import word_tokenizer


def test_lone_surrogates_are_refused_at_load_time(tmp_path):
    line = {"subject": "Fr\ud800ance", "relation": "r", "object": "Paris", "prompt": "The capital of {} is"}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")  # json writes the escape \ud800
    with pytest.raises(EngramError, match=r'a.jsonl line 1 "subject": character 2 .*lone surrogate'):
        load_facts(str(tmp_path / "a.jsonl"))
    # The documented un-escaping of double-escaped LRE text must not create one either.
    lre = {"prompt_templates": ["The capital of {} is"], "samples": [{"subject": "X\\ud800y", "object": "Paris"}]}
    (tmp_path / "b.json").write_text(json.dumps(lre))
    with pytest.raises(EngramError, match=r'b.json samples\[0\] "subject": character 1 .*lone surrogate'):
        load_facts(str(tmp_path / "b.json"))
    # A proper surrogate pair (an emoji, double-escaped) decodes to one character and is fine.
    lre["samples"][0]["subject"] = "X\\ud83d\\ude00y"
    (tmp_path / "c.json").write_text(json.dumps(lre))
    assert load_facts(str(tmp_path / "c.json")).facts[0].subject == "X\U0001F600y"
    line["subject"], line["prompt"] = "France", "The capital \udfff of {} is"
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(EngramError, match="d.jsonl line 1 template 0: character 12"):
        load_facts(str(tmp_path / "d.jsonl"))


def _lm(family, max_pos=32):
    words = ["The", "capital", "of", "is", "Paris", "France", "word"]
    tok = word_tokenizer([" ".join(words)])
    return wrap_model(tiny_model(family, vocab_size=len(tok), seed=0, max_pos=max_pos), tok)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompts_longer_than_the_context_are_refused(family):
    lm = _lm(family, max_pos=16)
    assert context_length(lm.model) == 16
    fits = Fact("France", "capital", "Paris", ("The capital of {} is",))
    # 11 words of subject + 4 of template + 1 object = 16 tokens: exactly the context.
    edge = Fact(" ".join(["word"] * 11), "capital", "Paris", ("The capital of {} is",))
    over = Fact(" ".join(["word"] * 12), "capital", "Paris", ("The capital of {} is", "{} capital"))
    check_facts_fit(lm, FactSet([fits, edge]))
    assert score_recall(lm, FactSet([fits, edge])).summary()["n_facts"] == 2
    with pytest.raises(EngramError, match=r"fact 1 \(capital, .*template 0: prompt \+ object is 17 tokens, more "
                                          r"than the model's context of 16"):
        score_recall(lm, FactSet([fits, over]))
    # The second template alone fits: every template is checked, not only the first.
    short = Fact(" ".join(["word"] * 12), "capital", "Paris", ("{} is", "The capital of {} is"))
    with pytest.raises(EngramError, match="template 1"):
        check_facts_fit(lm, FactSet([short]))


def test_a_huge_subject_is_refused_without_tokenizing_it():
    lm = _lm("llama", max_pos=64)
    huge = Fact("word " * 2_000_000, "capital", "Paris", ("The capital of {} is",))
    t0 = time.time()
    with pytest.raises(EngramError, match=r"prompt \+ object is 10,000,\d{3} characters"):
        check_facts_fit(lm, FactSet([huge]))
    assert time.time() - t0 < 5  # tokenizing it would take far longer


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit 0: must be >= 1"),
    (["--batch-size", "0"], "RecallConfig.batch_size=0 (--batch-size): must be >= 1"),
    (["--batch-size", "-1"], "RecallConfig.batch_size=-1 (--batch-size): must be >= 1"),
    (["--dtype", "float8"], "--dtype 'float8'"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--relation", "nope"], "unknown relation 'nope'"),
])
def test_bad_recall_options_write_nothing(tmp_path, tiny_hf_dir, args, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["recall", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                 "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.count("error:") == 1
    assert not out.exists()  # checked before the run directory is made


def test_bad_inspect_options(tiny_hf_dir):
    r = CliRunner().invoke(app, ["inspect", "--model", str(tiny_hf_dir), "--seq-len", "-3"])
    assert r.exit_code == 2 and "--seq-len -3: must be >= 1" in r.output


@pytest.mark.parametrize("locate", ["neurons", "dkn", "circuit"])
def test_every_locator_refuses_prompts_beyond_the_context(locate):  # probe cases 21, 22, 39
    from engramlab.locate.circuits import find_circuit
    from engramlab.locate.dkn import find_dkns
    from engramlab.locate.neurons import find_knowledge_neurons

    find = {"neurons": find_knowledge_neurons, "dkn": find_dkns, "circuit": find_circuit}[locate]
    lm = _lm("gpt2", max_pos=16)
    over = Fact(" ".join(["word"] * 12), "capital", "Paris", ("The capital of {} is",))
    with pytest.raises(EngramError, match="more than the model's context of 16 tokens"):
        find(lm, FactSet([over, over]))


@pytest.mark.parametrize("verb", ["recall", "neurons", "dkn", "circuit"])
def test_limit_zero_is_an_error_for_every_fact_verb(tmp_path, verb):  # probe cases 18, 38
    r = CliRunner().invoke(app, [verb, "--model", "smollm2-135m", "--facts", "country_capital_city",
                                 "--limit", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--limit 0: must be >= 1" in r.output and not (tmp_path / "o").exists()


def test_a_bad_flag_into_a_complete_run_leaves_it_as_it_was(tmp_path, tiny_hf_dir):  # probe case 122
    runner = CliRunner()
    out = tmp_path / "done"
    args = ["recall", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit", "3", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for extra in (["--dtype", "float8"], []):  # a typo, then an honest re-run without --overwrite
        r = runner.invoke(app, args + extra)
        assert r.exit_code == 2 and r.output.count("error:") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
