"""Clipping implementations and their registry."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import clipping, per_example
from ewtune_tf.mechanism import records as records_lib

# Keyed records of the 8 rows of _setup: keys mod 4 give groups 1, 2, 3, 0, 1, 2, 3, 0.
KEYED = records_lib.microbatch_records(tf.constant([5, 6, 7, 8, 9, 10, 11, 12]), 4, expected_batch_size=8.0)


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
@pytest.mark.parametrize("records", [None, KEYED])
def test_every_clipped_contribution_at_most_c(impl, records):
    model, loss_fn = _setup()
    c = 0.05
    grads = per_example.per_example_gradients(loss_fn, model.trainable_variables, records)
    norms = clipping.global_norms(grads).numpy()
    factors = clipping.clip_factors(norms, c).numpy()
    assert np.all(norms * factors <= c * (1 + 1e-6))
    res = clipping.clipped_gradient_sum(impl, model, loss_fn, model.trainable_variables, c, records)
    n_rec = 8 if records is None else 4
    assert int(res.num_records) == n_rec
    np.testing.assert_allclose(res.norms.numpy(), norms, rtol=1e-5)
    # The sum of n records each of norm <= C has norm <= n C.
    total = math.sqrt(sum(float(tf.reduce_sum(g**2)) for g in res.grad_sum))
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
    def fake(model, fn, variables, c):
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


# --------------------------------------------------------------------------
# Group-wise clipping
# --------------------------------------------------------------------------


def _group_reference(grads, assignment, shares, c):
    """numpy reference: each record's group-g slice clipped to c*sqrt(share_g)."""
    g_np = [g.numpy().reshape(g.shape[0], -1) for g in grads]
    out = [np.zeros(g.shape[1:], np.float64) for g in grads]
    for r in range(g_np[0].shape[0]):
        for grp, share in enumerate(shares):
            idx = [i for i, a in enumerate(assignment) if a == grp]
            norm = math.sqrt(sum(float(np.sum(g_np[i][r] ** 2)) for i in idx))
            f = min(1.0, c * math.sqrt(share) / norm) if norm > 0 else 1.0
            for i in idx:
                out[i] += f * grads[i][r].numpy()
    return out


@pytest.mark.parametrize(
    "impl, records",
    [(i, None) for i in ("vectorized", "microbatch", "ghost", "ghost_two_pass")]
    + [(i, KEYED) for i in ("vectorized", "microbatch")],
)
def test_group_clipping_matches_reference_and_bounds_each_record(impl, records):
    model, loss_fn = _setup()
    variables = model.trainable_variables  # [k0, b0, k1, b1]
    groups = clipping.ClipGroups(assignment=(0, 0, 1, 1), shares=(0.2, 0.8))
    c = 0.05
    grads = per_example.per_example_gradients(loss_fn, variables, records)
    res = clipping.clipped_gradient_sum(impl, model, loss_fn, variables, c, records, groups=groups)
    ref = _group_reference(grads, groups.assignment, groups.shares, c)
    for a, b in zip(res.grad_sum, ref):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-6, rtol=1e-4)
    # norms stay the global pre-clip norms.
    np.testing.assert_allclose(res.norms.numpy(), clipping.global_norms(grads).numpy(), rtol=1e-5)
    # Every record's clipped contribution has global norm <= C.
    n_rec = grads[0].shape[0]
    for r in range(n_rec):
        one = [tf.expand_dims(g[r], 0) for g in grads]
        single = clipping.clip_and_sum(one, c, groups).grad_sum
        norm = math.sqrt(sum(float(tf.reduce_sum(g**2)) for g in single))
        assert norm <= c * (1 + 1e-6)


def test_group_clipping_differs_from_global_when_one_group_dominates():
    model, loss_fn = _setup()
    variables = model.trainable_variables
    groups = clipping.ClipGroups(assignment=(0, 0, 1, 1), shares=(0.5, 0.5))
    glob = clipping.clipped_gradient_sum("vectorized", model, loss_fn, variables, 0.05)
    grp = clipping.clipped_gradient_sum("vectorized", model, loss_fn, variables, 0.05, groups=groups)
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in zip(glob.grad_sum, grp.grad_sum))


