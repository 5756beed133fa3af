"""Tests for ewtune_tf/accounting/accountant.py (EdgeworthAccountant)."""

import math

import dp_accounting
import pytest
from dp_accounting import dp_event
from hypothesis import given, settings
from hypothesis import strategies as st

from ewtune_tf.accounting import EdgeworthAccountant

FAST = settings(max_examples=5, deadline=None, derandomize=True)


def _sgd(q, sigma):
    return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))


def test_is_a_privacy_accountant_and_matches_compute_epsilon():
    acc = EdgeworthAccountant()
    assert isinstance(acc, dp_accounting.PrivacyAccountant)
    acc.compose(_sgd(2000 / 67349, 0.7865), 660)
    r = acc.get_epsilon_result(1e-5)
    assert r.certified and acc.get_epsilon(1e-5) == r.epsilon
    assert acc.get_delta(r.epsilon) <= 1e-5 * 1.01


@FAST
@given(q=st.floats(1e-3, 0.1), sigma=st.floats(0.6, 2.0), a=st.integers(3, 3000), b=st.integers(1, 3000))
def test_heterogeneous_of_identical_events_equals_self_composition(q, sigma, a, b):
    one = EdgeworthAccountant(certify=False)
    one.compose(dp_event.SelfComposedDpEvent(_sgd(q, sigma), a + b))
    many = EdgeworthAccountant(certify=False)
    many.compose(dp_event.ComposedDpEvent([_sgd(q, sigma)] * 2))
    many.compose(_sgd(q, sigma), a - 2)
    many.compose(dp_event.ComposedDpEvent([dp_event.NoOpDpEvent(), dp_event.SelfComposedDpEvent(_sgd(q, sigma), b)]))
    assert many.get_epsilon(1e-6) == pytest.approx(one.get_epsilon(1e-6), rel=1e-12)


def test_heterogeneous_composition_matches_pld():
    events = [(_sgd(0.01, 1.0), 3000), (_sgd(0.02, 0.8), 1000), (dp_event.GaussianDpEvent(20.0), 2)]
    acc = EdgeworthAccountant(certify=False)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for e, c in events:
        acc.compose(e, c)
        pld.compose(e, c)
    est = acc.get_epsilon(1e-6)
    assert est == pytest.approx(pld.get_epsilon(1e-6), rel=5e-3)
    cert = EdgeworthAccountant()
    for e, c in events:
        cert.compose(e, c)
    assert cert.get_epsilon(1e-6) >= pld.get_epsilon(1e-6) * (1 - 1e-3)


def test_refuses_unsupported_events():
    acc = EdgeworthAccountant()
    for bad in (
        dp_event.LaplaceDpEvent(1.0),
        dp_event.UnsupportedDpEvent(),
        dp_event.PoissonSampledDpEvent(0.1, dp_event.LaplaceDpEvent(1.0)),
        dp_event.ComposedDpEvent([_sgd(0.1, 1.0), dp_event.LaplaceDpEvent(1.0)]),
    ):
        assert not acc.supports(bad)
        with pytest.raises(dp_accounting.UnsupportedEventError):
            acc.compose(bad)
    assert acc.get_epsilon(1e-5) == 0.0  # nothing was composed


def test_non_private_and_empty():
    acc = EdgeworthAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    acc.compose(_sgd(0.0, 1.0), 10)
    assert acc.get_epsilon(1e-5) == 0.0
    acc.compose(dp_event.GaussianDpEvent(0.0))
    assert math.isinf(acc.get_epsilon(1e-5))
    assert acc.get_delta(1.0) == 1.0


def test_constructor_validation():
    with pytest.raises(ValueError, match="method"):
        EdgeworthAccountant(method="rdp")
    with pytest.raises(ValueError, match="order"):
        EdgeworthAccountant(order=0)
    with pytest.raises(ValueError, match="neighboring_relation"):
        EdgeworthAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    with pytest.raises(ValueError, match="target_delta"):
        EdgeworthAccountant().get_epsilon(0.0)
