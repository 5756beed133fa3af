"""Per-example losses from a compiled Keras 3 model.

The private step needs one loss per example, not the batch mean. We derive it
from the loss the user passed to ``compile`` (``model.loss``):

* a ``keras.losses.Loss`` instance is shallow-copied with ``reduction=None``
  (works for any subclass, keeps its hyperparameters, e.g. ``from_logits``);
* a string or plain function is resolved with ``keras.losses.get`` and wrapped
  in an unreduced ``keras.losses.Loss``;
* a list/dict holding exactly one loss is unwrapped; several outputs with
  several losses are rejected (ValueError).

Non-batch axes left by the loss (e.g. per-token losses of a sequence model)
are averaged per example; positions masked by a Keras mask on ``y_pred`` are
excluded from that average. A rank-1 ``sample_weight`` multiplies each
example's loss, and examples with weight 0 (padding rows of Poisson batches)
get a loss of exactly 0 -- written with ``tf.where``, so their gradient is
exactly 0 even if the padding row's raw loss is not finite.

A ``loss_weights`` given to ``compile`` for the single loss scales it.
A custom ``Model.compute_loss`` override is not used (only ``model.loss``).

Anything that does not yield a [batch] vector (a function that already
reduces to a scalar, an unknown loss type) raises ValueError.
"""

import copy
from typing import Callable, Optional

import keras
import tensorflow as tf


def _single_loss(loss):
    if isinstance(loss, dict):
        values = [v for v in loss.values() if v is not None]
        if len(values) != 1:
            raise ValueError(
                "make_private supports models compiled with exactly one loss; got "
                f"loss={loss!r}. Combine multi-output losses into one Loss."
            )
        return values[0]
    if isinstance(loss, (list, tuple)):
        values = [v for v in loss if v is not None]
        if len(values) != 1:
            raise ValueError(
                "make_private supports models compiled with exactly one loss; got "
                f"loss={loss!r}. Combine multi-output losses into one Loss."
            )
        return values[0]
    return loss


class _FunctionLoss(keras.losses.Loss):
    """Wraps ``fn(y_true, y_pred)`` as an unreduced Loss (masks honoured)."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"), reduction=None)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def unreduced_loss(loss) -> keras.losses.Loss:
    """A Loss equivalent to ``loss`` but with ``reduction=None``."""
    if loss is None:
        raise ValueError(
            "The model must be compiled with a loss (model.compile(loss=...)) "
            "before private training: per-example losses are derived from it."
        )
    loss = _single_loss(loss)
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        per_example = copy.copy(loss)
        per_example.reduction = None
        return per_example
    if callable(loss):
        return _FunctionLoss(loss)
    raise ValueError(
        f"Cannot derive per-example losses from loss={loss!r}: expected a "
        "keras.losses.Loss, a loss name, or a function (y_true, y_pred) -> "
        "per-example loss."
    )


def make_per_example_loss(model) -> Callable:
    """Returns ``fn(y, y_pred, sample_weight) -> float32 [batch]``."""
    if getattr(model, "_compile_loss", None) is None and getattr(model, "loss", None) is None:
        raise ValueError("loss: the model must be compiled with a loss before private training.")
    loss_obj = unreduced_loss(model.loss)
    # compile(loss_weights=...) for the single loss: a constant factor.
    weight = getattr(getattr(model, "_compile_loss", None), "_user_loss_weights", None)
    if isinstance(weight, dict):
        weight = list(weight.values())
    if isinstance(weight, (list, tuple)):
        weight = weight[0] if len(weight) == 1 else None
    loss_weight = 1.0 if weight is None else float(weight)

    def per_example_loss(y, y_pred, sample_weight: Optional[tf.Tensor] = None) -> tf.Tensor:
        if isinstance(y_pred, (list, tuple)) and len(y_pred) == 1:
            y_pred = y_pred[0]
        if isinstance(y, (list, tuple)) and len(y) == 1:
            y = y[0]
        mask = getattr(y_pred, "_keras_mask", None)
        values = loss_obj(y, y_pred)
        values = tf.cast(values, tf.float32)
        if values.shape.rank == 0:
            raise ValueError(
                "loss: the compiled loss returned a scalar even with reduction "
                "disabled; per-example losses are required. Use a keras.losses.Loss "
                "or a function that returns one value per example."
            )
        if values.shape.rank > 1:
            axes = list(range(1, values.shape.rank))
            if mask is not None and mask.shape.rank == values.shape.rank:
                m = tf.cast(mask, tf.float32)
                values = tf.reduce_sum(values * m, axis=axes) / tf.maximum(tf.reduce_sum(m, axis=axes), 1.0)
            else:
                values = tf.reduce_mean(values, axis=axes)
        if loss_weight != 1.0:
            values = values * loss_weight
        if sample_weight is not None:
            w = tf.cast(sample_weight, tf.float32)
            if w.shape.rank is not None and w.shape.rank > 1:
                w = tf.reshape(w, [tf.shape(w)[0], -1])
                if w.shape[1] != 1:
                    raise ValueError(
                        "sample_weight: the private step supports one weight per "
                        f"example (shape [batch] or [batch, 1]); got shape {sample_weight.shape}."
                    )
                w = w[:, 0]
            values = tf.where(w != 0.0, values * w, tf.zeros_like(values))
        return values

    return per_example_loss
