"""Report sections of train and sweep runs: classification, figures, notes, verdict rules, determinism."""

import json
import re
import shutil

import pytest

from engramlab.cli import app
from engramlab.report.html import build_report
from engramlab.report.runs import Report, RunView, collect
from engramlab.report.sections import training as T

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--batch-size", "8", "--eval-people", "6", "--eval-templates", "1", "--lr", "3e-3", "--checkpoints", "none"]
STAGES = ["world-a", "world-b", "base", "ft", "ft-replay", "twin", "sweep"]


def engram(*args):
    app(args=[str(a) for a in args], standalone_mode=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    """A from-scratch run, two fine-tuning runs of it (plain, replay), a patched twin and a sweep,
    gathered as the stages of one study directory (all tiny: 40 people, at most 12 steps)."""
    root = tmp_path_factory.mktemp("train-report")
    engram("world", "--preset", "tiny", "--n-people", "40", "--n-heldout", "10", "--out", root / "world-a")
    engram("world", "--preset", "tiny", "--n-people", "40", "--n-heldout", "10", "--seed", "1",
           "--disjoint-from", root / "world-a", "--out", root / "world-b")
    engram("train", "--world", root / "world-a", "--out", root / "base", "--steps", "12", "--eval-every", "4", *SMALL)
    for name, extra in (("ft", []), ("ft-replay", ["--sampler", "replay:weight=0.5"])):
        engram("train", "--world", root / "world-b", "--init", root / "base", "--out", root / name, "--steps", "4",
               "--eval-every", "2", *extra, *SMALL)
    engram("train", "--world", root / "world-a", "--out", root / "twin", "--steps", "4", "--eval-every", "2",
           "--patch-attention-from", f"{root / 'base'}:12", *SMALL)
    engram("sweep", "--out", root / "sweep", "--grid", "n_people=20,30", "--grid", "sampler=uniform|powerlaw:alpha=0.7",
           "--steps", "2", "--eval-every", "2", *SMALL)
    (root / "manifest.json").write_text(json.dumps({"command": "study", "status": "complete", "config": {
        "preset": "test", "stages": [{"name": n} for n in STAGES]}}))
    return root


def sections_of(directory):
    report = collect(directory)
    return T.render(report.of("train", "sweep"), report), report


def by_id(sections):
    return {s.id: s for s in sections}


def n_figures(html):
    return html.count("<figure")


def test_each_kind_of_run_gets_its_section(study):
    secs, _ = sections_of(study)
    ids = by_id(secs)
    assert set(ids) == {"train-base", "finetune-base", "patched-twin", "sweep-sweep"}
    assert [ids[i].order for i in ("train-base", "sweep-sweep", "patched-twin", "finetune-base")] == [10, 20, 25, 30]
    base = ids["train-base"].body
    assert n_figures(base) == 3  # learning curves, hallucination, attention
    assert "Hallucination" in base and "Attention" in base and "plateau end step" in base
    # both fine-tuning runs in one section, plain and replay told apart
    ft = ids["finetune-base"].body
    assert "ft-replay" in ft and "replay:weight=0.5" in ft and n_figures(ft) == 1
    # the twin found its source through RUN:STEP
    twin = ids["patched-twin"].body
    assert "source: base" in twin and "not in this report" not in twin
    sweep = ids["sweep-sweep"].body
    assert n_figures(sweep) == 2 and "the plateau end of each sampler" in sweep and "against the number of people" in sweep
    assert "No run of this sweep reached its plateau end" in sweep  # 2 steps: no plateau ends, and it says so
    keys = {f.key: f for s in secs for f in s.findings}
    assert set(keys) == {"three_phases", "hallucination", "finetune_collapse", "attention_patching",
                         "plateau_scaling", "imbalance_warmup"}
    # 12 steps never leave the plateau: said plainly, not hidden
    assert keys["three_phases"].verdict == "not reproduced"
    assert all(f.section in ids for f in keys.values())


def test_one_run_alone_still_finds_its_parent_and_source(study):
    secs, _ = sections_of(study / "ft")
    assert [s.id for s in secs] == ["finetune-base"] and "ft-replay" not in secs[0].body
    assert secs[0].findings[0].verdict in ("partly reproduced", "not reproduced")  # no replay run alone
    secs, _ = sections_of(study / "twin")
    assert [s.id for s in secs] == ["patched-twin"] and "source: base" in secs[0].body


def test_missing_files_give_notes_not_crashes(study, tmp_path):
    run = tmp_path / "base"
    shutil.copytree(study / "base", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in [k for k in r if k.startswith(("heldout.", "eval.attn."))]:
            del r[k]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    (run / "summary.json").unlink()
    body = sections_of(run)[0][0].body
    assert "No held-out" in body and "No attention statistics" in body and "interrupted" in body
    assert n_figures(body) == 1
    # the summary is recomputed from the metrics: the plateau numbers are still there
    assert "plateau start step" in body
    (run / "metrics.jsonl").unlink()
    secs = sections_of(run)[0]
    assert "no metrics.jsonl" in secs[0].body and n_figures(secs[0].body) == 0
    assert secs[0].findings[0].verdict == "inconclusive"
    sweep = tmp_path / "sweep"
    shutil.copytree(study / "sweep", sweep)
    shutil.rmtree(sweep / "runs" / "n_people-20_sampler-uniform")
    body = sections_of(sweep)[0][0].body
    assert "No loss curve for: runs/n_people-20_sampler-uniform" in body
    (sweep / "sweep.jsonl").unlink()
    body = sections_of(sweep)[0][0].body
    assert "no sweep.jsonl" in body and n_figures(body) == 0


def test_page_is_deterministic(study):
    a, b = build_report(study), build_report(study)
    assert a == b
    assert re.search(r'id="finding-three_phases".*?href="#train-base"', a, re.S)


def test_continual_world_is_not_a_finetuning_pair(tmp_path):
    world = tmp_path / "world-b"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"config": {"kind": "continual"}}))
    cont = RunView("train-b", tmp_path / "train-b", {"command": "train", "config": {
        "init": str(tmp_path / "train-a"), "world": str(world)}}, {})
    bio = RunView("ft", tmp_path / "ft", {"command": "train", "config": {"init": str(tmp_path / "train-a"),
                                                                          "world": str(tmp_path / "nowhere")}}, {})
    parent = RunView("train-a", tmp_path / "train-a", {"command": "train", "config": {}}, {})
    report = Report(tmp_path, [parent, cont, bio])
    assert [T.classify(r, report) for r in (parent, cont, bio)] == ["scratch", "continued", "finetune"]
    secs = T.render([parent, cont], report)
    assert [s.id for s in secs] == ["train-train-a", "train-train-b"]
    assert secs[1].findings == [] and "not a fine-tuning pair" in secs[1].body
    assert T.split_spec("/runs/base:2000") == "/runs/base" and T.split_spec("/runs/base") == "/runs/base"


