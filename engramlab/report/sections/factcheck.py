"""Report section of ``engram factcheck``: the three checkers' precision / recall / F1 on simple and
complex statements, a bar plot of F1, and the ``dkn_factcheck`` finding; ``draw_factcheck`` also
writes the run's ``factcheck.png``.

Read from the run directory: ``summary.json`` (``dkn.f1``, ``complex.kn.precision``...) only.
"""

from __future__ import annotations

from engramlab.report.page import Finding, figure, fmt, is_number, new_figure, note, para, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import verb_section

CHECKERS = ("dkn", "kn", "prompt")
LABELS = {"dkn": "relation DKNs (IG < tau: false)", "kn": "relation knowledge neurons (IG < tau: false)",
          "prompt": 'asking the model ("true or false?")'}
FORMS = (("simple", ""), ("complex", "complex."))
MIN_JUDGED = 8  # below this many judged test claims, an F1 says little


def f1_figure(s: dict):
    """Bars of F1 per checker (groups) and statement form (bars); an abstaining checker has none."""
    fig, (ax,) = new_figure(1, 1, 5.6, 2.8)
    width = 0.38
    for j, (form, prefix) in enumerate(FORMS):
        values = [s.get(f"{prefix}{c}.f1") for c in CHECKERS]
        xs = [k + (j - 0.5) * width for k in range(len(CHECKERS))]
        ax.bar(xs, [v if is_number(v) else 0.0 for v in values], width, label=form,
               color=("#4c72b0", "#dd8452")[j])
        for x, v, c in zip(xs, values, CHECKERS):
            if not is_number(v):
                ax.text(x, 0.02, "abstains" if s.get(f"{prefix}{c}.abstain") else "n/a", rotation=90, ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(CHECKERS)), ["DKN", "KN", "prompt"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (test split)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("fact-checking: F1 with true claims positive", fontsize=9)
    fig.tight_layout()
    return fig


def draw_factcheck(summary: dict, path) -> None:
    """Write ``path`` (PNG): ``f1_figure`` of a factcheck summary, atomically."""
    import io

    from engramlab.report.page import _matplotlib
    from engramlab.runs import atomic_write_bytes

    fig = f1_figure(summary)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _matplotlib().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _f1(s: dict, key: str) -> float:
    v = s.get(key)
    return float(v) if is_number(v) else 0.0


def verdict(s: dict) -> tuple[str, str]:
    """(verdict, measured text) of the ``dkn_factcheck`` rule on a factcheck summary."""
    forms = [(form, prefix) for form, prefix in FORMS if f"{prefix}dkn.f1" in s]
    text = "; ".join(f"{form}: F1 DKN {fmt(s.get(f'{p}dkn.f1'))}, KN {fmt(s.get(f'{p}kn.f1'))}, prompt "
                     f"{fmt(s.get(f'{p}prompt.f1'))}" for form, p in forms)
    text += f" (DKN found rate {fmt(s.get('dkn_found_rate'))} on the training facts)"
    if s.get("dkn.abstain"):
        return "inconclusive", f"the DKN checker abstained ({s['dkn.abstain']}); {text}"
    if (s.get("dkn.n_claims") or 0) < MIN_JUDGED:
        return "inconclusive", f"the DKN checker judged only {s.get('dkn.n_claims') or 0} test claims; {text}"
    beats = [[_f1(s, f"{p}dkn.f1") > _f1(s, f"{p}{other}.f1") for other in ("kn", "prompt")] for _, p in forms]
    if all(all(b) for b in beats):
        return "reproduced", text
    if any(any(b) for b in beats):
        return "partly reproduced", text
    return "not reproduced", text


def factcheck_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    if not s:
        return note("No summary.json: the run did not finish."), []
    v, text = verdict(s)
    body = para(f"Finding dkn_factcheck: {v} ({text}).")
    rows = []
    for c in CHECKERS:
        for form, p in FORMS:
            if f"{p}{c}.f1" in s:
                rows.append((LABELS[c], form, s.get(f"{p}{c}.precision"), s.get(f"{p}{c}.recall"), s.get(f"{p}{c}.f1"),
                             s.get(f"{p}{c}.train_f1"), s.get(f"{p}{c}.n_claims"), s.get(f"{p}{c}.n_abstained"),
                             s.get(f"{p}{c}.threshold")))
    body += table(["checker", "statements", "precision", "recall", "F1", "train F1", "judged", "abstained", "tau"],
                  rows)
    body += figure(f1_figure(s), "F1 on the test split's claims (true claims positive) of each checker, on the "
                                 "facts' own prompts (simple) and inside distractor clauses (complex).")
    for c in ("dkn", "kn"):
        if s.get(f"{c}.abstain"):
            body += note(s[f"{c}.abstain"] + ".")
        elif s.get(f"{c}.relations_without_neurons"):
            body += note(f"{c}: no relation-level neurons for {s[f'{c}.relations_without_neurons']}; their claims "
                         "are not judged.")
    if s.get("n_skipped_relations"):
        body += note(f"Skipped relations: {s.get('skipped_relations')} (the reasons are in records.jsonl).")
    body += table(["facts checked", "train / test facts", "test claims", "DKN found rate", "relation DKN neurons",
                   "relation KN neurons", "seconds"],
                  [(s.get("n_checked_facts"), f"{s.get('n_train_facts')} / {s.get('n_test_facts')}",
                    s.get("n_test_claims"), s.get("dkn_found_rate"), s.get("n_relation_dkn"), s.get("n_relation_kn"),
                    s.get("seconds"))])
    # Of several runs, the one whose DKN checker judged the most claims speaks for the finding (a run
    # where it abstains only when no run has DKNs), then the one with the most test claims.
    judged = 0 if s.get("dkn.abstain") else int(s.get("dkn.n_claims") or 0)
    return body, [Finding("dkn_factcheck", text, v, sid, priority=judged * 100_000 + int(s.get("n_test_claims") or 0))]


@renderer("factcheck")
def render_factcheck(runs: list[RunView], report: Report):
    return verb_section("factcheck", "Fact-checking with DKNs", 87,
                        "Fact-checking (AMIG; Chen et al. 2024): each fact gives a true claim and a false one (another "
                        "object of its relation). The DKN and KN checkers judge a claim false when the mean "
                        "integrated-gradients attribution of the relation's degenerate (or knowledge) neurons, with "
                        "the claimed object as the target, is below tau (fitted on the training facts' claims); the "
                        "prompt checker asks the model whether the statement is true. The paper reports that DKNs "
                        "check facts better than knowledge neurons and prompting, also on complex statements.",
                        runs, factcheck_body)


__all__ = ["draw_factcheck", "f1_figure", "render_factcheck", "verdict"]
