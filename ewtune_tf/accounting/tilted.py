"""Tail-accurate ("tilted") accountant: saddlepoint / Lugannani-Rice.

The plain Edgeworth expansion is centred at the mean of S, but delta(eps) for
small delta is decided 5-7 standard deviations out, where its relative error
explodes. Exponential tilting moves the expansion to the point of interest:
under dP_t ∝ e^{tS} dP, the sum S has mean M K'(t), so choosing the saddlepoint
t with M K'(t) = x centres the expansion at x. Here M K(t) is the CGF of S (a sum
of count * K over the composed components, so the cost is O(1) in the number of
steps). The Lugannani-Rice formula with Daniels' second-order correction gives

  P(S > x) = phi(w) * A,
  A = R(w) + 1/u - 1/w
      + [ (1/u)(l4/8 - 5 l3^2/24) - l3/(2u^2) - 1/u^3 + 1/w^3 ]   (order >= 2)

with w = sign(t) sqrt(2(t x - M K(t))), u = t sqrt(M K''(t)),
l3 = M K'''/(M K'')^{3/2}, l4 = M K''''/(M K'')^2, R(w) = Phi_bar(w)/phi(w).

Both tail probabilities in delta(eps) = P_Q(S > eps) - e^eps P_P(S > eps) come
from the same saddlepoint: Q is P tilted by 1, so the Q-tail uses tilt s = t - 1
with K_Q(s) = K(t). Moreover e^eps phi(w_P) = phi(w_Q) exactly, so

  delta_remove = phi(w_Q) (A_Q - A_P),

and no exponentially large factor is ever formed. The add direction is the
mirror image with lower tails at x = -eps.

Near the centre of a tail (|w| small) the terms 1/u - 1/w cancel; there the
order-3 Edgeworth expansion (accurate at the centre) takes over.

Each result carries diagnostics (standardized cumulants at the saddlepoint and
the size of the second-order correction) that the public API uses to decide
whether the expansion can vouch for itself (see `api.py`).
"""

import dataclasses
import math
from typing import Sequence, Tuple

import numpy as np
from scipy import optimize, special

from ewtune_tf.accounting import edgeworth, pllr

_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_W_CENTRE = 0.1  # |w| below which the plain expansion replaces Lugannani-Rice.
_T_LIMIT = 5000.0


class TiltedInvalidError(ArithmeticError):
    """The saddlepoint approximation produced an impossible value."""


@dataclasses.dataclass(frozen=True)
class SaddleDiagnostics:
    """Standardized cumulants at the saddlepoint and the correction size."""

    t: float
    lambda3: float
    lambda4: float
    correction: float  # |order-2 correction| / |delta| at this point


def _state(components: Sequence[pllr.Component], t: float) -> np.ndarray:
    return pllr.composed_cgf(components, t)


def _r(w: float) -> float:
    """Mills ratio Phi_bar(w) / phi(w), stable for all w."""
    return _SQRT_HALF_PI * float(special.erfcx(w / math.sqrt(2.0)))


def _lr_terms(w: float, u: float, l3: float, l4: float) -> Tuple[float, float]:
    """(first-order bracket, second-order correction), both without R(w)."""
    first = 1.0 / u - 1.0 / w
    second = (1.0 / u) * (l4 / 8.0 - 5.0 * l3 * l3 / 24.0) - l3 / (2.0 * u * u) - 1.0 / u**3 + 1.0 / w**3
    return first, second


def _tail_a(
    x: float, tilt: float, legendre: float, k2: float, l3: float, l4: float, order: int, centre_cum, upper: bool
) -> Tuple[float, float, float]:
    """Return (w, A, A_correction) with P(S > x) = phi(w) * A (``upper``), or
    P(S < x) = phi(w) * A (lower tail: the same expansion with w, and the
    odd terms, mirrored)."""
    w = math.copysign(math.sqrt(max(2.0 * legendre, 0.0)), tilt)
    if abs(w) < _W_CENTRE or tilt == 0.0:
        tail = float(edgeworth.sf(x, centre_cum, 3) if upper else edgeworth.cdf(x, centre_cum, 3))
        return w, tail / (math.exp(-0.5 * w * w) * _INV_SQRT_2PI), 0.0
    u = tilt * math.sqrt(k2)
    first, second = _lr_terms(w, u, l3, l4)
    sign = 1.0 if upper else -1.0
    corr = sign * second if order >= 2 else 0.0
    return w, _r(sign * w) + sign * first + corr, corr


def _delta_at_tilt(components, t: float, direction: str, order: int, centre: Tuple[np.ndarray, np.ndarray]):
    """(eps, delta, diagnostics) of one direction at saddlepoint tilt t."""
    kk = _state(components, t)
    cgf, k1, k2, k3, k4 = (float(kk[j]) for j in range(5))
    if not (math.isfinite(cgf) and math.isfinite(k1) and k2 > 0 and math.isfinite(k3) and math.isfinite(k4)):
        raise TiltedInvalidError(f"CGF not finite at tilt {t}")
    l3 = k3 / k2**1.5
    l4 = k4 / k2**2
    x = k1  # The saddlepoint equation M K'(t) = x, solved for x.
    cum_p, cum_q = centre
    s = t - 1.0
    leg_p = t * x - cgf
    leg_q = s * x - cgf
    if direction == "remove":
        eps = x
        w_q, a_q, c_q = _tail_a(x, s, leg_q, k2, l3, l4, order, cum_q, upper=True)
        w_p, a_p, c_p = _tail_a(x, t, leg_p, k2, l3, l4, order, cum_p, upper=True)
    else:
        eps = -x
        # Add direction: delta = P_P(S < -eps) - e^eps P_Q(S < -eps), and here
        # e^eps phi(w_Q) = phi(w_P).
        w_p, a_p, c_p = _tail_a(x, t, leg_p, k2, l3, l4, order, cum_p, upper=False)
        w_q, a_q, c_q = _tail_a(x, s, leg_q, k2, l3, l4, order, cum_q, upper=False)
        a_q, a_p, c_q, c_p = a_p, a_q, c_p, c_q
        w_q, w_p = w_p, w_q
    # delta = phi(w_Q) * (A_Q - A_P) (see module docstring).
    diff = a_q - a_p
    log_phi = -0.5 * w_q * w_q
    if not math.isfinite(diff):
        raise TiltedInvalidError(f"saddlepoint terms not finite at tilt {t}")
    delta = math.exp(log_phi) * _INV_SQRT_2PI * diff
    corr = abs(c_q - c_p) / abs(diff) if diff != 0 else math.inf
    return eps, delta, SaddleDiagnostics(t, l3, l4, corr)


