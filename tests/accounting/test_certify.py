"""Tests for ewtune_tf/accounting/certify.py (PLD upper bounds)."""

from ewtune_tf.accounting import certify


def test_bound_is_tight_and_above_estimate():
    # Exact eps (spec §10.3, PLD remove at fine discretisation) is 8.2893.
    b = certify.epsilon_upper_bound([(2000 / 67349, 0.7865, 660)], 1e-5, reference=8.2891)
    assert 8.2891 <= b.value <= 8.2893 * 1.005
    assert b.method == "pld_pessimistic"


def test_refines_until_slack_is_small():
    comps = [(1e-3, 1.0, 100000)]
    coarse = certify.epsilon_upper_bound(comps, 1e-6, interval=1e-3).value
    fine = certify.epsilon_upper_bound(comps, 1e-6, reference=1.86).value
    assert fine < coarse
    assert fine <= 1.86 * 1.005 or fine < coarse * 0.99


def test_delta_bound():
    b = certify.delta_upper_bound([(2000 / 67349, 0.7865, 660)], 8.0)
    assert 1.7e-5 < b.value < 1.8e-5
