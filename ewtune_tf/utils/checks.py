"""Value checks that name the parameter and its allowed range.

Every check raises ``ValueError("<name> must be <allowed>; got <value>.")``.
``name`` is whatever the caller's user typed: ``--epsilon`` on the command
line, ``custom_config['epsilon']`` in TFX, ``target_epsilon`` in Python. The
``describe_*`` functions give the ``<allowed>`` phrase on its own, for help
texts, so a range is written once.
"""

import math
import numbers
from typing import Any, Callable, Optional, Sequence

Naming = Callable[[str], str]


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _num(x: float) -> str:
    return f"{x:g}"


def describe_real(
    low: float = -math.inf, high: float = math.inf, *, low_open: bool = True, high_open: bool = True
) -> str:
    """``"a finite number > 0"``, ``"in [0, 1)"``, ... (a finite value is always required)."""
    if math.isinf(high):
        if math.isinf(low):
            return "a finite number"
        return f"a finite number {'>' if low_open else '>='} {_num(low)}"
    if math.isinf(low):
        return f"a finite number {'<' if high_open else '<='} {_num(high)}"
    return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"


def describe_int(low: Optional[int] = None, high: Optional[int] = None) -> str:
    if low is not None and high is not None:
        return f"an integer in [{low}, {high}]"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer <= {high}"
    return "an integer"


def describe_choice(choices: Sequence[Any]) -> str:
    return f"one of {tuple(choices)!r}"


def fail(name: str, allowed: str, value: Any, optional: bool = False) -> None:
    raise ValueError(f"{name} must be {allowed}{' or unset' if optional else ''}; got {value!r}.")


def check_real(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = True,
    high_open: bool = True,
    optional: bool = False,
) -> Optional[float]:
    """A finite real in the given interval (None passes when ``optional``)."""
    if value is None and optional:
        return None
    ok = is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        fail(name, describe_real(low, high, low_open=low_open, high_open=high_open), value, optional)
    return float(value)


def check_int(
    name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *, optional: bool = False
) -> Optional[int]:
    """An integer in [low, high]; an integral float (``10.0``, as JSON may carry it) is accepted."""
    if value is None and optional:
        return None
    if is_real(value) and not is_int(value) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        fail(name, describe_int(low, high), value, optional)
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or value not in tuple(choices):
        fail(name, describe_choice(choices), value, optional)
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(name, "True or False", value)
    return value


def check_text(name: str, value: Any, *, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        fail(name, "a non-empty string", value, optional)
    return value
