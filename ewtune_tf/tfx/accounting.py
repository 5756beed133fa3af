"""Privacy accounting for the TFX Trainer: noise calibration and the report.

The certified epsilon is always an upper bound: it comes from Google
``dp_accounting``'s privacy-loss-distribution (PLD) accountant with its
pessimistic discretisation, for the Poisson-subsampled Gaussian under the
add-or-remove-one relation (both directions). Where the project's Edgeworth
accountant (``ewtune_tf.accounting``) is available, its first-order point
estimate is reported next to it as ``estimated_epsilon`` and labelled an
approximation; it is never used to calibrate or to gate.

No TensorFlow import here.
"""

import math
from typing import Any, Dict, Optional, Tuple

# Coarse grid for the many evaluations of a noise search; fine grid for the
# one reported number. Both grids are pessimistic, so both are upper bounds.
_SEARCH_INTERVAL = 1e-3
_REPORT_INTERVAL = 1e-4


def certified_epsilon(sampling_probability: float, noise_multiplier: float, steps: int,
                      delta: float, value_discretization_interval: float = _REPORT_INTERVAL) -> float:
    """Certified epsilon of `steps` Poisson-subsampled Gaussian steps.

    Args:
      sampling_probability: Poisson rate q in (0, 1].
      noise_multiplier: sigma (noise std / clipping norm), > 0.
      steps: number of noisy steps actually run (>= 0).
      delta: target delta in (0, 1).
    """
    import dp_accounting  # Local: keeps `import ewtune_tf.tfx.accounting` light.
    from dp_accounting.pld import pld_privacy_accountant

    if steps == 0:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=value_discretization_interval)
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def estimated_epsilon(sampling_probability: float, noise_multiplier: float, steps: int,
                      delta: float) -> Tuple[Optional[float], str]:
    """The Edgeworth point estimate (an approximation), and how it was made.

    Returns (None, reason) when the project's Edgeworth accountant is not
    importable or fails for these parameters; the certified number stands on
    its own.
    """
    try:
        from ewtune_tf.accounting import compute_epsilon  # type: ignore[attr-defined]
    except ImportError:
        compute_epsilon = None
    if compute_epsilon is not None:
        try:
            value = compute_epsilon(
                sampling_probability=sampling_probability, noise_multiplier=noise_multiplier,
                steps=steps, delta=delta, certified=False)
            value = float(getattr(value, "epsilon", value))
            return value, "edgeworth first-order point estimate (approximation)"
        except Exception as err:  # noqa: BLE001 -- an estimate must never block training.
            return None, f"edgeworth estimate unavailable: {type(err).__name__}: {err}"
    return None, "edgeworth accountant not available in this environment"


def calibrate_noise_multiplier(target_epsilon: float, sampling_probability: float, steps: int,
                               delta: float, tolerance: float = 1e-3) -> float:
    """Smallest sigma (up to `tolerance`, relative) whose certified eps <= target.

    Bisection on sigma: certified epsilon is non-increasing in sigma.

    Raises:
      ValueError: if even sigma = 1000 cannot meet the target.
    """
    def eps(sigma: float) -> float:
        return certified_epsilon(sampling_probability, sigma, steps, delta, _SEARCH_INTERVAL)

    low, high = 0.1, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1000.0:
            raise ValueError(
                f"epsilon={target_epsilon} is unreachable with q={sampling_probability}, "
                f"steps={steps}, delta={delta} (noise multiplier would exceed 1000)")
    if eps(low) <= target_epsilon:
        return low
    while (high - low) / high > tolerance:
        mid = math.sqrt(low * high)
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def privacy_report(*, target_epsilon: float, delta: float, noise_multiplier: float,
                   sampling_probability: float, steps: int, dataset_size: int,
                   batch_size: int, l2_norm_clip: float, sampling: str,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The privacy report dict (JSON-serialisable) for a finished run.

    ``epsilon`` is the certified value (the one to trust); the estimate is
    labelled as such.
    """
    fine = certified_epsilon(sampling_probability, noise_multiplier, steps, delta)
    coarse = certified_epsilon(sampling_probability, noise_multiplier, steps, delta,
                               _SEARCH_INTERVAL)
    # Both are upper bounds; the smaller of two upper bounds is one too.
    certified = min(fine, coarse)
    estimate, estimate_method = estimated_epsilon(
        sampling_probability, noise_multiplier, steps, delta)
    report: Dict[str, Any] = {
        "epsilon": certified,
        "certified_epsilon": certified,
        "estimated_epsilon": estimate,
        "estimate_method": estimate_method,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "sampling_probability": sampling_probability,
        "steps": int(steps),
        "dataset_size": int(dataset_size),
        "expected_batch_size": int(batch_size),
        "l2_norm_clip": l2_norm_clip,
        "sampling_method": sampling,
        "accountant": "pld (dp_accounting, pessimistic, add-or-remove-one)",
        "certified": True,
        "neighboring_relation": "add_or_remove_one",
    }
    if extra:
        report.update(extra)
    return report
