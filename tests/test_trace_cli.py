"""``engram trace`` end to end on a tiny HF directory, its report section, and
``engram evolve --analysis trace`` over a tiny ``engram train`` run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engramlab.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trace_verb_writes_the_run_and_its_plot(tiny_hf_dir, tmp_path):
    out = tmp_path / "trace"
    r = CliRunner().invoke(app, ["trace", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit",
                                 "3", "--window", "2", "--samples", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "records.jsonl", "summary.json", "trace.safetensors", "skipped.jsonl", "trace.png",
                 "manifest.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_facts"] == 3 and summary["n_skipped"] == 0
    assert 0 <= summary["trace.peak_mlp_layer"] < 2 and summary["trace.mean_max_indirect_effect"] is not None
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["trace"]["samples"] == 2 and manifest["status"] == "complete"

    from engramlab.report.runs import collect
    from engramlab.report.sections import renderers

    report = collect(out)
    (section,) = renderers()["trace"](report.of("trace"), report)
    assert "<svg" in section.body and "peak layer" in section.body
    assert [f.key for f in section.findings] == ["trace_mlp_peak"]


def test_a_window_larger_than_the_model_is_refused_in_one_line(tiny_hf_dir, tmp_path):
    r = CliRunner().invoke(app, ["trace", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit",
                                 "1", "--out", str(tmp_path / "t")])  # the default window, 10 > 2 layers
    assert r.exit_code == 2
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "TraceConfig.window=10 (--window)" in line[0]


def test_evolve_runs_trace_over_checkpoints(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "12", "--n-heldout", "4", "--out",
                            str(tmp_path / "world")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--world", str(tmp_path / "world"), "--model-config", "tiny", "--steps", "4",
                            "--batch-size", "4", "--eval-every", "2", "--eval-people", "2", "--eval-templates", "1",
                            "--checkpoints", "every:2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evolve", "--run", str(tmp_path / "run"), "--analysis", "trace", "--limit", "1",
                            "--set", "trace.window=2", "--out", str(tmp_path / "evolve")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "evolve" / "evolution.jsonl").read_text().splitlines()]
    assert len(rows) >= 2
    for row in rows:
        assert row["trace.peak_mlp_layer"] in (0, 1) and row["trace.mean_max_effect"] is not None
        assert {"trace.mlp_last_subject.L0", "trace.mlp_last_subject.L1"} <= set(row)
    assert rows[-1]["trace.peak_mlp_layer_final"] is True

    from engramlab.report.runs import collect
    from engramlab.report.sections import renderers

    report = collect(tmp_path / "evolve")
    body = "".join(s.body for s in renderers()["evolve"](report.of("evolve"), report))
    assert "Causal tracing over checkpoints" in body and "peak MLP layer" in body
