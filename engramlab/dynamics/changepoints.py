"""When does a metric change over training: a knee, a half-way step, a settling step, a trend test.

Every function takes a metric's values over checkpoint steps (``evolution.jsonl`` columns) and
drops the pairs whose value is None or NaN first (True / False count as 1 / 0), so a checkpoint
where an analysis was skipped does not break the series. Steps are sorted; nothing here needs
torch.

Knee (``knee_fit``): the formation -> optimization phase-shift detector. With x = log(step + 1)
(or x = step with ``log_x=False``), fit the continuous two-segment line

    f_k(x) = v + b1 * min(x - k, 0) + b2 * max(x - k, 0)

by least squares, for every knee k among the observed x's that leaves at least two distinct x's
on each side (the knee point itself counts on both), and keep the k of least

    sse(k) = sum_i (y_i - f_k(x_i))^2.

``v`` is the fitted value at the knee, ``b1`` the slope before it (steep while the mechanism
forms), ``b2`` after (flat once it is only being tuned). With ``refine=True`` k is then moved
continuously between the neighbouring observed x's (bounded scalar minimisation of sse(k), kept
within the second to the second-last observed x), and ``knee_step`` is the observed step nearest
the refined knee. ``improvement = 1 - sse / sse_one_line`` compares with the single best line
(1: the knee explains everything one line could not; 0: no better than one line, also when one
line already fits exactly). Fewer than four points: None.

Half step (``half_step``): the first step whose value reaches ``fraction`` x the final value.
Settle step (``settle_step``): the first step from which every later value stays within ``tol``
of the final value. Trend (``trend_test``): Kendall's tau between two sequences with its
one-sided p-value; ``deep_to_shallow`` asks whether deeper layer bands settle earlier.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ALTERNATIVES = ("less", "greater", "two-sided")


def _finite(v) -> bool:
    """A usable number (bools count as 0 / 1, so a ``role_held`` column is a series too)."""
    if v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def clean_series(steps: Sequence, values: Sequence) -> tuple[list, list[float]]:
    """(steps, values) sorted by step, without the pairs whose value is None / NaN / infinite."""
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    pairs = sorted(((s, float(v)) for s, v in zip(steps, values) if s is not None and _finite(v)),
                   key=lambda p: float(p[0]))
    return [s for s, _ in pairs], [v for _, v in pairs]


def _axis(steps: Sequence, log_x: bool) -> np.ndarray:
    x = np.asarray([float(s) for s in steps], dtype=np.float64)
    if log_x:
        if (x <= -1).any():
            raise ValueError("log(step + 1) needs steps > -1; pass log_x=False for such an axis")
        return np.log1p(x)
    return x


def hinge_fit(x: np.ndarray, y: np.ndarray, k: float) -> tuple[float, np.ndarray]:
    """(sse, [v, b1, b2]) of the continuous two-segment least-squares line with its knee at ``k``.

    x, y: (n,) float. Design columns 1, min(x - k, 0), max(x - k, 0): so v is the fit at the knee
    and b1 / b2 the slopes before / after it."""
    design = np.column_stack([np.ones_like(x), np.minimum(x - k, 0.0), np.maximum(x - k, 0.0)])  # (n, 3)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r = y - design @ coef
    return float(r @ r), coef


def _one_line_sse(x: np.ndarray, y: np.ndarray) -> float:
    design = np.column_stack([np.ones_like(x), x])  # (n, 2)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r = y - design @ coef
    return float(r @ r)


def knee_fit(steps: Sequence, values: Sequence, log_x: bool = True, refine: bool = False) -> dict | None:
    """The best continuous two-segment fit of ``values`` against log(step + 1) (see the module
    docstring). Returns knee_step, knee_x, knee_value, slope_before, slope_after, sse,
    sse_one_line, improvement, n_points; None with fewer than four points (or fewer than three
    distinct steps)."""
    steps, vals = clean_series(steps, values)
    if len(steps) < 4:
        return None
    x, y = _axis(steps, log_x), np.asarray(vals, dtype=np.float64)
    distinct = np.unique(x)
    if len(distinct) < 3:
        return None
    candidates = distinct[1:-1]  # each leaves >= 2 distinct x's on each side, itself included
    fits = [hinge_fit(x, y, k) for k in candidates]
    best = int(np.argmin([sse for sse, _ in fits]))
    k, (sse, coef) = float(candidates[best]), fits[best]
    if refine:
        k, sse, coef = _refine(x, y, distinct, best + 1, k, sse, coef)
    sse = max(sse, 0.0)
    one = _one_line_sse(x, y)
    nearest = int(np.argmin(np.abs(x - k)))  # the observed step at (or nearest) the knee
    return {"knee_step": steps[nearest], "knee_x": k, "knee_value": float(coef[0]),
            "slope_before": float(coef[1]), "slope_after": float(coef[2]), "sse": sse, "sse_one_line": one,
            "improvement": 1.0 - sse / one if one > 0 else 0.0, "n_points": len(steps)}


def _refine(x, y, distinct, i, k, sse, coef):
    """Move the knee continuously between distinct[i - 1] and distinct[i + 1], within the second
    to the second-last distinct x (so two points stay on each side); keep the grid knee if no
    better point is found."""
    from scipy.optimize import minimize_scalar

    lo, hi = max(distinct[i - 1], distinct[1]), min(distinct[i + 1], distinct[-2])
    if hi <= lo:
        return k, sse, coef
    got = minimize_scalar(lambda t: hinge_fit(x, y, t)[0], bounds=(float(lo), float(hi)), method="bounded")
    if got.success and float(got.fun) < sse:
        new_sse, new_coef = hinge_fit(x, y, float(got.x))
        return float(got.x), new_sse, new_coef
    return k, sse, coef


def half_step(steps: Sequence, values: Sequence, fraction: float = 0.5, final: float | None = None):
    """The first step whose value is >= ``fraction`` x ``final`` (default: the last value); None
    if no value reaches it, if ``final`` <= 0, or without values."""
    steps, vals = clean_series(steps, values)
    if not vals:
        return None
    final = vals[-1] if final is None else float(final)
    if final <= 0:
        return None
    target = fraction * final
    return next((s for s, v in zip(steps, vals) if v >= target), None)


def settle_step(steps: Sequence, values: Sequence, tol: float, final: float | None = None):
    """The first step from which every later value (itself included) is within ``tol`` of
    ``final`` (default: the last value), i.e. |v - final| <= tol; None without values."""
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    steps, vals = clean_series(steps, values)
    if not vals:
        return None
    final = vals[-1] if final is None else float(final)
    settled = None
    for s, v in zip(reversed(steps), reversed(vals)):  # walk back while the values stay close
        if abs(v - final) > tol:
            break
        settled = s
    return settled


def trend_test(x: Sequence, y: Sequence, alternative: str = "less") -> dict:
    """Kendall's tau-b of (x, y) over the pairs where both are numbers, with scipy's p-value for
    ``alternative`` ("less": tau < 0, y falls as x grows). Returns stat, p, n; stat and p are None
    with fewer than two pairs or when a side is constant."""
    from scipy.stats import kendalltau

    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r}: choose one of {', '.join(ALTERNATIVES)}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if _finite(a) and _finite(b)]
    out = {"stat": None, "p": None, "n": len(pairs)}
    if len(pairs) < 2:
        return out
    res = kendalltau([a for a, _ in pairs], [b for _, b in pairs], alternative=alternative)
    if _finite(res.statistic) and _finite(res.pvalue):
        out.update(stat=float(res.statistic), p=float(res.pvalue))
    return out


def deep_to_shallow(settle_by_band: dict) -> dict:
    """Do deeper bands settle earlier? Kendall's tau between band index (0 = shallowest) and
    settle step, one-sided towards tau < 0. Bands without a settle step (None) are left out of
    the test. Returns stat, p, n and ``settle_step.L{band}`` for every band given."""
    # Keys may be strings ("3") when the mapping was read back from JSON.
    by_band = sorted(((int(b), s) for b, s in settle_by_band.items()), key=lambda p: p[0])
    bands, steps = [b for b, _ in by_band], [s for _, s in by_band]
    out = trend_test(bands, steps, alternative="less")
    out.update({f"settle_step.L{b}": s for b, s in zip(bands, steps)})
    return out


__all__ = ["clean_series", "deep_to_shallow", "half_step", "hinge_fit", "knee_fit", "settle_step", "trend_test"]
