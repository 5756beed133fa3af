"""Privacy accounting for the TFX Trainer: noise calibration and the report.

Thin adapter over ``ewtune_tf.accounting``. The reported ``epsilon`` /
``certified_epsilon`` is always a proven upper bound (the accountant's
certify=True mode: dp_accounting's pessimistic privacy-loss distribution for
the Poisson-subsampled Gaussian, add-or-remove adjacency, both directions).
The Edgeworth (or tilted) analytic value is reported next to it as
``estimated_epsilon`` and labelled an approximation; it never calibrates or
gates anything.

No TensorFlow import here.
"""

from typing import Any, Dict, Optional

from ewtune_tf.accounting import calibrate_noise_multiplier as _calibrate
from ewtune_tf.accounting import compute_epsilon


def calibrate_noise_multiplier(
    target_epsilon: float, sampling_probability: float, steps: int, delta: float, method: str = "edgeworth"
) -> float:
    """Smallest sigma whose *certified* epsilon after `steps` steps is <= target.

    Raises:
      ValueError: bad arguments, or the target cannot be certified.
    """
    result = _calibrate(
        target_epsilon, delta, sampling_probability=sampling_probability, steps=steps, method=method, certify=True
    )
    if not result.certified:
        raise ValueError(
            f"could not certify epsilon={target_epsilon} at delta={delta} "
            f"(q={sampling_probability}, steps={steps}); refusing to train"
        )
    return float(result.noise_multiplier)


def privacy_report(
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sampling_probability: float,
    steps: int,
    dataset_size: int,
    batch_size: int,
    l2_norm_clip: float,
    sampling: str,
    method: str = "edgeworth",
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The privacy report (JSON-serialisable) of a finished run.

    Accounts for the steps actually run. ``epsilon`` is the certified value,
    the one to trust and to gate on.
    """
    result = compute_epsilon(
        sampling_probability=sampling_probability,
        noise_multiplier=noise_multiplier,
        steps=steps,
        delta=delta,
        method=method,
        certify=True,
    )
    if not result.certified:
        raise ValueError("the accountant could not certify this run's epsilon")
    report: Dict[str, Any] = {
        "epsilon": float(result.epsilon),
        "certified_epsilon": float(result.epsilon),
        "certified": True,
        "certified_method": result.bound_method or result.method,
        "estimated_epsilon": float(result.estimate),
        "estimate_method": f"{result.estimate_method} (approximation, not a guarantee)",
        "target_epsilon": float(target_epsilon),
        "delta": float(delta),
        "noise_multiplier": float(noise_multiplier),
        "sampling_probability": float(sampling_probability),
        "steps": int(steps),
        "dataset_size": int(dataset_size),
        "expected_batch_size": int(batch_size),
        "l2_norm_clip": float(l2_norm_clip),
        "sampling_method": sampling,
        "accountant": f"ewtune_tf.accounting ({method}; certified by {result.method})",
        "neighboring_relation": "add_or_remove_one",
        "accountant_result": result.to_dict(),
    }
    if extra:
        report.update(extra)
    return report
