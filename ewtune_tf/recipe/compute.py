"""How the recipe computes its train step: precision, XLA and static shapes.

* **Precision** (``FinetuneConfig.precision``): the Keras dtype policy is set
  while the model is built and compiled, where Keras reads it (each layer
  keeps the policy it was built with), then restored, so ``finetune`` leaves
  the process's global policy as it found it. The private step keeps the
  clipped sum, the noise and the update in float32 whatever the policy.
* **Static shapes** (``jit_compile``, or a TPU): XLA compiles one program per
  input shape, so the step must see one shape for the whole run. Dynamic
  padding cuts each chunk to its longest row (a new width per chunk; under
  XLA the cut is a bounded dynamic shape, which costs compile time and saves
  no compute), and a Poisson batch has a new size every step. Instead every
  logical batch is padded with weight-0 rows to ``static_batch_rows`` rows
  (``FinetuneConfig.static_batch_rows``: a batch above it aborts the run, and
  the report adds that event's probability to delta) and runs at the full
  ``sequence_length``. The private step skips the trailing chunks that hold
  padding only, so the extra rows cost (almost) nothing; the full width
  costs what dynamic padding saved. On the main job (SST-2, 13.3 tokens per
  sentence, ``sequence_length`` 64) that is 4.5x the tokens per step
  (``benchmarks/static_shapes.py``): static shapes pay off only where XLA
  (or a TPU) gains more than that, or with long texts. Per-chunk length
  buckets (a few widths, one program each) would recover most of it; they
  belong to the private step's chunk loop and are not done yet. The step is
  traced once per run (tests/trainers/test_glue_trainer.py counts traces).
* **Replicas**: the global Poisson draw (``ewtune_tf.data.global_poisson``)
  deals sampled example j to replica j mod R and pads every replica's shard
  to ceil(M / R) rows, so each replica gets an equal share of the real rows.
"""

import contextlib
from typing import Iterator, Optional

from ewtune_tf.recipe.settings import ConfigError

OVERFLOW_MARKER = "Poisson batch overflow"  # ewtune_tf.data.poisson's error message


class BatchOverflowError(RuntimeError):
    """A Poisson batch exceeded the static row count: the run stopped before that step."""


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Keras's global dtype policy is ``name`` inside the block, and restored after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def model_jit_compile(config) -> bool:
    """``compile(jit_compile=...)``: explicit, because Keras's default ("auto")
    turns XLA on whenever a GPU is visible, where dynamic padding would compile
    a bounded dynamic shape. Under TPUStrategy the step is compiled anyway."""
    return bool(config.jit_compile) and config.strategy != "tpu"


def check_replicas(rows: Optional[int], replicas: int) -> None:
    """ConfigError unless a static batch of ``rows`` splits into whole per-replica shards."""
    if rows is not None and rows % replicas:
        raise ConfigError(
            f"{{strategy}}: the static batches of {rows} rows do not split over {replicas} replicas; "
            "use a replica count that divides it (1, 2, 4 or 8), or no static shapes (drop {jit_compile}).",
            "strategy",
            "jit_compile",
        )


@contextlib.contextmanager
def overflow_as_error(rows: Optional[int], delta_budget: float) -> Iterator[None]:
    """Turns the sampler's overflow error into a :class:`BatchOverflowError` that
    says what happened (``delta_budget``: the delta reserved for it)."""
    try:
        yield
    except Exception as e:  # tf.errors.InvalidArgumentError, possibly wrapped by Keras
        if rows is None or OVERFLOW_MARKER not in str(e):
            raise
        raise BatchOverflowError(
            f"a Poisson batch exceeded the static batch size of {rows} rows. The privacy plan allowed for this "
            f"rare event (the report adds at most {delta_budget:.3g} to delta for it); the step was not taken and "
            "nothing of it was released. Rerun the same command to resume from the last checkpoint: the resumed "
            "steps draw fresh batches."
        ) from None
