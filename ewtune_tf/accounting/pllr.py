"""Privacy-loss log-likelihood ratio (PLLR) of the Poisson-subsampled Gaussian.

One step of DP-SGD with sampling rate q and noise multiplier sigma reduces
(sensitivity 1, unit noise, mean shift mu = 1/sigma) to the pair

  P = N(0, 1)                          (dataset without the individual)
  Q = (1 - q) N(0, 1) + q N(mu, 1)     (dataset with the individual)

with PLLR L(x) = log(dQ/dP)(x) = log(1 - q + q exp(mu x - mu^2 / 2)).

Both neighbouring directions are expressed through the *same* random variable
S = sum of the per-step L's:

  remove:  delta(eps) = P_Q(S > eps)  - e^eps P_P(S > eps)
  add:     delta(eps) = P_P(S < -eps) - e^eps P_Q(S < -eps)

(the add pair is (P, Q) swapped, whose PLLR is -L). Everything is therefore
driven by the per-step cumulant generating function

  K(t) = log E_P[exp(t L)],        with K(0) = K(1) = 0,

because dQ = e^L dP makes the Q-CGF K_Q(s) = K(s + 1). The j-th derivative of
K at t is the j-th cumulant of L under the exponentially tilted measure
dP_t ∝ e^{tL} dP, so K^{(j)}(0) are the P-cumulants and K^{(j)}(1) the
Q-cumulants.

Numerics: the integrals over x are computed with the trapezoid rule on a
uniform grid. For integrands that are analytic in a strip around the real axis
and decay like a Gaussian the trapezoid rule converges geometrically (the error
is ~exp(-2 pi d / h) for strip half-width d), and here L is analytic for
|Im x| < pi / mu. With h = min(0.1, 0.4/mu) the discretisation error is
below 1e-15 (exp(-2 pi^2 / (mu h)) <= e^-49), and the grid covers 12 standard deviations beyond the
interval between the two tilted modes (0 and t mu), where the log-integrand
provably decays at least like a Gaussian. This matches 40-digit quadrature to
~1e-12 relative (tests compare with adaptive quadrature and closed forms).
"""

import functools
import math
from typing import NamedTuple, Sequence, Tuple

import numpy as np

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_MARGIN = 12.0  # Standard deviations of Gaussian decay kept beyond the modes.


def pllr(x: np.ndarray, sampling_probability: float, noise_multiplier: float) -> np.ndarray:
    """L(x) = log(1 - q + q exp(mu x - mu^2/2)), evaluated stably in log space."""
    q = sampling_probability
    mu = 1.0 / noise_multiplier
    z = mu * np.asarray(x, dtype=float) - 0.5 * mu * mu
    out = np.empty_like(z)
    neg = z <= 0
    # z <= 0: the mixture weight of the shifted component is small; log1p keeps
    # relative precision when q * (e^z - 1) is tiny.
    out[neg] = np.log1p(q * np.expm1(z[neg]))
    zp = z[~neg]
    out[~neg] = zp + np.log(q + (1.0 - q) * np.exp(-zp))
    return out


class TiltedCumulants(NamedTuple):
    """K(t) and its derivatives K'(t) ... K^(5)(t) for one step."""

    t: float
    cgf: float
    k1: float
    k2: float
    k3: float
    k4: float
    k5: float

    def derivative(self, j: int) -> float:
        return (self.cgf, self.k1, self.k2, self.k3, self.k4, self.k5)[j]


def tilted_cumulants(sampling_probability: float, noise_multiplier: float, t: float) -> TiltedCumulants:
    """Per-step CGF K(t) = log E_P[e^{tL}] and its first five derivatives.

    Args:
      sampling_probability: q in (0, 1].
      noise_multiplier: sigma > 0 (noise std in units of the clipping norm).
      t: tilt (any real number).

    Returns:
      TiltedCumulants(t, K(t), K'(t), ..., K^(5)(t)).
    """
    q = float(sampling_probability)
    mu = 1.0 / float(noise_multiplier)
    t = float(t)
    h = min(0.1, 0.4 / mu)
    lo = min(0.0, t * mu) - _MARGIN
    hi = max(0.0, t * mu) + _MARGIN
    n = int(math.ceil((hi - lo) / h)) + 1
    x = lo + h * np.arange(n)
    ell = pllr(x, q, 1.0 / mu)
    g = -0.5 * x * x + t * ell
    gmax = float(np.max(g))
    w = np.exp(g - gmax)
    total = float(np.sum(w))
    cgf = math.log(total * h) + gmax - _LOG_SQRT_2PI
    w /= total
    mean = float(np.dot(w, ell))
    d = ell - mean
    d2 = d * d
    c2 = float(np.dot(w, d2))
    c3 = float(np.dot(w, d2 * d))
    c4 = float(np.dot(w, d2 * d2))
    c5 = float(np.dot(w, d2 * d2 * d))
    return TiltedCumulants(t, cgf, mean, c2, c3, c4 - 3.0 * c2 * c2, c5 - 10.0 * c3 * c2)


@functools.lru_cache(maxsize=4096)
def _cumulants_cached(q: float, sigma: float, measure: str) -> Tuple[float, ...]:
    t = 0.0 if measure == "P" else 1.0
    c = tilted_cumulants(q, sigma, t)
    return (c.k1, c.k2, c.k3, c.k4, c.k5)


def cumulants(
    sampling_probability: float, noise_multiplier: float, measure: str = "P"
) -> Tuple[float, float, float, float, float]:
    """Per-step cumulants kappa_1..kappa_5 of L under P (X) or Q (Y). Cached."""
    if measure not in ("P", "Q"):
        raise ValueError(f"measure must be 'P' or 'Q'; got {measure!r}.")
    return _cumulants_cached(float(sampling_probability), float(noise_multiplier), measure)


def cumulants_to_moments(k: Sequence[float]) -> Tuple[float, ...]:
    """Raw moments M1..M5 from cumulants kappa_1..kappa_5."""
    k1, k2, k3, k4, k5 = k
    m1 = k1
    m2 = k2 + k1**2
    m3 = k3 + 3 * k2 * k1 + k1**3
    m4 = k4 + 4 * k3 * k1 + 3 * k2**2 + 6 * k2 * k1**2 + k1**4
    m5 = k5 + 5 * k4 * k1 + 10 * k3 * k2 + 10 * k3 * k1**2 + 15 * k2**2 * k1 + 10 * k2 * k1**3 + k1**5
    return (m1, m2, m3, m4, m5)


def raw_moments(sampling_probability: float, noise_multiplier: float, measure: str = "P") -> Tuple[float, ...]:
    """Raw moments E[L^k], k = 1..5, under P or Q."""
    return cumulants_to_moments(cumulants(sampling_probability, noise_multiplier, measure))


# A composition is a tuple of (q, sigma, count) components; S is the sum over
# all count copies of each component's PLLR.
Component = Tuple[float, float, int]


def composed_cgf(components: Sequence[Component], t: float) -> np.ndarray:
    """Sum over components of count * (K(t), K'(t), ..., K^(5)(t))."""
    out = np.zeros(6)
    for q, sigma, count in components:
        c = tilted_cumulants(q, sigma, t)
        out += count * np.array(c[1:])
    return out


def composed_cumulants(components: Sequence[Component], measure: str = "P") -> np.ndarray:
    """Summed cumulants K_1..K_5 of S under P or Q (spec section 4)."""
    out = np.zeros(5)
    for q, sigma, count in components:
        out += count * np.array(cumulants(q, sigma, measure))
    return out
