"""EWTune optimizers: config, validation, privacy state, noise scale, guard."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import ewtune_tf
from ewtune_tf.optimizers import (
    EWTuneAdam,
    EWTuneAdamW,
    EWTuneSGD,
    NonPrivateStepError,
    make_ewtune_optimizer,
)

BASE = dict(l2_norm_clip=1.0, noise_multiplier=1.1, batch_size=10, num_examples=1000, target_delta=1e-5)


def test_top_level_exports():
    assert ewtune_tf.EWTuneAdam is EWTuneAdam
    assert ewtune_tf.make_ewtune_optimizer(keras.optimizers.Adam) is EWTuneAdam
    rms = make_ewtune_optimizer(keras.optimizers.RMSprop)
    assert rms.__name__ == "EWTuneRMSprop" and issubclass(rms, keras.optimizers.RMSprop)
    assert make_ewtune_optimizer(keras.optimizers.RMSprop) is rms


def test_privacy_state_variables_initialized_exactly():
    opt = EWTuneAdam(1e-3, **BASE)
    s = opt.privacy_state()
    assert s["steps"] == 0 and s["noise_multiplier"] == 1.1
    assert s["sampling_probability"] == 0.01 and s["delta"] == 1e-5
    names = [v.name for v in opt.variables]
    for n in ("dp_steps", "dp_noise_multiplier", "dp_sampling_probability", "dp_delta"):
        assert n in names


@pytest.mark.parametrize("cls", [EWTuneAdam, EWTuneSGD, EWTuneAdamW])
def test_get_config_round_trip(cls):
    opt = cls(learning_rate=0.01, num_microbatches=2, clipping="microbatch", **BASE)
    cfg = opt.get_config()
    again = cls.from_config(cfg)
    assert again.get_config() == cfg
    ser = keras.optimizers.serialize(opt)
    assert ser["registered_name"] == f"ewtune_tf>{cls.__name__}"
    assert type(keras.optimizers.deserialize(ser)) is cls


BAD = [
    (dict(l2_norm_clip=0), "l2_norm_clip"),
    (dict(l2_norm_clip=-1), "l2_norm_clip"),
    (dict(noise_multiplier=-1), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(sampling_probability=0.0), "sampling_probability"),
    (dict(sampling_probability=1.5), "sampling_probability"),
    (dict(batch_size=2000), "batch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_examples=0), "num_examples"),
    (dict(target_delta=1.0), "target_delta"),
    (dict(target_delta=0.0), "target_delta"),
    (dict(num_microbatches=0), "num_microbatches"),
    (dict(clipping="nope"), "clipping"),
    (dict(sampling="random"), "sampling"),
    (dict(certify="yes"), "certify"),
    (dict(target_epsilon=1.0), "either noise_multiplier"),
    (dict(noise_multiplier=None, target_epsilon=-1.0), "target_epsilon"),
    (dict(noise_multiplier=None, target_epsilon=1.0, epochs=None), "epochs"),
    (dict(l2_norm_clip=math.inf), "l2_norm_clip"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    (dict(clip_groups="dense"), "clip_groups"),
    (dict(clip_groups=[("dense", 0.0)]), "clip_groups share"),
    (dict(clip_groups=[("a", 0.6), ("b", 0.6)]), "clip_groups.*sum to 1.2"),
    (dict(clip_groups=[("(", 0.5)]), "clip_groups: pattern '\\(' is not a valid"),
    (dict(clip_groups=[("a", 0.5)], target_unclipped_quantile=0.5), "clip_groups.*adaptive"),
]


@pytest.mark.parametrize("override,needle", BAD)
def test_bad_input_raises_value_error_naming_parameter(override, needle):
    kwargs = {**BASE, **override}
    with pytest.raises(ValueError, match=needle):
        EWTuneSGD(0.1, **kwargs)


def test_calibration_from_target_epsilon_is_certified():
    opt = EWTuneSGD(
        0.1, l2_norm_clip=1.0, target_epsilon=3.0, target_delta=1e-5, num_examples=1000, batch_size=50, epochs=2
    )
    plan = opt.privacy_plan
    assert plan is opt.privacy_config.plan and plan.noise_multiplier_rule == "certified"
    assert plan.noise_multiplier > 0 and plan.sampling_probability == pytest.approx(0.05)
    assert plan.steps == 40  # 2 epochs of floor(1000 / 50) steps: the sampler's rule
    res = plan.epsilon()
    assert res.certified and res.epsilon <= 3.0 + 1e-9
    # Restoring from config reuses sigma instead of recalibrating.
    again = EWTuneSGD.from_config(opt.get_config())
    assert again.privacy_plan == plan


def test_optimizer_takes_a_plan():
    from ewtune_tf.privacy import PrivacyPlan

    plan = PrivacyPlan(0.01, 1.0, noise_multiplier=1.1, num_examples=1000, expected_batch_size=10.0, delta=1e-5)
    opt = EWTuneAdam(1e-3, plan=plan, clipping="vectorized")
    assert opt.privacy_plan is plan and opt.privacy_state()["noise_multiplier"] == 1.1
    assert type(opt).from_config(opt.get_config()).privacy_plan == plan
    with pytest.raises(ValueError, match="give a plan or its arguments, not both"):
        EWTuneAdam(1e-3, plan=plan, l2_norm_clip=1.0)
    with pytest.raises(ValueError, match="num_microbatches=4 forms 'keyed_microbatch' records"):
        EWTuneAdam(1e-3, plan=plan, num_microbatches=4, clipping="vectorized")


def test_inconsistent_sampling_probability_is_refused():
    """Issue 13.5: q=0.05 with batch_size/num_examples = 0.01 was silently replaced by 0.01."""
    with pytest.raises(ValueError, match="sampling_probability=0.05 disagrees with batch_size / num_examples"):
        EWTuneSGD(
            0.1,
            l2_norm_clip=1.0,
            target_epsilon=1.0,
            target_delta=1e-5,
            sampling_probability=0.05,
            batch_size=100,
            num_examples=10000,
            epochs=1,
        )


def test_shuffle_sampling_warns_and_is_recorded():
    with pytest.warns(UserWarning, match="assumes Poisson"):
        opt = EWTuneSGD(0.1, sampling="shuffle", **BASE)
    assert opt.privacy_state()["sampling"] == "shuffle"


def test_apply_outside_private_step_is_refused():
    opt = EWTuneSGD(0.1, **BASE)
    v = keras.Variable([1.0, 2.0])
    with pytest.raises(NonPrivateStepError, match="make_private"):
        opt.apply_gradients([(tf.constant([1.0, 1.0]), v)])
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])


def test_noise_std_on_update_is_sigma_c_over_expected_batch():
    sigma, c, b = 1.7, 0.5, 25.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = EWTuneSGD(1.0, l2_norm_clip=c, noise_multiplier=sigma, batch_size=b, num_examples=1000)
    v = keras.Variable(np.zeros(50000, np.float32))
    opt.build([v])
    deltas = []
    for _ in range(2):
        before = v.numpy().copy()
        opt.apply_private_gradients([tf.zeros([50000])], [v], physical_batch_size=None)
        deltas.append(v.numpy() - before)
    for d in deltas:
        assert abs(d.std() / (sigma * c / b) - 1) < 0.03
    assert abs(np.corrcoef(deltas[0], deltas[1])[0, 1]) < 0.03
    assert opt.privacy_state()["steps"] == 2


def test_restored_state_from_other_config_is_rejected():
    opt = EWTuneSGD(0.1, **BASE)
    opt.dp_noise_multiplier.assign(0.5)
    with pytest.raises(ValueError, match="different privacy configuration"):
        opt.check_privacy_state()
    v = keras.Variable([0.0])
    opt.build([v])
    with pytest.raises(tf.errors.InvalidArgumentError, match="noise_multiplier"):
        opt.apply_private_gradients([tf.zeros([1])], [v], physical_batch_size=None)
    np.testing.assert_array_equal(v.numpy(), [0.0])


def test_budget_cap_blocks_step():
    opt = EWTuneSGD(0.1, **BASE)
    v = keras.Variable([0.0])
    opt.build([v])
    opt.dp_max_steps.assign(0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="budget exhausted"):
        opt.apply_private_gradients([tf.zeros([1])], [v], physical_batch_size=None)
    assert opt.privacy_state()["steps"] == 0


def test_adaptive_clipping_config_round_trip():
    opt = EWTuneSGD(0.1, target_unclipped_quantile=0.5, clip_learning_rate=0.3, **{**BASE, "batch_size": 100})
    assert opt.privacy_config.clipped_count_stddev == pytest.approx(100 / 20)
    again = EWTuneSGD.from_config(opt.get_config())
    assert again.privacy_config == opt.privacy_config
    assert again.privacy_state()["current_l2_norm_clip"] == 1.0


def test_clip_groups_config_round_trip():
    opt = EWTuneAdam(0.1, clip_groups=[("logits", 0.25)], **BASE)
    assert opt.privacy_config.clip_groups == (("logits", 0.25),)
    again = EWTuneAdam.from_config(opt.get_config())
    assert again.privacy_config == opt.privacy_config


def test_two_models_with_same_tf_seed_get_independent_noise():
    # E.g. an audit training many models in one process, each after
    # keras.utils.set_random_seed(0): their noise must not coincide.
    deltas = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        opt = EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=1)
        v = keras.Variable(np.zeros(20000, np.float32))
        opt.build([v])
        tf.function(lambda: opt.apply_private_gradients([tf.zeros([20000])], [v], physical_batch_size=None))()
        deltas.append(v.numpy())
    assert abs(np.corrcoef(deltas[0], deltas[1])[0, 1]) < 0.05
