"""The ghost-rule registry: user rules, declining rules, subclass semantics,
and the run-time choice of the norm method when the sequence length is dynamic.

References are brute-force per-example gradients (``tape.jacobian`` on the
unpatched model), as in ``test_ghost.py``.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import ghost, ghost_layers

RTOL = 1e-4
# Kept before any test replaces it (see ``no_jacobian``).
_JACOBIAN = tf.GradientTape.jacobian


def _reference(loss_fn, variables, clip):
    """(norms, clipped sums) from per-example jacobians."""
    with tf.GradientTape() as tape:
        losses = tf.cast(loss_fn(), tf.float32)
    jac = _JACOBIAN(tape, losses, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jac = [tf.convert_to_tensor(j).numpy().astype(np.float64) for j in jac]
    r = jac[0].shape[0]
    norms = np.sqrt(sum(np.sum(j.reshape(r, -1) ** 2, axis=1) for j in jac))
    factors = np.where(norms > 0, np.minimum(1.0, clip / np.maximum(norms, 1e-30)), 1.0)
    return norms, [np.tensordot(factors, j, axes=[[0], [0]]) for j in jac]


def _assert_matches(out, ref):
    norms, sums = ref
    np.testing.assert_allclose(out.norms.numpy(), norms, rtol=RTOL, atol=1e-7)
    for got, want in zip(out.grad_sum, sums):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(np.asarray(got) / scale, want / scale, rtol=RTOL, atol=RTOL)


def _seq_loss(model, x, y):
    return lambda: tf.reduce_sum(tf.square(tf.cast(model(x, training=True), tf.float32) - y), axis=[1, 2])


@pytest.fixture
def no_jacobian(monkeypatch):
    """Fails the test if ghost clipping takes the exact jacobian fallback."""

    def fail(*args, **kwargs):
        raise AssertionError("jacobian fallback used")

    monkeypatch.setattr(tf.GradientTape, "jacobian", fail)


@pytest.fixture
def clean_registry():
    saved = dict(ghost_layers._RULES)
    yield
    ghost_layers._RULES.clear()
    ghost_layers._RULES.update(saved)


class Scale(keras.layers.Layer):
    """y = x * w (w per feature): no built-in rule."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


class Shift(keras.layers.Layer):
    """y = x + b (b per feature): no built-in rule."""

    def build(self, shape):
        self.b = self.add_weight(shape=(shape[-1],), initializer="zeros")

    def call(self, x):
        return x + self.b


