"""The privacy-budget decision behind ``PrivacyGate`` (pure Python, no TFX, no TensorFlow).

Fails closed: a model passes only when its privacy report is a valid report
of the ``ewtune_tf.privacy`` schema, is ``certified`` (its epsilon is a proven
upper bound for what ran: see ``uncertified_because``), and its epsilon is <=
the budget. Estimates are never gated on. Every model that ``ewtune-train``,
``ewtune_tf.recipe.finetune`` or the TFX Trainer produced under budget passes.
"""

import math
from typing import Any, Mapping, Tuple

from ewtune_tf.privacy import certified_epsilon


def check_budget(epsilon_budget: Any) -> float:
    if (
        isinstance(epsilon_budget, bool)
        or not isinstance(epsilon_budget, (int, float))
        or not math.isfinite(epsilon_budget)
        or epsilon_budget <= 0
    ):
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
    return float(epsilon_budget)


def gate_decision(report: Mapping[str, Any], epsilon_budget: float) -> Tuple[bool, str]:
    """(passed, reason) for a privacy report against an epsilon budget."""
    budget = check_budget(epsilon_budget)
    eps, why = certified_epsilon(report)
    if eps is None:
        return False, f"refused: {why}"
    if eps <= budget:
        return True, f"certified epsilon {eps:.6g} <= budget {budget:.6g}"
    return False, f"certified epsilon {eps:.6g} > budget {budget:.6g}"
