"""Statistical bounds that turn attack outcomes into empirical ε lower bounds.

Pure numpy/scipy (no TensorFlow). Two families:

* **Hypothesis-test bounds** (many runs on a fixed pair of neighbouring
  datasets D, D'). For any (ε, δ)-DP mechanism and any test that says "D'"
  with false-positive rate FPR (under D) and false-negative rate FNR (under
  D'), both of these hold (Kairouz et al. 2015):

      FPR + e^ε · FNR >= 1 - δ        and        FNR + e^ε · FPR >= 1 - δ,

  so ε >= log((1 - δ - FNR) / FPR) and ε >= log((1 - δ - FPR) / FNR).
  We only *observe* the rates, so we replace each by a one-sided
  Clopper–Pearson upper confidence bound at level β/2 (Bonferroni over the two
  rates): the resulting ε is a lower bound on the true ε with probability at
  least 1 - β. Both directions are valid because add/remove adjacency is
  symmetric (D ~ D' and D' ~ D).

* **One-run bounds** (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with
  One (1) Training Run"). m canaries, each included independently with
  probability 1/2; the auditor makes r guesses (abstaining on the rest) of
  which v are correct. Under ε-DP the number of correct guesses is
  stochastically dominated by Binomial(r, e^ε / (1 + e^ε)). Under (ε, δ)-DP
  their Theorem 5.2 adds a term 2·m·δ·α, where
  α = max_{1 <= i <= v} P[v > Binomial(r, p) >= v - i] / i. The lower bound is
  the largest ε whose p-value stays below β. The guesses (r and which
  canaries) must be fixed before looking at which canaries were included; the
  caller's job, stated in :func:`one_run_epsilon_lower_bound`.

All functions are conservative in the direction that matters: when in doubt
they return a *smaller* ε lower bound (a lower bound that is too high would
make a correct mechanism look broken, and it would be a false statement).
"""

import math
from typing import NamedTuple

import numpy as np
from scipy import optimize, special, stats


def _check_confidence(confidence: float) -> float:
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1); got {confidence!r}.")
    return float(confidence)


def _check_delta(delta: float) -> float:
    if not isinstance(delta, (int, float)) or not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be a number in [0, 1); got {delta!r}.")
    return float(delta)


def _check_count(k: int, n: int, what: str) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"{what}: number of trials must be an integer >= 1; got {n!r}.")
    if int(k) != k or not 0 <= k <= n:
        raise ValueError(f"{what}: count must be an integer in [0, {n}]; got {k!r}.")


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper confidence bound on a binomial rate.

    P[true rate <= bound] >= 1 - alpha, for k successes in n trials.
    """
    _check_count(k, n, "clopper_pearson_upper")
    if k >= n:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided lower confidence bound on a binomial rate."""
    _check_count(k, n, "clopper_pearson_lower")
    if k <= 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


class RateBound(NamedTuple):
    """An ε lower bound from a hypothesis test, with what it was made of."""

    epsilon_lower: float  # >= 0; the larger of the two directions.
    fpr: float  # observed false-positive rate (under D)
    fnr: float  # observed false-negative rate (under D')
    fpr_upper: float  # Clopper-Pearson upper bound at level (1 - confidence) / 2
    fnr_upper: float
    confidence: float


def _log_ratio(numerator: float, denominator: float) -> float:
    if numerator <= 0.0:
        return 0.0
    if denominator <= 0.0:  # cannot happen with CP bounds (n finite), kept safe
        return math.inf
    return max(0.0, math.log(numerator / denominator))


def epsilon_lower_bound_from_rates(
    false_positives: int,
    num_negatives: int,
    false_negatives: int,
    num_positives: int,
    delta: float,
    confidence: float = 0.95,
) -> RateBound:
    """ε lower bound from a test's error counts (see module docstring).

    Args:
      false_positives: runs on D (canary absent) the test called "present".
      num_negatives: runs on D.
      false_negatives: runs on D' (canary present) the test called "absent".
      num_positives: runs on D'.
      delta: the δ of the (ε, δ) claim being audited.
      confidence: 1 - β; the bound holds with at least this probability.
    """
    confidence = _check_confidence(confidence)
    delta = _check_delta(delta)
    half_alpha = (1.0 - confidence) / 2.0  # Bonferroni over FPR and FNR
    fpr_u = clopper_pearson_upper(false_positives, num_negatives, half_alpha)
    fnr_u = clopper_pearson_upper(false_negatives, num_positives, half_alpha)
    eps = max(
        _log_ratio(1.0 - delta - fnr_u, fpr_u),
        _log_ratio(1.0 - delta - fpr_u, fnr_u),
    )
    return RateBound(
        epsilon_lower=eps,
        fpr=false_positives / num_negatives,
        fnr=false_negatives / num_positives,
        fpr_upper=fpr_u,
        fnr_upper=fnr_u,
        confidence=confidence,
    )


