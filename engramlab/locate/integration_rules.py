"""The names of the integration rules (``engramlab.locate.integration``), without torch.

Knowledge-neuron IG and EAP-IG both offer ``RULES`` as a config choice; the configs (and so the
command line) need the names long before any gradient is taken, so they live here, importing
nothing heavy. The rules themselves (points and weights) are in ``engramlab.locate.integration``.
"""

from __future__ import annotations

from engramlab.errors import EngramError

RULES = ("right", "left", "trapezoid", "midpoint", "gauss-legendre")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise EngramError(f"integration rule {rule!r}: choose one of {', '.join(RULES)} (--ig-rule)")
