"""Report section of ``engram neurons``: layer histograms, interventions against controls, shared neurons;
the ``kn_suppression`` finding."""

from __future__ import annotations

from engramlab.locate.neurons.config import COMPLETENESS_TOLERANCE  # standard library only: no torch
from engramlab.report.page import Finding, Section, figure, fmt, kv_table, new_figure, note, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import left_out, verb_section, n_layers_of, number, records_of, short_name, model_name


_METHOD_WORDS = {"ig": "integrated gradients, every layer",
                 "static": "static score (direct log-probability contribution, one forward)",
                 "screen": "screen: static score picks layers, integrated gradients verifies them"}

KINDS = (("own", "own neurons"), ("same_relation", "same-relation control"),
         ("other_relation", "other-relation control"), ("random", "random neurons"))
KIND_COLOURS = {"own": "#1f77b4", "same_relation": "#ff7f0e", "other_relation": "#2ca02c", "random": "#7f7f7f"}


def kn_verdict(own, other, random) -> tuple[str, str]:
    """The ``kn_suppression`` rule on the mean drops; (verdict, what was compared)."""
    own, other, random = number(own), number(other), number(random)
    if own is None:
        return "inconclusive", "no fact had its neurons suppressed"
    words = f"own drop {fmt(own)}, other-relation {fmt(other)}, random {fmt(random)}"
    if other is not None and random is not None:
        if own >= 0.3 and own >= 2 * other and own >= random + 0.2:
            return "reproduced", words
        return ("partly reproduced" if own > other and own > random else "not reproduced"), words
    # A control was not measured (one relation only: no other relation): the full rule cannot hold.
    measured = [c for c in (other, random) if c is not None]
    missing = "other-relation" if other is None else "random-neuron"
    words += f" ({missing} control not measured"
    words += ", one relation only)" if other is None else ")"
    if measured and all(own > c for c in measured):
        return "partly reproduced", words
    return ("not reproduced" if measured else "inconclusive"), words


def _effect_means(records: list[dict]) -> dict:
    out = {}
    for kind, _ in KINDS:
        drops = [-e["suppress"][kind] for e in records if e["suppress"].get(kind) is not None]
        ups = [e["enhance"][kind] for e in records if e["enhance"].get(kind) is not None]
        out[f"mean_{kind}_drop"] = sum(drops) / len(drops) if drops else None
        out[f"mean_{kind}_enhance"] = sum(ups) / len(ups) if ups else None
    return out


def _layer_histogram(done: list[dict], n_layers: int, title: str):
    fig, (ax,) = new_figure(1, 1, 9.0, 3.2)
    bottom = [0] * n_layers
    for rel in sorted({r["relation"] for r in done}):
        counts = [0] * n_layers
        for r in done:
            if r["relation"] == rel:
                for n in r["neurons"]:
                    if 0 <= int(n[0]) < n_layers:
                        counts[int(n[0])] += 1
        ax.bar(range(n_layers), counts, bottom=bottom, label=short_name(rel, 28))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel("knowledge neurons")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.legend(fontsize=7, title="relation", title_fontsize=7)
    fig.tight_layout()
    return fig


