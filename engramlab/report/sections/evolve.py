"""Report sections for ``engram evolve`` (circuits over checkpoints) and ``engram continual``.

Each evolve run gets a section (order 40) built from its ``evolution.jsonl``, ``summary.json``,
``transplant.json`` and each checkpoint's saved circuit: recall over checkpoints, the circuit at
every checkpoint (a slider), its change over time (Jaccard with the final and the previous
circuit, entropy, with the knees ``engram evolve`` found), the layer-share heat map, head roles,
where the logit lens first reads the answer, the transplant matrix, and neurons / degenerate
neurons over time when those analyses ran. An evolve of a run trained on a continual world also
gets a continual pre-training section (order 50): recall by knowledge type and by frequency,
with the half steps of ``engramlab.studies.continual``. The same section appears whether the
stages sit in an ``engram continual`` directory or flat in a study.

Steps are drawn on a symlog axis: checkpoints are dense early. Every figure whose columns are
absent (an older run, an analysis not run) is replaced by a note saying so.
"""

from __future__ import annotations

import math
from pathlib import Path

from engramlab.errors import EngramError
from engramlab.report.page import (Finding, Section, anchor, details, figure, fmt, is_number, kv_table, new_figure,
                                   note, para, series, slider, table)
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import knowledge_regions as knowledge
from engramlab.report.sections import renderer

ROLE_COLUMNS = (("circuit.mover_fraction", "mover"), ("circuit.relation_fraction", "relation"),
                ("circuit.mixture_fraction", "mixture"))
#: the most circuit drawings a slider holds (evenly thinned, the first and final always kept)
MAX_FRAMES = 24


# ----------------------------------------------------------------------------------------- data


def has(rows: list[dict], key: str) -> bool:
    return any(is_number(r.get(key)) for r in rows)


def bands(rows: list[dict], prefix: str) -> list[int]:
    """The band / layer numbers of the ``prefix.L<b>`` columns, sorted."""
    out = set()
    for r in rows:
        for k in r:
            if k.startswith(prefix + ".L") and k[len(prefix) + 2:].isdigit():
                out.add(int(k[len(prefix) + 2:]))
    return sorted(out)


def is_continual(rows: list[dict], train: RunView | None, report: Report) -> bool:
    """An evolve of a continual world: its rows carry knowledge-type groups, or the training run's
    world is of kind ``continual``."""
    if any("recall.top1_accuracy.kind.rel" in r for r in rows):
        return True
    return train is not None and report.world_kind(train) == "continual"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------------ findings


def formation_finding(summary: dict, rows: list[dict], section: str, priority: int) -> Finding | None:
    """``formation_optimization`` by its rule, from the knee of edge Jaccard with the final circuit
    (the evolve summary's, or fitted here when the run chose another --phase-metric); None without
    circuits."""
    jaccard = "circuit.edge_jaccard_final"
    if not has(rows, jaccard) and summary.get("phase_shift_metric") != jaccard:
        return None
    if summary.get("phase_shift_metric") == "circuit.edge_jaccard_final":
        knee, before, after = (summary.get(f"phase_shift_{k}") for k in ("step", "slope_before", "slope_after"))
        improvement, flattens = summary.get("phase_shift_improvement"), summary.get("phase_shift_flattens")
    else:
        from engramlab.dynamics.changepoints import knee_fit

        fit = knee_fit(*series(rows, "circuit.edge_jaccard_final"), log_x=True) or {}
        knee, before, after, improvement = (fit.get(k) for k in ("knee_step", "slope_before", "slope_after",
                                                                 "improvement"))
        flattens = None
    if knee is None or not is_number(before) or not is_number(after):
        n = len(series(rows, "circuit.edge_jaccard_final")[0])
        return Finding("formation_optimization", f"no knee could be fitted to edge Jaccard with the final circuit "
                       f"({n} checkpoints; a fit needs 4)", "inconclusive" if n < 4 else "not reproduced",
                       section, priority)
    if flattens is None:
        flattens = abs(after) < abs(before)
    improvement = improvement if is_number(improvement) else 0.0
    ok = bool(flattens) and improvement >= 0.3
    measured = (f"knee of edge Jaccard with the final circuit at step {knee}: slope {before:.3g} before, {after:.3g} "
                f"after (per unit of log(step+1); {'flatter' if flattens else 'steeper'} after), "
                f"{improvement:.0%} less squared error than one line")
    return Finding("formation_optimization", measured, "reproduced" if ok else "not reproduced", section, priority)


