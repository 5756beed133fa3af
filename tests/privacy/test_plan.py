"""PrivacyPlan: the one steps rule, calibration rules, q consistency, arguments."""

import math

import pytest

from ewtune_tf import accounting
from ewtune_tf.privacy import PLAN_ARGUMENTS, PrivacyPlan, plan_from_arguments, plan_to_arguments

N, B = 67349, 2048  # the main job (SST-2)


def _main_job(**changes):
    q = B / N
    plan = PrivacyPlan(
        sampling_probability=q,
        l2_norm_clip=1.0,
        num_examples=N,
        expected_batch_size=B,
        steps=PrivacyPlan(q, 1.0).steps_for(3),
        target_epsilon=8.0,
        delta=1e-5,
    )
    return plan.replace(**changes)


def test_main_job_plan_steps_and_certified_sigma():
    plan = _main_job().calibrate()
    assert plan.steps == 96 and plan.noise_multiplier == pytest.approx(0.593, abs=5e-4)
    assert plan.noise_multiplier_rule == "certified" and plan.bounds_target
    result = plan.epsilon()
    assert result.certified and 7.99 < result.epsilon <= 8.0
    assert plan.calibration["noise_multiplier"] == plan.noise_multiplier
    event = plan.dp_event(10)
    assert event.count == 10 and event.event.sampling_probability == plan.sampling_probability
    assert event.event.event.noise_multiplier == plan.noise_multiplier


def test_rules_choose_sigma_and_the_certified_epsilon_of_what_ran_is_reported():
    certified = _main_job().calibrate("certified")
    rdp = _main_job().calibrate("rdp")
    paper = _main_job().calibrate("edgeworth_paper")
    assert rdp.noise_multiplier > certified.noise_multiplier > paper.noise_multiplier
    assert rdp.bounds_target and not paper.bounds_target
    # The paper's sigma under-reports: its certified epsilon is well above 8.
    assert paper.report(96)["epsilon"] > 10.0 and paper.report(96)["noise_multiplier_rule"] == "edgeworth_paper"
    assert rdp.report(96)["epsilon"] < 8.0


def test_inconsistent_sampling_probability_is_refused():
    """Issue 13.5 (the optimizer's path: tests/optimizers/test_dp_optimizer.py)."""
    with pytest.raises(ValueError, match="disagrees"):
        PrivacyPlan(0.05, 1.0, num_examples=10000, expected_batch_size=100)
    consistent = plan_from_arguments(
        l2_norm_clip=1.0, noise_multiplier=1.0, sampling_probability=0.01, batch_size=100, num_examples=10000
    )
    assert consistent.sampling_probability == 0.01


def test_epochs_and_steps_must_agree():
    plan = plan_from_arguments(l2_norm_clip=1.0, noise_multiplier=1.0, sampling_probability=0.1, epochs=2.5)
    assert plan.steps == 25
    with pytest.raises(ValueError, match="steps=24 disagrees with epochs=2.5"):
        plan_from_arguments(l2_norm_clip=1.0, noise_multiplier=1.0, sampling_probability=0.1, epochs=2.5, steps=24)


def test_arguments_round_trip_without_recalibrating():
    plan = plan_from_arguments(
        l2_norm_clip=1.0, target_epsilon=3.0, target_delta=1e-5, num_examples=1000, batch_size=50, epochs=2
    )
    assert plan.steps == accounting.steps_and_sampling_probability(1000, 50, 2)[1] == 40
    args = plan_to_arguments(plan)
    assert set(args) <= set(PLAN_ARGUMENTS)
    again = plan_from_arguments(**args)
    assert again == plan and again.noise_multiplier == plan.noise_multiplier
    assert plan_from_arguments(**{**args, "noise_multiplier_source": "calibrated"}) == plan  # older configs


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(sampling_probability=0.0), "sampling_probability must be in (0, 1]"),
        (dict(l2_norm_clip=0.0), "l2_norm_clip must be in (0, inf]"),
        (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(delta=1.0), "target_delta must be in (0, 1)"),
        (dict(accountant="rdp"), "accountant_method must be one of"),
        (dict(sampling="random"), "sampling must be one of"),
        (dict(noise_multiplier_rule="magic"), "noise_multiplier_rule must be one of"),
        (dict(expected_batch_size=N + 1.0), "batch_size must be in (0, 67349]"),
    ],
)
def test_bad_fields_name_the_parameter(changes, needle):
    with pytest.raises(ValueError) as e:
        _main_job(**changes)
    assert needle in str(e.value)


def test_calibration_needs_a_target_and_a_private_plan_needs_finite_clip():
    with pytest.raises(ValueError, match="target_epsilon"):
        _main_job(target_epsilon=None).calibrate()
    with pytest.raises(ValueError, match="finite when noise_multiplier > 0"):
        PrivacyPlan(0.1, math.inf, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="epsilon is infinite"):
        PrivacyPlan(0.1, 1.0, noise_multiplier=0.0, delta=1e-5).epsilon(3)


def test_max_steps_within_a_budget():
    plan = PrivacyPlan(0.25, 1.0, noise_multiplier=1.0, delta=1e-3)
    target = (plan.epsilon(5).epsilon + plan.epsilon(6).epsilon) / 2
    assert plan.max_steps_within(target, 0) == 5
    assert plan.max_steps_within(target, 0, planned=3) == 3
    assert plan.max_steps_within(target, 5) == 5  # no further step fits
