"""Mixed precision and jit_compile: private steps work, clip/noise in float32."""

import contextlib

import keras
import numpy as np
import pytest

from ewtune_tf.optimizers import EWTuneSGD, PrivacyBudgetExhausted
from ewtune_tf.training import make_private


def _fit(jit=False, physical=None, steps_cap=None):
    rs = np.random.RandomState(0)
    x, y = rs.randn(16, 4).astype("float32"), rs.randint(0, 3, 16)
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    m.compile(
        EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    make_private(m, physical_batch_size=physical, report_train_metrics=True)
    opt = getattr(m.optimizer, "inner_optimizer", m.optimizer)
    if steps_cap is not None:
        opt.dp_max_steps.assign(steps_cap)
    h = m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return m, opt, h


@contextlib.contextmanager
def _policy(name):
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_bfloat16():
    with _policy("mixed_bfloat16"):
        m, opt, h = _fit(physical=4)
    assert int(opt.dp_steps.numpy()) == 2
    assert np.isfinite(h.history["loss"][0])
    assert all(w.dtype == "float32" for w in m.trainable_weights)


def test_mixed_float16_refused_before_any_update():
    """float16 needs loss scaling; Keras's dynamic scaling reacts to un-noised
    private gradients, so the private step refuses it and names bfloat16."""
    with _policy("mixed_float16"):
        with pytest.raises(ValueError, match="mixed_float16.*mixed_bfloat16"):
            _fit(physical=4)


def _one_update(policy, noise_multiplier, x, y, clipping):
    with _policy(policy):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
        opt = EWTuneSGD(
            1.0, l2_norm_clip=0.5, noise_multiplier=noise_multiplier, batch_size=8, noise_seed=7, clipping=clipping
        )
        m.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        make_private(m, physical_batch_size=4)
        before = [w.numpy().copy() for w in m.trainable_weights]
        m.train_on_batch(x, y)
    return [w.numpy() - b for w, b in zip(m.trainable_weights, before)]


@pytest.mark.parametrize("clipping", ["ghost", "vectorized"])
def test_bfloat16_update_equals_float32_update_for_a_fixed_seed(clipping):
    """Clipped sum, noise and update are float32: only the forward/backward
    passes run in bfloat16 (8-bit mantissa), so the updates agree to ~1e-2 of
    the clipped signal and exactly in the noise."""
    rs = np.random.RandomState(0)
    x, y = rs.randn(8, 4).astype("float32"), rs.randint(0, 3, 8)
    for sigma in (0.0, 1.0):
        f32 = _one_update("float32", sigma, x, y, clipping)
        bf16 = _one_update("mixed_bfloat16", sigma, x, y, clipping)
        signal = np.sqrt(sum(np.sum(u**2) for u in _one_update("float32", 0.0, x, y, clipping)))
        diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(f32, bf16)))
        assert all(u.dtype == np.float32 for u in bf16)
        assert diff <= 2e-2 * signal, (sigma, diff, signal)


def test_noise_std_unchanged_under_bfloat16():
    with _policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2000)])
        m.compile(EWTuneSGD(1.0, l2_norm_clip=0.5, noise_multiplier=1.5, batch_size=16.0), "mse")
        make_private(m)
        k0 = m.layers[0].kernel.numpy().copy()
        # Zero inputs: the kernel's clipped sum is 0, its update is the noise.
        m.train_on_batch(np.zeros((16, 10), np.float32), np.ones((16, 2000), np.float32))
    d = m.layers[0].kernel.numpy() - k0
    assert abs(d.std() / (1.5 * 0.5 / 16.0) - 1.0) < 0.03  # 20000 draws: std error ~0.5 %


def test_jit_compile():
    m, opt, h = _fit(jit=True, physical=4)
    assert int(opt.dp_steps.numpy()) == 2 and np.isfinite(h.history["loss"][0])


def test_jit_compile_budget_guard_on_host():
    with pytest.raises(PrivacyBudgetExhausted):
        _fit(jit=True, steps_cap=1)
