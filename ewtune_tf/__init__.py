"""ewtune_tf: differentially private fine-tuning of BERT-family models in
TensorFlow/Keras 3, with the Edgeworth privacy accountant (EW-Tune).

``import ewtune_tf`` is deliberately cheap: it imports neither TensorFlow nor
Keras. The public names below are resolved lazily on first attribute access,
so that accounting-only users (and the ``ewtune-accountant`` CLI) never pay for
a TensorFlow import.
"""

import importlib
from typing import Any

from ewtune_tf.version import __version__

# Public name -> module that defines it. Resolved by __getattr__ (PEP 562).
_LAZY_EXPORTS = {
    # Accounting (pure numpy/scipy).
    "EdgeworthAccountant": "ewtune_tf.accounting",
    "calibrate_noise_multiplier": "ewtune_tf.accounting",
    "compute_epsilon": "ewtune_tf.accounting",
    # Keras optimizers and private training.
    "EWTuneAdam": "ewtune_tf.optimizers",
    "EWTuneSGD": "ewtune_tf.optimizers",
    "EWTuneAdamW": "ewtune_tf.optimizers",
    "make_ewtune_optimizer": "ewtune_tf.optimizers",
    "make_private": "ewtune_tf.training",
    "PrivacyBudget": "ewtune_tf.training",
}

__all__ = ["__version__", *sorted(_LAZY_EXPORTS)]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ewtune_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # Cache: later lookups skip __getattr__.
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
