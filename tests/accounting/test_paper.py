"""Tests for ewtune_tf/accounting/paper.py: EW-Tune's sigma table (spec §10.1)."""

import pytest

from ewtune_tf.accounting import calibrate_noise_multiplier, paper

N = {"MNLI": 392702, "QQP": 363849, "QNLI": 104743, "SST-2": 67349}

# Spec §10.1: sigma_EW chosen for eps = 8, B = 2000, 20 epochs (m = 20 * N // B).
SIGMA_EW = [
    ("MNLI", 1e-5, 0.557),
    ("MNLI", 1e-6, 0.573),
    ("QQP", 1e-5, 0.5635),
    ("QQP", 1e-6, 0.580),
    ("QNLI", 1e-5, 0.711),
    ("QNLI", 1e-6, 0.7395),
    ("SST-2", 1e-5, 0.7865),
    ("SST-2", 1e-4, 0.747),
]

# Spec §10.1 second table: logged eps at the chosen sigma.
LOGGED = [
    (2000 / 67349, 660, 1e-5, 0.7865, 7.992898902497304),
    (2000 / 67349, 660, 1e-4, 0.747, 7.996608791958288),
    (2000 / 104743, 1040, 1e-5, 0.711, 7.99797238679675),
    (4000 / 104743, 520, 1e-5, 0.842, 7.999991947078689),
]


@pytest.mark.parametrize("task,delta,sigma", SIGMA_EW)
def test_sigma_ew_column_exact(task, delta, sigma):
    n = N[task]
    res = calibrate_noise_multiplier(8.0, delta, 2000 / n, 20 * (n // 2000), paper=True)
    assert res.noise_multiplier == sigma
    assert not res.certified and not res.epsilon.certified
    assert res.epsilon.epsilon < 8.0


@pytest.mark.parametrize("q,m,delta,sigma,eps", LOGGED)
def test_logged_epsilons(q, m, delta, sigma, eps):
    assert paper.paper_epsilon(q, sigma, m, delta) == pytest.approx(eps, abs=1e-6)


def test_search_starts_above_two_when_needed():
    # eps(2.0) >= target: the published code crashes (previous_eps unbound).
    sigma, eps, _ = paper.paper_sigma(0.05, 5000, 2.0, 1e-5)
    assert sigma > 2.0 and eps < 2.0
