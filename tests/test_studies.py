"""Studies: stages as ordinary runs (kept, resumed, refused when changed) and `engram continual`."""

import json

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.errors import EngramError
from engramlab.studies.continual import GROUPS, PRESET_FILE, load_presets
from engramlab.studies.stages import Stage, run_stages, stage_state

MICRO = """
[micro]
description = "a study small enough for a test"
stages = [
  { name = "world-a", command = "world --preset tiny --n-people 24 --n-heldout 4" },
  { name = "train-a", command = "train --world {root}/world-a --model-config tiny --steps 4 --batch-size 4 --eval-every 2 --eval-people 4 --eval-templates 1 --checkpoints none" },
  { name = "world-b", command = "world --preset continual-tiny --rel-from {root}/world-a --set n_rel=6 --set n_compl=6 --set n_heldout=4" },
  { name = "train-b", command = "train --world {root}/world-b --init {root}/train-a --steps 6 --batch-size 4 --eval-every 2 --eval-people 12 --eval-templates 1 --checkpoints every:2" },
  { name = "evolve", command = "evolve --run {root}/train-b --analysis recall,circuit --set circuit.steps=2 --set circuit.top_n=20 --set circuit.require_correct=false --transplant 2" },
]
"""


def test_the_packaged_presets_are_engram_command_lines(tmp_path):
    presets = load_presets(PRESET_FILE)
    assert {"demo", "paper"} <= set(presets)
    verbs = {c.name for c in app.registered_commands} | {c.callback.__name__ for c in app.registered_commands}
    for name, preset in presets.items():
        assert preset["description"]
        kinds = [s.argv(tmp_path)[0] for s in preset["stages"]]
        assert "train" in kinds and kinds[-1] == "evolve", name
        assert set(kinds) <= verbs, name
        for s in preset["stages"]:
            argv = s.argv(tmp_path)
            assert argv[-2:] == ["--out", str(tmp_path / s.name)] and "{root}" not in " ".join(argv)


def test_a_bad_study_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[demo]\nstages = 3\n")
    with pytest.raises(EngramError, match=r"needs stages"):
        load_presets(bad)
    bad.write_text("[demo\n")
    with pytest.raises(EngramError, match="not valid TOML"):
        load_presets(bad)
    with pytest.raises(EngramError, match="no such file"):
        load_presets(tmp_path / "missing.toml")
    with pytest.raises(EngramError, match="drop --out"):
        Stage("x", "world --out elsewhere").argv(tmp_path)
    r = CliRunner().invoke(app, ["continual", "--preset", "nope", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "demo" in r.output and not (tmp_path / "c").exists()


def test_finished_stages_are_kept_and_a_changed_one_refused(tmp_path):
    stages = [Stage("w", "world --preset tiny --n-people 12 --n-heldout 2")]
    run_stages(stages, tmp_path)
    assert stage_state(stages[0], tmp_path) == "complete"
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["argv"][1:] == stages[0].argv(tmp_path)  # the stage's own command, not the caller's
    stamp = (tmp_path / "w" / "world.json").stat().st_mtime_ns
    lines = []
    run_stages(stages, tmp_path, log=lines.append)
    assert "done earlier" in lines[0] and (tmp_path / "w" / "world.json").stat().st_mtime_ns == stamp
    changed = [Stage("w", "world --preset tiny --n-people 13 --n-heldout 2")]
    assert stage_state(changed[0], tmp_path) == "other"
    with pytest.raises(EngramError, match="another command line"):
        run_stages(changed, tmp_path)
    failing = [Stage("t", "train --world {root}/missing --steps 2")]
    with pytest.raises(EngramError, match="stage t .* failed"):
        run_stages(failing, tmp_path)


def test_continual_study_end_to_end_at_micro_scale(tmp_path):
    study = tmp_path / "micro.toml"
    study.write_text(MICRO)
    out = tmp_path / "study"
    r = CliRunner().invoke(app, ["continual", "--config", str(study), "--preset", "micro", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for stage in ("world-a", "train-a", "world-b", "train-b", "evolve"):  # each an ordinary run directory
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("k_rel_half_step", "k_compl_half_step", "high_half_step", "medium_half_step", "low_half_step",
                "phase_shift_step", "deep_to_shallow_stat", "deep_to_shallow_p"):
        assert key in summary
    rows = [json.loads(line) for line in (out / "evolve" / "evolution.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2, 4, 6]
    for label in ("kind.rel", "kind.compl"):  # both knowledge types are in the world's facts
        assert all(f"recall.top1_accuracy.{label}" in row for row in rows)
        assert all(f"circuit.hit_at_10_circuit.{label}" in row for row in rows)
    # all 12 trained people are evaluated (6 revised, 6 new), six attributes each
    assert summary["k_rel_n_facts"] == summary["k_compl_n_facts"] == 36
    assert summary["high_n_facts"] + summary["medium_n_facts"] + summary["low_n_facts"] == 72
    assert set(GROUPS) == {"k_rel", "k_compl", "high", "medium", "low"}
    # a second run keeps every stage and gives the same numbers
    r = CliRunner().invoke(app, ["continual", "--config", str(study), "--preset", "micro", "--out", str(out)])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in again.items() if "seconds" not in k} == \
        {k: v for k, v in summary.items() if "seconds" not in k}
