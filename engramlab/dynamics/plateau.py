"""Learning-curve phases and scaling fits.

The attribute loss of a model learning facts about N individuals goes through three phases: a
fast drop to the no-knowledge baseline (the loss of predicting each attribute's marginal), a
plateau near that baseline, and a fall below it once individual knowledge forms.

Criterion (both thresholds configurable, relative to the baseline loss B):

* ``plateau_start_step``: first evaluation with loss <= B * (1 + reach)  (default reach 0.05);
* ``plateau_end_step``: first evaluation after that with loss <= B * (1 - exit) (default 0.10).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def detect_plateau(steps: Sequence[int], losses: Sequence[float], baseline: float,
                   reach: float = 0.05, exit: float = 0.10) -> tuple[int | None, int | None]:
    """(plateau_start_step, plateau_end_step); None where the curve never gets there."""
    start = end = None
    for step, loss in zip(steps, losses):
        if start is None and loss <= baseline * (1 + reach):
            start = step
        if start is not None and loss <= baseline * (1 - exit):
            end = step
            break
    return start, end


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares fit of y = a * x**b in log-log space.

    Returns a, b, r2 (of the log-log fit) and n. Needs at least two positive points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or len(np.unique(x)) < 2:
        return {"a": None, "b": None, "r2": None, "n": int(len(x))}
    lx, ly = np.log(x), np.log(y)
    b, log_a = np.polyfit(lx, ly, 1)
    pred = log_a + b * lx
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(np.exp(log_a)), "b": float(b), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "n": int(len(x))}