def deep_finding(summary: dict, section: str, priority: int) -> Finding | None:
    """``deep_to_shallow`` by its rule (Kendall's tau between layer and logit-lens surface step);
    None when no logit lens was measured (no circuit analysis)."""
    surf = {k: v for k, v in summary.items() if k.startswith("lens_surface_step.L")}
    stat, p, n = summary.get("deep_to_shallow_stat"), summary.get("deep_to_shallow_p"), summary.get("deep_to_shallow_n")
    if not surf and stat is None and n is None:
        return None
    if not is_number(n):
        n = sum(1 for v in surf.values() if v is not None)
    layer = lambda key: int(key.rsplit("L", 1)[1])  # noqa: E731
    steps = ", ".join(f"L{layer(k)} {fmt(v)}" for k, v in sorted(surf.items(), key=lambda kv: layer(kv[0])))
    where = f" (surface steps: {steps})" if steps else ""
    if n < 3 or not is_number(stat):
        return Finding("deep_to_shallow", f"{n} layer(s) surface in the logit lens, fewer than 3{where}",
                       "inconclusive", section, priority)
    ok = stat < 0 and is_number(p) and p < 0.05
    return Finding("deep_to_shallow", f"Kendall tau {stat:.2f} between layer and surface step, one-sided p "
                   f"{fmt(p)}, {n} layers{where}", "reproduced" if ok else "not reproduced", section, priority)


def krel_finding(numbers: dict, section: str, priority: int = 1) -> Finding | None:
    """``krel_kcompl`` by its rule: an earlier half step for K_rel (or, tied at checkpoint
    resolution, in the training run's own evaluation) reproduces; only a higher time-averaged
    accuracy partly reproduces."""
    rel, compl = numbers.get("k_rel_half_step"), numbers.get("k_compl_half_step")
    t_rel, t_compl = numbers.get("train_k_rel_half_step"), numbers.get("train_k_compl_half_step")
    m_rel, m_compl = numbers.get("k_rel_mean_accuracy"), numbers.get("k_compl_mean_accuracy")
    if rel is None and compl is None and m_rel is None and m_compl is None:
        return None
    own = (f"{fmt(t_rel)} vs {fmt(t_compl)} in the run's own evaluation" if t_rel is not None or t_compl is not None
           else "the run's own evaluation not available")
    measured = (f"half step K_rel {fmt(rel)} vs K_compl {fmt(compl)} at the checkpoints, {own}; accuracy averaged "
                f"over training {fmt(m_rel)} vs {fmt(m_compl)}")
    finer = is_number(t_rel) and is_number(t_compl) and t_rel < t_compl
    if is_number(rel) and is_number(compl) and (rel < compl or (rel == compl and finer)):
        verdict = "reproduced"
    elif is_number(m_rel) and is_number(m_compl) and m_rel > m_compl:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    return Finding("krel_kcompl", measured, verdict, section, priority)


# ------------------------------------------------------------------------------------- figures


