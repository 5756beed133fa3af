"""TFX components: the privacy report and the privacy-budget gate.

PrivacyReportGen(model) -> privacy_report: PrivacyReport
    Reads the report the private Trainer wrote next to its SavedModel and
    records it, with typed properties, in ML Metadata.
PrivacyGate(privacy_report, epsilon_budget) -> blessing: ModelBlessing
    Blesses the model only when its *certified* epsilon is <= the budget
    (and the report says it is certified). The standard Pusher reads the
    blessing's ``blessed`` custom property (1 = push) when it is given
    ``model_blessing=gate.outputs['blessing']``; a refused model is not
    pushed.
"""

import json
import math
import os

from tfx import v1 as tfx
from tfx.types import standard_artifacts

from ewtune_tf.privacy import certified_epsilon
from ewtune_tf.tfx.artifacts import REPORT_FILE, PrivacyReport
from ewtune_tf.tfx.gate import gate_decision
from ewtune_tf.tfx.trainer_module import find_privacy_report

# What tfx.components.util.model_utils.is_model_blessed() reads, and the
# marker files the Evaluator writes (kept for tools that look for them).
BLESSED_KEY = "blessed"
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"


def _number(report, key: str) -> float:
    value = report.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else -1.0


@tfx.dsl.components.component
def PrivacyReportGen(
    model: tfx.dsl.components.InputArtifact[standard_artifacts.Model],
    privacy_report: tfx.dsl.components.OutputArtifact[PrivacyReport],
) -> None:
    """Copies the Trainer's privacy report into a PrivacyReport artifact."""
    path = find_privacy_report(model.uri)
    with open(path) as f:
        report = json.load(f)
    os.makedirs(privacy_report.uri, exist_ok=True)
    with open(os.path.join(privacy_report.uri, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)

    # Typed MLMD properties from the report's schema fields; -1 where absent
    # (certified_epsilon: -1 unless the report is certified).
    certified, _ = certified_epsilon(report)
    accountant = report.get("accountant") or {}
    privacy_report.certified_epsilon = -1.0 if certified is None else certified
    privacy_report.estimated_epsilon = _number(report, "epsilon_estimate")
    privacy_report.target_epsilon = _number(report, "target_epsilon")
    privacy_report.delta = _number(report, "delta")
    privacy_report.noise_multiplier = _number(report, "noise_multiplier")
    privacy_report.sampling_probability = _number(report, "sampling_probability")
    privacy_report.steps = int(_number(report, "steps"))
    privacy_report.sampling_method = str(report.get("sampling", "unknown"))
    privacy_report.accountant = (
        f"ewtune_tf.accounting ({accountant.get('method')}; certify={accountant.get('certify')})"
    )
    privacy_report.l2_norm_clip = _number(report, "l2_norm_clip")
    privacy_report.dataset_size = int(_number(report, "num_examples"))
    privacy_report.set_string_custom_property("certified", str(bool(report.get("certified"))))
    privacy_report.set_string_custom_property("source", path)


@tfx.dsl.components.component
def PrivacyGate(
    privacy_report: tfx.dsl.components.InputArtifact[PrivacyReport],
    blessing: tfx.dsl.components.OutputArtifact[standard_artifacts.ModelBlessing],
    epsilon_budget: tfx.dsl.components.Parameter[float],
) -> None:
    """Blesses the model iff its certified epsilon <= epsilon_budget."""
    with open(os.path.join(privacy_report.uri, REPORT_FILE)) as f:
        report = json.load(f)
    passed, reason = gate_decision(report, epsilon_budget)
    certified, _ = certified_epsilon(report)

    os.makedirs(blessing.uri, exist_ok=True)
    with open(os.path.join(blessing.uri, BLESSED_FILE if passed else NOT_BLESSED_FILE), "w") as f:
        f.write(reason + "\n")
    blessing.set_int_custom_property(BLESSED_KEY, 1 if passed else 0)
    blessing.set_float_custom_property("certified_epsilon", -1.0 if certified is None else certified)
    blessing.set_float_custom_property("epsilon_budget", float(epsilon_budget))
    blessing.set_string_custom_property("reason", reason)
    print(f"[ewtune_tf.tfx] PrivacyGate: {'BLESSED' if passed else 'NOT BLESSED'}: {reason}", flush=True)