def best_threshold(scores_negative: np.ndarray, scores_positive: np.ndarray, delta: float) -> float:
    """Threshold ("present" iff score > t) maximizing the *empirical* ε.

    Only for choosing a threshold on a calibration split: the empirical rates
    are not a bound. Evaluate the chosen threshold on fresh runs.
    """
    neg = np.sort(np.asarray(scores_negative, dtype=np.float64))
    pos = np.sort(np.asarray(scores_positive, dtype=np.float64))
    candidates = np.unique(np.concatenate([neg, pos]))
    if candidates.size > 4096:  # quantile grid keeps this O(n log n)
        candidates = np.quantile(candidates, np.linspace(0.0, 1.0, 4096))
    fpr = 1.0 - np.searchsorted(neg, candidates, side="right") / neg.size
    fnr = np.searchsorted(pos, candidates, side="right") / pos.size
    # Add one pseudo-count so an empty tail does not give an infinite ratio:
    # the threshold search should prefer tails it has actually seen.
    fpr_s = (fpr * neg.size + 1.0) / (neg.size + 2.0)
    fnr_s = (fnr * pos.size + 1.0) / (pos.size + 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(np.maximum(1.0 - delta - fnr_s, 1e-300) / fpr_s)
        e2 = np.log(np.maximum(1.0 - delta - fpr_s, 1e-300) / fnr_s)
    score = np.maximum(e1, e2)
    return float(candidates[int(np.argmax(score))])


# --------------------------------------------------------------------------
# One-run audit (Steinke, Nasr & Jagielski 2023).


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """P-value of observing >= num_correct correct guesses under (ε, δ)-DP."""
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= num_correct <= num_guesses <= num_canaries; got {v}, {r}, {m}.")
    delta = _check_delta(delta)
    p = float(special.expit(epsilon))  # e^ε / (1 + e^ε), stable for large ε
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # alpha = max_i P[v - i <= Bin < v] / i, i = 1..v (cumulative pmf sums).
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # k = v-1, v-2, ..., 0
    cumulative = np.cumsum(pmf)
    alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Largest ε rejected at level β = 1 - confidence (0 if none is).

    Valid only if which canaries are guessed, and how many, was fixed without
    looking at the inclusion bits (e.g. "top-k and bottom-k scores" with k
    chosen in advance).
    """
    beta = 1.0 - _check_confidence(confidence)

    def excess(eps: float) -> float:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) - beta

    if excess(0.0) >= 0.0:
        return 0.0
    hi = 1.0
    while excess(hi) < 0.0:
        hi *= 2.0
        if hi > 1e3:
            return hi  # effectively unbounded by this many canaries
    # Bisection on a monotone p-value; return the lower end (conservative).
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------
# Reference: the exact ε of one Gaussian mechanism (sensitivity 1, std σ).


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """δ(ε) of the Gaussian mechanism N(0, σ²) vs N(1, σ²) (Balle & Wang 2018)."""
    mu = 1.0 / noise_multiplier
    return float(stats.norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon) * stats.norm.cdf(-mu / 2 - epsilon / mu))


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact ε(δ) of one Gaussian mechanism with noise multiplier σ.

    Rounded *up* (bisection upper end): used as a claimed ε, so it must not
    under-report.
    """
    if not noise_multiplier > 0:
        return math.inf
    delta = _check_delta(delta)
    if gaussian_delta(0.0, noise_multiplier) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, noise_multiplier) > delta:
        hi *= 2.0
    root = optimize.brentq(lambda e: gaussian_delta(e, noise_multiplier) - delta, 0.0, hi, xtol=1e-12)
    return float(root) + 1e-9
