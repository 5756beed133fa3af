"""Poisson-sampled logical batches."""

import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.data import (
    auto_max_batch_size,
    overflow_probability_bound,
    poisson_batches,
    shuffled_batches,
)

pytestmark = pytest.mark.filterwarnings("ignore:poisson_batches\\(seed")


def _ds(n=50):
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(n)
    return tf.data.Dataset.from_tensor_slices((x, y))


def test_inclusion_frequencies_match_q():
    n, q = 50, 0.2
    pb = poisson_batches(_ds(n), q, steps=25, seed=1)
    counts = np.zeros(n)
    sizes = []
    total_steps = 0
    for _ in range(8):  # 8 passes x 25 steps = 200 draws per example
        for _, y, w in pb.dataset:
            ids = y.numpy()[w.numpy() > 0]
            assert len(set(ids)) == len(ids)  # no duplicates within a step
            counts[ids] += 1
            sizes.append(len(ids))
            total_steps += 1
    freq = counts / total_steps
    # Binomial(200, 0.2): sd = 0.028 per example; mean over 50 is tight.
    assert abs(freq.mean() - q) < 0.01
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / total_steps))
    # Batch sizes vary (Binomial(50, 0.2), sd ~ 2.8).
    assert np.std(sizes) > 1.5
    assert abs(np.mean(sizes) - q * n) < 1.0


def test_each_pass_draws_fresh_batches():
    pb = poisson_batches(_ds(), 0.3, steps=5, seed=3)
    a = [tuple(y.numpy()) for _, y, _ in pb.dataset]
    b = [tuple(y.numpy()) for _, y, _ in pb.dataset]
    assert a != b


def test_padding_static_shape_and_mask():
    pb = poisson_batches(_ds(), expected_batch_size=5, max_batch_size="auto", seed=0)
    m = pb.max_batch_size
    assert 5 < m < 50
    assert pb.overflow_probability_bound <= 1e-9
    assert pb.dataset.element_spec[0].shape.as_list() == [m, 3]
    for x, _, w in pb.dataset:
        k = int(w.numpy().sum())
        np.testing.assert_array_equal(w.numpy()[:k], 1.0)
        np.testing.assert_array_equal(w.numpy()[k:], 0.0)
        np.testing.assert_array_equal(x.numpy()[k:], 0.0)
    assert pb.report()["sampling"] == "poisson"


def test_overflow_error_and_truncate_reported():
    pb = poisson_batches(_ds(), 0.5, steps=10, max_batch_size=5, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflow"):
        for _ in pb.dataset:
            pass
    pt = poisson_batches(_ds(), 0.5, steps=10, max_batch_size=5, overflow="truncate", seed=0)
    sizes = [int(w.numpy().sum()) for _, _, w in pt.dataset]
    assert max(sizes) == 5
    assert pt.report()["overflow_count"] >= 1
    assert pt.overflow_probability_bound > 0.5


def test_auto_size_bound():
    m = auto_max_batch_size(10000, 0.01, 1000)
    assert overflow_probability_bound(10000, 0.01, 1000, m) <= 1e-9
    assert overflow_probability_bound(10000, 0.01, 1000, m - 1) > 1e-9


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(sampling_probability=0.0), "sampling_probability"),
        (dict(sampling_probability=1.5), "sampling_probability"),
        (dict(expected_batch_size=100), "expected_batch_size"),
        (dict(sampling_probability=0.1, max_batch_size=0), "max_batch_size"),
        (dict(sampling_probability=0.1, overflow="drop"), "overflow"),
        (dict(sampling_probability=0.1, steps=0), "steps"),
        (dict(), "exactly one"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        poisson_batches(_ds(), **kwargs)


def test_infinite_dataset_rejected():
    with pytest.raises(ValueError, match="finite"):
        poisson_batches(_ds().repeat(), 0.1)


def test_shuffled_batches_warn_and_keep_fixed_size():
    with pytest.warns(UserWarning, match="assumes Poisson"):
        ds = shuffled_batches(_ds(), 8)
    sizes = [int(x.shape[0]) for x, _, _ in ds]
    assert sizes == [8] * 6


def test_sampler_runs_the_accounted_steps():
    """The sampler's pass and the accountant's epochs -> steps rule are one rule."""
    import math

    from ewtune_tf.accounting import steps_and_sampling_probability
    from ewtune_tf.data import steps_per_epoch

    for n, b in [(67349, 256), (100, 30), (50, 50), (1000, 7)]:
        for epochs in (1, 2, 3):
            q, steps = steps_and_sampling_probability(n, b, epochs)
            assert epochs * steps_per_epoch(q) == steps == epochs * math.floor(n / b)
    assert poisson_batches(_ds(), 0.25).steps_per_epoch == 4
