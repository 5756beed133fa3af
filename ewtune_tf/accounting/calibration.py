"""Noise calibration: the smallest sigma whose epsilon is at most a target.

Two phases, both driven by dp_accounting.mechanism_calibration
.calibrate_dp_mechanism (Brent's method) in x = log(sigma), so that its
absolute tolerance 1e-4 on x is a 1e-4 *relative* tolerance on sigma:

 1. locate: the analytic (tilted / Edgeworth) estimate, milliseconds per
    evaluation, finds the neighbourhood sigma_est;
 2. certify (default): the same search with the certifying accountant, in a
    narrow bracket around sigma_est and with the PLD discretisation fixed at the
    value chosen at sigma_est (so the bound is a deterministic, monotone
    function of sigma during the search). calibrate_dp_mechanism guarantees the
    returned sigma has epsilon <= target, and the reported EpsilonResult is
    recomputed at that sigma with the same discretisation.

`paper=True` runs EW-Tune's own grid search (paper.py) instead; its result is
an approximation (certified=False).

Dataset-size form: (num_examples N, batch_size B, epochs E) is converted by
`steps_and_sampling_probability` to q = B / N (Poisson sampling with expected
batch size B) and steps = ceil(E * floor(N / B)) (`steps_for_epochs`: E passes
of floor(1 / q) steps each, exactly what the Poisson sampler runs).
"""

import dataclasses
import math
import time
from typing import Optional, Tuple

from dp_accounting import dp_event
from dp_accounting import mechanism_calibration as mc
from dp_accounting.rdp import rdp_privacy_accountant

from ewtune_tf.accounting import _validation as v
from ewtune_tf.accounting import accountant as accountant_lib
from ewtune_tf.accounting import api, tilted
from ewtune_tf.accounting import certify as certify_lib
from ewtune_tf.accounting import paper as paper_lib

_REL_TOL = 1e-4


