"""Public accounting entry points: compute_epsilon / compute_delta.

Reported numbers follow one rule: with `certify=True` (the default) the number
in `.epsilon` / `.delta` is a proven upper bound. It is the larger of the
analytic estimate and dp_accounting's pessimistic PLD bound (both are upper
bounds when the estimate is the larger one). The analytic estimate is always
kept in `.estimate`.

Analytic estimates:
  * method="tilted" (default): saddlepoint / Lugannani-Rice (tilted.py), order 1
    = first-order Lugannani-Rice, orders 2 and 3 = with Daniels' second-order
    correction (order 3 has no further term and equals order 2).
  * method="edgeworth": plain Edgeworth expansion of the given order for the
    remove direction (the direction the paper and spec use). The add-direction
    Edgeworth expansion of the lower tail is unreliable (it reports e.g. 8.4
    where the truth is 5.1 at EW-Tune's SST-2 setting), so the add direction is
    always evaluated with the tilted method (flag "add_direction_tilted").

Self-check: an estimate is only used when the expansion can vouch for itself.
It cannot when the Edgeworth delta_hat is negative or non-monotone, when the
saddlepoint delta is impossible, or when the expansion's own second-order term
is large (the few-rare-jumps regime, q*m ~ 1-5 at small sigma): then the
estimate comes from a fine PLD computation instead, labelled
estimate_method="pld" and flagged "expansion_invalid_fell_back_to_pld".
"""

import dataclasses
import math
import time
from typing import NamedTuple, Optional, Sequence, Tuple

from ewtune_tf.accounting import _validation as v
from ewtune_tf.accounting import certify as certify_lib
from ewtune_tf.accounting import edgeworth, pllr, tilted

FALLBACK_FLAG = "expansion_invalid_fell_back_to_pld"
ADD_TILTED_FLAG = "add_direction_tilted"
BELOW_RANGE_FLAG = "noise_below_accountant_range"

# The smallest (accounted) noise multiplier the accountant evaluates. Below it
# the per-step privacy loss spreads over ~1/sigma standard deviations, so the
# cumulant grid (pllr.tilted_cumulants) and the PLD grow as 1/sigma^2: sigma
# 1e-6 asked for an 18 TiB array in the middle of a training run, and sigma
# 0.01 already takes ~45 s per epsilon on a 2-core CPU (for eps ~ 6e4 at the main
# job's q = 0.03, 96 steps; 0.02 gives ~1.5e4 in ~12 s). A composition with
# any sigma below it is reported with the trivial bound that holds for every
# mechanism, epsilon = inf (delta = 1), certified and flagged BELOW_RANGE_FLAG.
MIN_ACCOUNTED_NOISE_MULTIPLIER = 0.02

# Self-check thresholds for the tilted estimate (tuned on the benchmark grid,
# see benchmarks/accountant.py): the relative change of eps between the first-
# and second-order saddlepoint approximations, and the standardized cumulants
# lambda3 = K'''/K''^1.5, lambda4 = K''''/K''^2 of the tilted sum. Observed
# errors grow with them: (0.56, 0.79) -> 0.03 %, (1.34, 1.96) -> 0.46 %,
# (1.6, 4.9) -> 0.9 %. Beyond the thresholds the series is not trusted.
_MAX_ORDER_DISAGREEMENT = 0.01
_MAX_LAMBDA3 = 1.0
_MAX_LAMBDA4 = 1.2


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Provenance:
    """How an accounted number was obtained (shared by EpsilonResult and DeltaResult).

    Attributes:
      certified: True iff the number is a proven upper bound.
      method: the method that produced the number.
      estimate: the analytic (Edgeworth / tilted) point estimate, or the PLD
        value when the expansion could not vouch for itself.
      estimate_method: "tilted", "edgeworth_order{k}" or "pld".
      bound: the certified PLD upper bound, when computed.
      bound_method: e.g. "pld_pessimistic(interval=1.2e-04)".
      seconds: wall time of the whole computation.
      flags: diagnostics, e.g. ("expansion_invalid_fell_back_to_pld",).
    """

    certified: bool
    method: str
    estimate: float
    estimate_method: str
    bound: Optional[float] = None
    bound_method: Optional[str] = None
    seconds: float = 0.0
    flags: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flags"] = list(self.flags)
        return d


@dataclasses.dataclass(frozen=True)
class EpsilonResult(_Provenance):
    """``epsilon`` for the target ``delta``; a proven upper bound iff ``certified``."""

    epsilon: float
    delta: float


@dataclasses.dataclass(frozen=True)
class DeltaResult(_Provenance):
    """``delta`` at the target ``epsilon``; a proven upper bound iff ``certified``.

    (The same provenance fields as :class:`EpsilonResult`.)
    """

    delta: float
    epsilon: float