def _intervention_bars(groups: list[tuple[str, int, dict]], title: str):
    from matplotlib.patches import Patch

    fig, axes = new_figure(2, 1, 11.0, 3.4)
    width = 0.8 / len(KINDS)
    for ax, what, label in ((axes[0], "drop", "drop of P(answer) when suppressed\n(1 = to zero)"),
                            (axes[1], "enhance", "relative rise of P(answer)\nwhen doubled")):
        for k, (kind, name) in enumerate(KINDS):
            xs = [i + (k - 1.5) * width for i in range(len(groups))]
            vals = [number(m.get(f"mean_{kind}_{what}")) for _, _, m in groups]
            ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width, label=name,
                   color=KIND_COLOURS[kind])
            for x, v in zip(xs, vals):
                if v is None:
                    ax.text(x, 0, "n/a", fontsize=6, ha="center", va="bottom", rotation=90)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlim(-0.6, max(len(groups), 2) - 0.4)
        ax.set_xticks(list(range(len(groups))))
        ax.set_xticklabels([f"{short_name(g, 40 if len(groups) <= 3 else 24)}\n(n={n})" for g, n, _ in groups], fontsize=7)
        ax.set_ylabel(label, fontsize=8)
    if number(groups[-1][2].get("mean_own_drop")) is not None:
        axes[0].axhline(0.3, color="grey", ls=":", lw=0.8)
    axes[0].set_title("suppress (dotted: the 0.3 of the rule)", fontsize=9)
    axes[1].set_title("enhance", fontsize=9)
    axes[1].legend(handles=[Patch(color=KIND_COLOURS[k], label=name) for k, name in KINDS], fontsize=7,
                   loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _shared_neurons(run: RunView, done: list[dict], limit: int = 15) -> str:
    holders: dict[tuple[int, int], list[str]] = {}
    for r in done:
        for n in {(int(n[0]), int(n[1])) for n in r["neurons"]}:
            holders.setdefault(n, []).append(r["relation"])
    if not holders:
        return note("No fact kept any knowledge neuron.")
    rel_file = run.json("relation_neurons.json")
    of_rel: dict[tuple[int, int], list[str]] = {}
    for rel, ns in sorted((rel_file or {}).items()):
        for n in ns:
            of_rel.setdefault((int(n[0]), int(n[1])), []).append(rel)
    top = sorted(holders.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]
    rows = [(f"L{l}.{i}", l, len(facts), ", ".join(sorted(set(facts))),
             ", ".join(of_rel.get((l, i), [])) if rel_file is not None else "—") for (l, i), facts in top]
    out = table(["neuron", "layer", "facts holding it", "their relations", "relation neuron of"], rows)
    if rel_file is None:
        out += note("relation_neurons.json is missing: the relation-neuron column is not known.")
    return out


def neurons_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    records = records_of(run, "neurons.jsonl")
    if records is None:
        return note("No records.jsonl: no neurons to show."), []
    done = [r for r in records if r.get("skipped") is None]
    with_effects = [r for r in done if r.get("effects")]
    n_layers = n_layers_of(run) or 1 + max((int(n[0]) for r in done for n in r["neurons"]), default=0)
    config = getattr(run, "config", None) or {}
    method = s.get("method") or config.get("method") or "ig"
    errors = [r["completeness_error"] for r in done if r.get("completeness_error") is not None]
    error = s.get("mean_completeness_error", sum(errors) / len(errors) if errors else None)
    body = kv_table([("facts attributed / all", f"{len(done)} / {len(records)}"),
                     ("attribution method", _METHOD_WORDS.get(method, method)),
                     ("mean IG completeness error", "— (no integral: static score)" if method == "static" else error),
                     ("forward/backward passes per fact", s.get("mean_passes_per_fact")),
                     ("mean neurons per fact", s.get("mean_neurons_per_fact")),
                     ("facts without neurons", s.get("n_without_neurons")),
                     ("mean paraphrase consistency (Jaccard)", s.get("mean_consistency")),
                     ("relation neurons", s.get("n_relation_neurons"))])
    tolerance = number((config.get("neurons") or {}).get("completeness_tolerance")) or COMPLETENESS_TOLERANCE
    if number(error) is not None and number(error) > tolerance:
        body += note(f"The IG scores miss the sum rule by {fmt(number(error))} of the change of the objective on average "
                     f"(tolerance {tolerance:g}): more integration steps, or the gauss-legendre rule, "
                     "would make them add up.")
    if any(r["neurons"] for r in done):
        body += figure(_layer_histogram(done, n_layers, f"refined knowledge neurons per layer ({model_name(run)})"),
                       "Where the facts' refined knowledge neurons sit, stacked by relation.")
    else:
        body += note("No refined knowledge neurons: nothing to place on layers.")
    findings = []
    if with_effects:
        groups = []
        for rel in sorted({r["relation"] for r in with_effects}):
            mine = [r["effects"] for r in with_effects if r["relation"] == rel]
            groups.append((rel, len(mine), _effect_means(mine)))
        overall = _effect_means([r["effects"] for r in with_effects])
        for key in overall:  # the run's own means when recorded (the same numbers, fewer roundings)
            if number(s.get(key)) is not None:
                overall[key] = s[key]
        if len(groups) == 1:  # one relation: it is the whole run
            groups = [(f"{groups[0][0]} (all facts)", len(with_effects), overall)]
        else:
            groups.append(("all relations", len(with_effects), overall))
        body += figure(_intervention_bars(groups, f"interventions on the knowledge neurons ({model_name(run)})"),
                       "Suppressing (zeroing) or doubling a fact's own neurons against three controls: the neurons "
                       "of another fact of the same relation, of a fact of another relation, and random neurons; "
                       "n = facts. n/a: the control could not be formed (e.g. one relation only).")
        body += table(["relation", "n facts"] + [f"{name} drop" for _, name in KINDS] + [f"{name} enhance" for _, name in KINDS],
                      [(g, n, *[m[f"mean_{k}_drop"] for k, _ in KINDS], *[m[f"mean_{k}_enhance"] for k, _ in KINDS])
                       for g, n, m in groups])
        verdict, words = kn_verdict(overall["mean_own_drop"], overall["mean_other_relation_drop"],
                                    overall["mean_random_drop"])
        findings.append(Finding("kn_suppression", f"{model_name(run)}, {len(with_effects)} facts: {words}",
                                verdict, sid, priority=len(with_effects)))
    else:
        body += note("No intervention effects were recorded (no fact kept neurons, or the run stopped early).")
    body += "<h4>Most shared neurons</h4>" + _shared_neurons(run, done)
    body += left_out([r for r in records if r.get("skipped") is not None], "skipped")
    return body, findings


@renderer("neurons")
def render_neurons(runs: list[RunView], report: Report) -> list[Section]:
    return verb_section("neurons", "Knowledge neurons", 60, (
        "Knowledge neurons (Dai et al. 2022): MLP neurons whose integrated-gradients attribution "
        "to the answer is high in most paraphrases of a fact, then tested by suppressing and "
        "enhancing them."), runs, neurons_body)


# -- dkn ------------------------------------------------------------------------------------------------
