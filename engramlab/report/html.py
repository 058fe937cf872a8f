"""``report.html``: one self-contained page from any run directory (a study, or one verb's run).

``build_report(dir)`` collects the runs (``report.runs.collect``), asks each kind's renderer
(``report.sections``) for its sections, puts the findings table (``report.findings``) on top and
the runs' metadata at the end. The page needs no network and no JavaScript to be read: figures are
inline SVG, tables are HTML; a few lines of script add sortable tables and the checkpoint slider.
The same run directories give the same bytes (no clock is read; figures are deterministic SVG), so
``engram report DIR`` rebuilds a study's page exactly.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from engramlab.report.findings import FINDINGS
from engramlab.report.page import Finding, Section, anchor, esc, note, para, table
from engramlab.report.runs import Report, RunView, collect

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:0 1.2em 4em;color:#1d1d1f}
h1{font-size:1.6em;margin:1em 0 .2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:1.4em 0 .3em}a{color:#0b5cad}code,pre{font:13px ui-monospace,Menlo,Consolas,monospace}
pre{white-space:pre-wrap;background:#f5f5f7;padding:.5em .7em;border-radius:4px}
table{border-collapse:collapse;margin:.6em 0;font-size:13.5px}th,td{border:1px solid #ddd;padding:.25em .55em;vertical-align:top;text-align:left}
th{background:#f5f5f7}table.sortable th{cursor:pointer}td[data-v]{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure svg,figure img{max-width:100%;height:auto;display:block}figcaption{font-size:13px;color:#555;margin-top:.3em}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:.4em .7em}
.verdict{font-weight:600}.v-reproduced{color:#12733a}.v-partly-reproduced{color:#8a6d00}
.v-not-reproduced{color:#b3261e}.v-inconclusive{color:#6b5b00}.v-not-run{color:#777}
#findings{width:100%;table-layout:fixed}#findings th:nth-child(1){width:17%}#findings th:nth-child(2){width:34%}#findings th:nth-child(3){width:34%}#findings th:nth-child(4){width:9.5%}#findings th:nth-child(5){width:5.5%}#findings td:nth-child(2){font-size:12.5px;color:#444}nav.toc{columns:2;font-size:14px}nav.toc a{display:block}
.slider .frame-label{font-weight:600;margin:.8em 0 .2em}.slider input{width:60%}
details>summary{cursor:pointer;color:#0b5cad}.meta td{font-size:12.5px}
"""

# Conveniences only: the page reads the same without them.
SCRIPT = """
(function(){
function key(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''&&!isNaN(+v))return +v;return td.textContent.trim().toLowerCase();}
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.title='sort';th.addEventListener('click',function(){
  var b=t.tBodies[0],rows=Array.prototype.slice.call(b.rows),d=th.getAttribute('data-d')==='1'?-1:1;
  rows.sort(function(x,y){var a=key(x.cells[i]),c=key(y.cells[i]);
   if(typeof a!==typeof c){a=String(a);c=String(c);}return a<c?-d:a>c?d:0;});
  th.setAttribute('data-d',d===1?'1':'0');rows.forEach(function(r){b.appendChild(r);});});});});
document.querySelectorAll('.slider').forEach(function(s){
 var frames=s.querySelectorAll('.frame');if(frames.length<2)return;
 var bar=document.createElement('p'),inp=document.createElement('input'),lab=document.createElement('span');
 inp.type='range';inp.min=0;inp.max=frames.length-1;inp.value=frames.length-1;
 function show(){frames.forEach(function(f,i){f.style.display=(i==inp.value)?'':'none';});
  lab.textContent=' '+(s.getAttribute('data-label')||'')+': '+frames[inp.value].getAttribute('data-label');}
 inp.addEventListener('input',show);bar.appendChild(inp);bar.appendChild(lab);s.insertBefore(bar,frames[0]);
 s.querySelectorAll('.frame-label').forEach(function(l){l.style.display='none';});show();});
})();
"""


def _strict() -> bool:
    return os.environ.get("ENGRAM_REPORT_STRICT", "") not in ("", "0")


def render_sections(report: Report) -> list[Section]:
    """Every renderer's sections, sorted by ``order`` (then by the order runs were collected)."""
    from engramlab.report.sections import renderers

    table_ = renderers()
    sections: list[Section] = []
    seen: set[str] = set()
    for run in report.runs:
        fn = table_.get(run.command)
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds = [c for c, f in table_.items() if f is fn]
        runs = report.of(*kinds)
        try:
            sections.extend(fn(runs, report))
        except Exception as e:  # one broken section must not cost the whole page
            if _strict():
                raise
            print(f"warning: report section for {run.command} failed: {e}", file=sys.stderr)
            sections.append(Section(anchor(run.command, "failed"), f"{run.command} (section failed)",
                                    note(f"This section could not be drawn: {type(e).__name__}: {e}") +
                                    f"<pre>{esc(traceback.format_exc(limit=3))}</pre>", order=900))
    ids = set()
    for s in sections:  # ids are links; a clash would send a reader to the wrong evidence
        while s.id in ids:
            s.id += "-2"
        ids.add(s.id)
    return sorted(sections, key=lambda s: s.order)