def _step_axis(ax, label: str = "training step", steps: list | None = None) -> None:
    """The step axis: symlog (linear below 1, plain numbers) when the steps span a decade or more
    (checkpoints are dense early), linear otherwise; from 0 (or over ``steps``' range)."""
    from matplotlib.ticker import FuncFormatter

    horizontal = ax.get_yaxis_transform(which="grid")  # axhline's x is in axes units, not steps
    xs = [float(x) for line in ax.get_lines() if line.get_transform() != horizontal
          for x in line.get_xdata() if is_number(float(x))] + list(steps or [])
    xs += [float(p.get_x() + p.get_width()) for p in ax.patches]
    wide = bool(xs) and (min(xs) <= 0 or max(xs) / min(xs) >= 10)
    if wide:
        ax.set_xscale("symlog", linthresh=1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if steps:
        lo, hi = min(steps), max(steps)
        ax.set_xlim(lo - (0 if wide else 0.04 * (hi - lo)), (hi * 1.08 + 0.5) if wide else hi + 0.04 * (hi - lo) + 0.5)
    elif ax.get_xlim()[0] < 0 and xs and min(xs) >= 0:
        ax.set_xlim(left=0)
    ax.set_xlabel(f"{label} (symlog)" if wide else label)
    ax.grid(alpha=0.25)


def _vline(ax, step, label: str, color: str = "grey", ls: str = ":") -> None:
    if is_number(step):
        ax.axvline(step, color=color, ls=ls, lw=1.1, label=label)


def recall_figure(rows: list[dict], summary: dict) -> str:
    if not has(rows, "recall.top1_accuracy") and not has(rows, "run.eval.attr_acc"):
        return note("No recall or training-evaluation columns in evolution.jsonl (run evolve with --analysis recall).")
    fig, (ax,) = new_figure(1, 1, 9.0, 3.2)
    for key, label, x in (("recall.top1_accuracy", "recall top-1 (evolve's facts)", "step"),
                          ("recall.top10_accuracy", "recall top-10", "step"),
                          ("run.eval.attr_acc", "run's own eval accuracy", "run.step")):
        s, v = series(rows, key, x=x)
        if s:
            ax.plot(s, v, marker="o", ms=3, label=label, ls="--" if key.startswith("run.") else "-")
    _vline(ax, summary.get("plateau_start_step"), f"plateau start ({fmt(summary.get('plateau_start_step'))})", "C7")
    _vline(ax, summary.get("plateau_end_step"), f"plateau end ({fmt(summary.get('plateau_end_step'))})", "k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    _step_axis(ax)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("recall over checkpoints", fontsize=10)
    fig.tight_layout()
    return figure(fig, "Recall of the evolved facts at each checkpoint, and the training run's own held-out "
                       "evaluation at the nearest earlier step; the plateau is the training run's.")


def _fit_line(ax, rows: list[dict], key: str, color: str) -> None:
    """Draw the two-segment fit of ``key`` against log(step + 1) (``changepoints.knee_fit``)."""
    import numpy as np

    from engramlab.dynamics.changepoints import knee_fit

    steps, vals = series(rows, key)
    fit = knee_fit(steps, vals, log_x=True) if steps else None
    if not fit:
        return
    x = np.log1p(np.asarray(sorted(set(steps)) + [fit["knee_step"]], dtype=float))
    x.sort()
    k = fit["knee_x"]
    y = fit["knee_value"] + np.where(x < k, fit["slope_before"], fit["slope_after"]) * (x - k)
    ax.plot(np.expm1(x), y, color=color, lw=0.9, alpha=0.6, ls="-.", label="two-segment fit")


def change_figure(rows: list[dict], summary: dict) -> str:
    if not has(rows, "circuit.edge_jaccard_final") and not has(rows, "circuit.entropy"):
        return note("No circuit comparisons in evolution.jsonl (run evolve with --analysis circuit).")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.4)
    for key, label, ls in (("circuit.edge_jaccard_final", "edges vs final", "-"),
                           ("circuit.node_jaccard_final", "nodes vs final", "-"),
                           ("circuit.edge_jaccard_prev", "edges vs previous", "--"),
                           ("circuit.node_jaccard_prev", "nodes vs previous", "--")):
        s, v = series(rows, key)
        if s:
            ax.plot(s, v, marker="o", ms=2.5, ls=ls, label=label)
    _fit_line(ax, rows, "circuit.edge_jaccard_final", "C0")
    if summary.get("phase_shift_metric") == "circuit.edge_jaccard_final":
        k, b, a = (summary.get(f"phase_shift_{x}") for x in ("step", "slope_before", "slope_after"))
        _vline(ax, k, f"knee {fmt(k)} (slope {fmt(b, 2)} -> {fmt(a, 2)})", "k", "--")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("Jaccard similarity")
    ax.set_title("circuit change", fontsize=10)
    _step_axis(ax)
    ax.legend(fontsize=6.5, loc="best")
    s, v = series(rows, "circuit.entropy")
    if s:
        bx.plot(s, v, marker="o", ms=2.5, color="C4", label="edge-score entropy")
        _fit_line(bx, rows, "circuit.entropy", "C4")
        k, b, a = (summary.get(f"entropy_knee_{x}") for x in ("step", "slope_before", "slope_after"))
        _vline(bx, k, f"knee {fmt(k)} (slope {fmt(b, 2)} -> {fmt(a, 2)})", "k", "--")
        bx.legend(fontsize=6.5)
    else:
        bx.text(0.5, 0.5, "no entropy column", transform=bx.transAxes, ha="center")
    bx.set_ylabel("entropy (nats)")
    bx.set_title("circuit entropy", fontsize=10)
    _step_axis(bx)
    fig.tight_layout()
    return figure(fig, "Left: Jaccard of the kept edges / nodes with the final circuit (solid) and the previous "
                       "checkpoint's (dashed). Right: entropy of the kept edges' |score| distribution. The knee is "
                       "evolve's two-segment fit against log(step+1); slopes per unit of log(step+1).")


def _heat(ax, rows: list[dict], prefix: str, title: str, label: str, fig) -> bool:
    import numpy as np

    bs = bands(rows, prefix)
    used = [r for r in rows if any(is_number(r.get(f"{prefix}.L{b}")) for b in bs)]
    if not bs or not used:
        ax.text(0.5, 0.5, f"no {prefix} columns", transform=ax.transAxes, ha="center")
        ax.set_axis_off()
        return False
    m = np.array([[r.get(f"{prefix}.L{b}") if is_number(r.get(f"{prefix}.L{b}")) else np.nan for r in used] for b in bs],
                 dtype=float)
    im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    every = max(1, math.ceil(len(used) / 12))
    ticks = list(range(0, len(used), every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(used[i]["step"]) for i in ticks], fontsize=7, rotation=45)
    ax.set_yticks(range(len(bs)))
    ax.set_yticklabels([label.format(b) for b in bs], fontsize=7)
    ax.set_xlabel("checkpoint (step)")
    ax.set_title(title, fontsize=10)
    return True


def _band_name(b: int) -> str:
    return "input" if b == 0 else f"layer {b - 1}"


def layer_figure(rows: list[dict]) -> str:
    if not bands(rows, "circuit.edge_share"):
        return note("No circuit.edge_share columns (an older evolve run, or no circuit analysis).")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.3)
    bs = bands(rows, "circuit.edge_share")
    names = {b: _band_name(b) for b in bs}
    _heat(ax, rows, "circuit.edge_share", "share of the circuit's edges by source", "{}", fig)
    ax.set_yticklabels([names[b] for b in bs], fontsize=7)
    if _heat(bx, rows, "circuit.edge_activation", "edge activation (kept / all edges out of band)", "{}", fig):
        bx.set_yticklabels([_band_name(b) for b in bands(rows, "circuit.edge_activation")], fontsize=7)
    fig.tight_layout()
    return figure(fig, "Where the circuit's edges start, per checkpoint (columns evenly spaced by checkpoint, "
                       "labelled with the step): left the share of the kept edges from each source band, right "
                       "the fraction of a band's outgoing edges that are kept (Ou et al.'s edge activation ratio).")


