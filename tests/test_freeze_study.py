"""`engram freeze` and the CorpusTrainer on a tiny model: frozen regions held bit-identically in both
modes while the rest trains, resume exactness, the held-out chunks never trained on, metrics rows
and summary keys (forgetting against a hand computation), and bad input as one line."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import word_tokenizer
from engramlab.data.corpora import load_corpora
from engramlab.models import tiny_model
from engramlab.models.loading import list_checkpoints
from engramlab.models.param_masks import load_masks
from engramlab.train.config import TrainConfig
from engramlab.train.corpus_train import CorpusTrainer, batch_indices

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("a", "b", "c")
STEPS = ["--steps", "6", "--eval-every", "2", "--checkpoint-every", "3", "--batch-size", "3", "--lr", "1e-2"]


def _texts():
    from engramlab.data.facts import load_facts

    facts = list(load_facts("country_capital_city"))
    return [f"{f.prompt()} {f.object}." for f in facts]


@pytest.fixture(scope="module")
def regions_run(tmp_path_factory):
    """A tiny Llama HF dir, three small text corpora and an `engram regions` run over them."""
    from engramlab.cli import app

    root = tmp_path_factory.mktemp("freeze")
    text = _texts()
    tok = word_tokenizer(text)
    model = tiny_model("llama", vocab_size=len(tok), seed=0)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    third = len(text) // 3
    specs = []
    for i, name in enumerate(NAMES):  # three disjoint slices of the facts: no chunk is in two corpora
        (root / f"{name}.txt").write_text(" ".join(text[i * third:(i + 1) * third]), encoding="utf-8")
        specs += ["--corpus", f"{name}={root / f'{name}.txt'}"]
    res = CliRunner().invoke(app, ["regions", "--model", str(root / "tiny"), *specs, "--seq-len", "8",
                                   "--max-chunks", "3", "--eval-chunks", "2", "--batch-size", "4", "--ratio", "0.1",
                                   "--out", str(root / "regions")])
    assert res.exit_code == 0, res.output
    return root


def _freeze(root, out, *extra):
    from engramlab.cli import app

    return CliRunner().invoke(app, ["freeze", "--regions", str(root / "regions"), "--train", "a", *STEPS, *extra,
                                    "--out", str(out)])


def _final(out, arm, steps=6):
    return load_file(str(list_checkpoints(out / arm)[steps] / "model.safetensors"))


@pytest.mark.parametrize("mode", ["grad_mask", "restore"])
def test_frozen_entries_are_bit_identical_while_the_others_move(regions_run, tmp_path, mode):
    out = tmp_path / "freeze"
    res = _freeze(regions_run, out, "--arms", "core,random", "--freeze-mode", mode)
    assert res.exit_code == 0, res.output
    start = load_file(str(regions_run / "tiny" / "model.safetensors"))
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("core", "random"):
        end, masks = _final(out, arm), load_masks(regions_run / "regions" / f"{arm}.safetensors")
        assert sum(int(m.sum()) for m in masks.values()) > 0
        for name, m in masks.items():
            assert torch.equal(start[name][m], end[name][m]), (arm, name)  # the very same bits
            assert (start[name][~m] != end[name][~m]).float().mean() > 0.5, (arm, name)  # the rest trained
        assert summary[f"{arm}.frozen_max_change"] == 0.0
    assert (out / "freezing.png").stat().st_size > 1000


def test_the_unfrozen_arm_moves_the_core_region(regions_run, tmp_path):
    # the control for the test above: without freezing, the same training changes the core entries
    out = tmp_path / "freeze"
    assert _freeze(regions_run, out, "--arms", "none").exit_code == 0
    start, end = load_file(str(regions_run / "tiny" / "model.safetensors")), _final(out, "none")
    masks = load_masks(regions_run / "regions" / "core.safetensors")
    assert all((start[n][m] != end[n][m]).float().mean() > 0.5 for n, m in masks.items())
    assert json.loads((out / "summary.json").read_text())["none.frozen_max_change"] is None


def _trainer(root, out, steps=8, resume=False, freeze=True):
    tok_dir = root / "tiny"
    from transformers import AutoTokenizer

    corpora = load_corpora([f"{n}={root / f'{n}.txt'}" for n in NAMES], AutoTokenizer.from_pretrained(tok_dir), 8)
    cfg = TrainConfig(steps=steps, batch_size=3, lr=1e-2, schedule="constant", checkpoints="every:4", eval_every=2,
                      init=str(tok_dir), freeze=str(root / "regions" / "core.safetensors") if freeze else None)
    held = {n: c.chunks[-2:] for n, c in corpora.items()}
    return CorpusTrainer(cfg, corpora["a"].chunks[:-2], held, out, resume=resume)


def test_a_stopped_run_resumes_to_the_same_bits(regions_run, tmp_path):
    _trainer(regions_run, tmp_path / "full").run(show_progress=False)
    _trainer(regions_run, tmp_path / "part").run(stop_after=6, show_progress=False)  # last checkpoint: step 4
    assert sorted(list_checkpoints(tmp_path / "part")) == [4]
    _trainer(regions_run, tmp_path / "part", resume=True).run(show_progress=False)
    a, b = _final(tmp_path, "full", 8), _final(tmp_path, "part", 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "part")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [0, 2, 4, 6, 8]


def test_batches_are_distinct_training_chunks_fixed_by_seed_and_step():
    got = batch_indices(0, 3, 10, 4)
    assert got.tolist() == batch_indices(0, 3, 10, 4).tolist() and len(set(got.tolist())) == 4
    assert all(0 <= i < 10 for i in got.tolist())
    assert any(batch_indices(0, s, 10, 4).tolist() != got.tolist() for s in (4, 5, 6))
    assert sorted(batch_indices(1, 0, 5, 9).tolist()) == [0, 1, 2, 3, 4]  # capped at n


def test_no_held_out_chunk_is_ever_trained_on(regions_run, tmp_path, monkeypatch):
    seen = []
    original = CorpusTrainer.make_batch

    def spy(self, step):
        batch = original(self, step)
        seen.extend(map(tuple, batch["input_ids"].tolist()))
        return batch

    monkeypatch.setattr(CorpusTrainer, "make_batch", spy)
    assert _freeze(regions_run, tmp_path / "freeze", "--arms", "none", "--batch-size", "2").exit_code == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(regions_run / "tiny")
    corpora = load_corpora([f"{n}={regions_run / f'{n}.txt'}" for n in NAMES], tok, 8)
    held_out = {tuple(r) for c in corpora.values() for r in c.chunks[-2:].tolist()}  # regions' split: the last 2
    train_rows = {tuple(r) for r in corpora["a"].chunks[:-2].tolist()}
    assert len(seen) == 6 * 2 and held_out.isdisjoint(seen) and set(seen) <= train_rows
    assert len(set(seen)) > 2  # more than one batch's worth: the steps draw different chunks


def test_metrics_and_summary_keys_and_forgetting_by_hand(regions_run, tmp_path):
    out = tmp_path / "freeze"
    res = _freeze(regions_run, out)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_corpus"] == "a" and summary["steps"] == 6 and summary["seconds"] > 0
    for arm in ("none", "core", "random"):
        rows = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 2, 4, 6]
        assert all(r[f"ppl.{c}"] > 1 for r in rows for c in NAMES) and rows[0]["train_loss"] is None
        assert all(r["train_loss"] > 0 and r["lr"] == 1e-2 for r in rows[1:])
        ratios = {c: rows[-1][f"ppl.{c}"] / rows[0][f"ppl.{c}"] for c in NAMES}
        for c in NAMES:
            assert summary[f"{arm}.{c}.ppl_start"] == rows[0][f"ppl.{c}"]
            assert summary[f"{arm}.{c}.ppl_end"] == rows[-1][f"ppl.{c}"]
            assert summary[f"{arm}.{c}.ppl_ratio"] == pytest.approx(ratios[c], rel=1e-12)
        assert summary[f"{arm}.forgetting"] == pytest.approx(math.sqrt(ratios["b"] * ratios["c"]), rel=1e-12)
        assert summary[f"{arm}.train_ppl_ratio"] == pytest.approx(ratios["a"], rel=1e-12)
        assert summary[f"{arm}.train_ppl_ratio"] < 1  # lr 1e-2 on a tiny model: the trained corpus improves
    # the ppl at step 0 is the start model's, the same in every arm
    assert summary["none.b.ppl_start"] == summary["core.b.ppl_start"] == summary["random.b.ppl_start"]
    # rerun with --resume: complete, nothing retrained, the same summary
    again = _freeze(regions_run, out, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text()) == summary


def test_resume_skips_finished_arms_and_continues_the_rest(regions_run, tmp_path, monkeypatch):
    assert _freeze(regions_run, tmp_path / "whole", "--arms", "none,core").exit_code == 0
    want = _final(tmp_path / "whole", "core")
    original_run, original_resume, resumed = CorpusTrainer.run, CorpusTrainer._resume, []

    def interrupted(self, **kw):  # arm core stops after step 4 (its last checkpoint: step 3)
        if self.out.name == "core":
            original_run(self, stop_after=4, show_progress=False)
            raise KeyboardInterrupt
        return original_run(self, **kw)

    def spy_resume(self):
        original_resume(self)
        resumed.append((self.out.name, self.start_step))

    out = tmp_path / "freeze"
    monkeypatch.setattr(CorpusTrainer, "run", interrupted)
    assert _freeze(regions_run, out, "--arms", "none,core").exit_code != 0
    assert json.loads((out / "manifest.json").read_text())["status"] != "complete"
    assert (out / "none" / "done.json").is_file() and not (out / "core" / "done.json").exists()
    assert sorted(list_checkpoints(out / "core")) == [3]
    monkeypatch.setattr(CorpusTrainer, "run", original_run)
    monkeypatch.setattr(CorpusTrainer, "_resume", spy_resume)
    none_mtime = (out / "none" / "done.json").stat().st_mtime_ns
    res = _freeze(regions_run, out, "--arms", "none,core", "--resume")
    assert res.exit_code == 0, res.output
    assert resumed == [("core", 4)]  # core continued after its step-3 checkpoint; none was not retrained
    assert (out / "none" / "done.json").stat().st_mtime_ns == none_mtime
    got = _final(out, "core")
    assert got.keys() == want.keys() and all(torch.equal(want[k], v) for k, v in got.items())
    assert not (list_checkpoints(out / "core")[6] / "optimizer.pt").exists()  # finished: no optimizer state
    rows = [(d / "core" / "metrics.jsonl").read_text() for d in (tmp_path / "whole", out)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("case", ["not_regions", "other_command", "train", "arm", "steps", "new_over_checkpoints"])
def test_bad_input_is_one_line(regions_run, tmp_path, case):
    from engramlab.cli import app

    regions, train, extra = regions_run / "regions", "a", []
    want = {"not_regions": "not an engram regions run", "other_command": "not regions",
            "train": "--train zz: not a corpus", "arm": "(--arms): choose from", "steps": "(--steps): must be >= 1",
            "new_over_checkpoints": "pass --resume"}[case]
    out = tmp_path / "freeze"
    if case == "not_regions":
        regions = tmp_path
    elif case == "other_command":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "manifest.json").write_text(json.dumps({"command": "corpus", "status": "complete"}))
        regions = tmp_path / "other"
    elif case == "train":
        train = "zz"
    elif case == "arm":
        extra = ["--arms", "none,bogus"]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "new_over_checkpoints":
        (out / "core" / "checkpoints" / "step-0000003").mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"command": "freeze", "status": "failed"}))
    res = CliRunner().invoke(app, ["freeze", "--regions", str(regions), "--train", train, *extra, "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and want in errors[0], res.output
    if case != "new_over_checkpoints":
        assert not out.exists()