def test_single_group_equals_global_clipping():
    model, loss_fn = _setup()
    variables = model.trainable_variables
    groups = clipping.ClipGroups(assignment=(0, 0, 0, 0), shares=(1.0,))
    glob = clipping.clipped_gradient_sum("ghost", model, loss_fn, variables, 0.05)
    grp = clipping.clipped_gradient_sum("ghost", model, loss_fn, variables, 0.05, groups=groups)
    for a, b in zip(glob.grad_sum, grp.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "groups, match",
    [
        (clipping.ClipGroups((0, 0, 1, 1), (0.5, 0.4)), "sum to 1"),
        (clipping.ClipGroups((0, 0, 1, 1), (0.0, 1.0)), r"each in \(0, 1\]"),
        (clipping.ClipGroups((0, 0, 1), (0.5, 0.5)), "3 entries for 4 variables"),
        (clipping.ClipGroups((0, 0, 1, 2), (0.5, 0.5)), r"in \[0, 1\]"),
        ((0, 0, 1, 1), "ClipGroups"),
    ],
)
def test_bad_groups_rejected(groups, match):
    model, loss_fn = _setup()
    with pytest.raises(ValueError, match=match):
        clipping.clipped_gradient_sum("vectorized", model, loss_fn, model.trainable_variables, 1.0, groups=groups)


def test_impl_without_groups_support_is_refused_not_run_globally():
    model, loss_fn = _setup()
    calls = []

    def legacy(model, per_example_loss_fn, variables, l2_norm_clip):
        calls.append(1)
        return clipping.get_clipping_impl("vectorized")(model, per_example_loss_fn, variables, l2_norm_clip)

    clipping.register_clipping_impl("test_legacy", legacy)
    try:
        groups = clipping.ClipGroups((0, 0, 1, 1), (0.5, 0.5))
        with pytest.raises(ValueError, match="does not support group-wise clipping"):
            clipping.clipped_gradient_sum("test_legacy", model, loss_fn, model.trainable_variables, 1.0, groups=groups)
        assert not calls
    finally:
        clipping._REGISTRY.pop("test_legacy", None)


# --------------------------------------------------------------------------
# Keyed records and non-finite records
# --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["ghost", "ghost_two_pass", "test_unknown"])
def test_keyed_records_only_from_materializing_impls(impl):
    model, loss_fn = _setup()
    with pytest.raises(ValueError, match="cannot form keyed microbatch records"):
        clipping.keyed_record_gradients(impl, model, loss_fn, model.trainable_variables, KEYED)
    assert clipping.keyed_record_impls() == ("microbatch", "vectorized")


def _poisoned(row=3):
    """_setup's model and loss with one example whose input is NaN."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    x = np.random.RandomState(0).randn(6, 4).astype("float32")
    x[row, 1] = np.nan
    y = tf.constant([0, 1, 0, 1, 1, 0])

    def loss_fn(keep=None):
        xs = x if keep is None else x[keep]
        ys = y if keep is None else tf.gather(y, keep)
        return keras.losses.sparse_categorical_crossentropy(ys, model(xs, training=True), from_logits=True)

    return model, loss_fn


@pytest.mark.parametrize("impl", ["vectorized", "microbatch", "ghost", "ghost_two_pass"])
def test_non_finite_record_is_dropped_not_propagated(impl):
    """The poisoned record contributes exactly 0 and is counted; the sum stays
    finite. Where rows are isolated (ghost book-keeping) every other record is
    untouched; elsewhere the implementation says so, and the private step
    re-runs the chunk row by row (tests/training/test_private_step.py)."""
    model, loss_fn = _poisoned(row=3)
    res = clipping.clipped_gradient_sum(impl, model, loss_fn, model.trainable_variables, 0.5)
    assert int(res.num_nonfinite) >= 1 and np.isinf(res.norms.numpy()[3])
    assert res.rows_isolated == (impl == "ghost")
    if impl != "ghost_two_pass":  # its re-weighted backward pass mixes rows
        assert all(np.isfinite(g.numpy()).all() for g in res.grad_sum)
    if res.rows_isolated:
        clean = clipping.clipped_gradient_sum(
            "vectorized", model, lambda: loss_fn([0, 1, 2, 4, 5]), model.trainable_variables, 0.5
        )
        assert int(res.num_nonfinite) == 1
        for a, b in zip(res.grad_sum, clean.grad_sum):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_clip_and_sum_masks_nan_rows_with_where():
    grads = [tf.constant([[1.0, 0.0], [np.nan, 1.0], [0.0, 3.0]])]
    res = clipping.clip_and_sum(grads, 1.0)
    np.testing.assert_allclose(res.grad_sum[0].numpy(), [1.0, 1.0])
    assert int(res.num_nonfinite) == 1
    np.testing.assert_array_equal(res.norms.numpy(), [1.0, np.inf, 3.0])
