"""FinetuneConfig: one declaration per setting, checks that name the setting, the plan of a run."""

import argparse
import dataclasses

import pytest

from ewtune_tf.recipe.config import PLAN_SOURCES, FinetuneConfig
from ewtune_tf.recipe.settings import ConfigError, add_arguments, flag_name, settings_of


def test_every_field_is_a_documented_setting():
    fields = dataclasses.fields(FinetuneConfig)
    assert [f.name for f, _ in settings_of(FinetuneConfig)] == [f.name for f in fields]
    for field, setting in settings_of(FinetuneConfig):
        assert setting.help.strip(), field.name
        if field.default is not None:
            setting.check.validate(field.name, field.default)  # defaults pass their own checks


def test_errors_name_the_setting_as_the_caller_spells_it():
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(batch_size=0)
    assert str(e.value) == "batch_size must be an integer >= 1; got 0."
    assert e.value.render(flag_name) == "--batch_size must be an integer >= 1; got 0."
    assert e.value.render(lambda f: f"custom_config[{f!r}]").startswith("custom_config['batch_size'] must be")
    with pytest.raises(ConfigError, match="trainable_layers is used only with lora_rank 0"):
        FinetuneConfig(trainable_layers=2)
    with pytest.raises(ConfigError, match=r"batch_size must be in \[1, 100\] \(the number of training examples\)"):
        FinetuneConfig().privacy_plan(100)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bogus'\]"):
        FinetuneConfig.from_mapping({"bogus": 1})
    assert FinetuneConfig(task="SST-2").task == "sst2"


def test_flags_are_generated_from_the_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser, FinetuneConfig)
    args = parser.parse_args(["--epsilon", "3", "--no_dp", "--max_steps", "7"])
    assert args.epsilon == 3.0 and args.no_dp is True and args.max_steps == 7 and args.batch_size == 2048
    help_text = parser.format_help()
    assert "--head_clip_share" in help_text and "in (0, 1) or unset" in help_text


def test_privacy_plan_of_the_main_job_and_its_variants():
    plan = FinetuneConfig().privacy_plan(67349)
    assert (plan.steps, plan.noise_multiplier_rule, plan.target_epsilon) == (96, "certified", 8.0)
    assert FinetuneConfig(max_steps=10).privacy_plan(67349).steps == 10
    given = FinetuneConfig(noise_multiplier=0.7).privacy_plan(67349)
    assert given.noise_multiplier == 0.7 and given.noise_multiplier_rule == "given" and given.target_epsilon is None
    baseline = FinetuneConfig(no_dp=True).privacy_plan(67349)
    assert not baseline.private and baseline.sampling == "shuffle" and baseline.steps == 96
    paper = FinetuneConfig(noise_multiplier_rule="edgeworth_paper").privacy_plan(67349)
    assert paper.noise_multiplier < plan.noise_multiplier and not paper.bounds_target


def test_every_plan_field_names_the_settings_that_set_it():
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    plan_fields = set(FinetuneConfig().privacy_plan(67349).to_dict()) - {"calibration"}
    constant = {"accountant_order", "certify", "record"}  # not settings (yet): always the defaults
    assert set(PLAN_SOURCES) == plan_fields - constant
    assert all(set(sources) <= fields for sources in PLAN_SOURCES.values())


def test_precision_and_jit_compile_are_settings_of_every_entry_point():
    parser = argparse.ArgumentParser()
    add_arguments(parser, FinetuneConfig)
    args = parser.parse_args(["--precision", "mixed_bfloat16", "--jit_compile"])
    assert args.precision == "mixed_bfloat16" and args.jit_compile is True
    assert parser.parse_args([]).precision == "float32" and parser.parse_args([]).jit_compile is False
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(precision="float16")
    assert e.value.render(flag_name).startswith("--precision must be one of ('float32', 'mixed_bfloat16'")
    config = FinetuneConfig.from_mapping({"precision": "mixed_bfloat16", "jit_compile": True})
    assert config.static_shapes and FinetuneConfig(strategy="tpu").static_shapes
    assert not FinetuneConfig().static_shapes


def test_mixed_float16_is_refused_for_private_runs_and_recommends_bfloat16():
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(precision="mixed_float16")
    message = e.value.render(flag_name)
    assert message.startswith("--precision mixed_float16 is refused for private training")
    assert "--precision mixed_bfloat16" in message and "loss scaling" in message
    assert FinetuneConfig(precision="mixed_float16", no_dp=True).precision == "mixed_float16"  # nothing to protect


def test_static_shapes_reserve_a_share_of_delta_for_the_batch_overflow():
    from ewtune_tf.privacy.report import overflow_delta
    from ewtune_tf.recipe.config import STATIC_BATCH_DELTA_SHARE, STATIC_BATCH_MULTIPLE

    n = 67349
    dynamic = FinetuneConfig()
    assert dynamic.static_batch_rows(dynamic.privacy_plan(n)) is None
    assert dynamic.privacy_plan(n).delta == dynamic.delta
    config = FinetuneConfig(jit_compile=True)
    plan = config.privacy_plan(n)
    assert plan.delta == pytest.approx(config.delta * (1 - STATIC_BATCH_DELTA_SHARE))
    rows = config.static_batch_rows(plan)
    assert rows % STATIC_BATCH_MULTIPLE == 0 and config.batch_size < rows < 1.2 * config.batch_size
    eps = plan.epsilon().epsilon
    assert eps <= config.epsilon
    assert overflow_delta(n, plan.sampling_probability, plan.steps, rows, eps) <= config.delta - plan.delta
    assert overflow_delta(n, plan.sampling_probability, plan.steps, rows - STATIC_BATCH_MULTIPLE, eps) > (
        config.delta - plan.delta
    )  # the smallest such multiple
    assert config.static_batch_rows(FinetuneConfig(jit_compile=True, no_dp=True).privacy_plan(n)) is None
