"""The quadrature rules shared by knowledge-neuron IG and EAP-IG, against hand-worked values."""

from __future__ import annotations

import math

import pytest

from engramlab.errors import EngramError
from engramlab.locate.integration import RULES, integration_points


def test_midpoint_points_by_hand():
    assert integration_points("midpoint", 4) == [(0.125, 0.25), (0.375, 0.25), (0.625, 0.25), (0.875, 0.25)]


def test_gauss_legendre_two_nodes_by_hand():
    # The 2-node rule on [-1, 1] has nodes -+1/sqrt(3) and weights 1; on [0, 1], (1 -+ 1/sqrt(3))/2 and 1/2.
    (a0, w0), (a1, w1) = integration_points("gauss-legendre", 2)
    assert a0 == pytest.approx((1 - 1 / math.sqrt(3)) / 2, abs=1e-15)
    assert a1 == pytest.approx((1 + 1 / math.sqrt(3)) / 2, abs=1e-15)
    assert w0 == pytest.approx(0.5, abs=1e-15) and w1 == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gauss_legendre_is_exact_to_degree_2m_minus_1(m):
    pairs = integration_points("gauss-legendre", m)
    for degree in range(2 * m):
        assert sum(w * a ** degree for a, w in pairs) == pytest.approx(1 / (degree + 1), abs=1e-12)
    # and not beyond: x^(2m) is integrated with an error
    assert abs(sum(w * a ** (2 * m) for a, w in pairs) - 1 / (2 * m + 1)) > 1e-11


@pytest.mark.parametrize("rule", RULES)
def test_weights_sum_to_one_and_points_lie_on_the_path(rule):
    for m in (1, 4, 7):
        pairs = integration_points(rule, m)
        assert sum(w for _, w in pairs) == pytest.approx(1.0, abs=1e-12)
        assert all(0.0 <= a <= 1.0 and w >= 0 for a, w in pairs)


def test_error_order_on_a_smooth_integrand():
    # int_0^1 e^x dx = e - 1. One-sided sums are first order, midpoint second, Gauss-Legendre faster still.
    def err(rule, m):
        return abs(sum(w * math.exp(a) for a, w in integration_points(rule, m)) - (math.e - 1))
    assert err("right", 20) / err("right", 40) == pytest.approx(2.0, rel=0.05)
    assert err("midpoint", 20) / err("midpoint", 40) == pytest.approx(4.0, rel=0.05)
    assert err("midpoint", 5) < err("right", 20) and err("midpoint", 5) < err("left", 20)
    assert err("gauss-legendre", 3) < err("trapezoid", 20)


def test_unknown_rule_names_the_option():
    with pytest.raises(EngramError, match="--ig-rule"):
        integration_points("simpson", 4)
