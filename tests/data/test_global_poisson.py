"""Global Poisson sampling: one draw per step, every replica its own shard."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from ewtune_tf.data.global_poisson import GlobalPoissonSampler, draw_seed, fixed_seed, shared_seed, step_seed
from ewtune_tf.data.poisson import inclusion_mask

pytestmark = pytest.mark.filterwarnings("ignore:global Poisson sampling with a fixed seed")
N, Q = 64, 0.25


def _ds(n=N):
    x = {"token_ids": np.arange(1, n + 1, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32)}
    return tf.data.Dataset.from_tensor_slices((x, np.arange(n, dtype=np.int64)))


def _samplers(num_replicas, seed=None, **kwargs):
    """One sampler per replica, as R single-replica workers would build them."""
    seed = fixed_seed(7) if seed is None else seed
    return [
        GlobalPoissonSampler(_ds(), Q, seed=seed, num_replicas=num_replicas, replica_ids=(r,), **kwargs)
        for r in range(num_replicas)
    ]


def _shards(samplers, steps):
    """[steps, R, P] sample indices (-1: padding), in graph (fast)."""
    fn = tf.function(lambda t: tf.concat([s.replica_indices(t) for s in samplers], 0))
    return [fn(tf.constant(t, tf.int64)).numpy() for t in range(steps)]


def test_shards_partition_the_global_draw():
    """No example is processed by two replicas in a step; together they process
    exactly the global sample, which is the single-process sample of that step."""
    single = _samplers(1)[0]
    for num_replicas in (2, 3):
        samplers = _samplers(num_replicas)
        for t, shards in enumerate(_shards(samplers, 40)):
            draw = single.global_indices(t).numpy()
            k = len(draw)
            assert shards.shape == (num_replicas, max(1, math.ceil(k / num_replicas)))
            real = shards[shards >= 0]
            assert len(real) == len(set(real)) == k  # disjoint
            assert sorted(real) == list(draw)  # the union is the global draw
            for r in range(num_replicas):  # by position: replica r gets draw[r::R]
                assert list(shards[r][shards[r] >= 0]) == list(draw[r::num_replicas])


def test_global_draw_is_the_inclusion_mask_of_the_step_seed():
    sampler = _samplers(1)[0]
    for t in (0, 5, 123):
        mask = inclusion_mask(Q, N, step_seed(fixed_seed(7), t)).numpy()
        np.testing.assert_array_equal(sampler.global_indices(t).numpy(), np.flatnonzero(mask))


def test_global_batch_sizes_follow_binomial():
    """Over many steps (fixed test seed) the global batch size, summed over two
    workers' shards, is Binomial(N, q): chi-square goodness of fit, mean and variance."""
    steps = 3000
    samplers = _samplers(2)
    sizes = (
        tf.data.Dataset.range(steps)
        .map(lambda t: tf.add_n([tf.reduce_sum(tf.cast(s.replica_indices(t) >= 0, tf.int32)) for s in samplers]))
        .batch(steps)
        .get_single_element()
        .numpy()
    )
    assert abs(sizes.mean() - N * Q) < 4 * math.sqrt(N * Q * (1 - Q) / steps)
    assert abs(sizes.var() / (N * Q * (1 - Q)) - 1) < 0.1
    # Pool the tails so every expected count is >= 5.
    edges = [0, 9, *range(10, 23), 23, N + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges) - 1, N, Q)) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_shards_carry_the_examples_and_weight_zero_padding():
    sampler = _samplers(3)[2]
    ids = sampler.replica_indices(0).numpy()[0]
    ((x, y, w),) = list(sampler.batches(0, 1))
    np.testing.assert_array_equal(w.numpy(), (ids >= 0).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), np.where(ids >= 0, ids, 0))
    np.testing.assert_array_equal(x["token_ids"].numpy()[:, 0], np.where(ids >= 0, ids + 1, 0))


def test_every_local_replica_gets_one_element_per_step_in_order():
    both = GlobalPoissonSampler(_ds(), Q, seed=fixed_seed(3), num_replicas=2, replica_ids=(1, 0))
    elements = [y.numpy() for _, y, _ in both.batches(4, 6)]
    assert len(elements) == 4  # two steps x two local replicas
    for step, (first, second) in zip((4, 5), (elements[0:2], elements[2:4])):
        shards = both.replica_indices(step).numpy()  # rows: replica 1, then replica 0
        np.testing.assert_array_equal(first, np.maximum(shards[0], 0))
        np.testing.assert_array_equal(second, np.maximum(shards[1], 0))


def test_an_empty_sample_still_feeds_every_replica_one_padding_row():
    tiny = GlobalPoissonSampler(_ds(), 1e-9, seed=fixed_seed(0), num_replicas=2, replica_ids=(0, 1))
    elements = list(tiny.batches(0, 3))
    assert len(elements) == 6
    for _, _, w in elements:
        assert w.shape == (1,) and float(w[0]) == 0.0


def test_max_batch_size_gives_static_shards():
    sampler = GlobalPoissonSampler(_ds(), Q, seed=fixed_seed(1), num_replicas=2, replica_ids=(0,), max_batch_size=40)
    assert sampler.shard_size == 20
    ds = sampler.batches(0, 3)
    assert ds.element_spec[1].shape.as_list() == [20]
    assert sampler.report()["overflow_probability_bound"] > 0


def test_fixed_seed_is_reproducible_and_secret_seeds_differ():
    a, b = _samplers(2, seed=fixed_seed(11)), _samplers(2, seed=fixed_seed(11))
    for x, y in zip(_shards(a, 5), _shards(b, 5)):
        np.testing.assert_array_equal(x, y)
    assert draw_seed() != draw_seed()
    assert shared_seed(tf.distribute.get_strategy(), 11) == fixed_seed(11)  # one process: its own draw


def test_report_names_the_replicas_and_the_seed():
    report = _samplers(2)[0].report()
    assert report["sampling_probability"] == Q and report["num_examples"] == N
    assert report["replicas"] == 2 and report["fixed_seed"] is False
    assert report["steps_per_epoch"] == 4 and report["max_batch_size"] is None


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_replicas=0), "num_replicas must be an integer >= 1"),
        (dict(num_replicas=2, replica_ids=(2,)), "replica_ids must be an integer in [0, 1]"),
        (dict(num_replicas=2, replica_ids=(1, 1)), "replica_ids must be distinct"),
        (dict(seed=(1,)), "seed must be two integers"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, fragment):
    kwargs = dict(dict(seed=fixed_seed(0)), **kwargs)
    with pytest.raises(ValueError) as e:
        GlobalPoissonSampler(_ds(), Q, **kwargs)
    assert fragment in str(e.value)