class _LocateAccountant(accountant_lib.EdgeworthAccountant):
    """Cheap, uncertified epsilon used only to find sigma's neighbourhood.

    Returns the raw tilted estimate even where it cannot vouch for itself (the
    certify phase decides), and dp_accounting's RDP bound where the saddlepoint
    has no solution at all (tiny sigma), so no slow PLD runs here.
    """

    def get_epsilon(self, target_delta: float) -> float:
        comps = self.components
        try:
            eps = max(tilted.epsilon_from_delta(comps, target_delta, 2, d)[0] for d in ("remove", "add"))
            if math.isfinite(eps):
                return eps
        except (tilted.TiltedInvalidError, ValueError, ZeroDivisionError, OverflowError):
            pass
        acc = rdp_privacy_accountant.RdpAccountant()
        for q, s, c in comps:
            acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), c)
        return acc.get_epsilon(target_delta)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Calibrated noise multiplier and the accounting at it."""

    noise_multiplier: float
    sampling_probability: float
    steps: int
    target_epsilon: float
    target_delta: float
    epsilon: api.EpsilonResult
    certified: bool
    method: str
    seconds: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["epsilon"] = self.epsilon.to_dict()
        return d


def steps_per_epoch(sampling_probability: float) -> int:
    """Logical steps in one pass over the data at Poisson rate q: floor(1 / q), at least 1.

    One pass is the floor so that a pass never draws more than N examples in
    expectation (floor(1/q) * q <= 1). ``ewtune_tf.data.poisson_batches`` runs
    exactly this many steps per pass, so epochs and accounting agree.
    """
    q = v.check_sampling_probability(sampling_probability)
    return max(1, int(math.floor(1.0 / q + 1e-9)))  # 1e-9: 1/q of an exact N/B may round below it


def steps_for_epochs(sampling_probability: float, epochs: float) -> int:
    """The one rule that turns epochs into logical steps: ceil(epochs * floor(1 / q)).

    Every entry point (optimizer calibration, PrivacyPlan, the trainer, TFX,
    this package's CLI) counts steps with it, and the sampler runs them.
    """
    e = v.check_positive_real(epochs, "epochs")
    return max(1, int(math.ceil(e * steps_per_epoch(sampling_probability) - 1e-9)))


def steps_and_sampling_probability(num_examples: int, batch_size: int, epochs: float) -> Tuple[float, int]:
    """(q, steps) = (B / N, steps_for_epochs(B / N, epochs)) for Poisson sampling.

    Args:
      num_examples: dataset size N >= 1.
      batch_size: expected batch size B, 1 <= B <= N.
      epochs: passes over the data, > 0 (each of floor(N / B) steps).
    """
    n = v.check_positive_int(num_examples, "num_examples")
    b = v.check_positive_int(batch_size, "batch_size")
    v.check_positive_real(epochs, "epochs")
    if b > n:
        raise ValueError(f"batch_size must be in [1, num_examples={n}]; got {b}.")
    q = b / n
    return q, steps_for_epochs(q, epochs)


def _event(q: float, steps: int, log_sigma: float) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(math.exp(log_sigma))), steps
    )


def _search(make_accountant, q, steps, target_epsilon, target_delta, bracket):
    return mc.calibrate_dp_mechanism(
        make_accountant,
        lambda x: _event(q, steps, x),
        target_epsilon,
        target_delta,
        bracket_interval=bracket,
        tol=_REL_TOL / 2,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sampling_probability: Optional[float] = None,
    steps: Optional[int] = None,
    *,
    num_examples: Optional[int] = None,
    batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    method: str = "tilted",
    order: int = 2,
    certify: bool = True,
    paper: bool = False,
) -> CalibrationResult:
    """Smallest noise multiplier (to 1e-4 relative) with epsilon <= target.

    Give either (sampling_probability, steps) or (num_examples, batch_size,
    epochs); see `steps_and_sampling_probability` for the conversion.

    With certify=True (default) the returned sigma's epsilon is a proven upper
    bound (dp_accounting pessimistic PLD). With certify=False the estimate is
    used as is (labelled certified=False unless it fell back to PLD). paper=True
    reproduces EW-Tune's search (order 1, estimate only, certified=False).
    """
    start = time.perf_counter()
    target_epsilon = v.check_target_epsilon(target_epsilon)
    target_delta = v.check_delta(target_delta, "target_delta")
    method = v.check_method(method)
    order = v.check_order(order)
    q, m = _resolve_q_and_steps(sampling_probability, steps, num_examples, batch_size, epochs)
    if paper:
        sigma, res, how = _paper_sigma(q, m, target_epsilon, target_delta)
    else:
        x_est, est_acc = _locate(q, m, target_epsilon, target_delta, method, order)
        if certify:
            sigma, res = _certify(q, m, target_epsilon, target_delta, method, order, x_est, est_acc)
            how = "calibrate_dp_mechanism(certified)"
        else:
            sigma = math.exp(x_est)
            res = api.epsilon_for_components(((q, sigma, m),), target_delta, method, order, certify=False)
            how = f"calibrate_dp_mechanism({res.method})"
    return CalibrationResult(
        sigma, q, m, target_epsilon, target_delta, res, res.certified, how, time.perf_counter() - start
    )


def _resolve_q_and_steps(sampling_probability, steps, num_examples, batch_size, epochs) -> Tuple[float, int]:
    """(q, steps) from exactly one of the two argument forms (ValueError otherwise)."""
    by_size = (num_examples, batch_size, epochs)
    if sampling_probability is None and steps is None:
        if any(x is None for x in by_size):
            raise ValueError("give (sampling_probability, steps) or all of (num_examples, batch_size, epochs).")
        return steps_and_sampling_probability(num_examples, batch_size, epochs)
    if any(x is not None for x in by_size):
        raise ValueError("give either (sampling_probability, steps) or (num_examples, batch_size, epochs), not both.")
    if sampling_probability is None or steps is None:
        raise ValueError("sampling_probability and steps must be given together.")
    return v.check_sampling_probability(sampling_probability), v.check_steps(steps)


def _paper_sigma(q: float, m: int, target_epsilon: float, target_delta: float):
    """EW-Tune's own grid search: an approximation, never certified."""
    sigma, eps, secs = paper_lib.paper_sigma(q, m, target_epsilon, target_delta)
    res = api.EpsilonResult(
        eps,
        target_delta,
        certified=False,
        method="paper_edgeworth_order1",
        estimate=eps,
        estimate_method="paper_edgeworth_order1",
        seconds=secs,
        flags=("paper_mode_approximation",),
    )
    return sigma, res, "paper_grid_search"


def _locate(q: float, m: int, target_epsilon: float, target_delta: float, method: str, order: int):
    """Phase 1: log(sigma) where the analytic estimate meets the target, and
    the factory of the estimating accountant (reused by phase 2)."""
    if method == "tilted":
        est_acc = lambda: _LocateAccountant(method, order, certify=False)
    else:
        est_acc = lambda: accountant_lib.EdgeworthAccountant(method, order, certify=False)
    lower = math.log(0.3)
    while True:
        eps_low = est_acc().compose(_event(q, m, lower)).get_epsilon(target_delta)
        if eps_low > target_epsilon:
            break
        lower -= math.log(4.0)  # Extremely loose target: search lower.
        if lower < math.log(1e-4):
            break
    x_est = _search(est_acc, q, m, target_epsilon, target_delta, mc.LowerEndpointAndGuess(lower, lower + 1.0))
    return x_est, est_acc


def _certify(q, m, target_epsilon, target_delta, method, order, x_est, est_acc):
    """Phase 2: the smallest sigma near exp(x_est) whose certified epsilon is
    <= target. The PLD discretisation is fixed at sigma_est so that the bound
    is a deterministic, monotone function of sigma during the search."""
    sigma_est = math.exp(x_est)
    b = certify_lib.epsilon_upper_bound(((q, sigma_est, m),), target_delta, reference=target_epsilon)
    interval = b.value_discretization_interval
    memo = {}

    class _MemoCertified(accountant_lib.EdgeworthAccountant):
        """Certified accountant whose results are shared within this search
        (Brent and calibrate_dp_mechanism re-evaluate the bracket endpoints)."""

        def get_epsilon_result(self, target_delta):
            key = (self.components, target_delta)
            if key not in memo:
                memo[key] = super().get_epsilon_result(target_delta)
            return memo[key]

    cert_acc = lambda: _MemoCertified(method, order, certify=True, pld_value_discretization_interval=interval)
    lo, hi = _certified_bracket(q, m, target_epsilon, target_delta, x_est, est_acc, cert_acc, b.value)
    x = _search(cert_acc, q, m, target_epsilon, target_delta, mc.ExplicitBracketInterval(lo, hi))
    res = cert_acc().compose(_event(q, m, x)).get_epsilon_result(target_delta)
    while res.epsilon > target_epsilon:  # Defensive: never return an unproven sigma.
        x += _REL_TOL / 2
        res = cert_acc().compose(_event(q, m, x)).get_epsilon_result(target_delta)
    return math.exp(x), res


def _certified_bracket(q, m, target_epsilon, target_delta, x_est, est_acc, cert_acc, bound_at_est):
    """A tight bracket (in log sigma) of the certified root.

    Predicts the root from the bound's excess at sigma_est and the local slope
    d eps / d log(sigma) of the estimate, so Brent needs only a few PLD
    evaluations, then widens until the bracket holds the root.
    """

    def gap(x):
        return cert_acc().compose(_event(q, m, x)).get_epsilon(target_delta) - target_epsilon

    h = 1e-3
    slope = (est_acc().compose(_event(q, m, x_est + h)).get_epsilon(target_delta) - target_epsilon) / h
    excess = max(bound_at_est - target_epsilon, 0.0)
    x_pred = x_est + (excess / -slope if slope < 0 else 0.0)
    lo, hi = x_pred - 2e-4, x_pred + 6e-4
    while gap(lo) <= 0:
        lo -= 4 * (hi - lo)
    while gap(hi) > 0:
        hi += 4 * (hi - lo)
    return lo, hi
