"""The privacy plan of a DP-SGD run and its report (no TensorFlow; layer 1).

* ``plan``: :class:`PrivacyPlan`, what runs and what it is accounted as
  (q, steps by the one epochs rule, sigma given or calibrated by a named rule,
  C, record, accountant, sampling).
* ``arguments``: the optimizers' keyword form of a plan
  (:func:`plan_from_arguments`, :func:`plan_to_arguments`).
* ``calibration``: the rules that choose sigma (certified, rdp, estimate,
  edgeworth_paper).
* ``report``: the one versioned privacy-report schema (:data:`FIELDS`),
  built only by ``PrivacyPlan.report``, read by the TFX gate.
"""

from ewtune_tf.privacy.arguments import PLAN_ARGUMENTS, plan_from_arguments, plan_to_arguments
from ewtune_tf.privacy.plan import CALIBRATION_RULES, NOISE_RULES, SAMPLING_SCHEMES, PrivacyPlan
from ewtune_tf.privacy.report import (
    FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    Release,
    RunFacts,
    bounded_batch_size,
    certified_epsilon,
    history_entry,
    overflow_delta,
    report_problems,
    validate_report,
)

__all__ = [
    "CALIBRATION_RULES",
    "FIELDS",
    "NOISE_RULES",
    "PLAN_ARGUMENTS",
    "PrivacyPlan",
    "Release",
    "RunFacts",
    "SAMPLING_SCHEMES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "bounded_batch_size",
    "certified_epsilon",
    "history_entry",
    "overflow_delta",
    "plan_from_arguments",
    "plan_to_arguments",
    "report_problems",
    "validate_report",
]
