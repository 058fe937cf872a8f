"""What changed over training, from an evolve sweep's rows: series columns and change points.

``compare_over_time(rows, results, run_summary)`` adds to each ``evolution.jsonl`` row the
comparisons with the final (and previous) checkpoint of every analysis that has them
(``circuit_metrics.circuit_series`` -> ``circuit.*``, ``neuron_metrics.neuron_series`` ->
``neurons.*``, ``dkn_series`` -> ``dkn.*``, ``region_metrics.region_series`` -> ``regions.*``,
``trace_metrics.trace_series`` -> ``trace.*``) and returns the change points, each as a step with
its evidence:

* the plateau: ``plateau_start_step`` / ``plateau_end_step`` come from the training run itself
  (``engram train`` detects them on its evaluation loss; copied by ``evolve``);
* the formation -> optimization phase shift: the knee of a two-segment piecewise-linear fit of
  ``phase_shift_metric`` against log(step + 1) (``changepoints.knee_fit``): ``phase_shift_step``,
  ``phase_shift_slope_before`` / ``_after`` (per unit of log step), ``phase_shift_improvement``
  (1 - SSE / SSE of one line) and ``phase_shift_flattens`` (the slope after the knee is smaller in
  size than before: a formation -> optimization shift rather than a late jump). With circuits the metric is ``circuit.edge_jaccard_final`` and
  the knee of ``circuit.entropy`` is reported next to it (``entropy_knee_step``, its slopes);
* deep to shallow: per layer, the step at which the answer surfaces in the logit lens there -
  the first checkpoint from which the answer's median rank at that layer is 1 at every later
  checkpoint (layers where it is not 1 at the end are left out) - and Kendall's tau between layer
  and that step, one-sided towards deeper layers first
  (``deep_to_shallow_stat`` < 0, ``deep_to_shallow_p``). The same test on the step at which each
  band's share of circuit edges settles (within ``EDGE_SHARE_TOL`` of its final value) is
  ``edge_deep_to_shallow_stat`` / ``_p``;
* attention-based recall: ``mover_head_step``, the first checkpoint from which every circuit has
  a mover head, and ``attr_to_name_half_step``, where the run's attention from attribute to name (last
  layer) reaches half its final value - to set against the plateau.
"""

from __future__ import annotations

from engramlab.dynamics.changepoints import deep_to_shallow, half_step, knee_fit, settle_step

EDGE_SHARE_TOL = 0.05


def column(rows: list[dict], key: str) -> tuple[list[int], list]:
    """(steps, values) of ``key`` over the rows that have it."""
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _knee(rows: list[dict], key: str, prefix: str) -> dict:
    fit = knee_fit(*column(rows, key), log_x=True)
    if fit is None:
        return {f"{prefix}_step": None}
    return {f"{prefix}_step": fit["knee_step"], f"{prefix}_slope_before": fit["slope_before"],
            f"{prefix}_slope_after": fit["slope_after"], f"{prefix}_improvement": fit["improvement"],
            f"{prefix}_flattens": abs(fit["slope_after"]) < abs(fit["slope_before"])}


def lens_surface_steps(results: list[tuple[int, object]]) -> dict[int, int | None]:
    """layer -> the first checkpoint from which the answer ranks first in the logit lens at that
    layer (median rank over the evaluation pairs 1) at every later checkpoint; None where it does
    not rank first at the final checkpoint."""
    if not results or not getattr(results[-1][1], "lens", None):
        return {}
    n_layers = len(results[-1][1].lens)
    top = {layer: [] for layer in range(n_layers)}  # layer -> [ranks first?] per checkpoint
    for _, r in results:
        ranks = {int(rec["layer"]): rec.get("median_rank") for rec in (getattr(r, "lens", None) or [])}
        for layer in top:
            top[layer].append(ranks.get(layer) is not None and float(ranks[layer]) <= 1)
    steps = [s for s, _ in results]
    return {layer: next((steps[i] for i in range(len(steps)) if all(flags[i:])), None)
            for layer, flags in top.items()}


def compare_over_time(rows: list[dict], results: dict[str, list], run_summary: dict | None = None, *,
                      phase_metric: str = "auto", transplant: dict | None = None) -> dict:
    """Add the series columns to ``rows`` (in place) and return the change points (module docstring).
    ``results``: analysis name -> [(step, result)] in step order."""
    from engramlab.dynamics.circuit_metrics import circuit_series
    from engramlab.dynamics.neuron_metrics import dkn_series, neuron_series
    from engramlab.dynamics.region_metrics import region_series
    from engramlab.dynamics.trace_metrics import trace_series

    by_step = {r["step"]: r for r in rows}
    makers = {"circuit": circuit_series, "neurons": neuron_series, "dkn": dkn_series, "regions": region_series,
              "trace": trace_series}
    for name, make in makers.items():
        if results.get(name):
            for step, values in make(results[name]).items():
                by_step[step].update({f"{name}.{k}": v for k, v in values.items()})
    summary: dict = {}
    circuits = results.get("circuit") or []
    if phase_metric == "auto":
        phase_metric = "circuit.edge_jaccard_final" if circuits else "recall.top1_accuracy"
    summary["phase_shift_metric"] = phase_metric
    summary.update(_knee(rows, phase_metric, "phase_shift"))
    if circuits:
        summary.update(_knee(rows, "circuit.entropy", "entropy_knee"))
        surface = lens_surface_steps(circuits)
        d2s = deep_to_shallow(surface) if surface else {}
        summary["deep_to_shallow_stat"], summary["deep_to_shallow_p"] = d2s.get("stat"), d2s.get("p")
        summary["deep_to_shallow_n"] = d2s.get("n")
        summary.update({f"lens_surface_step.L{layer}": s for layer, s in surface.items()})
        n_bands = sum(1 for k in rows[-1] if k.startswith("circuit.edge_share.L")) if rows else 0
        settle = {b: settle_step(*column(rows, f"circuit.edge_share.L{b}"), EDGE_SHARE_TOL) for b in range(n_bands)}
        edge = deep_to_shallow(settle) if settle else {}
        summary["edge_deep_to_shallow_stat"], summary["edge_deep_to_shallow_p"] = edge.get("stat"), edge.get("p")
        summary.update({f"edge_settle_step.L{b}": s for b, s in settle.items()})
        steps, movers = column(rows, "circuit.n_mover_heads")
        summary["mover_head_step"] = next((s for i, s in enumerate(steps) if all(movers[i:])), None) \
            if movers and movers[-1] else None
    attn = sorted((k for k in (rows[-1] if rows else {}) if k.startswith("run.eval.attn.attr_to_name.L")),
                  key=lambda k: int(k.rsplit("L", 1)[1]))
    if attn:
        summary["attr_to_name_half_step"] = half_step(*column(rows, attn[-1]))
    if transplant and transplant.get("steps"):
        f = transplant["faithfulness"]
        summary["transplant_first_on_last"] = f[0][-1]   # the earliest circuit on the final model
        summary["transplant_last_on_first"] = f[-1][0]   # the final circuit on the earliest model
    return summary


__all__ = ["EDGE_SHARE_TOL", "column", "compare_over_time", "lens_surface_steps"]
