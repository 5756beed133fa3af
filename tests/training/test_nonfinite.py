"""A record whose gradient is not finite contributes exactly 0; training goes
on and the model stays finite (issue 13, item 6)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.data import KeyedSampleWeight
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import make_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:noise_seed is set"),
]

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
POISONED = 3


def _data(n=8):
    rs = np.random.RandomState(0)
    x, y = rs.randn(n, 4).astype("float32"), rs.randint(0, 3, n)
    x[POISONED, 0] = np.nan
    return x, y


def _model(clipping="vectorized", jit=False, physical=None, **privacy):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    args = dict(l2_norm_clip=0.3, noise_multiplier=0.0, batch_size=8.0, clipping=clipping)
    m.compile(EWTuneSGD(1.0, **{**args, **privacy}), LOSS, jit_compile=jit)
    return make_private(m, physical_batch_size=physical)


def _step(m, x, y, w=None):
    m.train_on_batch(x, y, sample_weight=w)
    return [v.numpy() for v in m.trainable_weights]


@pytest.mark.parametrize(
    "clipping, physical, jit",
    [
        ("vectorized", None, False),
        ("vectorized", 3, False),
        ("vectorized", 3, True),
        ("microbatch", None, False),
        ("ghost", None, False),
        ("ghost", 3, True),
        ("ghost_two_pass", 3, False),
    ],
)
def test_poisoned_example_contributes_exactly_zero(clipping, physical, jit):
    """The update equals the update without the poisoned example: the other
    records are untouched even where a batched backward pass spreads the NaN
    (the chunk is re-run row by row), so the sensitivity stays C."""
    x, y = _data()
    keep = [i for i in range(8) if i != POISONED]
    m = _model(clipping, jit, physical)
    got = _step(m, x, y)
    want = _step(_model(clipping, jit, physical), x[keep], y[keep])
    for a, b in zip(got, want):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(m.optimizer.dp_steps.numpy()) == 1
    assert int(m.optimizer.dp_nonfinite_records.numpy()) == 1


@pytest.mark.parametrize("physical", [None, 3])
def test_poisoned_example_drops_only_its_keyed_record(physical):
    x, y = _data()
    keys = np.array([0, 1, 2, 3, 4, 5, 6, 7])  # mod 4: the poisoned row (key 3) is in record 3 with row 7
    kw = dict(num_microbatches=4, physical=physical)
    m = _model(**kw)
    got = _step(m, x, y, KeyedSampleWeight(np.ones(8, np.float32), keys))
    keep = [0, 1, 2, 4, 5, 6]
    want = _step(_model(**kw), x[keep], y[keep], KeyedSampleWeight(np.ones(6, np.float32), keys[keep]))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(m.optimizer.dp_nonfinite_records.numpy()) == 1


@pytest.mark.parametrize("jit", [False, True])
def test_training_goes_on_with_a_poisoned_example(jit):
    rs = np.random.RandomState(1)
    x, y = rs.randn(32, 4).astype("float32"), rs.randint(0, 3, 32)
    x[5] = np.inf
    m = _model("vectorized", jit, physical=4, noise_multiplier=1.0)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert int(m.optimizer.dp_steps.numpy()) == 8
    assert all(np.isfinite(v.numpy()).all() for v in m.trainable_weights)
    assert int(m.optimizer.dp_nonfinite_records.numpy()) == 2  # sampled once per epoch
    logs = m.get_metrics_result()
    assert "dp_nonfinite_records" not in logs  # never logged


def test_counter_is_checkpointed(tmp_path):
    x, y = _data()
    m = _model()
    _step(m, x, y)
    path = tf.train.Checkpoint(optimizer=m.optimizer).write(str(tmp_path / "c"))
    m2 = _model()
    m2.optimizer.build(m2.trainable_variables)
    tf.train.Checkpoint(optimizer=m2.optimizer).read(path)
    assert int(m2.optimizer.dp_nonfinite_records.numpy()) == 1
