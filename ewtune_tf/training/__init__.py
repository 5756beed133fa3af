"""Private training with Keras ``fit``: make_private and PrivacyBudget.

Layer 3: imports ewtune_tf.mechanism, ewtune_tf.optimizers (and lazily
ewtune_tf.accounting).
"""

from ewtune_tf.training.budget import PrivacyBudget, PrivacyBudgetExhausted
from ewtune_tf.training.private_step import (
    PrivateStepOptions,
    is_private,
    make_private,
    private_train_step,
)
from ewtune_tf.training.report import privacy_report

__all__ = [
    "PrivacyBudget",
    "PrivacyBudgetExhausted",
    "PrivateStepOptions",
    "is_private",
    "make_private",
    "privacy_report",
    "private_train_step",
]
