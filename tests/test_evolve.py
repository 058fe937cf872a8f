"""``engram evolve``: locators over a run's checkpoints, resumable, with skipped checkpoints listed."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.data.world import World
from engramlab.dynamics.evolve import select_steps, world_facts
from engramlab.errors import EngramError


def _rows(path):
    return [json.loads(line) for line in (path / "evolution.jsonl").read_text().splitlines()]


def test_select_steps():
    have = [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert select_steps("all", have) == have
    assert select_steps("first:3", have) == [0, 1, 2, 100]  # the last is always in
    assert select_steps("every:8", have) == [0, 8, 16, 32, 64, 100]
    assert select_steps("steps:4,16", have) == [4, 16, 100]
    picked = select_steps("log:4", have)
    assert picked[0] == 0 and picked[-1] == 100 and len(picked) == 4 and picked == sorted(set(picked))
    assert select_steps("log:50", have) == have
    for bad, message in (("steps:5", "no checkpoint at step"), ("every:0", ">= 1"), ("sometimes", "expected"),
                         ("first:x", ">= 1"), ("steps:", "steps:a,b,c")):
        with pytest.raises(EngramError, match=message):
            select_steps(bad, have)
    with pytest.raises(EngramError, match="no checkpoints"):
        select_steps("all", [])


def test_world_facts_prompts_end_right_before_the_value(trained):
    facts = world_facts(trained / "run")
    world = World.load(trained / "world")
    items = world.eval_items("heldout_templates", max_people=4)  # the run's --eval-people
    assert len(facts) == 4 * 6  # every evaluated person, every attribute
    prompts = {(f.subject, f.relation, f.prompt(j), f.object) for f in facts for j in range(len(f.templates))}
    want = {(world.people[i.person_index].name, i.attribute, i.prompt, i.value) for i in items}
    assert want <= prompts  # the run's own evaluation sentences, cut where the value starts
    for f in facts:
        for j in range(len(f.templates)):
            sentence = next(i for i in world.eval_items("heldout_templates", max_people=4)
                            if i.prompt == f.prompt(j) and i.attribute == f.relation)
            assert sentence.text.startswith(f.prompt(j) + " " + f.object)
            break


def test_evolve_maps_recall_and_resumes(trained, tmp_path):
    runner = CliRunner()
    run = trained / "run"
    full = tmp_path / "full"
    r = runner.invoke(app, ["evolve", "--run", str(run), "--analysis", "recall", "--out", str(full)])
    assert r.exit_code == 0, r.output
    rows = _rows(full)
    assert [row["step"] for row in rows] == [0, 2, 4, 6]
    assert all("recall.top1_accuracy" in row for row in rows)
    for row in rows:  # each row is that checkpoint's own result
        saved = json.loads((full / f"step-{row['step']:07d}" / "recall" / "summary.json").read_text())
        assert row["recall.top1_accuracy"] == saved["top1_accuracy"]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["n_checkpoints"] == 4 and summary["n_skipped"] == 0
    assert "plateau_start_step" in summary

    # Interrupted after two checkpoints (their directories exist, a half-written one too), then re-run.
    part = tmp_path / "part"
    r = runner.invoke(app, ["evolve", "--run", str(run), "--analysis", "recall", "--checkpoints", "steps:0,2",
                            "--out", str(part)])
    assert r.exit_code == 0, r.output
    (part / "step-0000004" / ".recall.partial").mkdir(parents=True)
    r = runner.invoke(app, ["evolve", "--run", str(run), "--analysis", "recall", "--out", str(part)])
    assert r.exit_code == 0, r.output
    assert _rows(part) == rows
    assert json.loads((part / "summary.json").read_text())["n_checkpoints"] == 4

    # Another fact selection in the same --out is refused, not mixed in.
    r = runner.invoke(app, ["evolve", "--run", str(run), "--analysis", "recall", "--limit", "1", "--out", str(part)])
    assert r.exit_code == 2 and "other facts" in r.output


def test_a_corrupted_checkpoint_is_skipped_and_listed(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    weights = next((run / "checkpoints" / "step-0000002").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    r = CliRunner().invoke(app, ["evolve", "--run", str(run), "--analysis", "recall", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in _rows(tmp_path / "e")] == [0, 4, 6]
    skipped = [json.loads(line) for line in (tmp_path / "e" / "skipped.jsonl").read_text().splitlines()]
    assert [s["step"] for s in skipped] == [2] and skipped[0]["reason"]


def test_bad_input_is_a_one_line_error(trained, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["evolve", "--run", str(trained / "run"), "--analysis", "recall,nope", "--out",
                            str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown analysis 'nope'" in r.output and "circuit" in r.output
    r = runner.invoke(app, ["evolve", "--run", str(trained / "world"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "engram train" in r.output
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"command": "train", "config": {}}))
    r = runner.invoke(app, ["evolve", "--run", str(bare), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "no checkpoints" in r.output
    with pytest.raises(EngramError, match="not trained on a world"):
        world_facts(bare)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_jaccard_and_entropy_on_hand_made_circuits():
    import math

    import torch

    from engramlab.dynamics.circuit_metrics import circuit_entropy, circuit_series, edge_jaccard

    a = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert edge_jaccard(a, b) == pytest.approx(1 / 4)  # one shared of four in the union
    assert edge_jaccard(a, a) == 1.0 and edge_jaccard(a & ~a, a & ~a) == 1.0
    scores = torch.tensor([[2.0, -2.0, 9.0], [0.0, 0.0, 5.0]])
    assert circuit_entropy(scores, a) == pytest.approx(math.log(2))  # two kept edges of equal |score|
    # b keeps |2|, |9|, |5|: by hand -(2/16 ln 2/16 + 9/16 ln 9/16 + 5/16 ln 5/16) = 0.947057
    assert circuit_entropy(scores, b) == pytest.approx(0.947057, abs=1e-6)
    with_zero = b.clone()
    with_zero[1, 0] = True  # a kept edge of score 0 adds nothing (0 log 0 = 0)
    assert circuit_entropy(scores, with_zero) == pytest.approx(0.947057, abs=1e-6)
    assert circuit_entropy(torch.zeros(2, 3), a) is None

    class R:  # the two fields circuit_series reads
        def __init__(self, kept):
            self.kept, self.scores = kept, scores

    series = circuit_series([(0, R(b)), (5, R(a)), (9, R(a | b))])
    assert series[9]["edge_jaccard_final"] == 1.0 and series[0]["edge_jaccard_prev"] is None
    assert series[5]["edge_jaccard_final"] == pytest.approx(2 / 4)
    assert series[5]["edge_jaccard_prev"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        edge_jaccard(a, torch.zeros(3, 3, dtype=torch.bool))


CIRCUIT = ["--analysis", "recall,circuit", "--set", "circuit.steps=2", "--set", "circuit.top_n=30",
           "--set", "circuit.require_correct=false", "--transplant", "3"]


def _evolve_cmd(run, out, *extra):
    import sys

    return [sys.executable, "-c", "from engramlab.cli import main; main()", "evolve", "--run", str(run),
            "--out", str(out), *CIRCUIT, *extra]


def test_sigkill_midway_then_rerun_gives_the_same_files(trained, tmp_path):
    """An evolve killed with SIGKILL mid-sweep and run again writes the same evolution.jsonl,
    summary.json and transplant.json as a sweep that was never interrupted."""
    import os
    import signal
    import subprocess
    import time

    run = trained / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    done = subprocess.run(_evolve_cmd(run, whole), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_evolve_cmd(run, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "step-0000002" / "circuit" / "summary.json").is_file():  # mid-sweep: 2 of 4 steps done
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "evolution.jsonl").exists() and not (cut / "step-0000006" / "circuit").exists()
    again = subprocess.run(_evolve_cmd(run, cut), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("evolution.jsonl", "transplant.json", "pairs.jsonl"):
        assert (cut / name).read_text() == (whole / name).read_text(), name
    untimed = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}  # noqa: E731
    assert untimed(cut / "summary.json") == untimed(whole / "summary.json")  # all but the wall time


def test_circuits_over_checkpoints_share_frozen_pairs_and_the_transplant_diagonal(trained, tmp_path):
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(tmp_path / "e"), *CIRCUIT])
    assert r.exit_code == 0, r.output
    out = tmp_path / "e"
    frozen = (out / "pairs.jsonl").read_text().splitlines()
    assert frozen
    steps = [row["step"] for row in _rows(out)]
    for step in steps:  # every checkpoint's circuit was found and judged on the frozen pairs
        records = [json.loads(line) for line in (out / f"step-{step:07d}" / "circuit" / "records.jsonl")
                   .read_text().splitlines()]
        sides = {(r["subject"], r["relation"], r["role"], r["corrupt_subject"]) for r in records
                 if r["role"] != "skipped"}
        want = {(r["subject"], r["relation"], r["role"], r["corrupt_subject"]) for r in map(json.loads, frozen)}
        assert sides == want
    matrix = json.loads((out / "transplant.json").read_text())
    assert matrix["steps"][-1] == steps[-1] and len(matrix["steps"]) == 3
    for i, step in enumerate(matrix["steps"]):  # the diagonal: each circuit on its own model
        own = json.loads((out / f"step-{step:07d}" / "circuit" / "summary.json").read_text())
        got = matrix["faithfulness"][i][i]
        # the same evaluation up to float rounding (the evaluator may batch several circuits)
        assert (got is None and own["faithfulness"] is None) or got == pytest.approx(own["faithfulness"], rel=1e-5)
        assert matrix["hit_at_10_circuit"][i][i] == pytest.approx(own["hit_at_10_circuit"])
    rows = _rows(out)
    assert all("circuit.edge_jaccard_final" in row and "circuit.entropy" in row for row in rows)
    assert rows[-1]["circuit.edge_jaccard_final"] == 1.0
    assert not any("seconds" in key for row in rows for key in row)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("phase_shift_step", "phase_shift_metric", "plateau_start_step", "plateau_end_step"):
        assert key in summary


def test_each_analysis_takes_its_own_settings(trained, tmp_path):
    from engramlab.cli.evolve import evolve as verb
    from engramlab.locate import LOCATORS

    for name in LOCATORS:  # every registered locator can be configured through evolve
        assert any(path.startswith(name + ".") for path in verb.cli_settings), name
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(tmp_path / "e"),
                                 "--checkpoints", "steps:6", *CIRCUIT])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "e" / "step-0000006" / "circuit" / "config.json").read_text())["config"]
    assert saved["steps"] == 2 and saved["top_n"] == 30 and saved["pairs"]
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(tmp_path / "f"),
                                 "--set", "circuit.stepz=2"])
    assert r.exit_code == 2 and "stepz" in r.output


def test_regions_over_checkpoints_follow_the_saved_masks(trained, tmp_path):
    """``--analysis regions`` on a world run: each row's Jaccard columns are those of the saved
    step masks, computed here by hand; the value and template regions are followed too."""
    from engramlab.models.param_masks import load_masks

    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--analysis", "regions", "--limit", "2",
                                 "--set", "regions.ratio=0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    steps = [row["step"] for row in rows]

    def masks(step, name):
        return load_masks(out / f"step-{step:07d}" / "regions" / f"{name}.safetensors")

    def jac(a, b):
        inter = sum(int((a[n] & b[n]).sum()) for n in a)
        union = sum(int((a[n] | b[n]).sum()) for n in a)
        return 1.0 if union == 0 else inter / union

    for name in ("core", "top_template", "top_value"):
        final = masks(steps[-1], name)
        for i, row in enumerate(rows):
            here = masks(row["step"], name)
            assert row[f"regions.{name}_jaccard_final"] == pytest.approx(jac(here, final))
            prev = None if i == 0 else jac(here, masks(steps[i - 1], name))
            assert row[f"regions.{name}_jaccard_prev"] == (None if prev is None else pytest.approx(prev))
    assert rows[-1]["regions.core_jaccard_final"] == 1.0
    shares = [rows[0][k] for k in rows[0] if k.startswith("regions.core_share.L")]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
    assert all(f"regions.accuracy.{r}" in rows[-1] for r in ("base", "core", "top_template", "top_value"))
