"""EW-Tune paper mode: reproduces the sigma values EW-Tune chose (spec §9.2, §10.1).

This mirrors the published accountant's numerical conventions deliberately, so
that its logged numbers are reproduced to 1e-6; it is NOT a privacy guarantee:

  * remove direction only (mixture vs N(0, 1));
  * raw moments E[L^k], k = 1..4, by adaptive quadrature (abs/rel tolerance
    1e-8, at most 50 subintervals), converted to cumulants;
  * first-order Edgeworth expansion, delta_hat = [1 - F_Y] - e^eps [1 - F_X];
  * eps from scipy.optimize.fsolve started at x0 = m (E_P L + E_Q L) / 2 with
    xtol = 1e-12, no bracketing;
  * sigma by the coarse-to-fine descending grid search from sigma = 2 with steps
    0.5, 0.05, 0.005, 0.0005, keeping the smallest grid sigma with eps < target.

Results are therefore labelled certified=False. The robust solver lives in
edgeworth.py / tilted.py; nothing here is used by them.
"""

import functools
import math
import time
import warnings
from typing import Tuple

import numpy as np
from scipy import integrate, optimize, stats

_GRID_STEPS = (0.5, 0.05, 0.005, 0.0005)
_SIGMA_START = 2.0


def _pllr_scalar(x: float, q: float, mu: float) -> float:
    z = mu * x - 0.5 * mu * mu
    if z > 0:
        return z + math.log(q + (1.0 - q) * math.exp(-z))
    return math.log1p(q * math.expm1(z))


@functools.lru_cache(maxsize=2048)
def paper_cumulants(q: float, sigma: float) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(kappa_1..4 under P, kappa_1..4 under Q), quadrature as in the paper code."""
    mu = 1.0 / sigma
    dens_p = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    dens_q = lambda x: (1 - q) * dens_p(x) + q * dens_p(x - mu)
    out = []
    for dens in (dens_p, dens_q):
        m = [
            integrate.quad(
                lambda x: _pllr_scalar(x, q, mu) ** k * dens(x), -np.inf, np.inf, epsabs=1e-8, epsrel=1e-8, limit=50
            )[0]
            for k in (1, 2, 3, 4)
        ]
        m1, m2, m3, m4 = m
        k1 = m1
        k2 = m2 - m1**2
        k3 = m3 - 3 * m2 * m1 + 2 * m1**3
        k4 = m4 - 4 * m3 * m1 - 3 * m2**2 + 12 * m2 * m1**2 - 6 * m1**4
        out.append((k1, k2, k3, k4))
    return tuple(out[0]), tuple(out[1])


def _cdf_order1(x, k, m):
    mean, var, k3 = m * k[0], m * k[1], m * k[2]
    s = math.sqrt(var)
    z = (x - mean) / s
    return stats.norm.cdf(z) - stats.norm.pdf(z) * (k3 / (6 * s**3)) * (z * z - 1)


def paper_delta(eps: float, q: float, sigma: float, steps: int) -> float:
    """Order-1 Edgeworth delta_hat(eps), remove direction, as the paper computes."""
    kp, kq = paper_cumulants(float(q), float(sigma))
    return (1 - _cdf_order1(eps, kq, steps)) - math.exp(eps) * (1 - _cdf_order1(eps, kp, steps))


def paper_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Order-1 Edgeworth eps estimate with the paper's fsolve conventions."""
    kp, kq = paper_cumulants(float(q), float(sigma))
    x0 = steps * (kp[0] + kq[0]) / 2.0
    f = lambda e: np.atleast_1d(paper_delta(float(np.ravel(e)[0]), q, sigma, steps) - delta)
    with warnings.catch_warnings():
        # fsolve warns about slow progress once it is at the xtol floor; the paper
        # code ignored it and so do we (its output is the logged number).
        warnings.simplefilter("ignore", RuntimeWarning)
        root = optimize.fsolve(f, x0, xtol=1e-12)
    return float(root[0])


def paper_sigma(q: float, steps: int, target_epsilon: float, delta: float) -> Tuple[float, float, float]:
    """EW-Tune's sigma search. Returns (sigma, eps at sigma, seconds).

    The published search assumes eps(2.0) < target on entry (otherwise its
    `previous_eps` is unbound); here the start is doubled until that holds, which
    keeps the same 0.0005 grid.
    """
    start = time.perf_counter()
    cache = {}

    def eps_of(s):
        key = round(s, 10)
        if key not in cache:
            cache[key] = paper_epsilon(q, s, steps, delta)
        return cache[key]

    sigma = _SIGMA_START
    while not eps_of(sigma) < target_epsilon:
        sigma *= 2.0
        if sigma > 1e6:
            raise ValueError("target_epsilon is unreachable by the paper search.")
    for step in _GRID_STEPS:
        while sigma > step and eps_of(sigma - step) < target_epsilon:
            sigma -= step
        # `sigma` is now the smallest value on this grid (above `step`) whose eps
        # is below the target; the finer pass continues downwards from it.
    sigma = round(sigma, 4)  # Undo float drift from repeated subtraction.
    return sigma, eps_of(sigma), time.perf_counter() - start
