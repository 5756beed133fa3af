"""recipe.compute: the dtype policy is scoped, replicas get whole shards, an overflow is a clear error."""

import pytest

from ewtune_tf.recipe import BatchOverflowError, compute
from ewtune_tf.recipe.settings import ConfigError, flag_name


def test_precision_policy_is_restored_even_on_error():
    import keras

    before = keras.mixed_precision.global_policy().name
    with compute.precision_policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
    assert keras.mixed_precision.global_policy().name == before
    assert layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32"  # the layer keeps its policy
    with pytest.raises(RuntimeError), compute.precision_policy("mixed_bfloat16"):
        raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == before


def test_static_rows_must_split_over_the_replicas():
    compute.check_replicas(None, 3)
    compute.check_replicas(48, 8)
    with pytest.raises(ConfigError) as e:
        compute.check_replicas(44, 8)
    assert e.value.render(flag_name).startswith("--strategy: the static batches of 44 rows do not split over 8")


def test_overflow_becomes_a_clear_error_and_other_errors_pass_through():
    import tensorflow as tf

    with pytest.raises(BatchOverflowError, match=r"exceeded the static batch size of 48 rows.*at most 1e-08 to delta"):
        with compute.overflow_as_error(48, 1e-8):
            raise tf.errors.InvalidArgumentError(None, None, f"{compute.OVERFLOW_MARKER}: 50 rows > 48")
    with pytest.raises(ValueError), compute.overflow_as_error(48, 1e-8):
        raise ValueError("unrelated")
    with pytest.raises(RuntimeError), compute.overflow_as_error(None, 0.0):
        raise RuntimeError(compute.OVERFLOW_MARKER)  # no static shapes: not ours to translate


def test_keras_jit_compile_is_explicit():
    from ewtune_tf.recipe import FinetuneConfig

    assert compute.model_jit_compile(FinetuneConfig()) is False  # not "auto" (XLA whenever a GPU is visible)
    assert compute.model_jit_compile(FinetuneConfig(jit_compile=True)) is True
    assert compute.model_jit_compile(FinetuneConfig(strategy="tpu", jit_compile=True)) is False  # TPUs compile anyway
