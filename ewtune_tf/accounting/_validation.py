"""Input validation shared by the accounting API (ValueError naming the parameter).

The range checks themselves live in ``ewtune_tf.utils.checks`` (one place for
"<name> must be <allowed>; got <value>."); this module fixes the accountant's
parameter ranges.
"""

import math
from typing import Any

from ewtune_tf.utils import checks

METHODS = ("edgeworth", "tilted")
ORDERS = (1, 2, 3)


def check_sampling_probability(q: Any, name: str = "sampling_probability") -> float:
    return checks.check_real(name, q, 0.0, 1.0, high_open=False)


def check_noise_multiplier(sigma: Any, name: str = "noise_multiplier") -> float:
    return checks.check_real(name, sigma, 0.0)


def check_steps(steps: Any, name: str = "steps") -> int:
    return checks.check_int(name, steps, 1)


def check_delta(delta: Any, name: str = "delta") -> float:
    return checks.check_real(name, delta, 0.0, 1.0)


def check_epsilon(eps: Any, name: str = "epsilon") -> float:
    return checks.check_real(name, eps, 0.0, low_open=False)


def check_target_epsilon(eps: Any, name: str = "target_epsilon") -> float:
    return checks.check_real(name, eps, 0.0)


def check_method(method: Any, name: str = "method") -> str:
    return str(checks.check_choice(name, method, METHODS))


def check_order(order: Any, name: str = "order") -> int:
    return int(checks.check_choice(name, order, ORDERS))


def check_positive_int(value: Any, name: str) -> int:
    return check_steps(value, name=name)


def check_positive_real(value: Any, name: str) -> float:
    return checks.check_real(name, value, 0.0, math.inf)
