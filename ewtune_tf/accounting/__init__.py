"""Edgeworth privacy accountant for DP-SGD (pure numpy/scipy/dp_accounting).

Public API:
  compute_epsilon, compute_delta        -> EpsilonResult / DeltaResult
  calibrate_noise_multiplier            -> CalibrationResult
  steps_and_sampling_probability        (num_examples, batch_size, epochs) -> (q, steps)
  steps_for_epochs, steps_per_epoch     the one epochs -> steps rule (the sampler's)
  EdgeworthAccountant                   dp_accounting.PrivacyAccountant subclass
  ExpansionInvalidError                 raised by the plain Edgeworth solver

Every epsilon reported with certify=True (the default) is a proven upper bound
(dp_accounting's pessimistic PLD); estimates are labelled as such. Below an
accounted sigma of MIN_ACCOUNTED_NOISE_MULTIPLIER (0.02) the reported epsilon
is the trivial bound inf (flag BELOW_RANGE_FLAG).

Layer 0 (no TensorFlow): imports no other ewtune_tf package.
"""

from ewtune_tf.accounting.accountant import EdgeworthAccountant
from ewtune_tf.accounting.api import (
    BELOW_RANGE_FLAG,
    MIN_ACCOUNTED_NOISE_MULTIPLIER,
    DeltaResult,
    EpsilonResult,
    compute_delta,
    compute_epsilon,
)
from ewtune_tf.accounting.calibration import (
    CalibrationResult,
    calibrate_noise_multiplier,
    steps_and_sampling_probability,
    steps_for_epochs,
    steps_per_epoch,
)
from ewtune_tf.accounting.edgeworth import ExpansionInvalidError
from ewtune_tf.accounting.tilted import TiltedInvalidError

__all__ = [
    "BELOW_RANGE_FLAG",
    "MIN_ACCOUNTED_NOISE_MULTIPLIER",
    "CalibrationResult",
    "DeltaResult",
    "EdgeworthAccountant",
    "EpsilonResult",
    "ExpansionInvalidError",
    "TiltedInvalidError",
    "calibrate_noise_multiplier",
    "compute_delta",
    "compute_epsilon",
    "steps_and_sampling_probability",
    "steps_for_epochs",
    "steps_per_epoch",
]
