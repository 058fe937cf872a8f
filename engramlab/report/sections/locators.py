"""Report sections of the locators: what they share, and ``recall``'s section (``neurons``, ``dkn``
and ``circuit`` have a module each).

Each verb is one section with one subsection per run (id ``anchor(verb, run name)``, which the
findings link to). Everything is drawn from the run's own files, so the page is the same wherever
it is built: the circuit is redrawn from ``scores.safetensors`` (not the run's ``circuit.svg``,
which depends on whether Graphviz was installed). A missing optional file gives a note in place
of its figure; a run that did not complete says so. The per-run body functions take a
:class:`RunView` and also work for a result directory without a manifest (an evolve checkpoint's).

Findings: ``kn_suppression`` (neurons), ``dkn_partial_full`` (dkn) and ``sparse_circuits``
(circuit, priority = the graph's edge count, so the largest model's circuit is the one shown),
each decided by its rule in ``engramlab.report.findings``.
"""

from __future__ import annotations

from engramlab.report.page import Finding, Section, anchor, details, esc, figure, fmt, new_figure, note, para, shown_path, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer

# -- shared ---------------------------------------------------------------------------------------------


def number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def locator_config(run: RunView) -> dict:
    c = run.json("config.json")
    return c if isinstance(c, dict) else {}


def model_name(run: RunView) -> str:
    """The model the run looked at: ``config.json``'s model facts, else the manifest's ``--model``."""
    m = locator_config(run).get("model")
    if isinstance(m, dict) and m.get("model"):
        return shown_path(m["model"])
    if run.config.get("model"):
        return shown_path(run.config["model"])
    return "unknown model"


def n_layers_of(run: RunView) -> int | None:
    m = locator_config(run).get("model")
    return int(m["n_layers"]) if isinstance(m, dict) and isinstance(m.get("n_layers"), int) else None


def records_of(run: RunView, *aliases: str) -> list[dict] | None:
    """``records.jsonl`` (or its name before the contract), None when there is none."""
    for name in ("records.jsonl", *aliases):
        if run.has(name):
            return run.jsonl(name)
    return None


def run_header(run: RunView) -> str:
    facts = run.config.get("facts")
    bits = [f"model {model_name(run)}"] + ([f"facts {shown_path(facts)}"] if facts else [])
    if run.config.get("limit"):
        bits.append(f"limit {run.config['limit']}")
    out = para("Run " + run.name + ": " + ", ".join(bits) + ".")
    status = run.manifest.get("status")
    if run.manifest and status != "complete":
        out += note(f"This run's status is {status or 'unknown'}, not complete: its numbers may be partial.")
    return out


def subsections(verb: str, runs: list[RunView], body) -> tuple[str, list[Finding]]:
    html, found = [], []
    for run in runs:
        sid = anchor(verb, run.name)
        text, findings = body(run, sid)
        html.append(f'<h3 id="{esc(sid)}">{esc(run.name)} ({esc(model_name(run))})</h3>{run_header(run)}{text}')
        found.extend(findings)
    return "".join(html), found


def relation_keys(summary: dict) -> list[str]:
    return sorted({k.split(".")[1] for k in summary if k.startswith("relation.") and k.count(".") >= 2})


def short_name(rel: str, n: int = 24) -> str:
    return rel if len(rel) <= n else rel[:n - 1] + "…"


# -- recall ---------------------------------------------------------------------------------------------


def recall_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    rels = relation_keys(s)
    if not rels and not s:
        return note("No summary.json: the run did not finish, so there are no recall numbers."), []
    rows = [(r, s.get(f"relation.{r}.top1_accuracy"), s.get(f"relation.{r}.top10_accuracy"),
             s.get(f"relation.{r}.exact_match"), s.get(f"relation.{r}.n_facts")) for r in rels]
    rows.append(("all relations", s.get("top1_accuracy"), s.get("top10_accuracy"), s.get("exact_match"),
                 s.get("n_facts")))
    body = table(["relation", "top-1", "top-10", "exact match", "n facts"], rows)
    if rels:
        fig, (ax,) = new_figure(1, 1, 10.0, 3.2)
        x = range(len(rels))
        ax.bar([i - 0.2 for i in x], [number(r[1]) or 0.0 for r in rows[:-1]], 0.4, label="top-1")
        ax.bar([i + 0.2 for i in x], [number(r[2]) or 0.0 for r in rows[:-1]], 0.4, label="top-10", alpha=0.6)
        if number(s.get("top1_accuracy")) is not None:
            ax.axhline(s["top1_accuracy"], color="k", ls="--", lw=0.8, label="top-1, all relations")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{short_name(r)}\n(n={fmt(s.get(f'relation.{r}.n_facts'))})" for r in rels], fontsize=7,
                           rotation=30 if len(rels) > 4 else 0, ha="right" if len(rels) > 4 else "center")
        ax.set_xlim(-0.7, max(len(rels), 6) - 0.3)  # a few relations: bars of a readable width
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of facts")
        ax.set_title(f"recall by relation ({model_name(run)})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        body += figure(fig, "Share of facts whose answer's first token ranks 1 (top-1) or within 10 (top-10), "
                            "per relation; the dashed line is top-1 over all facts.")
    return body, []


def left_out(rows: list[dict], reason: str, what: str = "skipped") -> str:
    """A collapsed table of the facts a run left out (``reason``: the rows' key holding why); ""
    when there are none."""
    if not rows:
        return ""
    return details(f"{len(rows)} fact(s) {what}", table(["relation", "subject", "reason"],
                   [(r.get("relation"), r.get("subject"), r.get(reason)) for r in rows]))


def verb_section(verb: str, title: str, order: int, intro: str, runs: list[RunView], body) -> list[Section]:
    """The one section of a locator verb: ``intro`` (plain text), then a subsection per run."""
    html, found = subsections(verb, runs, body)
    return [Section(verb, title, para(intro) + html, order=order, findings=found)]


@renderer("recall")
def render_recall(runs: list[RunView], report: Report) -> list[Section]:
    return verb_section("recall", "Recall", 90, "How well each model recalls the facts: the rank of the answer's "
                        "first token after the prompt (teacher-forced), and whether greedy decoding reproduces the "
                        "whole answer (exact match).", runs, recall_body)


# -- neurons --------------------------------------------------------------------------------------------