# ------------------------------------------------------------ verdict rules on hand-made numbers


def test_three_phases_rule():
    good = {"plateau_start_step": 100, "plateau_end_step": 400, "final_attr_acc": 0.9}
    assert T.three_phases(good, 4, "s").verdict == "reproduced"
    assert T.three_phases(good, 3, "s").verdict == "partly reproduced"
    assert T.three_phases({**good, "final_attr_acc": 0.4}, 6, "s").verdict == "partly reproduced"
    assert T.three_phases({**good, "plateau_end_step": None}, 6, "s").verdict == "not reproduced"
    assert T.three_phases({}, 0, "s").verdict == "inconclusive"


def test_near_baseline_counts_only_evaluations_before_the_plateau_end():
    rows = [{"step": s, "eval.attr_loss": v} for s, v in ((0, 15.0), (50, 5.4), (100, 5.0), (150, 4.6), (200, 4.3),
                                                           (250, 4.2), (300, 4.9))]
    assert T.near_baseline(rows, 5.0, 250) == [50, 100, 150]  # band 4.5-5.5; 4.3 is below it, 300 after the end
    assert T.near_baseline(rows, 5.0, 150) == [50, 100]
    assert T.near_baseline(rows, None, 150) == []


def test_hallucination_rule():
    s = {"plateau_start_step": 100, "heldout_rise_step": 250, "heldout_loss_final": 11.5}
    assert T.hallucination(s, 4.7, "s").verdict == "reproduced"
    assert T.hallucination({**s, "heldout_rise_step": None}, 4.7, "s").verdict == "not reproduced"
    assert T.hallucination({**s, "heldout_loss_final": 4.6}, 4.7, "s").verdict == "not reproduced"
    assert T.hallucination({**s, "heldout_rise_step": 50}, 4.7, "s").verdict == "not reproduced"
    assert T.hallucination({"plateau_start_step": 100}, 4.7, "s").verdict == "inconclusive"


