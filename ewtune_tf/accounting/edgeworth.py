"""Edgeworth expansion of the composed PLLR and the robust (eps, delta) solver.

The CDF of S = sum of per-step PLLRs is approximated from its summed
cumulants K_1..K_5 (spec section 6.2): with s = sqrt(K_2), z = (x - K_1)/s,

  F(x) ~ Phi(z) - phi(z) [ K3/(6 s^3) He2                                 (order 1)
                          + K4/(24 s^4) He3 + K3^2/(72 s^6) He5           (order 2)
                          + K5/(120 s^5) He4 + K3 K4/(144 s^7) He6
                          + K3^3/(1296 s^9) He8 ]                         (order 3)

and delta_hat(eps) = [1 - F_Q(eps)] - e^eps [1 - F_P(eps)] (remove direction)
or F_P(-eps) - e^eps F_Q(-eps) (add direction).

The expansion is *not* a distribution function: it can leave [0, 1] and be
non-monotone (spec section 11.3, m = 20). `epsilon_from_delta` therefore checks
delta_hat on a grid for negativity and monotonicity before bracketing the root
with Brent's method, and raises `ExpansionInvalidError` instead of returning a
number it cannot vouch for.
"""

import math
from typing import Sequence

import numpy as np
from scipy import optimize, special

from ewtune_tf.accounting import pllr

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class ExpansionInvalidError(ArithmeticError):
    """The Edgeworth delta_hat is negative or non-monotone where it is needed."""


def _hermite(z: np.ndarray, k: int) -> np.ndarray:
    """Probabilists' Hermite polynomial He_k(z)."""
    h0, h1 = np.ones_like(z), z
    if k == 0:
        return h0
    for n in range(1, k):
        h0, h1 = h1, z * h1 - n * h0
    return h1


def _bracket(z: np.ndarray, cum: Sequence[float], order: int) -> np.ndarray:
    k1, k2, k3, k4, k5 = cum
    s = math.sqrt(k2)
    g3 = k3 / s**3
    out = g3 / 6.0 * _hermite(z, 2)
    if order >= 2:
        g4 = k4 / s**4
        out = out + g4 / 24.0 * _hermite(z, 3) + g3**2 / 72.0 * _hermite(z, 5)
    if order >= 3:
        g4 = k4 / s**4
        g5 = k5 / s**5
        out = out + g5 / 120.0 * _hermite(z, 4) + g3 * g4 / 144.0 * _hermite(z, 6) + g3**3 / 1296.0 * _hermite(z, 8)
    return out


def cdf(x, cum: Sequence[float], order: int) -> np.ndarray:
    """Edgeworth approximation F_hat(x) of P(S <= x) from summed cumulants."""
    x = np.asarray(x, dtype=float)
    z = (x - cum[0]) / math.sqrt(cum[1])
    phi = np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return special.ndtr(z) - phi * _bracket(z, cum, order)


def sf(x, cum: Sequence[float], order: int) -> np.ndarray:
    """Edgeworth approximation of P(S > x) (computed without 1 - F cancellation)."""
    x = np.asarray(x, dtype=float)
    z = (x - cum[0]) / math.sqrt(cum[1])
    phi = np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return special.ndtr(-z) + phi * _bracket(z, cum, order)


def delta_hat(eps, cum_p: Sequence[float], cum_q: Sequence[float], order: int, direction: str = "remove") -> np.ndarray:
    """Edgeworth delta_hat(eps) for one direction, given summed cumulants."""
    eps = np.asarray(eps, dtype=float)
    if direction == "remove":
        return sf(eps, cum_q, order) - np.exp(eps) * sf(eps, cum_p, order)
    if direction == "add":
        return cdf(-eps, cum_p, order) - np.exp(eps) * cdf(-eps, cum_q, order)
    raise ValueError(f"direction must be 'remove' or 'add'; got {direction!r}.")


def summed_cumulants(components: Sequence[pllr.Component]):
    """(K under P, K under Q) for a (possibly heterogeneous) composition."""
    return (pllr.composed_cumulants(components, "P"), pllr.composed_cumulants(components, "Q"))


def delta_from_epsilon(components: Sequence[pllr.Component], epsilon: float, order: int = 2) -> float:
    """Edgeworth delta_hat(eps), max over the two directions.

    Raises:
      ExpansionInvalidError: if delta_hat is negative (not a probability).
    """
    cum_p, cum_q = summed_cumulants(components)
    vals = [float(delta_hat(epsilon, cum_p, cum_q, order, d)) for d in ("remove", "add")]
    if min(vals) < 0.0 or not all(math.isfinite(v) for v in vals):
        raise ExpansionInvalidError(
            f"Edgeworth order-{order} delta_hat({epsilon}) = {vals} (remove, add) is"
            " negative: the expansion is not valid for this composition."
        )
    return max(vals)


def _solve_direction(cum_p, cum_q, delta: float, order: int, direction: str, eps_max: float, grid_size: int) -> float:
    """Smallest eps in [0, eps_max] with delta_hat(eps) = delta, checked.

    The true delta(eps) is positive and non-increasing, so delta_hat must be too
    wherever it decides the answer: from 0 until it has fallen well below the
    target (to delta / 10), and it must not come back above the target later (a
    second crossing would make the root ambiguous).
    """
    grid = np.linspace(0.0, eps_max, grid_size)
    vals = delta_hat(grid, cum_p, cum_q, order, direction)
    if not np.all(np.isfinite(vals)):
        raise ExpansionInvalidError(f"Edgeworth delta_hat is not finite ({direction}).")
    low = np.nonzero(vals <= 0.1 * delta)[0]
    if low.size == 0:
        raise ExpansionInvalidError(f"Edgeworth delta_hat stays above {delta} on [0, {eps_max}] ({direction}).")
    j = int(low[0])
    seg = vals[: j + 1]
    tol = 1e-12 + 1e-9 * np.abs(seg[:-1])
    if np.any(seg < 0.0) or np.any(np.diff(seg) > tol):
        raise ExpansionInvalidError(
            f"Edgeworth order-{order} delta_hat is negative or non-monotone on "
            f"[0, {grid[j]:.4g}] ({direction}); the expansion is invalid here."
        )
    if np.any(np.abs(vals[j:]) >= delta):
        raise ExpansionInvalidError(
            f"Edgeworth order-{order} delta_hat returns to |delta_hat| >= {delta} "
            f"beyond eps={grid[j]:.4g} ({direction}); the expansion is invalid."
        )
    if vals[0] <= delta:
        return 0.0
    k = int(np.nonzero(vals <= delta)[0][0])
    fun = lambda e: float(delta_hat(e, cum_p, cum_q, order, direction)) - delta
    return optimize.brentq(fun, grid[k - 1], grid[k], xtol=1e-12, rtol=1e-12)


def epsilon_from_delta(
    components: Sequence[pllr.Component],
    delta: float,
    order: int = 2,
    directions=("remove", "add"),
    grid_size: int = 2001,
) -> float:
    """Edgeworth eps_hat(delta), max over directions, with validity checks.

    Raises:
      ExpansionInvalidError: if delta_hat is negative or non-monotone before its
        crossing of `delta` (e.g. the spec's m = 20 case), or never crosses it.
    """
    cum_p, cum_q = summed_cumulants(components)
    # Upper end of the search: far in the right tail of S under Q (where delta is
    # astronomically small) and never below a generous absolute range.
    eps_max = max(1.0, cum_q[0] + 40.0 * math.sqrt(cum_q[1]), 2.0 * abs(cum_p[0]))
    return max(_solve_direction(cum_p, cum_q, delta, order, d, eps_max, grid_size) for d in directions)
