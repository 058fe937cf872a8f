"""Dimension dependency of the core region in the regions section (``dimensions.json``): the
figure, the table and the rule of the ``dimension_dependency`` finding.

Zhang et al. report that the core region lines up on a few hidden dimensions, where perturbing a
single parameter breaks the model. ``find_regions`` perturbs, on each of the most core-dense
dimensions, the most important core parameter on it, and a same-matrix control off those
dimensions (and off the massive-activation ones); it also lists the massive-activation dimensions
(Sun et al. 2024) and super-weight candidates (Yu et al. 2024) from one forward pass.
"""

from __future__ import annotations

from engramlab.report.page import Finding, figure, fmt, is_number, kv_table, new_figure, note, table

BREAKS = 10.0       # one parameter breaks the model: every corpus's perplexity x10 or more ...
CONTROL_QUIET = 1.5  # ... while its control changes none by 1.5x or more
SOME_EFFECT = 2.0    # partly: some single-parameter perturbation doubles every corpus's perplexity


def _least(ratios) -> float | None:
    vals = [float(v) for v in (ratios or {}).values() if is_number(v)]
    return min(vals) if vals else None


def _most(ratios) -> float | None:
    vals = [float(v) for v in (ratios or {}).values() if is_number(v)]
    return max(vals) if vals else None


def verdict(dims: dict | None) -> tuple[str, str]:
    """(verdict, measured text) of the ``dimension_dependency`` rule on a ``dimensions.json``."""
    rows = (dims or {}).get("dependency") or []
    if not rows:
        return "inconclusive", "no dimension dependency measured (engram regions on corpora, --dimensions > 0)"
    massive = (dims.get("massive") or {}).get("dims") or []
    best = max(rows, key=lambda r: _least(r.get("ppl_ratio")) or 0.0)
    least, control = _least(best.get("ppl_ratio")), _most(best.get("control_ppl_ratio"))
    rank = rows.index(best) + 1
    text = (f"top {len(rows)} core-dense dimensions {', '.join(str(r['dim']) for r in rows)}; one parameter on "
            f"dimension {best['dim']} (rank {rank}) raises every corpus's perplexity at least x{fmt(least)} "
            f"(control x{fmt(control)}); massive-activation dimensions {', '.join(map(str, massive)) or 'none'}")
    if least is not None and least >= BREAKS and (control is None or control < CONTROL_QUIET):
        return "reproduced", text
    if least is not None and least >= SOME_EFFECT:
        return "partly reproduced", text
    return "not reproduced", text


def finding(dims: dict | None, section: str) -> Finding | None:
    if not dims:
        return None
    v, text = verdict(dims)
    return Finding("dimension_dependency", text, v, section, priority=len(dims.get("dependency") or []))


def dims_figure(dims: dict, title: str) -> str:
    counts = dims.get("core_counts")
    massive = dims.get("massive") or {}
    peak = massive.get("max_per_dim")
    if not counts and not peak:
        return note("dimensions.json has neither per-dimension core counts nor activation maxima: no figure.")
    fig, axes = new_figure(2 if counts and peak else 1, 1, 11.0, 3.0)
    marked = set(massive.get("dims") or [])
    top = {r["dim"] for r in dims.get("dependency") or []}
    ax_i = 0
    if counts:
        ax = axes[ax_i]
        ax_i += 1
        colors = ["#b3261e" if d in marked else "#e8a33d" if d in top else "#5f6368" for d in range(len(counts))]
        ax.bar(range(len(counts)), counts, width=1.0, color=colors)
        ax.set_xlabel("hidden dimension", fontsize=8)
        ax.set_ylabel("core entries on it", fontsize=8)
        ax.set_title("core region per hidden dimension (orange: perturbed, red: massive)", fontsize=9)
    if peak:
        ax = axes[ax_i]
        colors = ["#b3261e" if d in marked else "#5f6368" for d in range(len(peak))]
        ax.bar(range(len(peak)), peak, width=1.0, color=colors)
        ax.set_yscale("log")
        if is_number(massive.get("median")) and is_number(massive.get("ratio")):
            ax.axhline(float(massive["median"]) * float(massive["ratio"]), color="#1a73e8", ls="--", lw=0.9,
                       label=f"{fmt(massive['ratio'])} x median")
            ax.legend(fontsize=7)
        ax.set_xlabel("hidden dimension", fontsize=8)
        ax.set_ylabel("largest |activation| (log)", fontsize=8)
        ax.set_title("residual-stream activations after any layer", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure(fig, "Left: how many core-region entries lie on each hidden dimension (in the rows or columns of "
                       "every matrix reading or writing the residual stream). Right: the largest magnitude each "
                       "dimension reaches in the residual stream on the held-out chunks; above the dashed line a "
                       "dimension counts as massive.")


def dims_tables(dims: dict) -> str:
    rows = []
    for r in dims.get("dependency") or []:
        rows.append((r["dim"], r.get("core_count"), f"{r['param']}[{','.join(map(str, r['index']))}]", r.get("value"),
                     _least(r.get("ppl_ratio")), _most(r.get("ppl_ratio")), r.get("control_dim"),
                     _least(r.get("control_ppl_ratio")), _most(r.get("control_ppl_ratio"))))
    op = (dims.get("dependency") or [{}])[0].get("op")
    out = table(["dimension", "core entries", "perturbed parameter", "value", f"ppl ratio min ({op})", "ppl ratio max",
                 "control's dimension", "control ratio min", "control ratio max"], rows)
    supers = dims.get("super_weights") or []
    if supers:
        out += "<h4>Super-weight candidates</h4>" + table(
            ["layer", "parameter[index]", "value", "largest input |x|", "largest output |y|"],
            [(s["layer"], f"{s['param']}[{','.join(map(str, s['index']))}]", s.get("value"), s.get("in_max"),
              s.get("out_max")) for s in supers])
    co = dims.get("coincide") or {}
    out += kv_table([("perturbed dimensions that are massive", ", ".join(map(str, co.get("both") or [])) or "none"),
                     ("massive dimensions not among them", ", ".join(map(str, co.get("only_massive") or [])) or "none"),
                     ("Jaccard of the two lists", co.get("jaccard"))])
    return out


__all__ = ["dims_figure", "dims_tables", "finding", "verdict"]
