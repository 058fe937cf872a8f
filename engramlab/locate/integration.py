"""Quadrature rules for integrated gradients, shared by knowledge-neuron IG and EAP-IG.

Both integrate a gradient along the straight path x(alpha) = b + alpha (a - b) from a baseline b
(alpha = 0) to the input a (alpha = 1):

    IG = (a - b) * integral_0^1 dF/dx(x(alpha)) d alpha  ~  (a - b) * sum_k w_k dF/dx(x(alpha_k))

with m steps (for the Riemann rules, intervals of width 1/m; for Gauss-Legendre, m nodes):

=========== ======================== =============================== =====================================
rule        alpha_k                  w_k                             used by
=========== ======================== =============================== =====================================
right       k/m, k = 1..m            1/m                             Hanna et al. 2024 (EAP-IG paper) and
                                                                     the DynamicKnowledgeCircuits fork;
                                                                     engramlab's default for both locators
left        k/m, k = 0..m-1          1/m                             Dai et al. 2022's code
                                                                     (Hunter-DDM/knowledge-neurons),
                                                                     hannamw/EAP-IG v2 (range(0, steps))
trapezoid   k/m, k = 0..m            1/(2m) at the ends, else 1/m    (m + 1 points; exact for a linear
                                                                     gradient)
midpoint    (k - 1/2)/m, k = 1..m    1/m                             (second order like trapezoid, with m
                                                                     points; error about half of its)
gauss-      (1 + x_k)/2, x_k the     v_k/2, v_k the Legendre         (m points; exact for a gradient that
legendre    roots of P_m             weights                         is a polynomial of degree 2m - 1)
=========== ======================== =============================== =====================================

EleutherAI's knowledge-neurons package averages the gradient over linspace(0, 1, m) (both ends,
m points, equal weights); it differs from trapezoid with m - 1 intervals only in the end weights
and is not offered.

The one-sided sums have error O(1/m), trapezoid and midpoint O(1/m^2); Gauss-Legendre's error falls
faster than any power of 1/m when the gradient is smooth along the path, so 2-4 nodes often beat 20
uniform steps (benchmarks/bench_neurons.py and bench_circuits.py measure the completeness error per
rule and m). Neither midpoint nor Gauss-Legendre evaluates either end of the path.
"""

from __future__ import annotations

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.locate.integration_rules import RULES, check_rule  # noqa: F401 (one definition, re-exported)


def integration_points(rule: str, steps: int) -> list[tuple[float, float]]:
    """The (alpha_k, w_k) pairs of ``rule`` with ``steps`` intervals (for gauss-legendre: nodes); the
    weights sum to 1.

    right/left/midpoint/gauss-legendre give ``steps`` points, trapezoid ``steps + 1``."""
    check_rule(rule)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngramError(f"steps must be a whole number >= 1, got {steps!r}")
    if rule == "right":
        return [(k / steps, 1.0 / steps) for k in range(1, steps + 1)]
    if rule == "left":
        return [(k / steps, 1.0 / steps) for k in range(0, steps)]
    if rule == "midpoint":
        return [((k - 0.5) / steps, 1.0 / steps) for k in range(1, steps + 1)]
    if rule == "gauss-legendre":
        # numpy's nodes and weights are for [-1, 1]; map x -> (1 + x)/2, which halves the weights.
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return [(float((1.0 + x) / 2.0), float(w / 2.0)) for x, w in zip(nodes, weights)]
    return [(k / steps, (0.5 if k in (0, steps) else 1.0) / steps) for k in range(0, steps + 1)]


def integration_tensors(rule: str, steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``integration_points`` as two float32 tensors (alphas (n,), weights (n,))."""
    pairs = integration_points(rule, steps)
    alphas = torch.tensor([a for a, _ in pairs], dtype=torch.float32, device=device)
    weights = torch.tensor([w for _, w in pairs], dtype=torch.float32, device=device)
    return alphas, weights
