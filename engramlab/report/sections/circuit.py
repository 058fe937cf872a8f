"""Report section of ``engram circuit``: the drawing (from ``scores.safetensors``), faithfulness vs
N, the MIB CPR / CMD curve (``mib.json``), head roles, the logit lens; the ``sparse_circuits``
finding."""

from __future__ import annotations

from collections import Counter

from engramlab.report.page import Finding, Section, details, figure, fmt, kv_table, new_figure, note, para, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import left_out, verb_section, locator_config, n_layers_of, number, model_name


def circuit_verdict(faithfulness, edge_fraction) -> str:
    """The ``sparse_circuits`` rule: reproduced at faithfulness >= 0.8 with <= 5% of the edges; partly
    at faithfulness >= 0.5 (at any size: a faithful circuit of more than 5% counts here)."""
    f, frac = number(faithfulness), number(edge_fraction)
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
                 if number(c.get("edge_fraction")) and number(c.get("faithfulness")) is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="faithfulness (held out)")
    hits = [(p[0], p[2]) for p in pts if number(p[2]) is not None]
    if hits:
        ax.plot(*zip(*hits), "s--", ms=3, alpha=0.6, label="Hit@10 of the circuit")
    if number(chosen[0]) and number(chosen[1]) is not None:
        ax.plot([chosen[0]], [chosen[1]], "*", ms=12, color="#b3261e", label=f"chosen: {chosen[2]} edges", zorder=3)
    ax.axhline(0.8, color="grey", ls=":", lw=0.8, label="0.8 (the rule)")
    ax.axvline(0.05, color="grey", ls="--", lw=0.8, label="5% of the edges")
    if number(target) is not None:
        ax.axhline(target, color="#8a6d00", ls="-.", lw=0.7, label=f"target {fmt(target)}")
    ax.set_xscale("log")
    ax.set_xlabel("share of the graph's edges kept")
    ax.set_ylabel("faithfulness / Hit@10")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig


def _mib_figure(mib: dict, title: str):
    """Faithfulness against the requested edge fraction of the MIB sweep, linear x (the axis CPR and
    CMD integrate over): the area under the curve is CPR, the shaded area between it and 1 is CMD."""
    fig, (ax,) = new_figure(1, 1, 10.0, 3.3)
    pts = [(c["fraction"], c["faithfulness"]) for c in mib.get("curve") or []
           if number(c.get("fraction")) is not None and number(c.get("faithfulness")) is not None]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, "o-", ms=3, label=f"faithfulness (held out), {mib.get('mib_ranking', '—')} ranking")
    ax.fill_between(xs, ys, 0, color="#1f77b4", alpha=0.12, label=f"CPR {fmt(mib.get('cpr'))} (area under)")
    ax.fill_between(xs, ys, 1, color="#d62728", alpha=0.12, label=f"CMD {fmt(mib.get('cmd'))} (area to 1)")
    ax.axhline(1, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("share of the graph's edges requested (top floor(p x edges))")
    ax.set_ylabel("faithfulness")
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
                  if number(r.get("median_rank")) is not None)
    ax.plot([r[0] for r in rows], [max(1.0, r[1]) for r in rows], "o-", ms=3, label="median rank of the answer")
    ax.axhline(1, color="grey", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (1 = top)")
    first = next((r[0] for r in rows if r[1] <= 1), None)
    if first is not None:
        ax.axvline(first, color="#12733a", ls="--", lw=0.8, label=f"first layer at rank 1: {first}")
    shares = [(r[0], r[2]) for r in rows if number(r[2]) is not None]
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
    cfg = locator_config(run).get("config") or ev.get("config") or {}
    name = model_name(run)
    faith = s.get("faithfulness", metrics.get("faithfulness"))
    kept, total = s.get("n_edges_kept"), s.get("n_edges_total")
    frac = s.get("edge_fraction")
    if frac is None and number(kept) is not None and number(total):
        frac = kept / total
    body = kv_table([("model", name), ("method", f"{cfg.get('method', '—')}, {fmt(cfg.get('steps'))} steps, "
                                                 f"ablation {s.get('ablation', cfg.get('ablation', '—'))}"),
                     ("edges kept / total", f"{fmt(kept)} / {fmt(total)} ({fmt(100 * frac if frac is not None else None)}%)"),
                     ("nodes kept / total", f"{fmt(s.get('n_nodes_kept'))} / {fmt(s.get('n_nodes'))}"),
                     ("faithfulness, held out", faith),
                     ("MIB CPR (higher is better) / CMD (lower is better)",
                      f"{fmt(s.get('cpr'))} / {fmt(s.get('cmd'))} ({s.get('mib_ranking', '—')} ranking)"),
                     (("IG" if cfg.get("method", "eap-ig") == "eap-ig" else "first-order")
                      + " completeness error, discovery facts (weighted by |ΔM| / plain mean)",
                      f"{fmt(s.get('completeness_error'))} / {fmt(s.get('mean_completeness_error'))}"),
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
    mib = run.json("mib.json") or {}
    if mib.get("curve"):
        body += figure(_mib_figure(mib, f"MIB circuit scores ({name})"),
                       "The MIB sweep (Mueller et al. 2025): held-out faithfulness of the top floor(p x edges) circuit "
                       "at each edge fraction p (linear scale); CPR is the trapezoid area under the curve, CMD the "
                       "area between it and 1.")
    else:
        body += note("No MIB CPR/CMD curve (mib.json missing).")
    comp = run.json("components.json") or {}
    heads = comp.get("heads") or []
    n_layers = (run.json("circuit.json") or {}).get("graph", {}).get("n_layers") or n_layers_of(run)
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
    body += left_out(run.jsonl("skipped.jsonl"), "reason", "left out")
    verdict = circuit_verdict(faith, frac)
    words = (f"{name}: held-out faithfulness {fmt(faith)} with {fmt(kept)} of {fmt(total)} edges "
             f"({fmt(100 * frac if frac is not None else None)}%)")
    prio = int(total) if number(total) is not None else 0
    return body, [Finding("sparse_circuits", words, verdict, sid, priority=prio)]


@renderer("circuit")
def render_circuit(runs: list[RunView], report: Report) -> list[Section]:
    return verb_section("circuit", "Knowledge circuits", 80, (
        "Knowledge circuits (EAP-IG; Yao et al. 2024, Ou et al. 2025): the edges between "
        "attention heads and MLPs that carry a fact from the subject to the answer, scored on "
        "discovery facts and checked on held-out ones (faithfulness: the circuit's share of the "
        "model's logit difference over the corrupted baseline)."), runs, circuit_body)


