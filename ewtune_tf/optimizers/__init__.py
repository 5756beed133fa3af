"""Differentially private Keras 3 optimizers (EW-Tune).

Layer 3: imports ewtune_tf.mechanism and ewtune_tf.privacy (and lazily
ewtune_tf.accounting).
"""

from ewtune_tf.optimizers.dp_optimizer import (
    EWTuneAdam,
    EWTuneAdamW,
    EWTuneOptimizerMixin,
    EWTuneSGD,
    NonPrivateStepError,
    PrivacyBudgetExhausted,
    is_ewtune_optimizer,
    make_ewtune_optimizer,
    unwrap_optimizer,
)
from ewtune_tf.optimizers.privacy_config import PrivacyConfig, resolve_privacy_config

__all__ = [
    "EWTuneAdam",
    "EWTuneAdamW",
    "EWTuneOptimizerMixin",
    "EWTuneSGD",
    "NonPrivateStepError",
    "PrivacyBudgetExhausted",
    "PrivacyConfig",
    "is_ewtune_optimizer",
    "make_ewtune_optimizer",
    "resolve_privacy_config",
    "unwrap_optimizer",
]
