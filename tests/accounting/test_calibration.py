"""Tests for ewtune_tf/accounting/calibration.py."""

import math

import pytest

from ewtune_tf.accounting import (
    calibrate_noise_multiplier,
    compute_epsilon,
    steps_and_sampling_probability,
    steps_for_epochs,
    steps_per_epoch,
)


def test_steps_and_sampling_probability():
    q, m = steps_and_sampling_probability(67349, 2000, 20)
    assert q == 2000 / 67349 and m == 20 * math.floor(67349 / 2000) == 660  # the paper's SST-2 steps
    assert steps_and_sampling_probability(100, 10, 3) == (0.1, 30)
    assert steps_and_sampling_probability(67349, 2048, 3) == (2048 / 67349, 96)  # the main job
    with pytest.raises(ValueError, match="batch_size"):
        steps_and_sampling_probability(10, 20, 1)
    with pytest.raises(ValueError, match="epochs"):
        steps_and_sampling_probability(10, 2, 0)
    with pytest.raises(ValueError, match="num_examples"):
        steps_and_sampling_probability(0, 2, 1)


def test_one_rule_turns_epochs_into_steps():
    # The sampler's pass: floor(1/q) steps; fractional epochs round up.
    assert steps_per_epoch(0.1) == 10 and steps_per_epoch(0.3) == 3 and steps_per_epoch(1.0) == 1
    assert steps_for_epochs(0.1, 2.5) == 25 and steps_for_epochs(0.3, 0.5) == 2 and steps_for_epochs(1.0, 0.1) == 1
    assert steps_for_epochs(16 / 64, 2) == 8
    with pytest.raises(ValueError, match="sampling_probability"):
        steps_per_epoch(0.0)


def test_certified_calibration_sst2():
    res = calibrate_noise_multiplier(8.0, 1e-5, 2000 / 67349, 660)
    assert res.certified and res.epsilon.certified
    assert res.epsilon.epsilon <= 8.0
    # Spec §10.3: smallest sigma with exact eps <= 8 is 0.7983; the certified one
    # can only be (slightly) larger.
    assert 0.7983 * (1 - 2e-4) <= res.noise_multiplier <= 0.7983 * 1.01
    # Smallest to 1e-4 relative: a bit less noise breaks the (certified) target.
    lower = compute_epsilon(
        sampling_probability=2000 / 67349, noise_multiplier=res.noise_multiplier * (1 - 3e-4), steps=660, delta=1e-5
    )
    assert lower.epsilon > 8.0 or lower.epsilon == pytest.approx(8.0, rel=1e-3)


def test_uncertified_calibration_by_dataset_size():
    res = calibrate_noise_multiplier(8.0, 1e-5, num_examples=67349, batch_size=2000, epochs=20, certify=False)
    assert res.steps == 660 and res.sampling_probability == 2000 / 67349  # 20 passes of floor(N/B) = 33 steps
    assert not res.certified
    assert res.epsilon.epsilon == pytest.approx(8.0, abs=2e-3)
    d = res.to_dict()
    assert d["noise_multiplier"] == res.noise_multiplier and "epsilon" in d


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(sampling_probability=2.0), "sampling_probability"),
        (dict(steps=0), "steps"),
        (dict(method="x"), "method"),
        (dict(order=5), "order"),
    ],
)
def test_validation(kwargs, name):
    args = dict(target_epsilon=8.0, target_delta=1e-5, sampling_probability=0.01, steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**args)


def test_inconsistent_inputs():
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(8.0, 1e-5, 0.01, 100, num_examples=10)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(8.0, 1e-5, num_examples=100, batch_size=10)
