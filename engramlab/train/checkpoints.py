"""Checkpoint schedules: which steps of a run are saved.

Learning dynamics happen early (the drop to the baseline takes a few percent of a run), so the
default schedule is dense early and even later. Grammar::

    dense:N      N/2 log-spaced steps over the first 10% of the run + N/2 evenly spaced over all
    log:N        N log-spaced steps from 1 to the last step
    every:K      every K steps
    none         no intermediate checkpoints

Step 0 (the initialisation) and the last step are always included.
"""

from __future__ import annotations

import numpy as np

from engramlab.errors import EngramError

GRAMMAR = "dense:N | log:N | every:K | none"


def checkpoint_steps(spec: str, total_steps: int) -> list[int]:
    """Sorted unique steps in [0, total_steps] at which to save a checkpoint."""
    name, _, arg = spec.partition(":")
    try:
        n = int(arg) if arg else None
    except ValueError:
        n = None
    if name != "none" and (n is None or n < 1):
        raise EngramError(f"--checkpoints {spec!r}: expected {GRAMMAR} with a positive integer")
    steps: set[int] = {0, total_steps}
    if name == "every":
        steps.update(range(n, total_steps + 1, n))
    elif name == "log":
        steps.update(np.unique(np.geomspace(1, max(total_steps, 1), n).round().astype(int)).tolist())
    elif name == "dense":
        early = max(1, total_steps // 10)
        steps.update(np.unique(np.geomspace(1, early, max(1, n // 2)).round().astype(int)).tolist())
        steps.update(np.linspace(0, total_steps, max(2, n - n // 2 + 1)).round().astype(int).tolist())
    elif name != "none":
        raise EngramError(f"--checkpoints {spec!r}: unknown schedule; expected {GRAMMAR}")
    return sorted(s for s in steps if 0 <= s <= total_steps)
