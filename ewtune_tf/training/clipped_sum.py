"""The clipped sum of one logical batch: chunks, keyed records, non-finite rows.

``logical_clipped_sum`` turns the rows of one logical batch into the sum of
clipped record gradients that the optimizer noises once:

* **Chunks.** With ``physical`` set, the rows are padded with weight-0 rows to
  a multiple of ``physical`` and processed chunk by chunk in a
  ``tf.while_loop`` (static chunk shape, TPU-friendly); trailing chunks of
  padding only are skipped (they contribute exactly 0).
* **Per-example records** are clipped chunk by chunk by the clipping
  implementation and the clipped sums added.
* **Keyed microbatch records** (``ewtune_tf.mechanism.records``) are groups of
  the whole logical batch, whose members may sit in any chunk (the trainer
  sorts a batch by length before cutting it). Their *unclipped* gradients are
  accumulated over the chunks (``M x parameters`` floats) and clipped once.
* **Non-finite rows.** A record whose gradient is not finite contributes 0
  (``ewtune_tf.mechanism.clipping``). A batched backward pass can spread one
  row's NaN into every record of its chunk (``0 * NaN``), which would drop
  records for another example's fault and break the sensitivity bound. So,
  unless the implementation's rows are isolated (ghost book-keeping), a chunk
  in which anything was dropped or came out non-finite is recomputed one row
  at a time (plain per-row gradients), and only the records that are
  non-finite on their own are dropped. This costs nothing unless it happens.

All sums are float32.
"""

from typing import Callable, NamedTuple, Optional

import tensorflow as tf

from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import per_example
from ewtune_tf.mechanism import records as records_lib


class Rows(NamedTuple):
    """Rows of a logical batch (or of one chunk); ``y``/``group_ids`` may be None."""

    x: object
    y: object
    sample_weight: tf.Tensor  # [rows] float32
    group_ids: Optional[tf.Tensor]  # [rows] int32 keyed record of each row


class ClipSpec(NamedTuple):
    """What to clip and how (resolved once per traced step)."""

    clipping: str
    l2_norm_clip: object  # float, or a float32 tensor under adaptive clipping
    groups: Optional[clipping_lib.ClipGroups]
    num_microbatches: Optional[int]
    expected_batch_size: Optional[float]


class ClippedSum(NamedTuple):
    """The step's clipped sum and what the optimizer needs besides it."""

    grad_sum: list  # float32, one tensor per variable
    centered_unclipped_count: tf.Tensor  # sum over real records of 1[norm <= C] - 1/2
    num_nonfinite: tf.Tensor  # int32: records dropped for a non-finite gradient


# ``loss_fn_for(rows, report)`` -> no-arg callable returning [rows] weighted
# per-example losses (see ``ewtune_tf.mechanism.clipping``); ``report``: also
# update the (non-private) training metrics on its first call.
LossFnFactory = Callable[[Rows, bool], Callable[[], tf.Tensor]]


def logical_clipped_sum(
    model,
    spec: ClipSpec,
    loss_fn_for: LossFnFactory,
    rows: Rows,
    variables: list,
    *,
    physical: Optional[int] = None,
    report: bool = False,
) -> ClippedSum:
    """Sum of clipped record gradients of the logical batch ``rows``."""
    batch = _LogicalBatch(model, spec, loss_fn_for, list(variables))
    if spec.num_microbatches is None:
        return _accumulate(rows, physical, lambda c: batch.example_chunk(c, report), batch.example_zeros())
    acc = _accumulate(rows, physical, lambda c: batch.keyed_chunk(c, report), batch.keyed_zeros())
    res = clipping_lib.clip_and_sum(acc.grads, spec.l2_norm_clip, spec.groups)
    count = centered_unclipped_count(res.norms, acc.real, spec.l2_norm_clip)
    return ClippedSum(res.grad_sum, count, res.num_nonfinite)


def centered_unclipped_count(norms: tf.Tensor, real: tf.Tensor, l2_norm_clip) -> tf.Tensor:
    """sum over real records of (1[norm <= clip] - 1/2) (adaptive clipping).

    ``real`` counts each record's nonzero-weight rows: padding records (norm
    0) must not count as unclipped. A dropped record has norm +inf, so it
    counts as clipped, and its term is in {-1/2, +1/2} like any other.
    """
    below = tf.cast(norms <= tf.cast(l2_norm_clip, tf.float32), tf.float32) - 0.5
    return tf.reduce_sum(tf.where(real > 0, below, tf.zeros_like(below)))


class _Keyed(NamedTuple):
    grads: list  # unclipped [M, ...] per variable
    real: tf.Tensor  # [M] nonzero-weight rows per record


