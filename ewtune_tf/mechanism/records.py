"""What one record is -- the unit whose gradient is clipped to C -- and how records are formed.

The definitions and their sensitivities are the privacy plan's
(``ewtune_tf.privacy.plan.RECORDS``, TensorFlow-free, so the accountant side
reads them without TensorFlow); this module forms the records. Two exist:

* ``"example"`` (``num_microbatches=None``): every example is a record.
  Adding or removing one example adds or removes one record whose clipped
  gradient has norm <= C, so the clipped sum has add/remove sensitivity
  **1 C**.
* ``"keyed_microbatch"`` (``num_microbatches=M``): example i belongs to group
  ``example_key_i mod M``, where ``example_key_i`` is an integer fixed per
  example independently of the other examples. A record is one whole group
  of the *logical* batch (all its physical chunks): its loss is the sum of
  its members' losses divided by the expected group size ``B / M``, and its
  gradient is clipped once per logical step. Adding or removing one example
  changes exactly one record, from one vector of norm <= C to another, so
  the sensitivity is **2 C**.

Why keys and not positions: records of *consecutive* rows (TF Privacy's
microbatches) move with the data. Adding one sampled example shifts every
later group boundary, so every record can change (10 C measured on a linear
model), and the accountant's "one record changes" assumption fails.

Why ``poisson_batches`` draws a random key per example rather than using the
example's index in the dataset: inserting an example before another shifts
that index too. A key drawn independently per example makes the grouping a
function of nothing but the example's own slot, so the guarantee holds for
adding or removing any example, anywhere. A user pipeline may use any key
with that property (a random draw, a hash of a record id), carried to the
train step as ``KeyedSampleWeight(sample_weight, example_key)``.

Accounting: noise of std ``sigma * C`` on a sum of sensitivity ``s * C`` is
the Gaussian mechanism with noise multiplier ``sigma / s``. Calibration, the
budget callback and the privacy report all use :func:`accounted_noise_multiplier`.
"""

from typing import NamedTuple, Optional

import tensorflow as tf

from ewtune_tf.privacy.plan import RECORDS

RECORD_DEFINITIONS = tuple(RECORDS)  # ("example", "keyed_microbatch")


def check_num_microbatches(num_microbatches) -> Optional[int]:
    """None (per-example records) or the number of keyed groups M >= 1."""
    if num_microbatches is None:
        return None
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(
            "num_microbatches must be None (per-example records) or an integer >= 1 "
            f"(keyed record groups per logical batch); got {num_microbatches!r}."
        )
    return int(num_microbatches)


def record_definition(num_microbatches: Optional[int]) -> str:
    """``"example"`` or ``"keyed_microbatch"`` (see module docstring)."""
    return RECORD_DEFINITIONS[0] if num_microbatches is None else RECORD_DEFINITIONS[1]


def record_sensitivity(num_microbatches: Optional[int]) -> float:
    """Add/remove sensitivity of the clipped sum, in units of C: 1 or 2."""
    return RECORDS[record_definition(num_microbatches)]


def accounted_noise_multiplier(noise_multiplier: float, num_microbatches: Optional[int]) -> float:
    """The accountant's sigma: noise std / (C * sensitivity)."""
    return float(noise_multiplier) / record_sensitivity(num_microbatches)


class KeyedSampleWeight(NamedTuple):
    """The sample-weight slot of a batch ``(x, y, KeyedSampleWeight(w, key))``.

    Attributes:
      sample_weight: ``[batch]`` float weights (0 for padding rows).
      example_key: ``[batch]`` non-negative integers, fixed per example and
        chosen independently of the other examples (see module docstring).
    """

    sample_weight: tf.Tensor
    example_key: tf.Tensor


class MicrobatchRecords(NamedTuple):
    """Keyed records of one chunk of rows.

    Attributes:
      group_ids: ``[rows]`` int32 record index of each row, in ``[0, num_records)``.
      num_records: M, the number of groups of the logical batch.
      examples_per_record: the expected group size ``B / M`` (a constant, so
        the record loss never depends on how many members were sampled).
    """

    group_ids: tf.Tensor
    num_records: int
    examples_per_record: float


def group_ids(example_keys, num_microbatches: int) -> tf.Tensor:
    """``[rows]`` int32 record of each row: ``example_key mod num_microbatches``."""
    m = check_num_microbatches(num_microbatches)
    return tf.cast(tf.math.floormod(tf.cast(example_keys, tf.int64), m), tf.int32)


def microbatch_records(example_keys, num_microbatches: int, expected_batch_size: float) -> MicrobatchRecords:
    """Keyed records of rows with keys ``example_keys`` (see :func:`group_ids`)."""
    if not expected_batch_size or not expected_batch_size > 0:
        raise ValueError(
            "num_microbatches needs the expected logical batch size (batch_size > 0) "
            f"to normalise record losses; got {expected_batch_size!r}."
        )
    m = check_num_microbatches(num_microbatches)
    return MicrobatchRecords(group_ids(example_keys, m), m, float(expected_batch_size) / m)


def record_losses(per_example_losses: tf.Tensor, records: Optional[MicrobatchRecords]) -> tf.Tensor:
    """``[rows]`` example losses -> ``[R]`` record losses (identity for examples)."""
    if records is None:
        return per_example_losses
    sums = tf.math.unsorted_segment_sum(per_example_losses, records.group_ids, records.num_records)
    return sums / tf.constant(records.examples_per_record, per_example_losses.dtype)


def real_records(sample_weight: tf.Tensor, records: Optional[MicrobatchRecords]) -> tf.Tensor:
    """``[R]`` float32 count of nonzero-weight rows per record (padding: 0)."""
    real = tf.cast(tf.reshape(sample_weight, [-1]) != 0.0, tf.float32)
    if records is None:
        return real
    return tf.math.unsorted_segment_sum(real, records.group_ids, records.num_records)
