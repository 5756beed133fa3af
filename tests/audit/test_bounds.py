"""ewtune_tf.audit.bounds: the statistics that turn attacks into ε lower bounds.

The key property is *validity*: on a mechanism whose ε is known exactly, the
lower bound must not exceed it (except with probability <= 1 - confidence).
"""

import math

import numpy as np
import pytest
from scipy import stats

from ewtune_tf.audit import bounds


def test_clopper_pearson_matches_beta_quantiles():
    assert bounds.clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert bounds.clopper_pearson_upper(100, 100, 0.05) == 1.0
    assert bounds.clopper_pearson_lower(0, 100, 0.05) == 0.0
    assert bounds.clopper_pearson_lower(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100))
    lo, hi = bounds.clopper_pearson_lower(30, 100, 0.025), bounds.clopper_pearson_upper(30, 100, 0.025)
    assert lo < 0.3 < hi


def test_rates_bound_for_a_perfect_test():
    rb = bounds.epsilon_lower_bound_from_rates(0, 10000, 0, 10000, delta=1e-5, confidence=0.95)
    fpr_u = 1 - 0.025 ** (1 / 10000)
    assert rb.fpr_upper == pytest.approx(fpr_u)
    assert rb.epsilon_lower == pytest.approx(math.log((1 - 1e-5 - fpr_u) / fpr_u))


def test_rates_bound_is_zero_for_a_useless_test():
    rb = bounds.epsilon_lower_bound_from_rates(500, 1000, 500, 1000, delta=1e-5)
    assert rb.epsilon_lower == 0.0


@pytest.mark.parametrize("bad", [dict(confidence=1.0), dict(confidence=0.0), dict(delta=1.0), dict(delta=-0.1)])
def test_rates_bound_rejects_bad_parameters(bad):
    kwargs = dict(delta=1e-5, confidence=0.95)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        bounds.epsilon_lower_bound_from_rates(1, 10, 1, 10, **kwargs)


def test_gaussian_epsilon_matches_the_certified_accountant():
    from ewtune_tf.audit import claims

    for sigma in (0.8, 2.0):
        exact = bounds.gaussian_epsilon(sigma, 1e-5)
        claim = claims.claimed_epsilon(noise_multiplier=sigma, delta=1e-5)
        assert not claim.accountant_below_exact
        assert claim.certified_epsilon == pytest.approx(exact, rel=2e-3)
        assert bounds.gaussian_delta(exact, sigma) <= 1e-5


def test_rates_bound_is_valid_on_an_exact_gaussian_mechanism():
    # Gaussian mechanism with known ε; 40 independent audits at 95%: the
    # bound may exceed ε in at most a few (binomial(40, 0.05) tail).
    sigma, delta, n = 1.0, 1e-5, 4000
    eps_true = bounds.gaussian_epsilon(sigma, delta)
    rng = np.random.default_rng(1)
    exceed = 0
    for _ in range(40):
        neg = rng.normal(0.0, sigma, 2 * n)
        pos = rng.normal(1.0, sigma, 2 * n)
        t = bounds.best_threshold(neg[:n], pos[:n], delta)
        rb = bounds.epsilon_lower_bound_from_rates(int(np.sum(neg[n:] > t)), n, int(np.sum(pos[n:] <= t)), n, delta)
        exceed += rb.epsilon_lower > eps_true
    assert exceed <= 6


def test_one_run_p_value_pure_dp_is_a_binomial_tail():
    p = bounds.one_run_p_value(1000, 100, 70, epsilon=1.0, delta=0.0)
    assert p == pytest.approx(stats.binom.sf(69, 100, math.exp(1) / (1 + math.exp(1))))


def test_one_run_p_value_grows_with_delta_and_epsilon():
    base = bounds.one_run_p_value(1000, 100, 90, 1.0, 0.0)
    assert bounds.one_run_p_value(1000, 100, 90, 1.0, 1e-5) > base
    assert bounds.one_run_p_value(1000, 100, 90, 2.0, 0.0) > base


def test_one_run_bound_values():
    # All guesses right: the bound solves p^r = beta (pure DP).
    eps = bounds.one_run_epsilon_lower_bound(1000, 100, 100, delta=0.0)
    p = 0.05 ** (1 / 100)
    assert eps == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 100, delta=1e-5) <= eps
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0


def test_one_run_bound_is_valid_on_randomized_response():
    # Each canary's guess is right with prob e^ε/(1+e^ε): the bound is exact
    # for this mechanism, so it may exceed ε only ~5% of the time.
    eps_true, m = 1.0, 2000
    rng = np.random.default_rng(2)
    p = math.exp(eps_true) / (1 + math.exp(eps_true))
    exceed = sum(
        bounds.one_run_epsilon_lower_bound(m, m, int(rng.binomial(m, p)), delta=0.0) > eps_true for _ in range(60)
    )
    assert exceed <= 8


@pytest.mark.parametrize("args", [(10, 5, 6), (10, 11, 1), (10, 5, -1)])
def test_one_run_rejects_inconsistent_counts(args):
    with pytest.raises(ValueError, match="num_correct"):
        bounds.one_run_p_value(*args, epsilon=1.0, delta=0.0)
