"""Poisson-sampled logical batches."""

import fractions

import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.data import (
    KeyedSampleWeight,
    auto_max_batch_size,
    inclusion_mask,
    overflow_probability_bound,
    poisson_batches,
    shuffled_batches,
)
from ewtune_tf.data.poisson import below_thresholds, inclusion_thresholds

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


# --------------------------------------------------------------------------
# Exactly q (issue 13, item 4)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("q", [3e-7, 1e-6, 2048 / 67349, 1 / 3, 0.5, 1 - 2**-53, 2**-1000])
def test_thresholds_are_the_exact_binary_expansion_of_q(q):
    t = inclusion_thresholds(q)
    assert all(0 <= w < 2**32 for w in t)
    assert sum(fractions.Fraction(w, 2 ** (32 * (j + 1))) for j, w in enumerate(t)) == fractions.Fraction(q)


def _words(value: int, n_words: int):
    """The n_words 32-bit words of the binary fraction value / 2**(32 n_words)."""
    return np.array([[(value >> (32 * (n_words - 1 - j))) & 0xFFFFFFFF] for j in range(n_words)], np.int64)


def test_inclusion_at_q_3e7_is_exact_at_the_boundary():
    """U < q exactly: U = q's expansion is out, one unit below is in. A float32
    uniform compared with q (the old sampler) includes every U < 3 * 2**-23,
    i.e. with probability 3.58e-7, 19 % above q."""
    q = 3e-7
    t = inclusion_thresholds(q)
    assert len(t) == 3  # q's 53 significant bits end at 2**-74
    exact = int(fractions.Fraction(q) * 2**96)
    assert exact == (t[0] << 64) | (t[1] << 32) | t[2]
    assert not below_thresholds(_words(exact, 3), t).numpy()[0]
    assert below_thresholds(_words(exact - 1, 3), t).numpy()[0]
    assert not below_thresholds(_words(exact + 1, 3), t).numpy()[0]
    # Where the old sampler said "in" (U in [q, 3 * 2**-23)), the exact one says "out".
    assert not below_thresholds(_words(3 * 2**73 - 1, 3), t).numpy()[0]
    assert fractions.Fraction(int(np.ceil(np.float32(q) * 2**23)), 2**23) > fractions.Fraction(q) * fractions.Fraction(
        119, 100
    )


@pytest.mark.parametrize("q", [0.3, 1e-3])
def test_inclusion_mask_frequency(q):
    n = 1_000_000
    k = int(tf.reduce_sum(tf.cast(inclusion_mask(q, n, tf.constant([5, 6], tf.int64)), tf.int32)))
    assert abs(k - q * n) < 5 * np.sqrt(n * q * (1 - q))


def test_q_one_includes_everyone_and_tiny_q_runs():
    assert bool(tf.reduce_all(inclusion_mask(1.0, 10, tf.constant([1, 2], tf.int64))))
    pb = poisson_batches(_ds(), 3e-7, steps=3, seed=0)
    assert [int(tf.size(y)) for _, y, _ in pb.dataset] == [0, 0, 0]


# --------------------------------------------------------------------------
# Example keys (issue 13, item 1)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [None, "auto"])
def test_example_keys_are_fixed_per_example(max_batch_size):
    pb = poisson_batches(_ds(), 0.3, steps=6, seed=2, example_keys=True, max_batch_size=max_batch_size)
    assert pb.report()["example_keys"] is True
    key_of = {}
    for _ in range(2):
        for _, y, sw in pb.dataset:
            assert isinstance(sw, KeyedSampleWeight)
            real = sw.sample_weight.numpy() > 0
            for label, key in zip(y.numpy()[real], sw.example_key.numpy()[real]):
                assert key_of.setdefault(int(label), int(key)) == int(key)
    assert len(set(key_of.values())) == len(key_of)  # 62-bit random keys: no collision here
    assert all(0 <= k < 2**62 for k in key_of.values())


def test_example_keys_need_labels():
    x = tf.data.Dataset.from_tensor_slices(np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match="example_keys=True needs"):
        poisson_batches(x, 0.5, example_keys=True)
    with pytest.raises(ValueError, match="example_keys must be True or False"):
        poisson_batches(_ds(), 0.5, example_keys=1)
