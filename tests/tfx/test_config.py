"""custom_config validation and the gate decision (pure Python; runs in both envs)."""

import math
import types

import pytest

from ewtune_tf.tfx.config import PrivateTrainerConfig, parse_custom_config
from ewtune_tf.tfx.gate import gate_decision


def test_defaults_and_overrides():
    config = parse_custom_config({"epsilon": 3, "batch_size": 64, "max_steps": 10.0})
    assert isinstance(config, PrivateTrainerConfig)
    assert config.epsilon == 3.0 and config.batch_size == 64 and config.max_steps == 10
    assert config.sampling == "poisson"
    assert parse_custom_config(None) == PrivateTrainerConfig()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("epsilon", 0, r"custom_config\['epsilon'\] must be in \(0"),
        ("epsilon", float("nan"), r"custom_config\['epsilon'\] must be a finite number"),
        ("delta", 1.0, r"custom_config\['delta'\] must be in \(0.0, 1.0\)"),
        ("batch_size", 0, r"custom_config\['batch_size'\] must be in \[1"),
        ("batch_size", 2.5, r"custom_config\['batch_size'\] must be an integer"),
        ("l2_norm_clip", -1.0, r"custom_config\['l2_norm_clip'\]"),
        ("sequence_length", 4, r"custom_config\['sequence_length'\] must be in \[8"),
        ("sampling", "shuffle", r"custom_config\['sampling'\] must be one of \('poisson',\)"),
        ("accountant", "rdp", r"custom_config\['accountant'\]"),
        ("dropout", 1.0, r"custom_config\['dropout'\]"),
        ("model_name", "a/b", r"custom_config\['model_name'\]"),
        ("bogus", 1, r"unknown custom_config key\(s\) \['bogus'\]"),
    ],
)
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        parse_custom_config({key: value})


def test_run_fn_rejects_bad_config_before_reading_anything():
    from ewtune_tf.tfx import trainer_module

    # No data_accessor, no dirs: validation must fail first.
    fn_args = types.SimpleNamespace(custom_config={"epsilon": -1.0})
    with pytest.raises(ValueError, match=r"custom_config\['epsilon'\]"):
        trainer_module.run_fn(fn_args)


def test_gate_passes_only_certified_within_budget():
    report = {"certified": True, "certified_epsilon": 2.0, "estimated_epsilon": 0.5}
    assert gate_decision(report, 2.0)[0]
    assert gate_decision(report, 8.0)[0]
    passed, reason = gate_decision(report, 1.0)
    assert not passed and "> budget" in reason
    # The (smaller) estimate is never what is gated on.
    assert not gate_decision(report, 1.0)[0]


@pytest.mark.parametrize(
    "report",
    [
        {"certified": False, "certified_epsilon": 1.0},
        {"certified_epsilon": 1.0},
        {"certified": True},
        {"certified": True, "certified_epsilon": float("nan")},
        {"certified": True, "certified_epsilon": "1.0"},
    ],
)
def test_gate_fails_closed(report):
    assert not gate_decision(report, 100.0)[0]


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, float("nan"), True, "8"])
def test_gate_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="epsilon_budget"):
        gate_decision({"certified": True, "certified_epsilon": 1.0}, budget)
