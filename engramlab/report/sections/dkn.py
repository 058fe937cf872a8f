"""Report section of ``engram dkn``: found rates per method, partial vs full drop, robustness and
evolvability; the ``dkn_partial_full`` finding."""

from __future__ import annotations

from engramlab.report.page import Finding, Section, esc, figure, fmt, new_figure, note, para, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import left_out, verb_section, locator_config, number, records_of, model_name


def dkn_verdict(found_rate, n_evaluated) -> str:
    """The ``dkn_partial_full`` rule on the share of evaluated facts with a verified DKN."""
    rate = number(found_rate)
    if rate is None or not n_evaluated:
        return "inconclusive"
    if rate >= 0.1:
        return "reproduced"
    return "partly reproduced" if rate > 0 else "not reproduced"


def _dkn_methods(run: RunView, records: list[dict]) -> list[str]:
    cfg = locator_config(run).get("config") or {}
    methods = cfg.get("methods") or []
    seen = sorted({m for r in records for m in r.get("methods", {})})
    return list(methods) + [m for m in seen if m not in methods]


def _dkn_rate_figure(methods: list[str], s: dict, title: str):
    fig, axes = new_figure(2, 1, 10.0, 3.2)
    ex = [number(s.get(f"{m}.dkn_found_rate_exhaustive")) or 0.0 for m in methods]
    sa = [number(s.get(f"{m}.dkn_found_rate_sampled")) or 0.0 for m in methods]
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
    axes[1].bar([i - 0.2 for i in x], [number(s.get(f"{m}.mean_clusters")) or 0.0 for m in methods], 0.4,
                label="clusters per fact")
    axes[1].bar([i + 0.2 for i in x], [number(s.get(f"{m}.mean_dkn_clusters")) or 0.0 for m in methods], 0.4,
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
    records = records_of(run, "dkn.jsonl")
    if records is None:
        return note("No records.jsonl: no DKN results to show."), []
    cfg = locator_config(run).get("config") or {}
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
    if methods and evaluated and number(cfg.get("t_low")) is not None and number(cfg.get("t_high")) is not None:
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
    single = number(s.get(f"{default}.mean_max_single_drop"))
    if verdict == "not reproduced":
        if single is not None:
            words += f"; the strongest single cluster alone already drops P(answer) by {fmt(single)} on average"
    others = [f"{m} {fmt(s.get(f'{m}.dkn_found_rate'))}" for m in methods if m != default]
    if others:
        words += "; other methods: " + ", ".join(others)
    body += left_out([r for r in records if r.get("skipped")], "skipped")
    return body, [Finding("dkn_partial_full", words, verdict, sid, priority=n_eval)]


@renderer("dkn")
def render_dkn(runs: list[RunView], report: Report) -> list[Section]:
    return verb_section("dkn", "Degenerate knowledge neurons", 70, (
        "Degenerate knowledge neurons (Chen et al. 2024): a fact's candidate neurons are "
        "clustered, then a set of clusters is searched whose suppression removes the answer while "
        "no proper part of it does (redundant storage)."), runs, dkn_body)


# -- circuit --------------------------------------------------------------------------------------------
