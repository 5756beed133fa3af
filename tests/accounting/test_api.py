"""Tests for ewtune_tf/accounting/api.py: compute_epsilon / compute_delta."""

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ewtune_tf.accounting import api, compute_delta, compute_epsilon

SST2 = dict(sampling_probability=2000 / 67349, noise_multiplier=0.7865, steps=660)
FAST = settings(max_examples=6, deadline=None, derandomize=True)


def _optimistic_pld_epsilon(q, sigma, m, delta):
    """A provable LOWER bound on the exact eps (privacy buckets, rounding down)."""
    p = pld_lib.from_gaussian_mechanism(
        sigma, pessimistic_estimate=False, value_discretization_interval=2e-3, sampling_prob=q, use_connect_dots=False
    )
    return p.self_compose(m).get_epsilon_for_delta(delta)


def test_certified_default_and_fields():
    r = compute_epsilon(delta=1e-5, **SST2)
    assert r.certified and r.bound is not None
    assert r.epsilon >= r.bound and r.epsilon >= r.estimate
    assert r.estimate_method == "tilted"
    assert r.estimate == pytest.approx(8.2893, rel=1e-3)  # spec §10.3 exact
    assert r.epsilon <= 8.2893 * 1.006  # slack <= 0.5 %
    d = r.to_dict()
    assert set(d) >= {"epsilon", "certified", "method", "seconds", "flags"}


def test_uncertified_is_labelled():
    r = compute_epsilon(delta=1e-5, certify=False, **SST2)
    assert not r.certified and r.bound is None and r.method == "tilted"


def test_edgeworth_method_labels():
    r = compute_epsilon(delta=1e-5, method="edgeworth", order=1, certify=False, **SST2)
    assert r.estimate == pytest.approx(7.992899, abs=1e-5)
    assert r.estimate_method == "edgeworth_order1"
    assert api.ADD_TILTED_FLAG in r.flags


@pytest.mark.parametrize("method", ["tilted", "edgeworth"])
def test_m20_failure_falls_back_to_pld_flagged(method):
    for order in (1, 2):
        r = compute_epsilon(
            sampling_probability=0.01,
            noise_multiplier=0.8,
            steps=20,
            delta=0.015,
            method=method,
            order=order,
            certify=False,
        )
        assert api.FALLBACK_FLAG in r.flags
        assert r.estimate_method == "pld" and r.certified
        assert r.epsilon == pytest.approx(0.0537, abs=0.01)  # spec §11.4 PLD


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(sampling_probability=0.0), "sampling_probability"),
        (dict(sampling_probability=1.5), "sampling_probability"),
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(method="rdp"), "method"),
        (dict(order=4), "order"),
    ],
)
def test_validation(kwargs, name):
    args = dict(delta=1e-5, **SST2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        compute_epsilon(**args)


def test_delta_validation():
    with pytest.raises(ValueError, match="epsilon"):
        compute_delta(epsilon=-0.1, **SST2)


@FAST
@given(q=st.floats(1e-3, 0.1), sigma=st.floats(0.6, 2.0), m=st.integers(100, 5000), log_delta=st.floats(-9, -4))
def test_certified_never_below_exact(q, sigma, m, log_delta):
    delta = 10.0**log_delta
    r = compute_epsilon(sampling_probability=q, noise_multiplier=sigma, steps=m, delta=delta)
    assert r.certified
    assert r.epsilon >= _optimistic_pld_epsilon(q, sigma, m, delta) - 1e-9


@FAST
@given(q=st.floats(2e-3, 0.1), sigma=st.floats(0.6, 2.5), m=st.integers(200, 20000), log_delta=st.floats(-9, -4))
def test_monotone_in_sigma_m_q(q, sigma, m, log_delta):
    delta = 10.0**log_delta
    base_kw = dict(sampling_probability=q, noise_multiplier=sigma, steps=m)

    def e(**kw):
        r = compute_epsilon(delta=delta, certify=False, **{**base_kw, **kw})
        # Compare like with like: the analytic estimate (PLD fallbacks use an
        # adaptive discretisation and are only monotone up to their slack).
        assume(r.estimate_method != "pld")
        return r.epsilon

    base = e()
    assert e(noise_multiplier=sigma * 1.05) <= base * (1 + 1e-9)
    assert e(steps=int(m * 1.2) + 1) >= base * (1 - 1e-9)
    assert e(sampling_probability=min(1.0, q * 1.2)) >= base * (1 - 1e-9)


@FAST
@given(q=st.floats(2e-3, 0.1), sigma=st.floats(0.6, 2.5), m=st.integers(200, 20000), log_delta=st.floats(-9, -4))
def test_delta_epsilon_delta_round_trip(q, sigma, m, log_delta):
    delta = 10.0**log_delta
    kw = dict(sampling_probability=q, noise_multiplier=sigma, steps=m, certify=False)
    r = compute_epsilon(delta=delta, **kw)
    if r.estimate_method == "pld" or r.epsilon == 0.0:
        return  # The round trip is a property of the analytic estimate.
    d = compute_delta(epsilon=r.epsilon, **kw)
    assert d.delta == pytest.approx(delta, rel=1e-6)


def test_plain_gaussian_matches_closed_form():
    # q = 1: m steps are mu-GDP with mu = sqrt(m) / sigma (exact (eps, delta) curve).
    from scipy import optimize, stats

    sigma, m, delta = 2.0, 100, 1e-5
    mu = m**0.5 / sigma
    f = lambda e: stats.norm.cdf(-e / mu + mu / 2) - np.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta
    exact = optimize.brentq(f, 0.0, 200.0, xtol=1e-12)
    r = compute_epsilon(sampling_probability=1.0, noise_multiplier=sigma, steps=m, delta=delta)
    assert r.estimate == pytest.approx(exact, rel=1e-8)
    assert exact <= r.epsilon <= exact * 1.005 and r.certified


@pytest.mark.parametrize("sigma", [1e-6, 0.019])
def test_a_sigma_below_the_range_gets_the_trivial_bound_at_once(sigma):
    # sigma 1e-6 once asked pllr for an 18 TiB grid (it grows as 1/sigma^2).
    common = dict(sampling_probability=0.03, noise_multiplier=sigma, steps=96)
    eps = compute_epsilon(delta=1e-5, **common)
    assert eps.epsilon == np.inf and eps.certified and eps.method == "trivial"
    assert eps.flags == (api.BELOW_RANGE_FLAG,)  # method "trivial": no grid was built
    assert compute_delta(epsilon=8.0, **common).delta == 1.0
    # At the boundary the accountant still computes a finite certified epsilon.
    edge = {**common, "noise_multiplier": api.MIN_ACCOUNTED_NOISE_MULTIPLIER, "steps": 1}
    assert np.isfinite(compute_epsilon(delta=1e-5, **edge).epsilon)
