"""Empirical privacy auditing: ε lower bounds from canary membership tests.

An audit attacks ewtune_tf's own private step (clipping + noise + update) and
turns the attack's success into an empirical *lower* bound on ε that holds
with a stated confidence. A correct mechanism never yields a lower bound
above its certified ε; a broken one (noise off, clipping off) is caught with
a lower bound far above the claim. See docs/privacy.md.

``bounds`` (pure numpy/scipy) is imported eagerly; the audits themselves need
TensorFlow and are imported on first use.

Layer 4: may import the privacy core (layers 0-3), nothing above it.
"""

import importlib
from typing import Any

from ewtune_tf.audit.bounds import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound_from_rates,
    gaussian_epsilon,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

_LAZY = {
    "MECHANISMS": "ewtune_tf.audit.mechanism_audit",
    "MICROBATCHES": "ewtune_tf.audit.mechanism_audit",
    "AuditResult": "ewtune_tf.audit.mechanism_audit",
    "audit_mechanism": "ewtune_tf.audit.mechanism_audit",
    "one_run_audit": "ewtune_tf.audit.mechanism_audit",
    "audit_all": "ewtune_tf.audit.mechanism_audit",
    "claimed_epsilon": "ewtune_tf.audit.claims",
}

__all__ = [
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_lower_bound_from_rates",
    "gaussian_epsilon",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ewtune_tf.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
