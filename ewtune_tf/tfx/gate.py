"""The privacy-budget decision behind ``PrivacyGate`` (pure Python, no TFX).

Fails closed: a model passes only when its report is marked certified and its
certified epsilon is a finite number <= the budget. Estimates are ignored.
"""

import math
from typing import Any, Mapping, Tuple


def report_float(report: Mapping[str, Any], *keys: str) -> float:
    """First numeric value among `keys` (NaN if none)."""
    for key in keys:
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return float("nan")


def certified_epsilon(report: Mapping[str, Any]) -> float:
    return report_float(report, "certified_epsilon", "epsilon")


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
    eps = certified_epsilon(report)
    if report.get("certified") is not True:
        return False, "privacy report is not marked certified"
    if not math.isfinite(eps) or eps < 0:
        return False, f"certified epsilon missing or invalid ({eps!r})"
    if eps <= budget:
        return True, f"certified epsilon {eps:.6g} <= budget {budget:.6g}"
    return False, f"certified epsilon {eps:.6g} > budget {budget:.6g}"
