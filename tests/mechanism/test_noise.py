"""Gaussian noise through the DPQuery: scale, independence, validation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import noise


def _draw(sigma, c, seed, n=40000, replicas=1):
    out = noise.add_gaussian_noise(
        [tf.zeros([n])], l2_norm_clip=c, noise_multiplier=sigma, seed=seed, num_replicas=replicas
    )
    return out[0].numpy()


def test_noise_std_is_sigma_times_c():
    z = _draw(1.3, 0.7, noise.make_seed(0, 0))
    assert abs(z.std() / (1.3 * 0.7) - 1) < 0.03
    assert abs(z.mean()) < 0.03


def test_replica_noise_sums_to_one_device_noise():
    # R = 2: each replica adds sigma*C/sqrt(2); the all-reduced sum has sigma*C.
    a = _draw(2.0, 1.0, noise.make_seed(5, 0), replicas=2)
    b = _draw(2.0, 1.0, noise.make_seed(5, 1), replicas=2)
    assert abs(a.std() / (2.0 / math.sqrt(2)) - 1) < 0.03
    assert abs((a + b).std() / 2.0 - 1) < 0.03
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03  # independent streams


def test_streams_differ_across_steps_and_tensors():
    s0, s1 = noise.make_seed(0, 0), noise.make_seed(1, 0)
    assert abs(np.corrcoef(_draw(1, 1, s0), _draw(1, 1, s1))[0, 1]) < 0.03
    out = noise.add_gaussian_noise(
        [tf.zeros([20000]), tf.zeros([20000])], l2_norm_clip=1.0, noise_multiplier=1.0, seed=s0
    )
    assert abs(np.corrcoef(out[0].numpy(), out[1].numpy())[0, 1]) < 0.03


def test_seed_is_secret_and_fresh_not_tf_global_seed():
    tf.random.set_seed(1)
    a = noise.make_seed(3, 0).numpy()
    tf.random.set_seed(1)
    b = noise.make_seed(3, 0).numpy()
    assert not np.array_equal(a, b)  # same step, same TF seed: still fresh
    fixed = noise.make_seed(3, 0, noise_seed=123).numpy()
    np.testing.assert_array_equal(fixed, noise.make_seed(3, 0, noise_seed=123).numpy())


def test_traced_seed_never_repeats_for_the_same_step():
    @tf.function
    def seed_for(step):
        return noise.make_seed(step, 0)

    s1, s2 = seed_for(tf.constant(7)).numpy(), seed_for(tf.constant(7)).numpy()
    assert not np.array_equal(s1, s2)  # e.g. a step re-run after a restore


def test_zero_sigma_adds_nothing_even_with_infinite_clip():
    z = noise.add_gaussian_noise(
        [tf.ones([5])], l2_norm_clip=math.inf, noise_multiplier=0.0, seed=noise.make_seed(0, 0)
    )
    np.testing.assert_array_equal(z[0].numpy(), np.ones(5))


def test_normalize_divides_by_expected_batch():
    out = noise.normalize([tf.constant([8.0])], 4.0)
    np.testing.assert_allclose(out[0].numpy(), [2.0])
    with pytest.raises(ValueError, match="expected batch size"):
        noise.normalize([tf.constant([1.0])], 0.0)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "a", None])
def test_bad_noise_multiplier(bad):
    with pytest.raises(ValueError, match="noise_multiplier"):
        noise.check_noise_multiplier(bad)


def test_infinite_clip_with_noise_rejected():
    with pytest.raises(ValueError, match="l2_norm_clip"):
        noise.noise_stddev(math.inf, 1.0)
