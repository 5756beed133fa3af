"""Certified upper bounds from dp_accounting's privacy loss distributions (PLD).

The PLD accountant with `pessimistic_estimate=True` (connect-the-dots) gives a
provable upper bound on delta(eps), hence on eps(delta), for the
Poisson-subsampled Gaussian under add-or-remove adjacency (it tracks both
directions and reports the maximum). Its only slack is discretisation, which
shrinks with the value discretisation interval `Delta`. The slack grows with the
number of steps and with Delta relative to the per-step spread of the privacy
loss, so Delta starts at a fraction of the per-step standard deviation and is
refined (x1/4) until the bound is within `max_slack` (0.5 %) of a reference:
the analytic estimate when it is trustworthy, otherwise the previous, coarser
bound (pessimistic bounds decrease towards the exact value as Delta shrinks,
roughly linearly in Delta).
"""

import dataclasses
import math
import time
from typing import Optional, Sequence

from dp_accounting.pld import privacy_loss_distribution as pld_lib

from ewtune_tf.accounting import pllr

MAX_SLACK = 0.005
_MIN_INTERVAL = 2e-6
_MAX_INTERVAL = 1e-2


@dataclasses.dataclass(frozen=True)
class PLDBound:
    value: float  # epsilon or delta upper bound
    value_discretization_interval: float
    refinements: int
    seconds: float
    method: str = "pld_pessimistic"


def build_pld(components: Sequence[pllr.Component], interval: float, pessimistic: bool = True):
    """PLD (both directions) of a composition of subsampled Gaussians."""
    out = None
    for q, sigma, count in components:
        if q == 1.0:
            # count Gaussian steps compose exactly into one with sigma / sqrt(count)
            # (as dp_accounting's PLDAccountant does): one discretisation, not count.
            one = pld_lib.from_gaussian_mechanism(
                standard_deviation=sigma / math.sqrt(count),
                sensitivity=1.0,
                pessimistic_estimate=pessimistic,
                value_discretization_interval=interval,
            )
        else:
            one = pld_lib.from_gaussian_mechanism(
                standard_deviation=sigma,
                sensitivity=1.0,
                pessimistic_estimate=pessimistic,
                value_discretization_interval=interval,
                sampling_prob=q,
            ).self_compose(int(count))
        out = one if out is None else out.compose(one)
    return out


def initial_interval(components: Sequence[pllr.Component]) -> float:
    """Discretisation ~ 1/10 of the smallest per-step privacy-loss std."""
    sd = min(math.sqrt(pllr.cumulants(q, s, "Q")[1]) for q, s, _ in components)
    return min(_MAX_INTERVAL, max(_MIN_INTERVAL, 0.1 * sd))


def _refine(
    components,
    evaluate,
    reference: Optional[float] = None,
    interval: Optional[float] = None,
    max_slack: float = MAX_SLACK,
    time_budget: float = 5.0,
) -> PLDBound:
    """Evaluates ``evaluate(pld)`` on a pessimistic PLD, refining the
    discretisation (interval / 4 each round) until the value is within
    ``max_slack`` of ``reference`` (or stops improving), or ``time_budget``
    seconds pass. A given ``interval`` is used as is (no refinement)."""
    start = time.perf_counter()
    iv = interval if interval is not None else initial_interval(components)
    value = evaluate(build_pld(components, iv))
    prev = None
    n = 0
    while True:
        if interval is not None:
            break
        ref = reference if reference is not None and reference > 0 else None
        if ref is not None and value <= ref * (1 + max_slack):
            break
        if prev is not None and (prev - value) / 3.0 <= max_slack * max(value, 1e-300):
            break
        if iv / 4 < _MIN_INTERVAL or time.perf_counter() - start > time_budget:
            break
        prev, iv = value, iv / 4
        value = evaluate(build_pld(components, iv))
        n += 1
    return PLDBound(value, iv, n, time.perf_counter() - start)


def epsilon_upper_bound(components: Sequence[pllr.Component], delta: float, **options) -> PLDBound:
    """Certified eps(delta) upper bound (pessimistic PLD, max of add/remove).

    ``options``: ``reference``, ``interval``, ``max_slack``, ``time_budget``
    (see :func:`_refine`).
    """
    return _refine(components, lambda p: float(p.get_epsilon_for_delta(delta)), **options)


def delta_upper_bound(components: Sequence[pllr.Component], epsilon: float, **options) -> PLDBound:
    """Certified delta(eps) upper bound (pessimistic PLD, max of add/remove); ``options`` as above."""
    return _refine(components, lambda p: float(p.get_delta_for_epsilon(epsilon)), **options)
