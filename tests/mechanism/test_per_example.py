"""Per-example gradients (jacobian/pfor) against a plain per-example loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import per_example
from ewtune_tf.mechanism import records as records_lib


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


def test_keyed_record_gradients_are_group_sums_over_expected_size():
    model, x, y = _model_and_data(batch=6)
    ex = per_example.per_example_gradients(lambda: _losses(model, x, y), model.trainable_variables)
    keys = tf.constant([5, 0, 3, 8, 2, 11], tf.int64)  # mod 3: groups 2, 0, 0, 2, 2, 2
    records = records_lib.microbatch_records(keys, 3, expected_batch_size=6.0)
    mb = per_example.per_example_gradients(lambda: _losses(model, x, y), model.trainable_variables, records)
    for g_ex, g_mb in zip(ex, mb):
        assert g_mb.shape[0] == 3
        np.testing.assert_allclose(g_mb[0].numpy(), (g_ex[1] + g_ex[2]).numpy() / 2.0, atol=1e-5)
        np.testing.assert_array_equal(g_mb[1].numpy(), np.zeros_like(g_mb[1].numpy()))  # empty group
        np.testing.assert_allclose(g_mb[2].numpy(), tf.reduce_sum(tf.gather(g_ex, [0, 3, 4, 5]), 0) / 2.0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_num_microbatches_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_microbatches"):
        records_lib.check_num_microbatches(bad)


def test_record_sensitivity_and_accounted_noise():
    assert records_lib.record_definition(None) == "example"
    assert records_lib.record_definition(4) == "keyed_microbatch"
    assert records_lib.accounted_noise_multiplier(2.0, None) == 2.0
    assert records_lib.accounted_noise_multiplier(2.0, 4) == 1.0


def test_unused_variable_gets_zero_gradient():
    v_used = tf.Variable([1.0, 2.0])
    v_unused = tf.Variable([3.0])
    x = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    grads = per_example.per_example_gradients(lambda: tf.reduce_sum(x * v_used, axis=1), [v_used, v_unused])
    np.testing.assert_allclose(grads[0].numpy(), x.numpy())
    np.testing.assert_array_equal(grads[1].numpy(), np.zeros([2, 1]))