def best_findings(sections: list[Section]) -> dict[str, Finding]:
    out: dict[str, Finding] = {}
    for s in sections:
        for f in s.findings:
            if f.key not in out or f.priority > out[f.key].priority:
                out[f.key] = f
    return out


def findings_table(found: dict[str, Finding]) -> str:
    rows = []
    for spec in FINDINGS:
        f = found.get(spec.key)
        verdict = f.verdict if f else "not run"
        measured = esc(f.measured) if f else "no run of this study measures it"
        evidence = f'<a href="#{esc(f.section)}">evidence</a>' if f else ""
        rows.append(f'<tr id="finding-{esc(spec.key)}"><td><b>{esc(spec.title)}</b><br><small>{esc(spec.paper)}</small></td>'
                    f"<td>{esc(spec.claim)}</td><td>{measured}</td>"
                    f'<td class="verdict v-{anchor(verdict)}" title="{esc(spec.rule)}">{esc(verdict)}</td>'
                    f"<td>{evidence}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("finding", "the paper's claim", "measured here", "verdict", ""))
    return (f'<table id="findings"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<details><summary>how each verdict is decided</summary><ul>'
            + "".join(f"<li><b>{esc(s.title)}</b>: {esc(s.rule)}</li>" for s in FINDINGS) + "</ul></details>")


def _wall(run: RunView) -> str:
    from engramlab.runs import wall_seconds

    secs = wall_seconds(run.manifest)
    if secs is None:
        return "—"
    secs = int(secs)
    return f"{secs // 60}m{secs % 60:02d}s"


def metadata_section(report: Report) -> Section:
    rows = []
    # a study's own manifest is still "running" while it writes the page: only its stages are listed,
    # so the page the study writes and the one `engram report` rebuilds are the same
    runs = [r for r in report.runs if r.command != "study"]
    for run in runs:
        argv = run.manifest.get("argv") or []
        cmd = "engram " + " ".join(str(a) for a in argv[1:]) if argv else run.command
        for prefix in sorted({str(report.root.resolve()), str(report.root)}, key=len, reverse=True):
            cmd = cmd.replace(prefix, "{root}")  # the study file's notation: the page does not depend on where DIR is
        rows.append((run.name, run.command, run.manifest.get("status", "—"), run.manifest.get("seed", "—"),
                     run.manifest.get("start_time", "—"), run.manifest.get("end_time", "—"), _wall(run), cmd))
    versions: dict[str, set] = {}
    for run in runs:
        for k, v in (run.manifest.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    vrows = [(k, ", ".join(sorted(v))) for k, v in sorted(versions.items())]
    body = (para("Commands as each run recorded them; {root} is this report's directory.")
            + table(["run", "verb", "status", "seed", "started", "ended", "wall", "command"], rows)
            + _doctor_tables(runs) + "<h3>Versions</h3>" + table(["package", "version"], vrows, sortable=False))
    return Section("metadata", "Runs and versions", f'<div class="meta">{body}</div>', order=1000)


def _doctor_tables(runs: list[RunView]) -> str:
    """The adapter checks of each ``engram doctor`` run (its checks.json), or nothing."""
    rows = [(run.name, c.get("name", "—"), "pass" if c.get("passed") else "FAIL", c.get("detail", ""))
            for run in runs if run.command == "doctor" for c in run.json("checks.json", [])]
    return ("<h3>Adapter checks (engram doctor)</h3>" + table(["run", "check", "result", "measured"], rows)
            if rows else "")


def _title(report: Report) -> tuple[str, str]:
    top = report.runs[-1]
    if top.command == "study":
        preset = top.config.get("preset", "")
        return f"engramlab study ({preset})", str(top.config.get("description", ""))
    return f"engram {top.command}: {report.root.name}", ""


def build_report(directory: str | Path) -> str:
    """The page for the runs under ``directory`` (see the module docstring)."""
    return page(collect(directory))


def page(report: Report, sections: list[Section] | None = None) -> str:
    """The page for ``report``'s runs; ``sections`` when they were already rendered."""
    sections = (render_sections(report) if sections is None else list(sections)) + [metadata_section(report)]
    found = best_findings(sections)
    title, description = _title(report)
    toc = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    n_rep = sum(1 for f in found.values() if f.verdict == "reproduced")
    intro = (f"<p>{esc(description)}</p>" if description else "") + (
        f"<p>{len(report.runs)} run(s). Of {len(FINDINGS)} findings, {len(found)} were measured here and "
        f"{n_rep} reproduced. Hover a verdict for its rule.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1>{intro}"
            f'<section id="findings-section"><h2>Findings</h2>{findings_table(found)}</section>'
            f'<nav class="toc"><h2>Contents</h2>{toc}</nav>{body}'
            f"<script>{SCRIPT}</script></body></html>\n")


def write_report(directory: str | Path, out: str | Path | None = None, *, report: Report | None = None,
                 sections: list[Section] | None = None) -> Path:
    """Write ``report.html`` (atomically) into ``directory`` or to ``out``; returns its path.
    ``report`` / ``sections``: already collected runs / rendered sections, to reuse."""
    from engramlab.runs import atomic_write_text

    path = Path(out) if out else Path(directory) / "report.html"
    atomic_write_text(path, page(report or collect(directory), sections))
    return path


__all__ = ["best_findings", "build_report", "findings_table", "metadata_section", "page", "render_sections",
           "write_report"]
