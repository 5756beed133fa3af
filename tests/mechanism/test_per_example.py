"""Per-example gradients (jacobian/pfor) against a plain per-example loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import per_example


def _model_and_data(seed=0, batch=6):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    x = tf.constant(np.random.RandomState(seed).randn(batch, 4), tf.float32)
    y = tf.constant(np.random.RandomState(seed + 1).randint(0, 3, batch))
    return model, x, y


def _losses(model, x, y):
    logits = model(x, training=True)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def test_per_example_gradients_equal_loop():
    model, x, y = _model_and_data()
    grads = per_example.per_example_gradients(lambda: _losses(model, x, y), model.trainable_variables)
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = _losses(model, x[i : i + 1], y[i : i + 1])[0]
        ref = tape.gradient(loss, model.trainable_variables)
        for g, r in zip(grads, ref):
            np.testing.assert_allclose(g[i].numpy(), r.numpy(), atol=1e-5, rtol=1e-5)


def test_microbatch_gradients_are_group_means_of_example_gradients():
    model, x, y = _model_and_data(batch=6)
    ex = per_example.per_example_gradients(lambda: _losses(model, x, y), model.trainable_variables)
    mb = per_example.per_example_gradients(lambda: _losses(model, x, y), model.trainable_variables, num_microbatches=3)
    for g_ex, g_mb in zip(ex, mb):
        assert g_mb.shape[0] == 3
        ref = tf.reduce_mean(tf.reshape(g_ex, [3, 2] + g_ex.shape[1:].as_list()), axis=1)
        np.testing.assert_allclose(g_mb.numpy(), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 4, 2.0, True, "2"])
def test_num_microbatches_must_divide_batch(bad):
    with pytest.raises(ValueError, match="num_microbatches"):
        per_example.check_num_microbatches(bad, 6)


def test_group_into_microbatches_rejects_non_divisor():
    with pytest.raises(ValueError, match="num_microbatches=4"):
        per_example.group_into_microbatches(tf.zeros([6]), 4)


def test_unused_variable_gets_zero_gradient():
    v_used = tf.Variable([1.0, 2.0])
    v_unused = tf.Variable([3.0])
    x = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    grads = per_example.per_example_gradients(lambda: tf.reduce_sum(x * v_used, axis=1), [v_used, v_unused])
    np.testing.assert_allclose(grads[0].numpy(), x.numpy())
    np.testing.assert_array_equal(grads[1].numpy(), np.zeros([2, 1]))
