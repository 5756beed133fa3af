"""Tests for ewtune_tf/accounting/tilted.py (saddlepoint / Lugannani-Rice)."""

import math

import pytest
from scipy import stats

from ewtune_tf.accounting import tilted

A = (0.01, 0.8)
B = (2000 / 67349, 0.7865)
C = (2000 / 392702, 0.573)


@pytest.mark.parametrize(
    "qs,m,delta,remove,add",
    [
        # Exact values: spec §10.3 / §11.2 (PLD remove / add).
        (A, 1000, 0.015, 1.1617, None),
        (B, 660, 1e-5, 8.2893, 5.091),
        (C, 3920, 1e-6, 9.6006, 4.615),
    ],
)
def test_matches_exact_epsilon(qs, m, delta, remove, add):
    comps = [(qs[0], qs[1], m)]
    eps, diag = tilted.epsilon_from_delta(comps, delta, 2, "remove")
    assert eps == pytest.approx(remove, rel=1e-3)
    assert diag.t > 1
    if add is not None:
        eps_add, _ = tilted.epsilon_from_delta(comps, delta, 2, "add")
        assert eps_add == pytest.approx(add, abs=5e-3)


def test_gaussian_mechanism_is_exact():
    # q = 1: S ~ N(+-m mu^2/2, m mu^2), so delta is the GDP formula and the
    # saddlepoint approximation is exact (all higher cumulants vanish).
    sigma, m, eps = 2.0, 10, 1.5
    mu = math.sqrt(m) / sigma
    exact = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    for order in (1, 2):
        for direction in ("remove", "add"):
            got, _ = tilted.delta_from_epsilon([(1.0, sigma, m)], eps, order, direction)
            assert got == pytest.approx(exact, rel=1e-9)


def test_delta_epsilon_inverse():
    comps = [(B[0], B[1], 660)]
    for direction in ("remove", "add"):
        eps, _ = tilted.epsilon_from_delta(comps, 1e-6, 2, direction)
        d, _ = tilted.delta_from_epsilon(comps, eps, 2, direction)
        assert d == pytest.approx(1e-6, rel=1e-8)


def test_centre_is_stable():
    # Around eps = m E_Q[L] the Q-tail tilt is ~0: no blow-up, continuous.
    comps = [(A[0], A[1], 1000)]
    centre = 1000 * 1.766525e-4
    vals = [tilted.delta_from_epsilon(comps, centre + h, 2, "remove")[0] for h in (-1e-3, -1e-6, 0.0, 1e-6, 1e-3)]
    assert all(0 < v < 1 for v in vals)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[0] - vals[-1] < 1e-3


def test_add_direction_beyond_support_is_zero():
    # S >= m log(1 - q), so delta_add(eps) = 0 for eps >= -m log(1 - q).
    d, _ = tilted.delta_from_epsilon([(0.01, 1.0, 10)], 0.2, 2, "add")
    assert d == 0.0


def test_rare_jump_regime_reports_large_correction_or_fails():
    comps = [(0.01, 0.8, 20)]
    try:
        _, diag = tilted.epsilon_from_delta(comps, 0.015, 2, "remove")
    except tilted.TiltedInvalidError:
        return
    assert diag.correction > 0.05 or abs(diag.lambda3) > 1
