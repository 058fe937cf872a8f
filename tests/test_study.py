"""`engram study` and `engram report`: presets, bad input, one line per stage, resume after a kill,
a report rebuilt byte for byte."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.errors import EngramError
from engramlab.report.findings import FINDINGS
from engramlab.studies.stages import PRESET_KEYS, STAGE_KEYS
from engramlab.studies.study import PRESET_FILE, load_presets, stage_line

MICRO = """
[micro]
description = "a study small enough for a test"
stages = [
  { name = "world", command = "world --preset tiny --n-people 24 --n-heldout 4" },
  { name = "train", command = "train --world {root}/world --model-config tiny --steps 6 --batch-size 4 --eval-every 2 --eval-people 6 --eval-templates 1 --checkpoints every:3" },
  { name = "evolve", command = "evolve --run {root}/train --analysis recall --limit 2" },
]
"""


def _micro(tmp_path):
    path = tmp_path / "micro.toml"
    path.write_text(MICRO)
    return path


def test_the_packaged_presets_are_engram_command_lines(tmp_path):
    presets = load_presets(PRESET_FILE)
    assert {"demo", "paper"} <= set(presets)
    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    for name, preset in presets.items():
        assert preset["description"], name
        kinds = [s.argv(tmp_path)[0] for s in preset["stages"]]
        assert set(kinds) <= verbs, (name, set(kinds) - verbs)
        # the pipeline the issue asks for: training, evolve over it, the locators, continual pre-training
        assert {"world", "train", "evolve", "neurons", "dkn", "circuit"} <= set(kinds), name
        assert any("--init" in s.command and "world-b" in s.command for s in preset["stages"]), name
        for s in preset["stages"]:
            argv = s.argv(tmp_path)
            assert argv[-2:] == ["--out", str(tmp_path / s.name)] and "{root}" not in " ".join(argv)
    # the demo never asks for a GPU; the paper preset runs where one is
    assert not any("--device" in s.command for s in presets["demo"]["stages"])


def test_unknown_keys_and_presets_are_one_line_errors_naming_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[demo]\ndescription = "x"\nstagez = []\nstages = [{name = "w", command = "world"}]\n')
    with pytest.raises(EngramError, match=r"unknown key 'stagez'; valid keys: " + ", ".join(PRESET_KEYS)):
        load_presets(bad)
    bad.write_text('[demo]\nstages = [{name = "w", command = "world", comand = "x"}]\n')
    with pytest.raises(EngramError, match=r"stage 1: unknown key 'comand'; valid keys: " + ", ".join(STAGE_KEYS)):
        load_presets(bad)
    bad.write_text('[demo]\nstages = [{name = "../w", command = "world"}]\n')
    with pytest.raises(EngramError, match="plain directory name"):
        load_presets(bad)
    r = CliRunner().invoke(app, ["study", "--preset", "nope", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "'nope'" in r.output and "demo" in r.output and "paper" in r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(app, ["study", "--config", str(bad), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "plain directory name" in r.output and not (tmp_path / "s").exists()


def test_report_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "stuff").mkdir()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "stuff")])
    assert r.exit_code == 2 and "not a run directory" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such directory" in r.output
    assert not list(tmp_path.rglob("report.html"))


def test_micro_study_end_to_end_quiet_and_rebuilt_report(tmp_path, one_thread):
    out = tmp_path / "study"
    r = CliRunner().invoke(app, ["study", "--config", str(_micro(tmp_path)), "--preset", "micro", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    for stage in ("world", "train", "evolve"):  # ordinary run directories
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete"
    lines = [line for line in r.output.splitlines() if line.strip()]
    # --quiet: one line per finished stage, then the study's own lines (no stage tables, no bars)
    assert [line.split(":")[0].lstrip("✓ ") for line in lines[:3]] == ["world", "train", "evolve"]
    assert "6 steps" in lines[1] and "final acc" in lines[1]
    assert not any("[1/3]" in line for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert {f"finding.{f.key}" for f in FINDINGS} <= set(summary)
    assert summary["finding.core_region"] == "not run"  # no regions stage in this study
    assert all(summary[f"stage.{s}.seconds"] is not None for s in ("world", "train", "evolve"))
    page = (out / "report.html").read_bytes()
    assert page.count(b'<tr id="finding-') == len(FINDINGS)
    assert b"http://" not in page.replace(b"http://www.w3.org", b"") and b"https://" not in page
    # engram report rebuilds the same bytes (no clock in the page but the runs' own times)
    r = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "again.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.html").read_bytes() == page
    # running the study again keeps every stage and writes the same page
    stamps = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("world", "train", "evolve")}
    r = CliRunner().invoke(app, ["study", "--config", str(_micro(tmp_path)), "--preset", "micro", "--out", str(out)])
    assert r.exit_code == 0, r.output and "(kept)" in r.output
    assert {s: (out / s / "manifest.json").stat().st_mtime_ns for s in stamps} == stamps
    assert (out / "report.html").read_bytes() == page
    # a single verb's run directory gets a report of its own
    r = CliRunner().invoke(app, ["report", str(out / "train")])
    assert r.exit_code == 0 and (out / "train" / "report.html").is_file()


def test_stage_line_reads_the_stage_summary(tmp_path):
    run = tmp_path / "train"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "command": "train", "config": {"steps": 2000}, "status": "complete",
        "start_time": "2026-12-01T10:00:00+0000", "end_time": "2026-12-01T10:03:12+0000"}))
    (run / "summary.json").write_text(json.dumps({"plateau_start_step": 150, "plateau_end_step": 400,
                                                  "final_attr_acc": 0.9712}))
    assert stage_line("train", run) == "train: 2000 steps, plateau 150\u2192400, final acc 0.97, 3m12s"

    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "manifest.json").write_text(json.dumps({
        "command": "regions", "config": {}, "status": "complete",
        "start_time": "2026-12-01T10:00:00+0000", "end_time": "2026-12-01T10:00:42+0000"}))
    (regions / "summary.json").write_text(json.dumps({
        "de.ppl_top_ratio": 187000.0, "de.ppl_random_ratio": 1.764, "fr.ppl_top_ratio": 6.0e5,
        "fr.ppl_random_ratio": 1.72, "dimensions.top": "5,9", "dimensions.n_breaking": 1, "dimensions.massive": "9"}))
    assert stage_line("regions", regions) == ("regions: de core x1.87e+05 random x1.76; fr core x6e+05 random x1.72; "
                                              "1 breaking dimension(s), massive 9, 42s")

    for verb, summary, line in [
            ("trace", {"n_facts": 8, "trace.peak_mlp_layer": 5, "trace.mean_max_indirect_effect": 0.3791},
             "trace: 8 facts, MLP effect at the last subject token peaks at layer 5, mean max indirect effect 0.38, 42s"),
            ("doctor", {"doctor.n_checks": 6, "doctor.n_failed": 0}, "doctor: 6 adapter checks, all pass, 42s"),
            ("doctor", {"doctor.n_checks": 6, "doctor.n_failed": 2}, "doctor: 6 adapter checks, 2 failed, 42s"),
            ("circuit", {"n_edges_kept": 508, "n_edges_total": 70651, "faithfulness": 0.871, "cpr": 0.983,
                         "cmd": 0.0161, "mib_ranking": "absolute"},
             "circuit: 508/70651 edges, held-out faithfulness 0.87, CPR 0.98 CMD 0.02 (absolute), 42s")]:
        run = tmp_path / verb
        run.mkdir(exist_ok=True)
        (run / "manifest.json").write_text(json.dumps({
            "command": verb, "config": {}, "status": "complete",
            "start_time": "2026-12-01T10:00:00+0000", "end_time": "2026-12-01T10:00:42+0000"}))
        (run / "summary.json").write_text(json.dumps(summary))
        assert stage_line(verb, run) == line


def test_a_killed_study_resumes_without_redoing_finished_stages(tmp_path):
    """SIGKILL during the training stage; the second run keeps the world and finishes."""
    config = tmp_path / "slow.toml"
    config.write_text(MICRO.replace("--steps 6 ", "--steps 60 ").replace("every:3", "every:20").replace("[micro]", "[slow]"))
    out = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from engramlab.cli import main; main()", "study", "--config", str(config), "--preset", "slow",
           "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    train_manifest = out / "train" / "manifest.json"
    while time.monotonic() < deadline and proc.poll() is None:
        if train_manifest.is_file() and (out / "train" / "metrics.jsonl").is_file():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(train_manifest.read_text())["status"] == "running"  # killed mid-stage
    world_stamp = (out / "world" / "world.json").stat().st_mtime_ns
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "world" / "world.json").stat().st_mtime_ns == world_stamp
    assert "world:" in done.stdout and "(kept)" in done.stdout.split("\n")[0]
    assert json.loads(train_manifest.read_text())["status"] == "complete"
    assert json.loads((out / "summary.json").read_text())["finding.three_phases"] in (
        "reproduced", "partly reproduced", "not reproduced")
    assert (out / "report.html").is_file()


def test_every_packaged_stage_parses_as_its_verb(tmp_path):
    """Each stage's flags exist and take values of the right type (parsed, not run), so a typo in
    the paper preset, which CI never runs, is caught here."""
    import typer

    group = typer.main.get_command(app)
    for preset in load_presets(PRESET_FILE).values():
        for s in preset["stages"]:
            verb, *args = s.argv(tmp_path)
            command = group.get_command(group.context_class(group), verb)
            try:
                command.make_context(verb, list(args))
            except Exception as e:  # typer's click raises its own UsageError types
                message = e.format_message() if hasattr(e, "format_message") else str(e)
                raise AssertionError(f"stage {s.name}: {message}") from None
