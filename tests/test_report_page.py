"""The page's building blocks: deterministic figures, the findings table, a failing section."""

import json

from engramlab.report import html
from engramlab.report.findings import FINDING_KEYS, FINDINGS
from engramlab.report.page import Finding, Section, figure, fmt, new_figure, series, shown_path, svg_of
from engramlab.report.runs import collect


def _line_figure():
    fig, (ax,) = new_figure(1, 1, 4, 3)
    ax.plot([0, 1, 2], [3, 1, 2], label="x")
    ax.legend()
    return fig


def test_figures_are_the_same_bytes_every_time_and_carry_no_date_or_metadata():
    a, b = svg_of(_line_figure()), svg_of(_line_figure())
    assert a == b and a.startswith("<svg")
    assert "<metadata>" not in a and "dc:date" not in a and "http://purl.org" not in a
    assert ' width="' not in a.split(">", 1)[0]  # scales with the page (viewBox only)
    assert figure(a, "cap").startswith("<figure><svg") and "<figcaption>cap</figcaption>" in figure(a, "cap")


def test_numbers_and_paths_as_the_page_shows_them():
    assert [fmt(None), fmt(3), fmt(2.0), fmt(0.123456), fmt(True)] == ["—", "3", "2", "0.123", "yes"]
    assert shown_path("/scratch/me/study/train") == "study/train"
    assert shown_path("smollm2-135m") == "smollm2-135m" and shown_path("runs/x") == "runs/x"
    rows = [{"step": 0, "a": 1.0, "l": [1, 2]}, {"step": 5, "a": float("nan")}, {"step": 9, "a": 2, "l": [3, 4]}]
    assert series(rows, "a") == ([0, 9], [1.0, 2]) and series(rows, "l", 1) == ([0, 9], [2, 4])


def test_the_best_finding_wins_and_every_row_is_listed():
    sections = [Section("a", "A", "", findings=[Finding("three_phases", "weak", "partly reproduced", "a")]),
                Section("b", "B", "", findings=[Finding("three_phases", "strong", "reproduced", "b", priority=1)])]
    best = html.best_findings(sections)
    assert best["three_phases"].section == "b"
    table = html.findings_table(best)
    assert table.count('<tr id="finding-') == len(FINDINGS) == len(set(FINDING_KEYS))
    assert 'href="#b"' in table and table.count(">not run<") == len(FINDINGS) - 1


def test_a_failing_section_becomes_a_note_and_the_rest_of_the_page_stays(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"command": "boom", "status": "complete", "argv": ["engram", "boom"]}))
    from engramlab.report import sections

    def broken(runs, report):
        raise ValueError("no such column")

    monkeypatch.setitem(sections.RENDERERS, "boom", broken)
    monkeypatch.setattr(sections, "renderers", lambda: sections.RENDERERS)
    monkeypatch.setenv("ENGRAM_REPORT_STRICT", "0")
    page = html.page(collect(run))
    assert "section failed" in page and "ValueError: no such column" in page
    assert '<section id="metadata">' in page and page.count('<tr id="finding-') == len(FINDINGS)
    monkeypatch.setenv("ENGRAM_REPORT_STRICT", "1")
    try:
        html.page(collect(run))
    except ValueError as e:
        assert "no such column" in str(e)
    else:
        raise AssertionError("strict mode let a failing section through")