def _centre_cumulants(components):
    return edgeworth.summed_cumulants(components)


def _support_min(components) -> float:
    """Infimum of S: sum of count * log(1 - q) (-inf if some q = 1)."""
    return sum(c * (math.log1p(-q) if q < 1.0 else -math.inf) for q, _, c in components)


def _t_at_zero(components) -> float:
    """Tilt with M K'(t) = 0 (eps = 0); lies in (0, 1) since K(0) = K(1) = 0."""
    f = lambda t: _state(components, t)[1]
    return optimize.brentq(f, 0.0, 1.0, xtol=1e-12)


def _solve_tilt(components, x: float) -> float:
    """Saddlepoint t with M K'(t) = x (M K' is increasing in t)."""
    f = lambda t: _state(components, t)[1] - x
    lo, hi = 0.0, 1.0
    flo, fhi = f(lo), f(hi)
    while flo > 0:
        hi, fhi = lo, flo
        lo = 2 * lo - 1 if lo < 0 else -1.0
        if lo < -_T_LIMIT:
            raise TiltedInvalidError(f"no saddlepoint for x={x}")
        flo = f(lo)
    while fhi < 0:
        lo, flo = hi, fhi
        hi = 2 * hi
        if hi > _T_LIMIT:
            raise TiltedInvalidError(f"no saddlepoint for x={x}")
        fhi = f(hi)
    return optimize.brentq(f, lo, hi, xtol=1e-13, rtol=1e-13)


def delta_from_epsilon(components: Sequence[pllr.Component], epsilon: float, order: int = 2, direction: str = "remove"):
    """Tilted delta(eps) for one direction. Returns (delta, diagnostics)."""
    centre = _centre_cumulants(components)
    if direction == "add":
        q_min = _support_min(components)
        if -epsilon <= q_min:  # Below the support of S: delta_add is exactly 0.
            return 0.0, SaddleDiagnostics(-math.inf, 0.0, 0.0, 0.0)
        t = _solve_tilt(components, -epsilon)
    else:
        t = _solve_tilt(components, epsilon)
    _, delta, diag = _delta_at_tilt(components, t, direction, order, centre)
    return delta, diag


def epsilon_from_delta(components: Sequence[pllr.Component], delta: float, order: int = 2, direction: str = "remove"):
    """Tilted eps(delta) for one direction. Returns (eps, diagnostics).

    Solved in the tilt variable t: eps(t) = +-M K'(t) and delta(t) are explicit,
    so each iteration costs one CGF evaluation.
    """
    centre = _centre_cumulants(components)
    log_target = math.log(delta)

    def g(t):
        eps, d, _ = _delta_at_tilt(components, t, direction, order, centre)
        if d == 0.0:  # Underflow far in the tail: treat as astronomically small.
            return -800.0 - log_target
        if not d > 0:
            raise TiltedInvalidError(f"saddlepoint delta = {d} <= 0 at tilt {t} ({direction})")
        return math.log(d) - log_target

    if direction == "remove":
        # delta decreases as t increases; eps(t) >= 0 for t >= t0.
        a = 1.0
        ga = g(a)
        if ga < 0:
            t0 = _t_at_zero(components)
            eps0, d0, diag0 = _delta_at_tilt(components, t0, direction, order, centre)
            if d0 <= delta:
                return 0.0, diag0
            b, a = a, t0
        else:
            b = 2.0
            while g(b) > 0:
                a, b = b, 2 * b
                if b > _T_LIMIT:
                    raise TiltedInvalidError("eps beyond the tilt range")
    else:
        q_min = _support_min(components)
        # As t decreases from t0 (eps = 0) eps = -M K'(t) grows towards -q_min and
        # delta_add falls. Small targets have their root at t < 0, so start at
        # t = 0 (eps = M KL(P||Q)) and only locate t0 when the root lies above it.
        g0 = g(0.0)
        if g0 <= 0:
            t0 = _t_at_zero(components)
            eps0, d0, diag0 = _delta_at_tilt(components, t0, direction, order, centre)
            if d0 <= delta:
                return 0.0, diag0
            a, b = 0.0, t0
        else:
            b, step = 0.0, 1.0
            while True:
                a = b - step
                ga = g(a)  # TiltedInvalidError propagates: the caller falls back.
                if ga < 0:
                    break
                b, step = a, 2 * step
                if step > _T_LIMIT:
                    _, _, diag_b = _delta_at_tilt(components, b, direction, order, centre)
                    return -q_min, diag_b  # delta_add > target up to sup of support.
    t = optimize.brentq(g, min(a, b), max(a, b), xtol=1e-11, rtol=1e-11)
    eps, _, diag = _delta_at_tilt(components, t, direction, order, centre)
    return max(eps, 0.0), diag
