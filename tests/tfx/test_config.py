"""custom_config validation, CLI/TFX parity and the gate decision (pure Python; runs in both envs)."""

import json
import math
import types

import pytest

from ewtune_tf.privacy import PrivacyPlan, RunFacts
from ewtune_tf.recipe.config import FinetuneConfig, tfx_keys
from ewtune_tf.recipe.settings import config_from_arguments
from ewtune_tf.tfx.config import PrivateTrainerConfig, parse_custom_config
from ewtune_tf.tfx.gate import gate_decision
from trainers import glue as cli


def _cli_config(argv):
    return config_from_arguments(FinetuneConfig, cli.build_parser().parse_args(argv))


def test_defaults_are_the_main_job_and_overrides_apply():
    config = parse_custom_config({"epsilon": 3, "batch_size": 64, "max_steps": 10.0, "text_feature": "text"})
    assert isinstance(config, PrivateTrainerConfig) and config.text_feature == "text"
    assert config.finetune.epsilon == 3.0 and config.finetune.batch_size == 64 and config.finetune.max_steps == 10
    default = parse_custom_config(None).finetune
    assert default == FinetuneConfig() == _cli_config([])
    assert (default.batch_size, default.learning_rate, default.lora_rank) == (2048, 1e-2, 8)
    assert (default.sequence_length, default.accountant, default.dropout) == (64, "tilted", 0.0)


def test_cli_and_tfx_plan_the_same_steps_and_sigma():
    """The same settings through ewtune-train's flags and through TFX's
    custom_config (as JSON, the way it travels through ML Metadata) give the
    same config, hence the same plan."""
    settings = {"epsilon": 3.0, "delta": 1e-6, "batch_size": 512, "epochs": 2.5, "lora_rank": 4, "max_steps": 400}
    from_cli = _cli_config([x for k, v in settings.items() for x in (f"--{k}", str(v))])
    from_tfx = parse_custom_config(json.loads(json.dumps(settings))).finetune
    assert from_cli == from_tfx
    plans = [c.privacy_plan(67349) for c in (from_cli, from_tfx)]
    assert plans[0] == plans[1] and plans[0].steps == math.ceil(2.5 * (67349 // 512)) == 328
    assert plans[0].noise_multiplier == plans[1].noise_multiplier and plans[0].epsilon().epsilon <= 3.0
    main_job = FinetuneConfig().privacy_plan(67349)
    assert main_job.steps == 96 and main_job.noise_multiplier == pytest.approx(0.593, abs=5e-4)


def test_every_cli_setting_is_a_tfx_key_except_what_the_trainer_decides():
    flags = {a.dest for a in cli.build_parser()._actions if a.dest != "help"}
    assert set(tfx_keys()) <= flags
    assert flags - set(tfx_keys()) == {"glue_dir", "output_dir", "export_dir", "no_export", "no_resume"}


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("epsilon", 0, r"custom_config\['epsilon'\] must be a finite number > 0"),
        ("epsilon", float("nan"), r"custom_config\['epsilon'\] must be a finite number > 0"),
        ("delta", 1.0, r"custom_config\['delta'\] must be in \(0, 1\)"),
        ("batch_size", 0, r"custom_config\['batch_size'\] must be an integer >= 1"),
        ("batch_size", 2.5, r"custom_config\['batch_size'\] must be an integer"),
        ("l2_norm_clip", -1.0, r"custom_config\['l2_norm_clip'\]"),
        ("sequence_length", 4, r"custom_config\['sequence_length'\] must be an integer in \[8, 512\]"),
        ("accountant", "rdp", r"custom_config\['accountant'\] must be one of \('edgeworth', 'tilted'\)"),
        ("dropout", 1.0, r"custom_config\['dropout'\] must be in \[0, 1\)"),
        ("text_feature", "", r"custom_config\['text_feature'\] must be a non-empty string"),
        ("output_dir", "x", r"unknown custom_config key\(s\) \['output_dir'\]"),
        ("bogus", 1, r"unknown custom_config key\(s\) \['bogus'\]"),
        ("precision", "float16", r"custom_config\['precision'\] must be one of \('float32', 'mixed_bfloat16'"),
        ("precision", "mixed_float16", r"custom_config\['precision'\] mixed_float16 is refused .* mixed_bfloat16"),
    ],
)
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        parse_custom_config({key: value})


def test_precision_and_xla_reach_the_trainer_config():
    config = parse_custom_config({"precision": "mixed_bfloat16", "jit_compile": True}).finetune
    assert config == _cli_config(["--precision", "mixed_bfloat16", "--jit_compile"])
    assert config.static_shapes and config.precision == "mixed_bfloat16"


def test_run_fn_rejects_bad_config_before_reading_anything():
    from ewtune_tf.tfx import trainer_module

    # No data_accessor, no dirs: validation must fail first.
    fn_args = types.SimpleNamespace(custom_config={"epsilon": -1.0})
    with pytest.raises(ValueError, match=r"custom_config\['epsilon'\]"):
        trainer_module.run_fn(fn_args)


def _report(**facts):
    plan = PrivacyPlan(0.25, 1.0, noise_multiplier=1.0, steps=4, num_examples=64, expected_batch_size=16, delta=1e-3)
    return plan.report(4, RunFacts(**facts))


def test_gate_passes_only_certified_within_budget():
    report = _report()
    eps = report["epsilon"]
    assert report["epsilon_estimate"] <= eps  # The (smaller) estimate is never what is gated on.
    assert gate_decision(report, eps)[0] and gate_decision(report, 8.0)[0]
    passed, reason = gate_decision(report, eps * 0.999)
    assert not passed and "> budget" in reason


@pytest.mark.parametrize(
    "report",
    [
        _report(noise_seed_fixed=True),  # certified: false (issue 13.7)
        {**_report(), "certified": False},
        {"certified": True, "certified_epsilon": 1.0},  # not of the schema
        {**_report(), "epsilon": float("nan")},
        {**_report(), "epsilon": "1.0"},
        {**_report(), "schema_version": 2},
    ],
)
def test_gate_fails_closed(report):
    assert not gate_decision(report, 100.0)[0]


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, float("nan"), True, "8"])
def test_gate_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="epsilon_budget"):
        gate_decision(_report(), budget)
