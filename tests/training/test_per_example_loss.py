"""Per-example losses derived from the compiled loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.training.per_example_loss import make_per_example_loss, unreduced_loss


class _M:
    def __init__(self, loss):
        self.loss = loss
        self._compile_loss = object()


Y = tf.constant([0, 1, 2])
P = tf.constant([[2.0, 0.1, 0.3], [0.2, 1.0, 0.1], [0.0, 0.0, 3.0]])


@pytest.mark.parametrize(
    "loss",
    [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "sparse_categorical_crossentropy",
        lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True),
        [keras.losses.SparseCategoricalCrossentropy(from_logits=True)],
        {"out": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
    ],
)
def test_vector_of_example_losses(loss):
    fn = make_per_example_loss(_M(loss))
    out = fn(Y, P if not isinstance(loss, str) else tf.nn.softmax(P))
    ref = keras.losses.sparse_categorical_crossentropy(Y, P, from_logits=True)
    assert out.shape == (3,)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5)


def test_loss_instance_keeps_hyperparameters_and_original_untouched():
    orig = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per = unreduced_loss(orig)
    assert per.reduction is None and orig.reduction == "sum_over_batch_size"
    assert per.from_logits if hasattr(per, "from_logits") else True


def test_sample_weights_and_padding_rows_exactly_zero():
    fn = make_per_example_loss(_M(keras.losses.MeanSquaredError()))
    y = tf.constant([[1.0], [2.0], [3.0]])
    p = tf.constant([[0.0], [0.0], [np.inf]])
    out = fn(y, p, tf.constant([2.0, 1.0, 0.0])).numpy()
    np.testing.assert_allclose(out, [2.0, 4.0, 0.0])
    assert out[2] == 0.0


def test_sequence_losses_averaged_over_unmasked_positions():
    fn = make_per_example_loss(_M(keras.losses.MeanSquaredError()))
    y = tf.zeros([2, 3, 1])
    p = tf.constant([[[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]]])
    p._keras_mask = tf.constant([[True, True, False], [True, True, True]])
    np.testing.assert_allclose(fn(y, p).numpy(), [2.5, 1.0])


def test_reduced_loss_is_rejected():
    fn = make_per_example_loss(_M(lambda y, p: tf.reduce_mean(tf.square(p))))
    with pytest.raises(ValueError, match="scalar"):
        fn(Y, P)


def test_missing_or_multi_loss_rejected():
    with pytest.raises(ValueError, match="loss"):
        unreduced_loss(None)
    with pytest.raises(ValueError, match="exactly one loss"):
        unreduced_loss(["mse", "mae"])
    with pytest.raises(ValueError, match="Cannot derive"):
        unreduced_loss(42)


def test_compile_loss_weights_scale_the_loss():
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), loss_weights=2.0)
    out = make_per_example_loss(m)(Y, P)
    ref = keras.losses.sparse_categorical_crossentropy(Y, P, from_logits=True)
    np.testing.assert_allclose(out.numpy(), 2.0 * ref.numpy(), rtol=1e-5)
