"""Tests for ewtune_tf/accounting/pllr.py: spec §3.3 identities and §11.1 vectors."""

import math

import numpy as np
import pytest
from scipy import integrate

from ewtune_tf.accounting import pllr

# Spec §11.1: (q, sigma) -> (kappa_1..4 under P, kappa_1..4 under Q).
CASES = {
    "A": (
        (0.01, 0.8),
        (-1.671653e-4, 3.171047e-4, 4.707668e-5, 1.619817e-5),
        (1.766525e-4, 3.742798e-4, 6.981175e-5, 3.172822e-5),
    ),
    "B": (
        (2000 / 67349, 0.7865),
        (-1.340540e-3, 2.389767e-3, 7.392145e-4, 4.409551e-4),
        (1.513746e-3, 3.441768e-3, 1.494420e-3, 1.247610e-3),
    ),
    "C": (
        (2000 / 392702, 0.573),
        (-1.756536e-4, 3.062732e-4, 1.073737e-4, 8.342005e-5),
        (2.043668e-4, 4.828973e-4, 2.907324e-4, 3.729307e-4),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cumulant_vectors(case):
    (q, s), kp, kq = CASES[case]
    np.testing.assert_allclose(pllr.cumulants(q, s, "P")[:4], kp, rtol=1e-6)
    np.testing.assert_allclose(pllr.cumulants(q, s, "Q")[:4], kq, rtol=1e-6)


@pytest.mark.parametrize("q,s", [(0.01, 0.8), (3e-4, 3.0), (0.1, 0.5), (1.0, 1.0), (2000 / 392702, 0.573)])
def test_identities(q, s):
    mu = 1.0 / s
    # Normalization E_P[e^L] = 1 <=> K(1) = 0.
    assert abs(pllr.tilted_cumulants(q, s, 1.0).cgf) < 1e-14
    # Second exponential moment.
    k2 = pllr.tilted_cumulants(q, s, 2.0).cgf
    assert math.exp(k2) == pytest.approx(1 + q * q * math.expm1(mu * mu), rel=1e-10)
    # Integer exponential moments (RDP moments), lambda = 3.
    lam = 3
    expected = sum(
        math.comb(lam, k) * (1 - q) ** (lam - k) * q**k * math.exp(k * (k - 1) * mu * mu / 2) for k in range(lam + 1)
    )
    assert math.exp(pllr.tilted_cumulants(q, s, 3.0).cgf) == pytest.approx(expected, rel=1e-10)
    # Signs of the means: E_P L = -KL(P||Q) < 0 < E_Q L = KL(Q||P).
    assert pllr.cumulants(q, s, "P")[0] < 0 < pllr.cumulants(q, s, "Q")[0]


def test_change_of_measure_against_quadrature():
    q, s = 0.01, 0.8
    mu = 1 / s
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    L = lambda x: float(pllr.pllr(np.array([x]), q, s)[0])
    for k in (1, 2, 3):
        eq = integrate.quad(
            lambda x: L(x) ** k * ((1 - q) * phi(x) + q * phi(x - mu)),
            -40,
            40,
            epsabs=0,
            epsrel=1e-12,
            limit=200,
            points=[0, mu],
        )[0]
        ep = integrate.quad(
            lambda x: L(x) ** k * math.exp(L(x)) * phi(x), -40, 40, epsabs=0, epsrel=1e-12, limit=200, points=[0, mu]
        )[0]
        assert eq == pytest.approx(ep, rel=1e-9)
        assert pllr.raw_moments(q, s, "Q")[k - 1] == pytest.approx(eq, rel=1e-8)


def test_tilted_derivatives_match_finite_differences():
    q, s, t, h = 0.02, 0.9, 2.5, 1e-4
    c = pllr.tilted_cumulants(q, s, t)
    kp = pllr.tilted_cumulants(q, s, t + h)
    km = pllr.tilted_cumulants(q, s, t - h)
    assert (kp.cgf - km.cgf) / (2 * h) == pytest.approx(c.k1, rel=1e-6)
    assert (kp.k1 - km.k1) / (2 * h) == pytest.approx(c.k2, rel=1e-6)
    assert (kp.k3 - km.k3) / (2 * h) == pytest.approx(c.k4, rel=1e-5)


def test_pllr_is_stable_in_the_tails():
    x = np.array([-1e3, -30.0, 0.0, 30.0, 1e3])
    out = pllr.pllr(x, 1e-4, 0.7)
    assert np.all(np.isfinite(out))
    assert out[0] == pytest.approx(math.log1p(-1e-4))
    mu = 1 / 0.7
    assert out[-1] == pytest.approx(mu * 1e3 - mu * mu / 2 + math.log(1e-4), rel=1e-12)
    assert np.all(np.diff(out) >= 0) and out[-1] > out[2] > out[1]
