"""Private training with Keras ``fit``: make_private and PrivacyBudget.

Typical use::

    import ewtune_tf
    from ewtune_tf.data import poisson_batches

    data = poisson_batches(train_ds, expected_batch_size=256, max_batch_size="auto")
    opt = ewtune_tf.EWTuneAdam(
        1e-4, l2_norm_clip=1.0, target_epsilon=3.0, target_delta=1e-5,
        num_examples=data.num_examples, batch_size=256, epochs=3)
    model.compile(optimizer=opt, loss=...)           # any single Keras loss
    ewtune_tf.make_private(model, physical_batch_size=32)
    model.fit(data.dataset, epochs=3, shuffle=False,
              callbacks=[ewtune_tf.PrivacyBudget(data=data)])
    report = privacy_report(model, data)             # certified epsilon etc.

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
