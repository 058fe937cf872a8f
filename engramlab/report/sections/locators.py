"""Report sections of the locators: ``recall``, ``neurons``, ``dkn`` and ``circuit``.

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

from collections import Counter
from engramlab.report.page import (Finding, Section, anchor, details, esc, figure, fmt, kv_table, new_figure,
                                   note, para, shown_path, table)
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer

# -- shared ---------------------------------------------------------------------------------------------


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _locator_config(run: RunView) -> dict:
    c = run.json("config.json")
    return c if isinstance(c, dict) else {}


def model_name(run: RunView) -> str:
    """The model the run looked at: ``config.json``'s model facts, else the manifest's ``--model``."""
    m = _locator_config(run).get("model")
    if isinstance(m, dict) and m.get("model"):
        return shown_path(m["model"])
    if run.config.get("model"):
        return shown_path(run.config["model"])
    return "unknown model"


def _n_layers(run: RunView) -> int | None:
    m = _locator_config(run).get("model")
    return int(m["n_layers"]) if isinstance(m, dict) and isinstance(m.get("n_layers"), int) else None


def _records(run: RunView, *aliases: str) -> list[dict] | None:
    """``records.jsonl`` (or its name before the contract), None when there is none."""
    for name in ("records.jsonl", *aliases):
        if run.has(name):
            return run.jsonl(name)
    return None


def _header(run: RunView) -> str:
    facts = run.config.get("facts")
    bits = [f"model {model_name(run)}"] + ([f"facts {shown_path(facts)}"] if facts else [])
    if run.config.get("limit"):
        bits.append(f"limit {run.config['limit']}")
    out = para("Run " + run.name + ": " + ", ".join(bits) + ".")
    status = run.manifest.get("status")
    if run.manifest and status != "complete":
        out += note(f"This run's status is {status or 'unknown'}, not complete: its numbers may be partial.")
    return out


def _subsections(verb: str, runs: list[RunView], body) -> tuple[str, list[Finding]]:
    html, found = [], []
    for run in runs:
        sid = anchor(verb, run.name)
        text, findings = body(run, sid)
        html.append(f'<h3 id="{esc(sid)}">{esc(run.name)} ({esc(model_name(run))})</h3>{_header(run)}{text}')
        found.extend(findings)
    return "".join(html), found


def _relation_keys(summary: dict) -> list[str]:
    return sorted({k.split(".")[1] for k in summary if k.startswith("relation.") and k.count(".") >= 2})


def _short(rel: str, n: int = 24) -> str:
    return rel if len(rel) <= n else rel[:n - 1] + "…"


# -- recall ---------------------------------------------------------------------------------------------


def recall_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    rels = _relation_keys(s)
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
        ax.bar([i - 0.2 for i in x], [_num(r[1]) or 0.0 for r in rows[:-1]], 0.4, label="top-1")
        ax.bar([i + 0.2 for i in x], [_num(r[2]) or 0.0 for r in rows[:-1]], 0.4, label="top-10", alpha=0.6)
        if _num(s.get("top1_accuracy")) is not None:
            ax.axhline(s["top1_accuracy"], color="k", ls="--", lw=0.8, label="top-1, all relations")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{_short(r)}\n(n={fmt(s.get(f'relation.{r}.n_facts'))})" for r in rels], fontsize=7,
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


@renderer("recall")
def render_recall(runs: list[RunView], report: Report) -> list[Section]:
    body, found = _subsections("recall", runs, recall_body)
    intro = para("How well each model recalls the facts: the rank of the answer's first token after the prompt "
                 "(teacher-forced), and whether greedy decoding reproduces the whole answer (exact match).")
    return [Section("recall", "Recall", intro + body, order=90, findings=found)]


# -- neurons --------------------------------------------------------------------------------------------

KINDS = (("own", "own neurons"), ("same_relation", "same-relation control"),
         ("other_relation", "other-relation control"), ("random", "random neurons"))
KIND_COLOURS = {"own": "#1f77b4", "same_relation": "#ff7f0e", "other_relation": "#2ca02c", "random": "#7f7f7f"}


def kn_verdict(own, other, random) -> tuple[str, str]:
    """The ``kn_suppression`` rule on the mean drops; (verdict, what was compared)."""
    own, other, random = _num(own), _num(other), _num(random)
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
        ax.bar(range(n_layers), counts, bottom=bottom, label=_short(rel, 28))
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
            vals = [_num(m.get(f"mean_{kind}_{what}")) for _, _, m in groups]
            ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width, label=name,
                   color=KIND_COLOURS[kind])
            for x, v in zip(xs, vals):
                if v is None:
                    ax.text(x, 0, "n/a", fontsize=6, ha="center", va="bottom", rotation=90)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlim(-0.6, max(len(groups), 2) - 0.4)
        ax.set_xticks(list(range(len(groups))))
        ax.set_xticklabels([f"{_short(g, 40 if len(groups) <= 3 else 24)}\n(n={n})" for g, n, _ in groups], fontsize=7)
        ax.set_ylabel(label, fontsize=8)
    if _num(groups[-1][2].get("mean_own_drop")) is not None:
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
    records = _records(run, "neurons.jsonl")
    if records is None:
        return note("No records.jsonl: no neurons to show."), []
    done = [r for r in records if r.get("skipped") is None]
    with_effects = [r for r in done if r.get("effects")]
    n_layers = _n_layers(run) or 1 + max((int(n[0]) for r in done for n in r["neurons"]), default=0)
    body = kv_table([("facts attributed / all", f"{len(done)} / {len(records)}"),
                     ("mean neurons per fact", s.get("mean_neurons_per_fact")),
                     ("facts without neurons", s.get("n_without_neurons")),
                     ("mean paraphrase consistency (Jaccard)", s.get("mean_consistency")),
                     ("relation neurons", s.get("n_relation_neurons"))])
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
            if _num(s.get(key)) is not None:
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
    skipped = [r for r in records if r.get("skipped") is not None]
    if skipped:
        body += details(f"{len(skipped)} fact(s) skipped", table(["relation", "subject", "reason"],
                        [(r["relation"], r["subject"], r["skipped"]) for r in skipped]))
    return body, findings


@renderer("neurons")
def render_neurons(runs: list[RunView], report: Report) -> list[Section]:
    body, found = _subsections("neurons", runs, neurons_body)
    intro = para("Knowledge neurons (Dai et al. 2022): MLP neurons whose integrated-gradients attribution to the "
                 "answer is high in most paraphrases of a fact, then tested by suppressing and enhancing them.")
    return [Section("neurons", "Knowledge neurons", intro + body, order=60, findings=found)]


# -- dkn ------------------------------------------------------------------------------------------------


def dkn_verdict(found_rate, n_evaluated) -> str:
    """The ``dkn_partial_full`` rule on the share of evaluated facts with a verified DKN."""
    rate = _num(found_rate)
    if rate is None or not n_evaluated:
        return "inconclusive"
    if rate >= 0.1:
        return "reproduced"
    return "partly reproduced" if rate > 0 else "not reproduced"


def _dkn_methods(run: RunView, records: list[dict]) -> list[str]:
    cfg = _locator_config(run).get("config") or {}
    methods = cfg.get("methods") or []
    seen = sorted({m for r in records for m in r.get("methods", {})})
    return list(methods) + [m for m in seen if m not in methods]


def _dkn_rate_figure(methods: list[str], s: dict, title: str):
    fig, axes = new_figure(2, 1, 10.0, 3.2)
    ex = [_num(s.get(f"{m}.dkn_found_rate_exhaustive")) or 0.0 for m in methods]
    sa = [_num(s.get(f"{m}.dkn_found_rate_sampled")) or 0.0 for m in methods]
    axes[0].bar(methods, ex, label="every proper subset checked")
    axes[0].bar(methods, sa, bottom=ex, label="sampled subsets")
    axes[0].axhline(0.1, color="grey", ls=":", lw=0.8, label="10% (the rule)")
    axes[0].set_ylim(0, max(0.2, max((a + b for a, b in zip(ex, sa)), default=0) * 1.15))
    if not any(ex) and not any(sa):
        axes[0].text(0.5, 0.5, "no verified DKN with any method", transform=axes[0].transAxes, ha="center", fontsize=8)
    axes[0].set_ylabel("share of evaluated facts")
    axes[0].set_title("facts with a verified DKN", fontsize=9)
    axes[0].legend(fontsize=7)
    x = range(len(methods))
    axes[1].bar([i - 0.2 for i in x], [_num(s.get(f"{m}.mean_clusters")) or 0.0 for m in methods], 0.4,
                label="clusters per fact")
    axes[1].bar([i + 0.2 for i in x], [_num(s.get(f"{m}.mean_dkn_clusters")) or 0.0 for m in methods], 0.4,
                label="clusters in the DKN")
    axes[1].set_xticks(list(x))
    axes[1].set_xticklabels(methods)
    axes[1].set_ylabel("mean count")
    axes[1].set_title("cluster counts", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _dkn_scatter(methods: list[str], evaluated: list[dict], t_low: float, t_high: float, title: str):
    from matplotlib.patches import Rectangle

    fig, axes = new_figure(len(methods), 1, min(11.0, 2.6 * len(methods) + 1), 3.0)
    for ax, m in zip(axes, methods):
        entries = [r["methods"][m] for r in evaluated if m in r.get("methods", {})]
        dkn = [(e["partial_drop"], e["full_drop"]) for e in entries
               if e.get("dkn") is not None and e.get("partial_drop") is not None]
        none = [(e["max_single_drop"], e["all_drop"]) for e in entries
                if e.get("dkn") is None and e.get("max_single_drop") is not None and e.get("all_drop") is not None]
        ax.add_patch(Rectangle((-0.05, t_high), t_low + 0.05, 1.1 - t_high, color="#12733a", alpha=0.1, lw=0))
        ax.axvline(t_low, color="grey", ls=":", lw=0.8)
        ax.axhline(t_high, color="grey", ls="--", lw=0.8)
        if none:
            ax.scatter(*zip(*none), marker="x", s=18, color="#b3261e", label="no DKN: strongest cluster, all")
        if dkn:
            ax.scatter(*zip(*dkn), marker="o", s=18, color="#12733a", label="DKN: partial, full")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.1)
        ax.set_title(f"{m} ({len(dkn)} of {len(entries)})", fontsize=8)
        ax.set_xlabel("partial drop", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("full drop", fontsize=7)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        axes[-1].legend(handles, labels, fontsize=6, loc="lower right")
    fig.suptitle(f"{title}: DKN region shaded (partial < t_low = {fmt(t_low)}, full > t_high = {fmt(t_high)})",
                 fontsize=8)
    fig.tight_layout()
    return fig


def _dkn_extras(run: RunView, methods: list[str], default: str) -> str:
    s, out = run.summary, ""
    robust = sorted(k for k in s if k.startswith(f"{default}.robustness."))
    if robust:
        conds = sorted({k.split(".")[3] for k in robust})
        kinds = sorted({k.split(".")[2] for k in robust})
        out += f"<h4>Robustness ({esc(default)}'s DKNs)</h4>" + table(
            ["query"] + [f"P(answer), DKN {c}" for c in conds],
            [(k, *[s.get(f"{default}.robustness.{k}.{c}") for c in conds]) for k in kinds])
    evo = run.json("evolvability/evolvability.json") if run.has("evolvability/evolvability.json") else None
    arms = (evo or {}).get("arms") or {}
    if not arms:
        names = sorted({k.split(".")[1] for k in s if k.startswith("evolvability.") and k.count(".") >= 2})
        arms = {a: {k.split(".", 2)[2]: v for k, v in s.items() if k.startswith(f"evolvability.{a}.")} for a in names}
        arms = {a: v for a, v in arms.items() if a != "before"}
    if arms:
        cols = ("n_neurons", "n_params", "new_top1", "new_mean_prob", "old_top1", "old_mean_prob")
        out += "<h4>Evolvability (learning new facts through each set of neurons)</h4>" + table(
            ["arm", "neurons", "trained entries", "new facts top-1", "new facts P", "old facts top-1", "old facts P"],
            [(a, *[v.get(c) for c in cols]) for a, v in sorted(arms.items())])
    return out


def dkn_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    records = _records(run, "dkn.jsonl")
    if records is None:
        return note("No records.jsonl: no DKN results to show."), []
    cfg = _locator_config(run).get("config") or {}
    default = str(cfg.get("method") or "persistence")
    methods = _dkn_methods(run, records)
    evaluated = [r for r in records if not r.get("skipped")]
    n_eval = len(evaluated)
    rows = [(m + (" (the run's method)" if m == default else ""), s.get(f"{m}.dkn_found_rate"),
             s.get(f"{m}.dkn_found_rate_exhaustive"), s.get(f"{m}.dkn_found_rate_sampled"), s.get(f"{m}.n_dkn"),
             s.get(f"{m}.mean_clusters"), s.get(f"{m}.mean_partial_drop"), s.get(f"{m}.mean_full_drop"),
             s.get(f"{m}.mean_max_single_drop"), s.get(f"{m}.mean_all_clusters_drop")) for m in methods]
    body = para(f"{n_eval} of {len(records)} facts evaluated (the others are not recalled or have too few "
                f"candidate neurons); thresholds t_low = {fmt(cfg.get('t_low'))}, t_high = {fmt(cfg.get('t_high'))}.")
    body += table(["method", "found rate", "exhaustive", "sampled", "DKNs", "clusters per fact", "partial drop",
                   "full drop", "strongest single cluster drop", "all clusters drop"], rows)
    if methods and s:
        body += figure(_dkn_rate_figure(methods, s, f"degenerate knowledge neurons ({model_name(run)})"),
                       "Left: share of evaluated facts with a verified DKN per clustering method (a set of clusters "
                       "whose full suppression drops P(answer) by more than t_high while no proper subset drops it "
                       "by t_low). Right: mean clusters per fact and in the DKN.")
    if methods and evaluated and _num(cfg.get("t_low")) is not None and _num(cfg.get("t_high")) is not None:
        body += figure(_dkn_scatter(methods, evaluated, float(cfg["t_low"]), float(cfg["t_high"]), model_name(run)),
                       "Per fact: a DKN's largest proper-subset (partial) drop against its full drop (circles); a "
                       "fact without a DKN at its strongest single cluster's drop against all clusters' (crosses). "
                       "A DKN sits in the shaded corner.")
    elif not evaluated:
        body += note("No fact was evaluated, so there is no partial-vs-full picture.")
    body += _dkn_extras(run, methods, default)
    rate = s.get(f"{default}.dkn_found_rate", s.get("dkn_found_rate"))
    verdict = dkn_verdict(rate, n_eval)
    n_dkn = s.get(f"{default}.n_dkn", s.get("n_dkn"))
    words = f"{model_name(run)}, {default}: verified DKNs for {fmt(n_dkn)} of {n_eval} evaluated facts (rate {fmt(rate)})"
    single = _num(s.get(f"{default}.mean_max_single_drop"))
    if verdict == "not reproduced":
        if single is not None:
            words += f"; the strongest single cluster alone already drops P(answer) by {fmt(single)} on average"
    others = [f"{m} {fmt(s.get(f'{m}.dkn_found_rate'))}" for m in methods if m != default]
    if others:
        words += "; other methods: " + ", ".join(others)
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        body += details(f"{len(skipped)} fact(s) skipped", table(["relation", "subject", "reason"],
                        [(r["relation"], r["subject"], r["skipped"]) for r in skipped]))
    return body, [Finding("dkn_partial_full", words, verdict, sid, priority=n_eval)]


@renderer("dkn")
def render_dkn(runs: list[RunView], report: Report) -> list[Section]:
    body, found = _subsections("dkn", runs, dkn_body)
    intro = para("Degenerate knowledge neurons (Chen et al. 2024): a fact's candidate neurons are clustered, then "
                 "a set of clusters is searched whose suppression removes the answer while no proper part of it "
                 "does (redundant storage).")
    return [Section("dkn", "Degenerate knowledge neurons", intro + body, order=70, findings=found)]


# -- circuit --------------------------------------------------------------------------------------------


def circuit_verdict(faithfulness, edge_fraction) -> str:
    """The ``sparse_circuits`` rule: reproduced at faithfulness >= 0.8 with <= 5% of the edges; partly
    at faithfulness >= 0.5 (at any size: a faithful circuit of more than 5% counts here)."""
    f, frac = _num(faithfulness), _num(edge_fraction)
    if f is None or frac is None:
        return "inconclusive"
    if f >= 0.8 and frac <= 0.05:
        return "reproduced"
    return "partly reproduced" if f >= 0.5 else "not reproduced"


def _drawing(run: RunView, title: str) -> str:
    if not run.has("scores.safetensors"):
        return note("No scores.safetensors: the circuit cannot be drawn.")
    from engramlab.locate.circuits.store import load_scores
    from engramlab.report.circuits import circuit_svg

    graph, scores, kept = load_scores(run.path / "scores.safetensors")
    return figure(circuit_svg(scores, kept, graph, title=title),
                  "The circuit: nodes by layer (left to right) and head (MLP on top); line width grows with the "
                  "edge's |attribution|, colour says which input of the reader it feeds.")


def _curve_figure(curve: list[dict], chosen: tuple, target, title: str):
    fig, (ax,) = new_figure(1, 1, 10.0, 3.3)
    pts = sorted((c["edge_fraction"], c["faithfulness"], c.get("hit_at_10_circuit")) for c in curve
                 if _num(c.get("edge_fraction")) and _num(c.get("faithfulness")) is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="faithfulness (held out)")
    hits = [(p[0], p[2]) for p in pts if _num(p[2]) is not None]
    if hits:
        ax.plot(*zip(*hits), "s--", ms=3, alpha=0.6, label="Hit@10 of the circuit")
    if _num(chosen[0]) and _num(chosen[1]) is not None:
        ax.plot([chosen[0]], [chosen[1]], "*", ms=12, color="#b3261e", label=f"chosen: {chosen[2]} edges", zorder=3)
    ax.axhline(0.8, color="grey", ls=":", lw=0.8, label="0.8 (the rule)")
    ax.axvline(0.05, color="grey", ls="--", lw=0.8, label="5% of the edges")
    if _num(target) is not None:
        ax.axhline(target, color="#8a6d00", ls="-.", lw=0.7, label=f"target {fmt(target)}")
    ax.set_xscale("log")
    ax.set_xlabel("share of the graph's edges kept")
    ax.set_ylabel("faithfulness / Hit@10")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig


ROLE_COLOURS = {"mover": "#d62728", "relation": "#2ca02c", "mixture": "#1f77b4"}


def _roles_figure(heads: list[dict], n_layers: int, title: str):
    roles = sorted({h.get("role") or "none" for h in heads})
    fig, axes = new_figure(2, 1, 11.0, 3.2)
    bottom = [0] * n_layers
    for role in roles:
        counts = [0] * n_layers
        for h in heads:
            if (h.get("role") or "none") == role and 0 <= int(h["layer"]) < n_layers:
                counts[int(h["layer"])] += 1
        axes[0].bar(range(n_layers), counts, bottom=bottom, label=role, color=ROLE_COLOURS.get(role, "#7f7f7f"))
        bottom = [b + c for b, c in zip(bottom, counts)]
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("heads in the circuit")
    axes[0].set_title("head roles by layer", fontsize=9)
    axes[0].legend(fontsize=7)
    for role in roles:
        mine = [h for h in heads if (h.get("role") or "none") == role]
        axes[1].scatter([h.get("subject_effect", 0.0) for h in mine], [h.get("relation_effect", 0.0) for h in mine],
                        s=14, label=role, color=ROLE_COLOURS.get(role, "#7f7f7f"))
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].axvline(0, color="k", lw=0.5)
    axes[1].set_xlabel("effect through the subject tokens")
    axes[1].set_ylabel("effect through the relation tokens")
    axes[1].set_title("what each head reads", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _lens_figure(lens: list[dict], title: str):
    fig, (ax,) = new_figure(1, 1, 10.0, 3.2)
    rows = sorted((int(r["layer"]), r["median_rank"], r.get("top1_share")) for r in lens
                  if _num(r.get("median_rank")) is not None)
    ax.plot([r[0] for r in rows], [max(1.0, r[1]) for r in rows], "o-", ms=3, label="median rank of the answer")
    ax.axhline(1, color="grey", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (1 = top)")
    first = next((r[0] for r in rows if r[1] <= 1), None)
    if first is not None:
        ax.axvline(first, color="#12733a", ls="--", lw=0.8, label=f"first layer at rank 1: {first}")
    shares = [(r[0], r[2]) for r in rows if _num(r[2]) is not None]
    if shares:
        ax2 = ax.twinx()
        ax2.plot(*zip(*shares), "s--", ms=3, color="#9467bd", alpha=0.7, label="share at rank 1")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("share of facts at rank 1", fontsize=8)
        ax2.legend(fontsize=7, loc="center left")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def circuit_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    ev = run.json("evaluation.json") or {}
    metrics = ev.get("metrics") or {}
    cfg = _locator_config(run).get("config") or ev.get("config") or {}
    name = model_name(run)
    faith = s.get("faithfulness", metrics.get("faithfulness"))
    kept, total = s.get("n_edges_kept"), s.get("n_edges_total")
    frac = s.get("edge_fraction")
    if frac is None and _num(kept) is not None and _num(total):
        frac = kept / total
    body = kv_table([("model", name), ("method", f"{cfg.get('method', '—')}, {fmt(cfg.get('steps'))} steps, "
                                                 f"ablation {s.get('ablation', cfg.get('ablation', '—'))}"),
                     ("edges kept / total", f"{fmt(kept)} / {fmt(total)} ({fmt(100 * frac if frac is not None else None)}%)"),
                     ("nodes kept / total", f"{fmt(s.get('n_nodes_kept'))} / {fmt(s.get('n_nodes'))}"),
                     ("faithfulness, held out", faith),
                     ("faithfulness, discovery facts", s.get("discovery_faithfulness", metrics.get("discovery_faithfulness"))),
                     ("Hit@10, model / circuit", f"{fmt(s.get('hit_at_10_model'))} / {fmt(s.get('hit_at_10_circuit'))}"),
                     ("facts: discovery / held out / skipped", f"{fmt(s.get('n_discovery'))} / "
                                                               f"{fmt(s.get('n_evaluation'))} / {fmt(s.get('n_skipped'))}")])
    body += _drawing(run, f"{name} circuit")
    curve = ev.get("curve") or []
    if curve:
        body += figure(_curve_figure(curve, (frac, faith, kept), cfg.get("target_faithfulness"),
                                     f"faithfulness against circuit size ({name})"),
                       "Held-out faithfulness of the top-N circuit for several N (share of the graph's edges, log "
                       "scale); the star is the circuit kept.")
    else:
        body += note("No faithfulness-vs-N curve (evaluation.json missing or without a curve).")
    comp = run.json("components.json") or {}
    heads = comp.get("heads") or []
    n_layers = (run.json("circuit.json") or {}).get("graph", {}).get("n_layers") or _n_layers(run)
    if heads:
        n_layers = int(n_layers or 1 + max(int(h["layer"]) for h in heads))
        counts = Counter(h.get("role") or "none" for h in heads)
        body += para("Heads in the circuit by role: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
                     " (mover: reads mostly the subject; relation: mostly the relation words; mixture: both).")
        body += figure(_roles_figure(heads, n_layers, f"attention heads of the circuit ({name})"),
                       "Left: the circuit's heads per layer, by role. Right: each head's effect on the answer through "
                       "the subject tokens against through the relation tokens.")
        top = sorted(heads, key=lambda h: (-abs(h.get("direct_effect") or 0.0), h["node"]))[:10]
        body += details("the 10 heads with the largest direct effect", table(
            ["head", "role", "direct effect", "via subject", "via relation"],
            [(h["node"], h.get("role"), h.get("direct_effect"), h.get("subject_effect"), h.get("relation_effect"))
             for h in top]))
    else:
        body += note("No head roles (components.json missing or empty).")
    lens = comp.get("logit_lens") or []
    if lens:
        body += figure(_lens_figure(lens, f"logit lens over the held-out facts ({name})"),
                       "The answer's median rank when the residual stream after each layer is read out through "
                       "the final norm and unembedding.")
    else:
        body += note("No logit lens (components.json missing or without it).")
    skipped = run.jsonl("skipped.jsonl")
    if skipped:
        body += details(f"{len(skipped)} fact(s) left out", table(["relation", "subject", "reason"],
                        [(r.get("relation"), r.get("subject"), r.get("reason")) for r in skipped]))
    verdict = circuit_verdict(faith, frac)
    words = (f"{name}: held-out faithfulness {fmt(faith)} with {fmt(kept)} of {fmt(total)} edges "
             f"({fmt(100 * frac if frac is not None else None)}%)")
    prio = int(total) if _num(total) is not None else 0
    return body, [Finding("sparse_circuits", words, verdict, sid, priority=prio)]


@renderer("circuit")
def render_circuit(runs: list[RunView], report: Report) -> list[Section]:
    body, found = _subsections("circuit", runs, circuit_body)
    intro = para("Knowledge circuits (EAP-IG; Yao et al. 2024, Ou et al. 2025): the edges between attention heads "
                 "and MLPs that carry a fact from the subject to the answer, scored on discovery facts and checked "
                 "on held-out ones (faithfulness: the circuit's share of the model's logit difference over the "
                 "corrupted baseline).")
    return [Section("circuit", "Knowledge circuits", intro + body, order=80, findings=found)]


__all__ = ["circuit_body", "circuit_verdict", "dkn_body", "dkn_verdict", "kn_verdict", "model_name", "neurons_body",
           "recall_body", "render_circuit", "render_dkn", "render_neurons", "render_recall"]