def _model(middle, seed=0):
    """Dense -> middle layers -> Dense, random weights, and its loss."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((3, 4))
    h = keras.layers.Dense(4, activation="tanh")(inp)
    for layer in middle:
        h = layer(h)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape, scale=0.5).astype("float32"))
    x = tf.constant(rng.normal(size=(5, 3, 4)), tf.float32)
    y = tf.constant(rng.normal(size=(5, 3, 2)), tf.float32)
    return model, _seq_loss(model, x, y)


def _scale_rule(layer, rec, x):
    if x.shape.rank != 3:
        return NotImplemented
    return rec.einsum("btd,d->btd", x, layer.w)


def _shift_rule(layer, rec, x):
    b = rec.read(layer.b, x.dtype)
    # A per-feature bias: its per-example gradient is g summed over positions.
    return rec.reduce(layer.b, b, x + b, lambda g: tf.reduce_sum(g, axis=1))


@pytest.mark.parametrize("mode", ["bookkeeping", "two_pass"])
def test_user_registered_rules_are_used_and_exact(mode, clean_registry, no_jacobian):
    ghost.register_ghost_rule(Scale)(_scale_rule)  # decorator form
    ghost.register_ghost_rule(f"{__name__}:Shift", _shift_rule)  # by name, as for optional packages
    assert "Scale" in ghost.supported_layers() and f"{__name__}:Shift" in ghost.supported_layers()
    model, loss_fn = _model([Scale(), Shift()])
    ref = _reference(loss_fn, model.trainable_variables, 0.5)
    out = ghost.ghost_clipped_gradients(model, loss_fn, model.trainable_variables, 0.5, mode=mode)
    _assert_matches(out, ref)
    np.testing.assert_allclose(ghost.ghost_norms(model, loss_fn, model.trainable_variables).numpy(), ref[0], rtol=RTOL)
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())


def test_unregistered_and_declined_layers_keep_the_exact_fallback(clean_registry, caplog):
    model, loss_fn = _model([Scale()])
    ref = _reference(loss_fn, model.trainable_variables, 0.5)
    with caplog.at_level("WARNING"):
        _assert_matches(ghost.bookkeeping_clipped_gradients(model, loss_fn, model.trainable_variables, 0.5), ref)
    assert "jacobian fallback" in caplog.text and "register_ghost_rule" in caplog.text
    # A rule that declines this configuration: the layer's own call runs.
    ghost.register_ghost_rule(Scale, lambda layer, rec, x: NotImplemented)
    _assert_matches(ghost.bookkeeping_clipped_gradients(model, loss_fn, model.trainable_variables, 0.5), ref)


def test_rule_declining_after_tapping_is_an_error(clean_registry):
    def bad(layer, rec, x):
        rec.einsum("btd,d->btd", x, layer.w)
        return NotImplemented

    ghost.register_ghost_rule(Scale, bad)
    model, loss_fn = _model([Scale()])
    with pytest.raises(RuntimeError, match="NotImplemented after recording taps"):
        ghost.bookkeeping_clipped_gradients(model, loss_fn, model.trainable_variables, 0.5)
    assert not ghost_layers._PATCHED


def test_subclass_overriding_call_gets_no_inherited_rule():
    class DoubledDense(keras.layers.Dense):
        def call(self, x):
            return 2.0 * super().call(x)

    class PlainSubclass(keras.layers.Dense):
        pass

    assert ghost_layers.ghost_rule_for(DoubledDense(3)) is None
    assert ghost_layers.ghost_rule_for(PlainSubclass(3)) is ghost_layers.ghost_rule_for(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="layer_class"):
        ghost.register_ghost_rule("no_colon", _scale_rule)


@pytest.mark.parametrize("mode", ["bookkeeping", "two_pass"])
def test_dynamic_sequence_length_chooses_the_norm_method_at_run_time(mode):
    """One trace with an unknown length serves lengths where ghost norms are
    cheaper (T=1) and where materialized ones are (T=6): both are exact."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 4))
    h = keras.layers.LayerNormalization()(keras.layers.Dense(4, activation="tanh")(inp))
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    variables = model.trainable_variables
    spec = tf.TensorSpec([5, None, 4], tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec([5, None, 3], tf.float32)])
    def clipped(x, y):
        return ghost.ghost_clipped_gradients(model, _seq_loss(model, x, y), variables, 0.3, mode=mode)

    graph = clipped.get_concrete_function().graph
    assert any(op.type in ("If", "StatelessIf") for op in graph.get_operations())
    rng = np.random.default_rng(1)
    for t in (1, 6):  # Dense 4x4: ghost iff t * (4 + 4) < 4 * 4
        x = tf.constant(rng.normal(size=(5, t, 4)), tf.float32)
        y = tf.constant(rng.normal(size=(5, t, 3)), tf.float32)
        _assert_matches(clipped(x, y), _reference(_seq_loss(model, x, y), variables, 0.3))


def test_readme_rule_example_runs(clean_registry, no_jacobian):
    """The README's register_ghost_rule example, with MyScale = Scale."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "register_ghost_rule" in b]
    exec(compile(example, "README.md", "exec"), {"MyScale": Scale})
    model, loss_fn = _model([Scale()])
    ref = _reference(loss_fn, model.trainable_variables, 0.5)
    _assert_matches(ghost.bookkeeping_clipped_gradients(model, loss_fn, model.trainable_variables, 0.5), ref)