def test_finetune_collapse_rule():
    plain = [("ft", {"initial": 0.96, "min": 0.07, "final": 0.10})]
    assert T.finetune_collapse(plain, [("rp", {"initial": 0.96, "min": 0.26, "final": 0.74})], "s").verdict == \
        "reproduced"
    assert T.finetune_collapse(plain, [("rp", {"initial": 0.96, "min": 0.1, "final": 0.15})], "s").verdict == \
        "partly reproduced"
    assert T.finetune_collapse(plain, [], "s").verdict == "partly reproduced"
    kept = [("ft", {"initial": 0.96, "min": 0.6, "final": 0.7})]
    assert T.finetune_collapse(kept, [], "s").verdict == "not reproduced"
    assert T.finetune_collapse([], [("rp", {"initial": 0.9, "min": 0.2, "final": 0.7})], "s").verdict == "inconclusive"


def test_attention_patching_rule():
    assert T.attention_patching(175, 400, "s").verdict == "reproduced"
    assert T.attention_patching(400, 400, "s").verdict == "not reproduced"
    assert T.attention_patching(None, 400, "s").verdict == "not reproduced"
    assert T.attention_patching(175, None, "s").verdict == "inconclusive"


def test_plateau_scaling_rule():
    pts = [[250, 125], [500, 175], [1000, 375]]
    fit = {"all": {"a": 0.38, "b": 1.01, "r2": 0.98, "n": 3, "points": pts}}
    assert T.scaling_finding(fit, 3, "s").verdict == "reproduced"
    assert T.scaling_finding({"all": {**fit["all"], "b": 0.2}}, 3, "s").verdict == "not reproduced"
    assert T.scaling_finding({"all": {**fit["all"], "r2": 0.5}}, 3, "s").verdict == "not reproduced"
    two = {"all": {"a": 0.38, "b": 1.0, "r2": 1.0, "n": 2, "points": pts[:2]}}
    assert T.scaling_finding(two, 2, "s").verdict == "not reproduced"
    assert T.scaling_finding(fit, 1, "s") is None  # a sweep at one N does not measure scaling
    grouped = {"sampler=powerlaw": {**fit["all"], "b": 0.1}, "sampler=uniform": fit["all"]}
    assert T.scaling_finding(grouped, 3, "s").verdict == "reproduced"  # the uniform group is the one judged


def test_imbalance_warmup_rule():
    keys = ["n_people", "sampler"]

    def row(n, sampler, end, dist=None):
        r = {"n_people": n, "sampler": sampler, "summary.plateau_end_step": end}
        if dist is not None:
            r["summary.plateau_end_step_train_dist"] = dist
        return r

    uni = [row(2000, "uniform", 850)]
    # the training-distribution plateau end is the one compared when measured
    both = uni + [row(2000, "powerlaw:alpha=0.7", 900, 125), row(2000, "warmup:size=250,epochs=40", 675)]
    assert T.imbalance_finding(both, keys, "s").verdict == "reproduced"
    some = uni + [row(2000, "powerlaw:alpha=0.7", 800, 900), row(2000, "warmup:size=250,epochs=40", 675)]
    assert T.imbalance_finding(some, keys, "s").verdict == "partly reproduced"
    none_ = uni + [row(2000, "warmup:size=250,epochs=40", None)]
    assert T.imbalance_finding(none_, keys, "s").verdict == "not reproduced"
    other_n = uni + [row(4000, "warmup:size=250,epochs=40", 100)]
    assert T.imbalance_finding(other_n, keys, "s").verdict == "inconclusive"
    assert T.imbalance_finding(uni, ["n_people"], "s") is None


def test_thin_keeps_ends_and_bounds_points():
    rows = [{"step": i} for i in range(5000)]
    kept = T.thin(rows, 400)
    assert len(kept) == 400 and kept[0]["step"] == 0 and kept[-1]["step"] == 4999
    assert T.thin(rows[:10], 400) == rows[:10]
