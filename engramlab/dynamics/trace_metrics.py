"""Causal tracing over checkpoints (``engram evolve --analysis trace``).

Per checkpoint, from its ``TraceResult`` (``engramlab.locate.trace.find``)::

    peak_mlp_layer       argmax_l  mean_facts IE_mlp[l, last subject token]
    mean_max_effect      mean_facts max_{l, i} IE_resid[l, i]
    mean_max_mlp_effect  mean_facts max_{l, i} IE_mlp[l, i]
    mean_total_effect    mean_facts (P_clean - P_corrupt)
    mlp_last_subject.L{l}  mean_facts IE_mlp[l, last subject token]   (the profile the peak is taken on)
    peak_mlp_layer_final   peak_mlp_layer == the final checkpoint's (bool)

so the depth of the MLP peak can be followed over training next to the logit-lens and circuit
measurements of the same run (compare.py adds them as ``trace.*`` columns).
"""

from __future__ import annotations

import math


def trace_row(result) -> dict:
    """The per-checkpoint columns of the module docstring for one ``TraceResult``."""
    s = result.summary()
    row = {"peak_mlp_layer": s.get("trace.peak_mlp_layer"), "mean_max_effect": s.get("trace.mean_max_indirect_effect"),
           "mean_max_mlp_effect": s.get("trace.mean_max_mlp_effect"), "mean_total_effect": s.get("trace.mean_total_effect")}
    if s.get("n_facts"):
        from engramlab.locate.trace.config import KINDS, TOKEN_KINDS

        profile = result.mean_maps()[KINDS.index("mlp"), :, TOKEN_KINDS.index("last subject")].tolist()  # (L,)
        row.update({f"mlp_last_subject.L{l}": None if math.isnan(v) else float(v) for l, v in enumerate(profile)})
    return row


def trace_series(results: list[tuple[int, object]]) -> dict[int, dict]:
    """Per step, for (step, TraceResult) pairs in step order (the last is the final)."""
    if not results:
        return {}
    rows = {step: trace_row(r) for step, r in results}
    final = rows[results[-1][0]]["peak_mlp_layer"]
    for row in rows.values():
        row["peak_mlp_layer_final"] = row["peak_mlp_layer"] is not None and row["peak_mlp_layer"] == final
    return rows


__all__ = ["trace_row", "trace_series"]
