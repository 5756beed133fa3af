"""Tests for ewtune_tf/accounting/edgeworth.py: spec §11.2 / §11.3 vectors."""

import numpy as np
import pytest

from ewtune_tf.accounting import edgeworth

A = (0.01, 0.8)
B = (2000 / 67349, 0.7865)
C = (2000 / 392702, 0.573)


@pytest.mark.parametrize(
    "qs,m,delta,expected",
    [
        (A, 1000, 0.015, (1.228744, 1.148169, 1.153074)),
        (B, 660, 1e-5, (7.992899, 8.370244, 8.629450)),
        (C, 3920, 1e-6, (7.986994, 8.489489, 8.916014)),
    ],
)
def test_epsilon_vectors(qs, m, delta, expected):
    comps = [(qs[0], qs[1], m)]
    for order, want in zip((1, 2, 3), expected):
        got = edgeworth.epsilon_from_delta(comps, delta, order, directions=("remove",))
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    "qs,m,eps,d1,d2",
    [
        (A, 1000, 0.5, 8.5438e-2, 8.6683e-2),
        (A, 1000, 1.0, 2.5576e-2, 2.3313e-2),
        (A, 1000, 1.5, 7.9525e-3, 5.3820e-3),
        (A, 1000, 2.0, 1.7953e-3, 1.5437e-3),
        (B, 660, 2.0, 1.2785e-1, 1.2555e-1),
        (B, 660, 4.0, 2.1762e-2, 1.5312e-2),
        (B, 660, 6.0, 1.1673e-3, 1.4446e-3),
        (B, 660, 8.0, 9.7997e-6, 2.5977e-5),
    ],
)
def test_delta_vectors(qs, m, eps, d1, d2):
    cp, cq = edgeworth.summed_cumulants([(qs[0], qs[1], m)])
    assert float(edgeworth.delta_hat(eps, cp, cq, 1)) == pytest.approx(d1, rel=1e-4)
    assert float(edgeworth.delta_hat(eps, cp, cq, 2)) == pytest.approx(d2, rel=1e-4)


def test_failure_case_values_and_detection():
    comps = [(A[0], A[1], 20)]
    cp, cq = edgeworth.summed_cumulants(comps)
    want = {
        0.0: (1.367e-2, 2.569e-2),
        0.05: (3.38e-4, -1.48e-2),
        0.1: (3.36e-3, -3.42e-2),
        0.2: (1.82e-2, 5.21e-3),
        0.5: (3.1e-7, 1.0e-5),
    }
    for eps, (d1, d2) in want.items():
        assert float(edgeworth.delta_hat(eps, cp, cq, 1)) == pytest.approx(d1, rel=2e-2)
        assert float(edgeworth.delta_hat(eps, cp, cq, 2)) == pytest.approx(d2, rel=2e-2)
    # Order 1 is non-monotone (the paper's solver returns -0.0036), order 2 is
    # negative: both must be refused, never turned into a number.
    for order in (1, 2):
        with pytest.raises(edgeworth.ExpansionInvalidError):
            edgeworth.epsilon_from_delta(comps, 0.015, order, directions=("remove",))
    with pytest.raises(edgeworth.ExpansionInvalidError):
        edgeworth.delta_from_epsilon(comps, 0.1, 2)


def test_heterogeneous_sums_cumulants():
    one = edgeworth.epsilon_from_delta([(0.02, 1.0, 1000)], 1e-5, 2, ("remove",))
    split = edgeworth.epsilon_from_delta([(0.02, 1.0, 400), (0.02, 1.0, 600)], 1e-5, 2, ("remove",))
    assert split == pytest.approx(one, rel=1e-12)
    mixed = edgeworth.epsilon_from_delta([(0.02, 1.0, 500), (0.01, 0.8, 500)], 1e-5, 2, ("remove",))
    assert np.isfinite(mixed) and mixed > 0


def test_hermite():
    z = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(edgeworth._hermite(z, 5), z**5 - 10 * z**3 + 15 * z)
    np.testing.assert_allclose(edgeworth._hermite(z, 8), z**8 - 28 * z**6 + 210 * z**4 - 420 * z**2 + 105)