def _method_label(method: str, order: int) -> str:
    return "tilted" if method == "tilted" else f"edgeworth_order{order}"


def _tilted_trusted(eps_lo: float, eps_hi: float, diag) -> bool:
    scale = max(abs(eps_hi), 1e-3)
    if abs(eps_hi - eps_lo) / scale > _MAX_ORDER_DISAGREEMENT:
        return False
    if abs(diag.lambda3) > _MAX_LAMBDA3 or abs(diag.lambda4) > _MAX_LAMBDA4:
        return False
    return True


def _tilted_epsilon(components, delta: float, order: int, direction: str):
    """Tilted eps for one direction, or None if it cannot vouch for itself.

    Self-check: the other order's delta at the same saddlepoint, converted to an
    eps shift with the local slope |d log(delta)/d eps| (t - 1 for remove, -t for
    add, to leading saddlepoint order). One extra CGF evaluation, not a solve.
    """
    try:
        eps, diag = tilted.epsilon_from_delta(components, delta, order, direction)
        other = 1 if order >= 2 else 2
        centre = edgeworth.summed_cumulants(components)
        _, d_other, _ = tilted._delta_at_tilt(components, diag.t, direction, other, centre)
    except (tilted.TiltedInvalidError, ValueError, ZeroDivisionError, OverflowError, FloatingPointError):
        return None
    if eps == 0.0:
        return 0.0
    if not math.isfinite(eps) or not d_other > 0:
        return None
    slope = (diag.t - 1.0) if direction == "remove" else -diag.t
    if not slope > 1e-3:
        return None
    eps_other = eps + math.log(d_other / delta) / slope
    if not _tilted_trusted(eps_other, eps, diag):
        return None
    return eps


def estimate_epsilon(components: Sequence[pllr.Component], delta: float, method: str = "tilted", order: int = 2):
    """(estimate or None, flags). None means: the expansion cannot vouch."""
    flags = []
    if method == "tilted":
        rem = _tilted_epsilon(components, delta, order, "remove")
    else:
        try:
            rem = edgeworth.epsilon_from_delta(components, delta, order, directions=("remove",))
        except edgeworth.ExpansionInvalidError:
            rem = None
    add = _tilted_epsilon(components, delta, max(order, 2), "add")
    if method == "edgeworth":
        flags.append(ADD_TILTED_FLAG)
    if rem is None or add is None:
        return None, tuple(flags)
    return max(rem, add), tuple(flags)


def epsilon_for_components(
    components: Sequence[pllr.Component],
    delta: float,
    method: str = "tilted",
    order: int = 2,
    certify: bool = True,
    pld_interval: Optional[float] = None,
) -> EpsilonResult:
    """compute_epsilon for a (possibly heterogeneous) composition."""
    return _for_components(EpsilonResult, components, delta, method, order, certify, pld_interval)


class _Settled(NamedTuple):
    value: float
    labels: dict  # certified, method, estimate, estimate_method, bound, bound_method, flags


def _settle(est, flags, method, order, certify, upper_bound, pld_interval) -> _Settled:
    """The reported value from an analytic estimate and the PLD bound.

    Where the expansion cannot vouch for itself (``est`` None), a fine
    pessimistic PLD is both the estimate and (being pessimistic) a certified
    bound. With ``certify`` the larger of estimate and bound is reported and
    certified; otherwise the estimate, labelled uncertified. Shared by
    epsilon(delta) and delta(epsilon): ``upper_bound(reference=, interval=)``
    is the matching certified bound.
    """
    flags = list(flags)
    est_method = _method_label(method, order)
    b = None
    if est is None:
        flags.append(FALLBACK_FLAG)
        b = upper_bound(interval=pld_interval)
        est, est_method = b.value, "pld"
    elif certify:
        b = upper_bound(reference=est, interval=pld_interval)
    if b is None:
        value, method_used, bound, bound_method = est, est_method, None, None
    else:
        bound, bound_method = float(b.value), f"{b.method}(interval={b.value_discretization_interval:.2e})"
        value, method_used = (bound, bound_method) if bound >= est else (est, est_method)
    labels = dict(
        certified=b is not None,
        method=method_used,
        estimate=float(est),
        estimate_method=est_method,
        bound=bound,
        bound_method=bound_method,
        flags=tuple(flags),
    )
    return _Settled(float(value), labels)


