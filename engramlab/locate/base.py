"""What every locator shares: the Result contract, its files, the registry (filled in below)."""

from __future__ import annotations


def mean_of(values) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def short(x: float) -> float:
    """``x`` to 6 significant digits: what records store, so a saved run re-derives the same sets."""
    return float(f"{x:.6g}")
