"""Adaptive clipping (QuantileAdaptiveClipSumQuery): clip tracks the quantile."""

import math

import keras
import numpy as np
import pytest

from ewtune_tf.data import KeyedSampleWeight
from ewtune_tf.mechanism import noise
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import make_private


def test_composed_noise_multiplier_equals_accounted_sigma():
    s, b = 1.1, 2.0
    s_sum = noise.adaptive_sum_noise_multiplier(s, b)
    assert s_sum > s
    assert (s_sum**-2 + (2 * b) ** -2) ** -0.5 == pytest.approx(s)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        noise.adaptive_sum_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("physical, keyed", [(None, False), (8, False), (8, True)])
def test_clip_moves_towards_target_quantile(physical, keyed):
    """Also on keyed microbatch records (8 groups spanning the 4 chunks): the
    count query counts records, real when any member has a nonzero weight."""
    rs = np.random.RandomState(0)
    x, y = rs.randn(32, 4).astype("float32"), rs.randint(0, 3, 32)
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    opt = EWTuneSGD(
        1e-3,
        l2_norm_clip=100.0,
        noise_multiplier=0.5,
        batch_size=32,
        num_examples=32,
        target_unclipped_quantile=0.5,
        clip_learning_rate=0.5,
        clipped_count_stddev=1.0,
        **(dict(num_microbatches=8, clipping="vectorized") if keyed else {}),
    )
    m.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    make_private(m, physical_batch_size=physical)
    sw = KeyedSampleWeight(np.ones(32, np.float32), np.arange(32)) if keyed else None
    clips = []
    for _ in range(6):
        m.train_on_batch(x, y, sample_weight=sw)
        clips.append(opt.privacy_state()["current_l2_norm_clip"])
    # Every record is far below a clip of 100: the clip must shrink (~exp(-0.25) per step).
    assert clips[-1] < 100.0 * math.exp(-0.2 * 6 * 0.5)
    assert all(b < a for a, b in zip([100.0] + clips, clips))
    assert opt.privacy_state()["steps"] == 6


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(target_unclipped_quantile=1.0), "target_unclipped_quantile"),
        (dict(target_unclipped_quantile=0.5, clip_learning_rate=0.0), "clip_learning_rate"),
        (dict(target_unclipped_quantile=0.5, clipped_count_stddev=0.1), "clipped_count_stddev"),
        (dict(clipped_count_stddev=1.0), "only used with target_unclipped_quantile"),
    ],
)
def test_bad_adaptive_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, **kwargs)
