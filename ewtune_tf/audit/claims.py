"""The ε a configuration *claims*, i.e. what an audit is checked against.

The claim is always the library's certified number
(``ewtune_tf.accounting.compute_epsilon(..., certify=True)``), the number a
user is shown. Next to it we keep the exact ε of the Gaussian mechanism for
q = 1 (closed form, Balle & Wang 2018) as an independent cross-check of the
accountant: a certified ε below the exact one is an accountant bug and is
flagged, never hidden.
"""

import dataclasses
import math
from typing import Optional

from ewtune_tf.audit import bounds


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claimed (ε, δ) guarantee and where it came from."""

    certified_epsilon: float
    delta: float
    method: str  # how certified_epsilon was computed
    exact_epsilon: Optional[float]  # closed form, only for q = 1 and 1 step
    accountant_below_exact: bool  # True would be an accountant soundness bug


def _compute_epsilon():
    # ewtune_tf.accounting re-exports compute_epsilon; the module path is the
    # fallback while the package __init__ is being filled in.
    try:
        from ewtune_tf.accounting import compute_epsilon
    except ImportError:  # pragma: no cover - depends on the accounting helper
        from ewtune_tf.accounting.api import compute_epsilon
    return compute_epsilon


def claimed_epsilon(
    *, noise_multiplier: float, delta: float, sampling_probability: float = 1.0, steps: int = 1
) -> Claim:
    """Certified ε of ``steps`` Poisson-subsampled Gaussian steps."""
    result = _compute_epsilon()(
        sampling_probability=sampling_probability,
        noise_multiplier=noise_multiplier,
        steps=steps,
        delta=delta,
        certify=True,
    )
    certified = float(result.epsilon)
    if not getattr(result, "certified", True):
        raise RuntimeError(
            "compute_epsilon(certify=True) returned an uncertified ε; an audit "
            "must be checked against a proven upper bound."
        )
    exact = None
    below = False
    if sampling_probability == 1.0 and steps == 1:
        exact = bounds.gaussian_epsilon(noise_multiplier, delta)
        # Tolerance: the accountant's root finder and ours (1e-6 relative).
        below = certified < exact * (1.0 - 1e-6) - 1e-9
    method = getattr(result, "bound_method", None) or getattr(result, "method", "unknown")
    return Claim(
        certified_epsilon=certified if math.isfinite(certified) else math.inf,
        delta=float(delta),
        method=str(method),
        exact_epsilon=exact,
        accountant_below_exact=below,
    )
