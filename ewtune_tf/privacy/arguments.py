"""The keyword form of a PrivacyPlan: the privacy arguments of the EWTune optimizers.

``EWTuneAdam(learning_rate=..., l2_norm_clip=1.0, target_epsilon=8.0,
target_delta=1e-5, num_examples=N, batch_size=B, epochs=3)`` builds its plan
with :func:`plan_from_arguments`; ``get_config`` writes it back with
:func:`plan_to_arguments`. ``PLAN_ARGUMENTS`` (the names) is read off the
signature, so the argument list is written once, here.
"""

import dataclasses
import inspect
import math
import warnings
from typing import Any, Dict, Optional

from ewtune_tf.privacy.plan import CALIBRATION_RULES, PrivacyPlan
from ewtune_tf.utils import checks

# Older name of the "certified" rule, still accepted from saved configs.
_LEGACY_SOURCES = {"calibrated": "certified"}


def plan_from_arguments(
    *,
    l2_norm_clip: float,
    noise_multiplier: Optional[float] = None,
    target_epsilon: Optional[float] = None,
    target_delta: Optional[float] = None,
    num_examples: Optional[int] = None,
    batch_size: Optional[float] = None,
    epochs: Optional[float] = None,
    steps: Optional[int] = None,
    sampling_probability: Optional[float] = None,
    accountant_method: str = "tilted",
    accountant_order: int = 2,
    certify: bool = True,
    sampling: str = "poisson",
    noise_multiplier_source: Optional[str] = None,
    record: str = "example",
) -> PrivacyPlan:
    """Validates the privacy arguments and, given ``target_epsilon``, calibrates sigma.

    Exactly one of ``noise_multiplier`` or ``target_epsilon`` is given, except
    when ``noise_multiplier_source`` names a calibration rule: then sigma was
    calibrated before (a restored config) and is reused, not recalibrated.
    q is ``sampling_probability`` or ``batch_size / num_examples``; giving
    both inconsistently is an error. Planned steps are ``steps``, or
    ``steps_for_epochs(q, epochs)``. ``record`` ("example" or
    "keyed_microbatch") sets the sensitivity the accountant divides sigma by.
    """
    source = _LEGACY_SOURCES.get(noise_multiplier_source, noise_multiplier_source)
    checks.check_choice("noise_multiplier_source", source, ("given",) + CALIBRATION_RULES, optional=True)
    n = checks.check_int("num_examples", num_examples, 1, optional=True)
    b = checks.check_real("batch_size", batch_size, 0.0, n or math.inf, high_open=n is None, optional=True)
    q = checks.check_real("sampling_probability", sampling_probability, 0.0, 1.0, high_open=False, optional=True)
    if q is None and n is not None and b is not None:
        q = b / n
    if b is None and q is not None and n is not None:
        b = q * n
    steps = _planned_steps(q, epochs, steps)
    calibrated = source in CALIBRATION_RULES
    if target_epsilon is not None and noise_multiplier is not None and not calibrated:
        raise ValueError(
            "Give either noise_multiplier, or target_epsilon (+ target_delta, "
            "num_examples, batch_size, epochs) to calibrate it; not both."
        )
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError(
            "noise_multiplier (>= 0) or target_epsilon (> 0, with target_delta, "
            "num_examples, batch_size and epochs) is required."
        )
    plan = PrivacyPlan(
        sampling_probability=q,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        steps=steps,
        num_examples=n,
        expected_batch_size=b,
        target_epsilon=target_epsilon,
        delta=target_delta,
        accountant=accountant_method,
        accountant_order=accountant_order,
        certify=certify,
        sampling=sampling,
        noise_multiplier_rule=source if noise_multiplier is not None and source else "given",
        record=record,
    )
    if noise_multiplier is None:
        plan = _calibrate(plan, epochs)
    _warn_about(plan)
    return plan


def _planned_steps(q: Optional[float], epochs, steps) -> Optional[int]:
    if epochs is not None:
        checks.check_real("epochs", epochs, 0.0)
    if epochs is None or q is None:
        return steps
    from_epochs = PrivacyPlan(q, 1.0).steps_for(epochs)
    if steps is not None and steps != from_epochs:
        raise ValueError(
            f"steps={steps!r} disagrees with epochs={epochs!r} at sampling_probability={q!r} "
            f"({from_epochs} steps); give one of them."
        )
    return from_epochs


def _calibrate(plan: PrivacyPlan, epochs) -> PrivacyPlan:
    missing = {
        "target_delta": plan.delta,
        "num_examples": plan.num_examples if plan.sampling_probability is None else 0,
        "batch_size": plan.expected_batch_size if plan.sampling_probability is None else 0,
        "epochs": plan.steps if epochs is None else epochs,
    }
    missing = [k for k, v in missing.items() if v is None]
    if missing:
        raise ValueError(
            f"target_epsilon={plan.target_epsilon} needs {', '.join(missing)} to calibrate the "
            "noise multiplier (target_delta in (0, 1), num_examples >= 1, "
            "batch_size in (0, num_examples], epochs > 0)."
        )
    return plan.calibrate("certified" if plan.certify else "estimate")


def _warn_about(plan: PrivacyPlan) -> None:
    if plan.delta is not None and plan.num_examples is not None and plan.delta >= 1.0 / plan.num_examples:
        warnings.warn(
            f"target_delta={plan.delta} >= 1/num_examples={1.0 / plan.num_examples:.3g}: such a delta allows "
            "releasing individual records; choose delta << 1/num_examples.",
            stacklevel=4,
        )
    if plan.noise_multiplier == 0:
        warnings.warn("noise_multiplier=0: training is NOT differentially private.", stacklevel=4)
    if plan.sampling == "shuffle":
        warnings.warn(
            "sampling='shuffle': the accountant assumes Poisson sampling; the "
            "reported epsilon is that of Poisson sampling with the same q, which "
            "is not a proven bound for shuffled fixed-size batches (the report says "
            "certified: false). Use ewtune_tf.data.poisson_batches for a matching guarantee.",
            stacklevel=4,
        )


PLAN_ARGUMENTS = tuple(inspect.signature(plan_from_arguments).parameters)
# Plan fields whose argument has another (historical) name.
_ARGUMENT_OF_FIELD = {
    "delta": "target_delta",
    "expected_batch_size": "batch_size",
    "accountant": "accountant_method",
    "noise_multiplier_rule": "noise_multiplier_source",
}


def plan_to_arguments(plan: PrivacyPlan) -> Dict[str, Any]:
    """The keyword arguments that rebuild ``plan`` without recalibrating
    (sigma with the rule that chose it, steps instead of epochs)."""
    out = {}
    for field in dataclasses.fields(plan):
        name = _ARGUMENT_OF_FIELD.get(field.name, field.name)
        if name in PLAN_ARGUMENTS:
            out[name] = getattr(plan, field.name)
    return out
