"""Report sections of ``engram evolve`` and ``engram continual``: a real (tiny) continual study laid
out flat, the same evolve reported alone, and hand-made rows for the verdicts and missing columns."""

import json
import re

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.report.runs import collect
from engramlab.report.sections.evolve import deep_finding, formation_finding, krel_finding, render
from engramlab.studies.continual import continual_summary

SMALL = ["--model-config", "tiny", "--batch-size", "4", "--eval-people", "4", "--eval-templates", "1"]


def _ok(runner, args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    """world A -> 2 steps of training -> continual world B -> 6 steps from A's model (checkpoints
    0, 3, 6) -> evolve recall + circuit on all three, as flat stages of one study directory."""
    root = tmp_path_factory.mktemp("report-evolve")
    runner = CliRunner()
    _ok(runner, ["world", "--preset", "tiny", "-N", "40", "--n-heldout", "10", "--out", str(root / "world-a")])
    _ok(runner, ["train", "--world", str(root / "world-a"), "--steps", "2", "--checkpoints", "none", *SMALL,
                 "--eval-every", "2", "--out", str(root / "train-a")])
    _ok(runner, ["world", "--preset", "continual-tiny", "--rel-from", str(root / "world-a"), "--set", "n_rel=10",
                 "--set", "n_compl=10", "--n-heldout", "6", "--out", str(root / "world-b")])
    _ok(runner, ["train", "--world", str(root / "world-b"), "--init", str(root / "train-a"), "--steps", "6",
                 "--eval-every", "2", "--checkpoints", "every:3", *SMALL, "--out", str(root / "train-b")])
    _ok(runner, ["evolve", "--run", str(root / "train-b"), "--analysis", "recall,circuit", "--set", "circuit.steps=1",
                 "--set", "circuit.top_n=20", "--set", "circuit.require_correct=false", "--transplant", "3",
                 "--out", str(root / "evolve")])
    stages = [{"name": n, "command": "..."} for n in ("world-a", "train-a", "world-b", "train-b", "evolve")]
    (root / "manifest.json").write_text(json.dumps({"command": "study", "status": "complete",
                                                    "config": {"stages": stages}}))
    return root


def _render(directory):
    report = collect(directory)
    return render(report.of("evolve", "continual"), report)


@pytest.fixture(scope="module")
def sections(study):
    return _render(study)


def test_flat_study_gets_both_sections_with_the_circuit_slider(study, sections):
    assert [s.id for s in sections] == ["evolve-evolve", "continual-evolve"]
    ev, cont = sections
    assert (ev.order, cont.order) == (40, 50)
    # the slider: one circuit drawing per checkpoint, in step order (the page's script selects the last)
    frames = re.findall(r'<div class="frame" data-label="([^"]+)">', ev.body)
    assert frames == ["step 0", "step 3", "step 6"]
    assert 'data-label="checkpoint"' in ev.body
    for heading in ("Recall over checkpoints", "Circuit change over checkpoints", "Logit lens", "Transplant matrix"):
        assert f"<h3>{heading}</h3>" in ev.body
    # recall, change, layer shares, roles, lens, transplant + the three drawings; no note for a missing column
    assert ev.body.count("<figure") == 6 + 3
    assert "No transplant.json" not in ev.body and "No circuit.edge_share" not in ev.body
    assert "Knowledge neurons" not in ev.body  # not run: no heading at all
    # the continual table shows continual_summary's own half steps, from the flat stages
    want = continual_summary(study, "evolve", "train-b")
    table = re.search(r'<table id="continual-evolve-groups".*?</table>', cont.body, re.S).group(0)
    row = re.search(r"<tr><td>k_rel</td>(.*?)</tr>", table).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[0] == str(want["k_rel_n_facts"]) and want["k_rel_n_facts"] > 0
    assert cells[1] == (str(want["k_rel_half_step"]) if want["k_rel_half_step"] is not None else "—")
    assert "<h3>The training run's own evaluation</h3>" in cont.body  # train-b's metrics, finer than checkpoints
    keys = {f.key: f for s in sections for f in s.findings}
    assert set(keys) == {"formation_optimization", "deep_to_shallow", "krel_kcompl"}
    assert all(f.priority == 1 for f in keys.values())  # a continual run wins over a from-scratch evolve
    assert keys["deep_to_shallow"].verdict == "inconclusive"  # a 2-layer model: fewer than 3 layers surface
    assert keys["krel_kcompl"].section == "continual-evolve"
    assert keys["formation_optimization"].section == "evolve-evolve"


def test_the_evolve_alone_same_bytes(study, sections):
    alone = _render(study / "evolve")  # the training run is not collected: its evaluation from the rows
    assert [s.id for s in alone] == ["evolve-evolve", "continual-evolve"]
    assert alone[0].body == sections[0].body  # a second build, same bytes (the evolve section needs no train run)
    assert "The training run is not part of this report" in alone[1].body
    krel = next(f for f in alone[1].findings if f.key == "krel_kcompl")
    assert "own evaluation not available" in krel.measured


# --------------------------------------------------------------------------- hand-made runs


def _evolve_dir(path, rows, summary=None, status="complete", config=None):
    path.mkdir(parents=True)
    manifest = {"command": "evolve", "status": status, "config": config or {"run": "/nowhere/train"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if rows is not None:
        (path / "evolution.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_columns_give_notes_not_errors(tmp_path):
    rows = [{"step": s, "recall.top1_accuracy": a} for s, a in ((0, 0.0), (10, 0.2), (100, 0.9))]
    (ev,) = _render(_evolve_dir(tmp_path / "old", rows, status="running"))
    assert "status is &#x27;running&#x27;" in ev.body
    assert "No circuit analysis in this evolve run" in ev.body
    assert ev.body.count("<figure") == 1 and ev.findings == []
    (empty,) = _render(_evolve_dir(tmp_path / "empty", None, status="running"))
    assert "No evolution.jsonl" in empty.body


def test_neurons_and_dkn_over_time_when_present(tmp_path):
    rows = [{"step": s, "neurons.jaccard_final": j, "neurons.n_neurons": n, "neurons.layer_share.L0": 0.7,
             "neurons.layer_share.L1": 0.3, "dkn.found_rate": 0.0, "dkn.mean_all_clusters_drop": 0.6}
            for s, j, n in ((50, 0.1, 20), (150, 0.4, 30), (600, 1.0, 40))]
    (ev,) = _render(_evolve_dir(tmp_path / "n", rows, config={"run": "x", "dkn": {"t_low": 0.05, "t_high": 0.3}}))
    assert "<h3>Knowledge neurons over checkpoints</h3>" in ev.body
    assert "<h3>Degenerate knowledge neurons over checkpoints</h3>" in ev.body
    assert ev.body.count("<figure") == 2  # neurons, dkn (recall: a note, no recall columns)
    assert "No recall or training-evaluation columns" in ev.body


def test_orphan_continual_run_gets_a_note(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(
        {"command": "continual", "status": "running", "config": {"stages": [{"name": "evolve"}]}}))
    (sec,) = _render(tmp_path / "c")
    assert sec.id == "continual-c" and "no evolve stage yet" in sec.body


JACCARD = [{"step": s, "circuit.edge_jaccard_final": j} for s, j in ((0, 0.1), (1, 0.5), (3, 0.8), (10, 0.9),
                                                                     (30, 0.95), (100, 1.0))]


def test_formation_optimization_rule():
    base = {"phase_shift_metric": "circuit.edge_jaccard_final", "phase_shift_step": 3, "phase_shift_slope_before": 0.5,
            "phase_shift_slope_after": 0.05, "phase_shift_improvement": 0.4, "phase_shift_flattens": True}
    assert formation_finding(base, JACCARD, "s", 0).verdict == "reproduced"
    assert formation_finding({**base, "phase_shift_improvement": 0.2}, JACCARD, "s", 0).verdict == "not reproduced"
    steeper = {**base, "phase_shift_slope_after": 0.9, "phase_shift_flattens": False}
    assert formation_finding(steeper, JACCARD, "s", 0).verdict == "not reproduced"
    assert "steeper after" in formation_finding(steeper, JACCARD, "s", 0).measured
    assert formation_finding({"phase_shift_metric": "recall.top1_accuracy"}, [{"step": 0}], "s", 0) is None
    # another --phase-metric: the knee of edge Jaccard is fitted here (fast then flat: reproduced)
    other = formation_finding({"phase_shift_metric": "recall.top1_accuracy"}, JACCARD, "s", 1)
    assert other.verdict == "reproduced" and other.priority == 1
    few = formation_finding({"phase_shift_metric": "circuit.edge_jaccard_final", "phase_shift_step": None},
                            JACCARD[:3], "s", 0)
    assert few.verdict == "inconclusive" and "no knee" in few.measured  # too few checkpoints to fit
    no_knee = formation_finding({"phase_shift_metric": "circuit.edge_jaccard_final", "phase_shift_step": None},
                                JACCARD, "s", 0)
    assert no_knee.verdict == "not reproduced"  # enough checkpoints, and still no knee


def test_deep_to_shallow_rule():
    surf = {f"lens_surface_step.L{l}": s for l, s in enumerate((200, 133, 100, 100))}
    assert deep_finding({**surf, "deep_to_shallow_stat": -0.91, "deep_to_shallow_p": 0.035,
                         "deep_to_shallow_n": 4}, "s", 0).verdict == "reproduced"
    assert deep_finding({**surf, "deep_to_shallow_stat": -0.5, "deep_to_shallow_p": 0.2,
                         "deep_to_shallow_n": 4}, "s", 0).verdict == "not reproduced"
    assert deep_finding({**surf, "deep_to_shallow_stat": 0.9, "deep_to_shallow_p": 0.01,
                         "deep_to_shallow_n": 4}, "s", 0).verdict == "not reproduced"
    two = deep_finding({"lens_surface_step.L0": 300, "lens_surface_step.L1": 400, "deep_to_shallow_stat": 1.0,
                        "deep_to_shallow_p": 1.0, "deep_to_shallow_n": 2}, "s", 0)
    assert two.verdict == "inconclusive" and "L0 300, L1 400" in two.measured
    assert deep_finding({"phase_shift_step": 3}, "s", 0) is None


def test_krel_kcompl_rule():
    n = {"k_rel_half_step": 80, "k_compl_half_step": 120, "k_rel_mean_accuracy": 0.7, "k_compl_mean_accuracy": 0.6}
    assert krel_finding(n, "s").verdict == "reproduced"
    tie = {**n, "k_compl_half_step": 80}
    finer = {**tie, "train_k_rel_half_step": 60, "train_k_compl_half_step": 100}
    assert krel_finding(finer, "s").verdict == "reproduced"  # tied at the checkpoints, earlier in the run's eval
    assert krel_finding({**tie, "train_k_rel_half_step": 100, "train_k_compl_half_step": 100}, "s").verdict == \
        "partly reproduced"  # tied everywhere: only the time-averaged accuracy is higher
    assert krel_finding({**n, "k_rel_half_step": 140}, "s").verdict == "partly reproduced"
    assert krel_finding({**n, "k_rel_half_step": 140, "k_rel_mean_accuracy": 0.5}, "s").verdict == "not reproduced"
    assert krel_finding({}, "s") is None
