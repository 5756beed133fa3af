"""Clipping implementations and their registry."""

import math

import numpy as np
import pytest
import keras
import tensorflow as tf

from ewtune_tf.mechanism import clipping, per_example


def _setup(batch=8, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    rs = np.random.RandomState(seed)
    x = tf.constant(rs.randn(batch, 4) * 3, tf.float32)
    y = tf.constant(rs.randint(0, 2, batch))
    w = tf.constant([1.0] * (batch - 2) + [0.0, 0.0])  # two padding rows

    def loss_fn():
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return tf.where(w != 0, loss * w, 0.0)

    return model, loss_fn


@pytest.mark.parametrize("impl", ["vectorized", "microbatch"])
@pytest.mark.parametrize("nmb", [None, 4])
def test_every_clipped_contribution_at_most_c(impl, nmb):
    model, loss_fn = _setup()
    c = 0.05
    grads = per_example.per_example_gradients(loss_fn, model.trainable_variables, nmb)
    norms = clipping.global_norms(grads).numpy()
    factors = clipping.clip_factors(norms, c).numpy()
    assert np.all(norms * factors <= c * (1 + 1e-6))
    res = clipping.clipped_gradient_sum(impl, model, loss_fn, model.trainable_variables, c, nmb)
    n_rec = 8 if nmb is None else nmb
    assert int(res.num_records) == n_rec
    np.testing.assert_allclose(res.norms.numpy(), norms, rtol=1e-5)
    # The sum of n records each of norm <= C has norm <= n C.
    total = math.sqrt(sum(float(tf.reduce_sum(g ** 2)) for g in res.grad_sum))
    assert total <= n_rec * c * (1 + 1e-6)
    ref = [tf.tensordot(factors, g, axes=1) for g in grads]
    for a, b in zip(res.grad_sum, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_padding_rows_contribute_zero():
    model, loss_fn = _setup()
    grads = per_example.per_example_gradients(loss_fn, model.trainable_variables)
    for g in grads:
        np.testing.assert_array_equal(g[-2:].numpy(), np.zeros_like(g[-2:].numpy()))


def test_infinite_clip_is_plain_sum():
    model, loss_fn = _setup()
    res = clipping.clipped_gradient_sum("vectorized", model, loss_fn, model.trainable_variables, math.inf)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(loss_fn())
    ref = tape.gradient(total, model.trainable_variables)
    for a, b in zip(res.grad_sum, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_vectorized_and_microbatch_agree_in_graph_mode():
    model, loss_fn = _setup()
    c = 0.1

    @tf.function
    def run(name):
        return clipping.clipped_gradient_sum(name, model, loss_fn, model.trainable_variables, c).grad_sum

    for a, b in zip(run("vectorized"), run("microbatch")):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_unknown_impl_fails_loudly():
    with pytest.raises(ValueError, match="Unknown clipping implementation 'nope'"):
        clipping.get_clipping_impl("nope")


def test_registry_plugs_in_custom_impl():
    def fake(model, fn, variables, c, nmb):
        return clipping.ClippedGradients([tf.zeros(v.shape) for v in variables], tf.zeros([1]), tf.constant(1))

    clipping.register_clipping_impl("test_fake", fake)
    try:
        model, loss_fn = _setup()
        res = clipping.clipped_gradient_sum("test_fake", model, loss_fn, model.trainable_variables, 1.0)
        assert int(res.num_records) == 1
        assert "test_fake" in clipping.available_clipping_impls()
    finally:
        clipping._REGISTRY.pop("test_fake")


def test_ghost_is_resolved_lazily_by_name():
    assert "ghost" in clipping.available_clipping_impls()
    fn = clipping.get_clipping_impl("ghost")
    assert callable(fn)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "x", None])
def test_bad_clip_norm(bad):
    with pytest.raises(ValueError, match="l2_norm_clip"):
        clipping.check_l2_norm_clip(bad)
