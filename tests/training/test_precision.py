"""Mixed precision and jit_compile: private steps work, clip/noise in float32."""

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


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        m, opt, h = _fit(physical=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(opt.dp_steps.numpy()) == 2
    assert np.isfinite(h.history["loss"][0])
    assert all(w.dtype == "float32" for w in m.trainable_weights)


def test_jit_compile():
    m, opt, h = _fit(jit=True, physical=4)
    assert int(opt.dp_steps.numpy()) == 2 and np.isfinite(h.history["loss"][0])


def test_jit_compile_budget_guard_on_host():
    with pytest.raises(PrivacyBudgetExhausted):
        _fit(jit=True, steps_cap=1)
