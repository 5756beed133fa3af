"""Input validation shared by the accounting API (ValueError naming the parameter)."""

import math
import numbers
from typing import Any

METHODS = ("edgeworth", "tilted")
ORDERS = (1, 2, 3)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_probability(q: Any, name: str = "sampling_probability") -> float:
    if not _is_real(q) or not math.isfinite(q) or not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1]; got {q!r}.")
    return float(q)


def check_noise_multiplier(sigma: Any, name: str = "noise_multiplier") -> float:
    if not _is_real(sigma) or not math.isfinite(sigma) or not sigma > 0.0:
        raise ValueError(f"{name} must be a finite number > 0; got {sigma!r}.")
    return float(sigma)


def check_steps(steps: Any, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        if _is_real(steps) and math.isfinite(steps) and float(steps).is_integer():
            steps = int(steps)
        else:
            raise ValueError(f"{name} must be an integer >= 1; got {steps!r}.")
    if steps < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {steps!r}.")
    return int(steps)


def check_delta(delta: Any, name: str = "delta") -> float:
    if not _is_real(delta) or not math.isfinite(delta) or not 0.0 < delta < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1); got {delta!r}.")
    return float(delta)


def check_epsilon(eps: Any, name: str = "epsilon") -> float:
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0; got {eps!r}.")
    return float(eps)


def check_target_epsilon(eps: Any, name: str = "target_epsilon") -> float:
    if not _is_real(eps) or not math.isfinite(eps) or not eps > 0.0:
        raise ValueError(f"{name} must be a finite number > 0; got {eps!r}.")
    return float(eps)


def check_method(method: Any, name: str = "method") -> str:
    if method not in METHODS:
        raise ValueError(f"{name} must be one of {METHODS}; got {method!r}.")
    return str(method)


def check_order(order: Any, name: str = "order") -> int:
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"{name} must be one of {ORDERS}; got {order!r}.")
    return int(order)


def check_positive_int(value: Any, name: str) -> int:
    return check_steps(value, name=name)


def check_positive_real(value: Any, name: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or not value > 0.0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return float(value)
