"""The report section of ``engram freeze`` on a hand-made run directory (summary and per-arm
metrics), and the ``freezing`` rule on hand-made summaries."""

import json

import pytest

from engramlab.report.runs import Report, RunView
from engramlab.report.sections.freeze import render_freeze, verdict


def summary(none, core, random=None, steps=30):
    s = {"train_corpus": "python", "steps": steps}
    for arm, f in (("none", none), ("core", core), ("random", random)):
        if f is None:
            continue
        s[f"{arm}.forgetting"] = f
        s[f"{arm}.train_ppl_ratio"] = 0.5
        s[f"{arm}.frozen_max_change"] = None if arm == "none" else 0.0
        for c in ("de", "python"):
            s[f"{arm}.{c}.ppl_start"], s[f"{arm}.{c}.ppl_end"] = 10.0, 10.0 * (f if c == "de" else 0.5)
    return s


def test_the_rule_compares_the_core_arm_with_nothing_and_random_frozen():
    assert verdict(summary(2.0, 1.1, 1.9))[0] == "reproduced"      # log 1.1 <= 0.75 log 2, and below random
    assert verdict(summary(2.0, 1.1, 1.05))[0] == "partly reproduced"  # a random region did better
    assert verdict(summary(2.0, 1.8, 1.9))[0] == "partly reproduced"   # less, but most of the rise kept
    assert verdict(summary(2.0, 2.2, 1.9))[0] == "not reproduced"
    v, text = verdict(summary(0.87, 0.85, 0.86))
    assert v == "inconclusive" and "no forgetting to reduce" in text
    assert verdict({"none.forgetting": 2.0})[0] == "inconclusive"


def test_the_section_draws_the_curves_and_lists_the_arms(tmp_path):
    run = tmp_path / "freeze"
    run.mkdir()
    s = summary(2.0, 1.1, 1.9)
    (run / "summary.json").write_text(json.dumps(s))
    manifest = {"command": "freeze", "status": "complete", "config": {"model": "m", "regions": "r", "train": "python",
                                                                      "freeze": {"steps": 30, "lr": 2e-4}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    for arm in ("none", "core", "random"):
        (run / arm).mkdir()
        rows = [{"step": t, "ppl.de": 10.0 + t, "ppl.python": 10.0 - t / 10} for t in (0, 5, 10)]
        (run / arm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    view = RunView("freeze", run, manifest, s)
    (section,) = render_freeze([view], Report(tmp_path, [view]))
    assert section.body.count("<figure>") == 1 and "perplexity while training on python" in section.body
    assert "core region frozen" in section.body and "random region frozen" in section.body
    (f,) = section.findings
    assert f.key == "freezing" and f.verdict == "reproduced" and "x1.1 with the core frozen" in f.measured
    (run / "none" / "metrics.jsonl").unlink()
    (run / "core" / "metrics.jsonl").unlink()
    (run / "random" / "metrics.jsonl").unlink()
    (section,) = render_freeze([view], Report(tmp_path, [view]))
    assert "No &lt;arm&gt;/metrics.jsonl" in section.body or "No <arm>/metrics.jsonl" in section.body