def roles_figure(rows: list[dict], summary: dict) -> str:
    if not any(has(rows, k) for k, _ in ROLE_COLUMNS):
        return note("No head-role columns (circuit.mover_fraction, ...) in evolution.jsonl.")
    fig, (ax,) = new_figure(1, 1, 9.0, 3.0)
    for key, label in ROLE_COLUMNS:
        s, v = series(rows, key)
        if s:
            ax.plot(s, v, marker="o", ms=2.5, label=f"{label} heads")
    _vline(ax, summary.get("mover_head_step"), f"first mover head ({fmt(summary.get('mover_head_step'))})", "C0", "--")
    _vline(ax, summary.get("plateau_end_step"), f"plateau end ({fmt(summary.get('plateau_end_step'))})", "k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of the circuit's heads")
    ax.set_title("head roles in the circuit", fontsize=10)
    _step_axis(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure(fig, "Share of the circuit's attention heads that move the subject (mover), attend to the "
                       "relation (relation) or both (mixture), per checkpoint.")


def lens_figure(rows: list[dict], summary: dict) -> str:
    surf = sorted((int(k.rsplit("L", 1)[1]), v) for k, v in summary.items()
                  if k.startswith("lens_surface_step.L") and k.rsplit("L", 1)[1].isdigit())
    top = series(rows, "circuit.lens_top1_layer")
    if not surf and not top[0]:
        return note("No logit-lens numbers (lens_surface_step.L<l> in summary.json, circuit.lens_top1_layer): "
                    "run evolve with --analysis circuit.")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.2)
    if surf:
        layers = [l for l, _ in surf]
        ax.barh(layers, [v if is_number(v) else 0 for _, v in surf], color=["C2" if is_number(v) else "C7" for _, v in surf])
        for l, v in surf:
            ax.text(v if is_number(v) else 0, l, f" {fmt(v)}" if is_number(v) else " never", va="center", fontsize=7)
        ax.set_yticks(layers)
        ax.set_ylabel("layer")
        _step_axis(ax, "step at which the answer surfaces")
        tau, p, n = (summary.get(f"deep_to_shallow_{k}") for k in ("stat", "p", "n"))
        ax.set_title(f"logit-lens surface step: tau {fmt(tau, 2)}, p {fmt(p, 2)}, n {fmt(n)}", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no lens_surface_step in summary.json", transform=ax.transAxes, ha="center")
    if top[0]:
        bx.plot(*top, marker="o", ms=3, drawstyle="steps-post", color="C1")
        bx.set_ylabel("first layer ranking the answer 1st")
        bx.set_yticks(sorted({int(v) for v in top[1]}))
        _step_axis(bx, steps=[r["step"] for r in rows])
    else:
        bx.text(0.5, 0.5, "no circuit.lens_top1_layer column", transform=bx.transAxes, ha="center")
    bx.set_title("logit lens over checkpoints", fontsize=10)
    fig.tight_layout()
    return figure(fig, "Left: per layer, the first checkpoint whose logit-lens top-1 share of the answer reaches "
                       "half its final value (layers below 0.1 at the end are left out); Kendall's tau < 0 means "
                       "deeper layers surface first. Right: the first layer whose median answer rank is 1.")


def transplant_figure(run: RunView) -> str:
    doc = run.json("transplant.json")
    if not isinstance(doc, dict) or not doc.get("steps") or not doc.get("faithfulness"):
        return note("No transplant.json (the evolve ran without circuits, or with --transplant 0).")
    import numpy as np

    steps = doc["steps"]
    square = lambda m: isinstance(m, list) and len(m) == len(steps) and all(  # noqa: E731
        isinstance(row, list) and len(row) == len(steps) for row in m)
    panels = [(k, t) for k, t in (("faithfulness", "faithfulness"), ("hit_at_10_circuit", "circuit Hit@10"))
              if square(doc.get(k))]
    if not panels:
        return note("transplant.json holds no complete steps x steps matrix (an interrupted transplant).")
    fig, axes = new_figure(len(panels), 1, 5.5 * len(panels), 3.6)
    for ax, (key, title) in zip(axes, panels):
        m = np.array([[v if is_number(v) else np.nan for v in row] for row in doc[key]], dtype=float)
        im = ax.imshow(m, origin="upper", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([str(s) for s in steps], fontsize=7)
        ax.set_yticks(range(len(steps)))
        ax.set_yticklabels([str(s) for s in steps], fontsize=7)
        ax.set_xlabel("model of step t")
        ax.set_ylabel("circuit of step s")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure(fig, "The circuit of step s (row) run on the model of step t (column); the diagonal is each "
                       "checkpoint's own held-out evaluation. Colours clip to [0, 1]; the numbers are exact.")


def neurons_figure(rows: list[dict]) -> str:
    if not has(rows, "neurons.jaccard_final") and not bands(rows, "neurons.layer_share"):
        return note("No neurons columns (run evolve with --analysis neurons).")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.3)
    for key, label, ls in (("neurons.jaccard_final", "vs final", "-"), ("neurons.jaccard_prev", "vs previous", "--")):
        s, v = series(rows, key)
        if s:
            ax.plot(s, v, marker="o", ms=3, ls=ls, label=f"Jaccard {label}")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("Jaccard of the knowledge neurons")
    _step_axis(ax)
    s, v = series(rows, "neurons.n_neurons")
    if s:
        twin = ax.twinx()
        twin.plot(s, v, color="C3", marker="s", ms=3, lw=0.8, label="number of neurons")
        twin.set_ylabel("number of neurons", fontsize=8)
        twin.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("knowledge neurons over checkpoints", fontsize=10)
    _heat(bx, rows, "neurons.layer_share", "share of the neurons by layer", "layer {}", fig)
    fig.tight_layout()
    return figure(fig, "Left: Jaccard of the union of the facts' knowledge neurons with the final and the "
                       "previous checkpoint's, and their number. Right: their share by layer per checkpoint.")


def dkn_figure(rows: list[dict], run: RunView) -> str:
    keys = (("dkn.found_rate", "DKN found rate"), ("dkn.mean_partial_drop", "partial drop (DKN facts)"),
            ("dkn.mean_full_drop", "full drop (DKN facts)"),
            ("dkn.mean_max_single_drop", "largest one-cluster drop (all facts)"),
            ("dkn.mean_all_clusters_drop", "all-clusters drop (all facts)"))
    if not any(has(rows, k) for k, _ in keys):
        return note("No dkn columns (run evolve with --analysis dkn).")
    fig, (ax,) = new_figure(1, 1, 9.0, 3.0)
    for key, label in keys:
        s, v = series(rows, key)
        if s:
            ax.plot(s, v, marker="o", ms=3, label=label)
    cfg = run.config.get("dkn") if isinstance(run.config.get("dkn"), dict) else {}
    for k, ls in (("t_low", ":"), ("t_high", "--")):
        if is_number(cfg.get(k)):
            ax.axhline(cfg[k], color="grey", ls=ls, lw=0.9, label=f"{k} {fmt(cfg[k])}")
    ax.set_ylabel("rate / relative probability drop")
    ax.set_title("degenerate knowledge neurons over checkpoints", fontsize=10)
    _step_axis(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure(fig, "Share of the evaluated facts with a verified DKN; the mean relative drop of the answer's "
                       "probability when part of / all of a fact's DKN are suppressed (a DKN needs a partial drop "
                       "below t_low and a full drop above t_high); and, over every evaluated fact, the drop when "
                       "its most important neuron cluster alone / all its clusters are suppressed.")


def _circuit_drawing(scores, kept, graph, title: str) -> str:
    from engramlab.report.circuits import circuit_svg

    return circuit_svg(scores, kept, graph, title=title, max_edges=400)


def circuit_slider(run: RunView, rows: list[dict], id_: str) -> str:
    """The circuit drawing at each checkpoint (from ``step-NNNNNNN/circuit/scores.safetensors``),
    one at a time; the final circuit is shown first."""
    from engramlab.locate.circuits.store import load_scores

    found = [r["step"] for r in rows if is_number(r.get("step"))
             and (run.path / f"step-{int(r['step']):07d}" / "circuit" / "scores.safetensors").is_file()]
    if not found:
        return note("No circuit was saved at any checkpoint (run evolve with --analysis circuit).")
    if len(found) > MAX_FRAMES:  # thin evenly, keeping the first and the final
        idx = sorted({round(i * (len(found) - 1) / (MAX_FRAMES - 1)) for i in range(MAX_FRAMES)})
        found = [found[i] for i in idx]
    frames = []
    for step in found:
        try:
            graph, scores, kept = load_scores(run.path / f"step-{int(step):07d}" / "circuit" / "scores.safetensors")
        except (EngramError, OSError, KeyError, ValueError) as e:
            frames.append((f"step {step}", note(f"step {step}: the circuit could not be read ({e})")))
            continue
        frames.append((f"step {step}", figure(_circuit_drawing(scores, kept, graph, f"step {step}"))))
    return slider(frames, "checkpoint", id_)


def summary_table(summary: dict) -> str:
    keys = ("n_checkpoints", "n_skipped", "pairs_step", "plateau_start_step", "plateau_end_step", "phase_shift_metric",
            "phase_shift_step", "phase_shift_slope_before", "phase_shift_slope_after", "phase_shift_improvement",
            "phase_shift_flattens", "entropy_knee_step", "entropy_knee_slope_before", "entropy_knee_slope_after",
            "entropy_knee_flattens", "deep_to_shallow_stat", "deep_to_shallow_p", "deep_to_shallow_n",
            "edge_deep_to_shallow_stat", "edge_deep_to_shallow_p", "mover_head_step", "attr_to_name_half_step",
            "transplant_first_on_last", "transplant_last_on_first")
    return kv_table([(k, summary[k]) for k in keys if k in summary])


# ------------------------------------------------------------------------------------ sections


def evolve_section(run: RunView, report: Report, rows: list[dict], continual: bool) -> Section:
    sid = anchor("evolve", run.name)
    s = run.summary
    parts = []
    if run.manifest.get("status") != "complete":
        parts.append(note(f"This evolve run's status is {run.manifest.get('status', 'unknown')!r}: the figures show "
                          "the checkpoints it finished; re-run the same command to resume."))
    analyses = run.config.get("evolve", {}).get("analysis") if isinstance(run.config.get("evolve"), dict) else None
    parts.append(para(f"engram evolve on {Path(str(run.config.get('run', '?'))).name}: analyses "
                      f"{', '.join(analyses) if isinstance(analyses, list) else s.get('analyses', '?')}, "
                      f"{len(rows)} checkpoint(s) from step {fmt(rows[0].get('step') if rows else None)} to "
                      f"{fmt(rows[-1].get('step') if rows else None)}."))
    if not rows:
        parts.append(note("No evolution.jsonl: no checkpoint has finished."))
    else:
        circuits = has(rows, "circuit.n_edges_kept") or has(rows, "circuit.edge_jaccard_final")
        parts += ["<h3>Recall over checkpoints</h3>", recall_figure(rows, s)]
        if circuits:
            parts += ["<h3>The circuit at each checkpoint</h3>", circuit_slider(run, rows, anchor(sid, "circuits")),
                      "<h3>Circuit change over checkpoints</h3>", change_figure(rows, s), layer_figure(rows),
                      roles_figure(rows, s), "<h3>Logit lens</h3>", lens_figure(rows, s),
                      "<h3>Transplant matrix</h3>", transplant_figure(run)]
        else:
            parts.append(note("No circuit analysis in this evolve run (--analysis circuit draws the circuits, "
                              "their change, the logit lens and the transplant matrix)."))
        if has(rows, "neurons.jaccard_final") or bands(rows, "neurons.layer_share"):
            parts += ["<h3>Knowledge neurons over checkpoints</h3>", neurons_figure(rows)]
        if has(rows, "dkn.found_rate"):
            parts += ["<h3>Degenerate knowledge neurons over checkpoints</h3>", dkn_figure(rows, run)]
        if has(rows, "regions.core_jaccard_final"):
            lk = knowledge.numbers(rows[-1], "regions.")
            parts += ["<h3>Parameter regions over checkpoints</h3>", knowledge.over_time_figure(rows)]
            if lk is not None:
                parts += [f"<h4>Language vs knowledge at the final checkpoint (step {fmt(rows[-1].get('step'))})</h4>",
                          knowledge.zeroed_table(lk)]
        if has(rows, "trace.peak_mlp_layer"):
            from engramlab.report.sections.trace import trace_checkpoint_table
            parts.append(trace_checkpoint_table(rows))
    parts.append(details("summary.json: change points", summary_table(s)))
    priority = 1 if continual else 0
    findings = [f for f in (formation_finding(s, rows, sid, priority), deep_finding(s, sid, priority),
                            knowledge.finding(rows[-1], sid, "regions.") if rows else None) if f]
    return Section(sid, f"Circuits over checkpoints: {run.name}", "".join(parts), order=40, findings=findings)


def continual_numbers(run: RunView, train: RunView | None, report: Report) -> dict:
    """The continual study's numbers (``studies.continual.continual_summary``): the ``engram
    continual`` run's own summary when the evolve is its stage, else computed from the evolve
    stage and its training run."""
    from engramlab.dynamics.changepoints import half_step
    from engramlab.studies.continual import GROUPS, continual_summary

    for c in report.of("continual"):
        if _same(c.path, run.path.parent) and "k_rel_half_step" in c.summary:
            return dict(c.summary)
    if not run.has("summary.json") or not run.has("evolution.jsonl"):
        return {}
    sibling = train is not None and _same(train.path.parent, run.path.parent)
    try:
        out = continual_summary(run.path.parent, run.path.name, train.path.name if sibling else run.path.name)
    except (EngramError, OSError, ValueError):
        return {}
    if not sibling:  # the training run elsewhere (or not in this report): its own half steps from there
        metrics = train.jsonl("metrics.jsonl") if train is not None else []
        for name, label in GROUPS.items():
            out[f"train_{name}_half_step"] = half_step(*series(metrics, f"eval.attr_acc.{label}"))
    return out


def _group_panel(ax, rows: list[dict], prefix: str, groups: list[tuple[str, str]], halves: dict, title: str,
                 x: str = "step", ylim: tuple[float, float] = (-0.02, 1.02)) -> bool:
    drawn = False
    for i, (label, name) in enumerate(groups):
        s, v = series(rows, f"{prefix}.{label}", x=x)
        if not s:
            continue
        drawn = True
        ax.plot(s, v, marker="o", ms=2.5, color=f"C{i}", label=name)
        h = halves.get(label)
        if is_number(h):
            ax.axvline(h, color=f"C{i}", ls=":", lw=1.1, label=f"{name} half step {fmt(h)}")
    if not drawn:
        ax.text(0.5, 0.5, f"no {prefix}.<group> columns", transform=ax.transAxes, ha="center")
    ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    _step_axis(ax)
    ax.legend(fontsize=6.5, loc="upper left")
    return drawn


KINDS = [("kind.rel", "K_rel (known people)"), ("kind.compl", "K_compl (new people)")]
BUCKETS = [("bucket.high", "high frequency"), ("bucket.medium", "medium"), ("bucket.low", "low")]


def group_figure(rows: list[dict], prefix: str, halves: dict, what: str, caption: str, x: str = "step",
                 ylim: tuple[float, float] = (-0.02, 1.02)) -> str:
    if not any(has(rows, f"{prefix}.{g}") for g, _ in KINDS + BUCKETS):
        return note(f"No per-group {what} columns ({prefix}.kind.rel, ...).")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.4)
    _group_panel(ax, rows, prefix, KINDS, halves, f"{what} by knowledge type", x, ylim)
    _group_panel(bx, rows, prefix, BUCKETS, halves, f"{what} by frequency", x, ylim)
    ax.set_ylabel(what)
    fig.tight_layout()
    return figure(fig, caption)


def continual_section(run: RunView, train: RunView | None, report: Report, rows: list[dict]) -> Section:
    from engramlab.studies.continual import GROUPS

    sid = anchor("continual", run.name)
    n = continual_numbers(run, train, report)
    halves = {label: n.get(f"{name}_half_step") for name, label in GROUPS.items()}
    t_halves = {label: n.get(f"train_{name}_half_step") for name, label in GROUPS.items()}
    parts = [para(f"Continued pre-training of {train.name if train else 'the training run'} on a continual world: "
                  "new facts about known people (K_rel) and about new people (K_compl), each person seen at a "
                  "high, medium or low frequency. Half step: the first checkpoint at which a group reaches half "
                  "its final recall top-1 accuracy.")]
    parts += ["<h3>Recall by knowledge type and frequency</h3>",
              group_figure(rows, "recall.top1_accuracy", halves, "recall top-1",
                           "Recall top-1 of each group of the evolved facts at each checkpoint; dotted lines: the "
                           "group's half step.")]
    metrics = [r for r in (train.jsonl("metrics.jsonl") if train is not None else []) if is_number(r.get("step"))]
    if any(has(metrics, f"eval.attr_acc.{g}") for g, _ in KINDS + BUCKETS):
        parts += ["<h3>The training run's own evaluation</h3>",
                  group_figure(metrics, "eval.attr_acc", t_halves, "eval accuracy",
                               f"{train.name}'s held-out evaluation per group at every evaluation step (finer than "
                               "the checkpoints); dotted lines: its half steps.")]
    elif any(has(rows, f"run.eval.attr_acc.{g}") for g, _ in KINDS + BUCKETS):
        parts += ["<h3>The training run's own evaluation (at the checkpoints)</h3>",
                  note("The training run is not part of this report; its evaluation at the checkpoints, as "
                       "evolution.jsonl recorded it."),
                  group_figure(rows, "run.eval.attr_acc", t_halves, "eval accuracy",
                               "The training run's held-out evaluation per group at the step of each checkpoint.",
                               x="run.step")]
    else:
        parts.append(note("No per-group evaluation from the training run (eval.attr_acc.kind.rel, ...)."))
    if any(has(rows, f"circuit.faithfulness.{g}") for g, _ in KINDS + BUCKETS):
        parts += ["<h3>Circuit faithfulness by group</h3>",
                  group_figure(rows, "circuit.faithfulness", {}, "faithfulness",
                               "Held-out faithfulness of each checkpoint's circuit on each group's facts (axis "
                               "clipped to [-0.5, 1.2]: circuits of checkpoints that know nothing can score far "
                               "below 0).", ylim=(-0.5, 1.2))]
    if n:
        trows = [(name, n.get(f"{name}_n_facts"), n.get(f"{name}_half_step"), n.get(f"train_{name}_half_step"),
                  n.get(f"{name}_mean_accuracy"), n.get(f"{name}_final_accuracy"), n.get(f"{name}_final_hit_at_10"),
                  n.get(f"{name}_final_circuit_hit_at_10")) for name in GROUPS]
        parts += ["<h3>Continual summary</h3>",
                  table(["group", "facts", "half step", "half step (run's eval)", "mean accuracy", "final accuracy",
                         "final Hit@10", "final circuit Hit@10"], trows, id=anchor(sid, "groups")),
                  kv_table([("K_rel first (earlier half step; tie: larger mean)", n.get("k_rel_first")),
                            ("frequency order (high <= medium <= low half steps)", n.get("frequency_order"))])]
    else:
        parts.append(note("No continual summary could be computed (the evolve run has no summary.json yet)."))
    f = krel_finding(n, sid)
    return Section(sid, f"Continual pre-training: {run.name}", "".join(parts), order=50, findings=[f] if f else [])


def _orphan_continual(run: RunView) -> Section:
    return Section(anchor("continual", run.name), f"Continual pre-training: {run.name}",
                   note(f"The continual study {run.name} has no evolve stage yet (status "
                        f"{run.manifest.get('status', 'unknown')!r}); re-run it to finish."), order=50)


@renderer("evolve", "continual")
def render(runs: list[RunView], report: Report) -> list[Section]:
    sections = []
    evolves = [r for r in runs if r.command == "evolve"]
    for run in evolves:
        rows = sorted((r for r in run.jsonl("evolution.jsonl") if is_number(r.get("step"))), key=lambda r: r["step"])
        train = report.find(run.config.get("run"))
        continual = is_continual(rows, train, report)
        sections.append(evolve_section(run, report, rows, continual))
        if continual:
            sections.append(continual_section(run, train, report, rows))
    for c in (r for r in runs if r.command == "continual"):
        if not any(_same(e.path.parent, c.path) for e in evolves):
            sections.append(_orphan_continual(c))
    return sections


__all__ = ["continual_numbers", "deep_finding", "formation_finding", "is_continual", "krel_finding", "render"]
