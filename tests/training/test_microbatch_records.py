"""Keyed microbatch records: sensitivity 2C through the private step, and
accounting at sigma / 2 (issue 13, item 1)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.data import KeyedSampleWeight, poisson_batches
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import PrivacyBudget, make_private, privacy_report

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:poisson_batches\\(seed"),
]

D = np.array([2.0, 0.0], np.float32)  # |D| = 2 C
PATTERN = [0 * D, 0 * D, D, -D, 2 * D, -2 * D]


def output_loss(y_true, y_pred):
    """Per-example loss f(x) (y_true unused)."""
    del y_true
    return y_pred[:, 0]


def _linear(num_microbatches, batch_size, clipping="vectorized"):
    """f(x) = w . x with loss f(x): an example's gradient is x itself."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    opt = EWTuneSGD(
        1.0,
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        batch_size=batch_size,
        num_microbatches=num_microbatches,
        clipping=clipping,
    )
    model.compile(opt, loss=output_loss)
    return model


def _clipped_sum(rows, keys, weights, *, num_microbatches=31, clipping="vectorized", physical=None):
    """The private step's clipped sum: with sigma 0 and SGD(lr=1), the update
    is minus the clipped sum over num_microbatches (the expected records)."""
    model = _linear(num_microbatches, 60.0, clipping)
    make_private(model, physical_batch_size=physical)
    sw = KeyedSampleWeight(np.asarray(weights, np.float32), np.asarray(keys, np.int64))
    model.train_on_batch(np.asarray(rows, np.float32), np.zeros((len(rows), 1), np.float32), sample_weight=sw)
    return -num_microbatches * model.layers[0].kernel.numpy()[:, 0]


def _neighbours(inserted):
    """D: 60 examples (keys 0..59) padded to 62 rows; D': ``inserted`` (key 60)
    added at the front, which shifts every later row by one position."""
    rows = [PATTERN[i % 6] for i in range(60)]
    d = (rows + [0 * D] * 2, list(range(60)) + [0, 0], [1.0] * 60 + [0.0] * 2)
    d1 = ([inserted] + rows + [0 * D], [60] + list(range(60)) + [0], [1.0] * 61 + [0.0])
    return d, d1


def test_consecutive_groups_would_move_by_10c():
    """The issue's measurement: records of 2 consecutive rows, mean loss, C = 1."""

    def clip(v):
        n = np.linalg.norm(v)
        return v if n <= 1.0 else v / n

    (a, _, _), (b, _, _) = _neighbours(0 * D)
    consecutive = [sum(clip(np.mean(x[2 * g : 2 * g + 2], axis=0)) for g in range(31)) for x in (a, b)]
    assert np.linalg.norm(consecutive[1] - consecutive[0]) == pytest.approx(10.0)


@pytest.mark.parametrize("clipping", ["vectorized", "microbatch"])
@pytest.mark.parametrize("physical", [None, 7])
@pytest.mark.parametrize("inserted", [0 * D, 100 * D, np.array([0.0, -3.0], np.float32)])
def test_inserting_one_example_changes_the_clipped_sum_by_at_most_2c(clipping, physical, inserted):
    d, d1 = _neighbours(inserted)
    s0 = _clipped_sum(*d, clipping=clipping, physical=physical)
    s1 = _clipped_sum(*d1, clipping=clipping, physical=physical)
    assert np.linalg.norm(s1 - s0) <= 2.0 + 1e-5