def estimate_delta(components: Sequence[pllr.Component], epsilon: float, method: str = "tilted", order: int = 2):
    """(estimate or None, flags) of delta(eps), max over both directions."""
    flags = []
    try:
        add, add_diag = tilted.delta_from_epsilon(components, epsilon, max(order, 2), "add")
        if add > 0 and (abs(add_diag.lambda3) > _MAX_LAMBDA3 or abs(add_diag.lambda4) > _MAX_LAMBDA4):
            return None, tuple(flags)
        if method == "tilted":
            rem, diag = tilted.delta_from_epsilon(components, epsilon, order, "remove")
            other = 1 if order >= 2 else 2
            rem_other, _ = tilted.delta_from_epsilon(components, epsilon, other, "remove")
            # Compare the two orders on the eps scale: d eps ~ d log(delta) / (t - 1).
            t = max(abs(diag.t - 1.0), 1e-3)
            ok = rem > 0 and rem_other > 0 and _tilted_trusted(epsilon + math.log(rem_other / rem) / t, epsilon, diag)
            if not ok:
                return None, tuple(flags)
        else:
            flags.append(ADD_TILTED_FLAG)
            cum_p, cum_q = edgeworth.summed_cumulants(components)
            rem = float(edgeworth.delta_hat(epsilon, cum_p, cum_q, order, "remove"))
            # Validity of the expansion around eps: reuse the solver's checks.
            edgeworth.epsilon_from_delta(components, max(rem, 1e-300), order, directions=("remove",))
    except (tilted.TiltedInvalidError, edgeworth.ExpansionInvalidError, ValueError, ZeroDivisionError, OverflowError):
        return None, tuple(flags)
    if not (rem >= 0 and add >= 0):
        return None, tuple(flags)
    return min(1.0, max(rem, add)), tuple(flags)


def delta_for_components(components: Sequence[pllr.Component], epsilon: float, *args, **kwargs) -> DeltaResult:
    """compute_delta for a (possibly heterogeneous) composition; the other
    arguments (method, order, certify, pld_interval) as for
    :func:`epsilon_for_components`."""
    return _for_components(DeltaResult, components, epsilon, *args, **kwargs)


def _for_components(
    result_type, components, target, method="tilted", order=2, certify=True, pld_interval=None
) -> "EpsilonResult | DeltaResult":
    """epsilon(delta = target) or delta(epsilon = target), by ``result_type``."""
    start = time.perf_counter()
    if result_type is EpsilonResult:
        estimate, upper_bound, names = estimate_epsilon, certify_lib.epsilon_upper_bound, ("epsilon", "delta")
    else:
        estimate, upper_bound, names = estimate_delta, certify_lib.delta_upper_bound, ("delta", "epsilon")
    if any(sigma < MIN_ACCOUNTED_NOISE_MULTIPLIER for _, sigma, _ in components):
        trivial = math.inf if result_type is EpsilonResult else 1.0
        return result_type(
            **{names[0]: trivial, names[1]: float(target)},
            certified=True,
            method="trivial",
            estimate=trivial,
            estimate_method="trivial",
            flags=(BELOW_RANGE_FLAG,),
            seconds=time.perf_counter() - start,
        )
    est, flags = estimate(components, target, method, order)
    a = _settle(est, flags, method, order, certify, lambda **kw: upper_bound(components, target, **kw), pld_interval)
    values = {names[0]: a.value, names[1]: float(target)}
    return result_type(**values, seconds=time.perf_counter() - start, **a.labels)


def compute_epsilon(
    *,
    sampling_probability: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    method: str = "tilted",
    order: int = 2,
    certify: bool = True,
) -> EpsilonResult:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps at target `delta`.

    Args:
      sampling_probability: Poisson sampling rate q in (0, 1] (= batch/N).
      noise_multiplier: sigma > 0, noise std in units of the clipping norm.
      steps: number of steps m >= 1.
      delta: target delta in (0, 1).
      method: "tilted" (saddlepoint, default) or "edgeworth".
      order: expansion order in {1, 2, 3}.
      certify: if True (default) the reported epsilon is a proven upper bound.

    Returns:
      EpsilonResult; add-or-remove adjacency (max over both directions).
    """
    components, method, order = _checked_composition(sampling_probability, noise_multiplier, steps, method, order)
    return epsilon_for_components(components, v.check_delta(delta), method, order, bool(certify))


def compute_delta(
    *,
    sampling_probability: float,
    noise_multiplier: float,
    steps: int,
    epsilon: float,
    method: str = "tilted",
    order: int = 2,
    certify: bool = True,
) -> DeltaResult:
    """Delta of `steps` Poisson-subsampled Gaussian steps at `epsilon` (>= 0)."""
    components, method, order = _checked_composition(sampling_probability, noise_multiplier, steps, method, order)
    return delta_for_components(components, v.check_epsilon(epsilon), method, order, bool(certify))


def _checked_composition(sampling_probability, noise_multiplier, steps, method, order):
    """((q, sigma, m),), method, order -- validated (ValueError naming the parameter)."""
    q = v.check_sampling_probability(sampling_probability)
    sigma = v.check_noise_multiplier(noise_multiplier)
    m = v.check_steps(steps)
    return ((q, sigma, m),), v.check_method(method), v.check_order(order)