class _LogicalBatch:
    """Per-chunk work of :func:`logical_clipped_sum`."""

    def __init__(self, model, spec: ClipSpec, loss_fn_for: LossFnFactory, variables: list):
        self.model, self.spec, self.loss_fn_for, self.variables = model, spec, loss_fn_for, variables

    def _zeros(self, m: Optional[int] = None) -> list:
        lead = [] if m is None else [m]
        return [tf.zeros(lead + list(v.shape), tf.float32) for v in self.variables]

    def example_zeros(self) -> ClippedSum:
        return ClippedSum(self._zeros(), tf.constant(0.0), tf.constant(0))

    def keyed_zeros(self) -> _Keyed:
        m = self.spec.num_microbatches
        return _Keyed(self._zeros(m), tf.zeros([m], tf.float32))

    def _sum(self, res: clipping_lib.ClippedGradients, rows: Rows) -> ClippedSum:
        dropped = tf.constant(0) if res.num_nonfinite is None else res.num_nonfinite
        real = records_lib.real_records(rows.sample_weight, None)
        return ClippedSum(res.grad_sum, centered_unclipped_count(res.norms, real, self.spec.l2_norm_clip), dropped)

    def example_chunk(self, chunk: Rows, report: bool) -> ClippedSum:
        s = self.spec
        res = clipping_lib.clipped_gradient_sum(
            s.clipping, self.model, self.loss_fn_for(chunk, report), self.variables, s.l2_norm_clip, groups=s.groups
        )
        out = self._sum(res, chunk)
        if res.rows_isolated:
            return out
        bad = tf.logical_or(out.num_nonfinite > 0, tf.logical_not(_all_finite(res.grad_sum)))
        return tf.cond(bad, lambda: _accumulate(chunk, 1, self.isolated_example, self.example_zeros()), lambda: out)

    def isolated_example(self, row: Rows) -> ClippedSum:
        grads = _row_gradient(self.loss_fn_for(row, False), self.variables, None)
        return self._sum(
            clipping_lib.clip_and_sum([g[None] for g in grads], self.spec.l2_norm_clip, self.spec.groups), row
        )

    def keyed_chunk(self, chunk: Rows, report: bool) -> _Keyed:
        records = self._records(chunk)
        loss_fn = self.loss_fn_for(chunk, report)
        grads = clipping_lib.keyed_record_gradients(self.spec.clipping, self.model, loss_fn, self.variables, records)
        out = _Keyed(grads, records_lib.real_records(chunk.sample_weight, records))
        bad = tf.logical_not(_all_finite(grads))
        return tf.cond(bad, lambda: _accumulate(chunk, 1, self.isolated_keyed_row, self.keyed_zeros()), lambda: out)

    def isolated_keyed_row(self, row: Rows) -> _Keyed:
        records = self._records(row)
        grads = _row_gradient(self.loss_fn_for(row, False), self.variables, records)
        # scatter_nd writes the row's gradient into its own record only; a
        # one-hot product would spread a NaN into every record (0 * NaN).
        index = tf.reshape(records.group_ids, [1, 1])
        shape = [self.spec.num_microbatches]
        scattered = [tf.scatter_nd(index, g[None], shape + list(v.shape)) for g, v in zip(grads, self.variables)]
        return _Keyed(scattered, records_lib.real_records(row.sample_weight, records))

    def _records(self, rows: Rows) -> records_lib.MicrobatchRecords:
        m = self.spec.num_microbatches
        return records_lib.MicrobatchRecords(rows.group_ids, m, self.spec.expected_batch_size / m)


def _row_gradient(loss_fn, variables, records) -> list:
    """Plain float32 gradient of the (one-row) chunk's record loss."""
    tf_vars = [per_example._as_tf_variable(v) for v in variables]
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(records_lib.record_losses(tf.cast(loss_fn(), tf.float32), records))
    grads = tape.gradient(total, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in grads]


def _all_finite(tensors) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def _pad_rows(t, pad):
    if t is None:
        return None
    t = tf.convert_to_tensor(t)
    return tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))


def _chunk(t, i, p):
    if t is None:
        return None
    r = tf.reshape(t, tf.concat([[-1, p], tf.shape(t)[1:]], 0))
    c = tf.gather(r, i)
    c.set_shape([p] + list(t.shape[1:]))
    return c


def _accumulate(rows: Rows, p: Optional[int], fn, zeros):
    """Sums ``fn(chunk)`` over chunks of ``p`` rows.

    ``p=None``: the rows are one chunk. ``zeros`` has the structure of
    ``fn``'s result. Trailing chunks of weight-0 rows only are skipped.
    """
    if p is None:
        return fn(rows)
    pad = (-tf.shape(rows.sample_weight)[0]) % p
    padded = tf.nest.map_structure(lambda t: _pad_rows(t, pad), rows)
    nonzero = tf.cast(tf.where(padded.sample_weight != 0.0)[:, 0], tf.int32)
    last = tf.reduce_max(tf.concat([nonzero, tf.constant([-1], tf.int32)], 0))
    num_chunks = (last + 1 + p - 1) // p

    def body(i, acc):
        chunk = tf.nest.map_structure(lambda t: _chunk(t, i, p), padded)
        return i + 1, tf.nest.map_structure(tf.add, acc, fn(chunk))

    # One chunk at a time: overlapping iterations (the default allows 10) gain
    # nothing once each chunk's ops use every core, but hold several chunks'
    # activations at once (+0.5 GB, peak 1.25x the non-private step's, for
    # MiniLM full fine-tuning; benchmarks/train_step.py --workload main_job).
    _, acc = tf.while_loop(lambda i, _: i < num_chunks, body, (tf.constant(0), zeros), parallel_iterations=1)
    return acc