def test_records_span_chunks_and_ignore_row_order():
    """A record is a keyed group of the whole logical batch: permuting the rows
    (the trainer sorts by length) and chunking leave the clipped sum unchanged."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20, 2)).astype(np.float32) * 2
    keys = rng.integers(0, 1000, size=20)
    ref = _clipped_sum(rows, keys, np.ones(20), num_microbatches=4)
    perm = rng.permutation(20)
    for physical in (None, 3, 8):
        got = _clipped_sum(rows[perm], keys[perm], np.ones(20), num_microbatches=4, physical=physical)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # Each record's clipped value has norm <= C: at most 4 C in all.
    assert np.linalg.norm(ref) <= 4.0 + 1e-5


def test_one_microbatch_needs_no_key():
    model = _linear(1, 4.0)
    make_private(model)
    x = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    model.train_on_batch(x, np.zeros((4, 1)))
    # One record: the sum of all rows over the expected size 4, clipped to C.
    np.testing.assert_allclose(model.layers[0].kernel.numpy()[:, 0], [-1.0, 0.0], atol=1e-6)


def test_ghost_and_keyed_records_refused_at_construction():
    with pytest.raises(ValueError, match="num_microbatches=4 with clipping='ghost'.*vectorized"):
        EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, num_microbatches=4)
    with pytest.raises(ValueError, match="num_microbatches=4 needs batch_size"):
        EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=4, clipping="vectorized")


def test_make_private_clipping_override_to_ghost_refused_before_update():
    model = _linear(4, 8.0)
    make_private(model, clipping="ghost")
    sw = KeyedSampleWeight(np.ones(8, np.float32), np.arange(8))
    with pytest.raises(ValueError, match="cannot form keyed microbatch records"):
        model.train_on_batch(np.ones((8, 2), np.float32), np.zeros((8, 1)), sample_weight=sw)
    assert int(model.optimizer.dp_steps.numpy()) == 0


# --------------------------------------------------------------------------
# Accounting: sensitivity 2C is sigma / 2 for the accountant
# --------------------------------------------------------------------------

_ACCOUNTING = dict(l2_norm_clip=1.0, num_examples=1000, batch_size=50.0, target_delta=1e-5, clipping="vectorized")


def test_calibration_with_microbatches_doubles_the_noise():
    per_example = EWTuneSGD(0.1, target_epsilon=3.0, epochs=2, **_ACCOUNTING).privacy_plan
    keyed = EWTuneSGD(0.1, target_epsilon=3.0, epochs=2, num_microbatches=10, **_ACCOUNTING).privacy_plan
    assert keyed.noise_multiplier == pytest.approx(2 * per_example.noise_multiplier, rel=1e-12)
    assert keyed.accounted_noise_multiplier == pytest.approx(per_example.noise_multiplier, rel=1e-12)
    assert (keyed.record, keyed.sensitivity) == ("keyed_microbatch", 2.0)
    assert (per_example.record, per_example.sensitivity) == ("example", 1.0)


def _after_steps(opt, steps):
    opt.build([keras.Variable(np.zeros(2, np.float32))])
    opt.dp_steps.assign(steps)
    return opt


def test_reported_epsilon_is_per_example_epsilon_at_half_sigma():
    keyed = _after_steps(EWTuneSGD(0.1, noise_multiplier=2.0, num_microbatches=10, **_ACCOUNTING), 40)
    half = _after_steps(EWTuneSGD(0.1, noise_multiplier=1.0, **_ACCOUNTING), 40)
    full = _after_steps(EWTuneSGD(0.1, noise_multiplier=2.0, **_ACCOUNTING), 40)
    r_keyed, r_half, r_full = (privacy_report(o) for o in (keyed, half, full))
    assert r_keyed["epsilon"] == r_half["epsilon"] and r_keyed["certified"]
    assert r_keyed["epsilon"] > r_full["epsilon"]
    record = tuple(r_keyed[k] for k in ("record", "sensitivity", "accounted_noise_multiplier"))
    assert record == ("keyed_microbatch", 2.0, 1.0) and r_keyed["mechanism"]["num_microbatches"] == 10
    budget, budget_half = PrivacyBudget(), PrivacyBudget()
    budget.set_model(keras.Sequential([keras.Input((2,))]))
    budget.model.optimizer = keyed
    budget_half.set_model(keras.Sequential([keras.Input((2,))]))
    budget_half.model.optimizer = half
    assert budget.epsilon(40).epsilon == budget_half.epsilon(40).epsilon


def test_checkpoint_of_other_record_definition_refused(tmp_path):
    keyed = _after_steps(EWTuneSGD(0.1, noise_multiplier=2.0, num_microbatches=10, **_ACCOUNTING), 5)
    plain = _after_steps(EWTuneSGD(0.1, noise_multiplier=2.0, **_ACCOUNTING), 0)
    path = tf.train.Checkpoint(optimizer=keyed).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(optimizer=plain).read(path)
    with pytest.raises(ValueError, match="dp_record_sensitivity"):
        plain.check_privacy_state()


def test_fit_on_keyed_poisson_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros((64, 1), np.float32)))
    data = poisson_batches(ds, expected_batch_size=16, max_batch_size="auto", seed=1, example_keys=True)
    model = _linear(4, 16.0)
    opt = EWTuneSGD(
        0.1,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        num_examples=64,
        batch_size=16.0,
        target_delta=1e-5,
        num_microbatches=4,
        clipping="microbatch",
    )
    model.compile(opt, loss=output_loss)
    make_private(model, physical_batch_size=8)
    model.fit(data.dataset, epochs=1, verbose=0)
    assert int(model.optimizer.dp_steps.numpy()) == data.steps_per_epoch == 4
    assert np.isfinite(model.layers[0].kernel.numpy()).all()
    assert math.isfinite(privacy_report(model, data)["epsilon"])
