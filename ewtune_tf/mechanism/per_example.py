"""Vectorized per-example (or per-microbatch) gradients.

A *record* is the unit whose gradient is clipped: one example by default, or
one microbatch of ``batch_size // num_microbatches`` consecutive examples.

The gradients are computed with ``tf.GradientTape.jacobian`` of the vector of
per-record losses, vectorized with pfor (``experimental_use_pfor=True``), in
the manner of TF Privacy's vectorized optimizers. We do not use
``tf.vectorized_map`` over the forward pass: through Keras 3 ``EinsumDense`` /
``MultiHeadAttention`` it segfaults on x86 while oneDNN custom ops are on.

Units: a microbatch loss is the *sum* of its examples' (weighted) losses
divided by the microbatch size, i.e. the mean with padding rows counted as
zero-loss members. Dividing the clipped, noised sum of microbatch gradients by
``expected_batch_size / microbatch_size`` therefore gives the same scale as the
per-example path (see ``ewtune_tf.mechanism.noise``).
"""

from typing import Optional, Sequence

import tensorflow as tf


def check_num_microbatches(num_microbatches: Optional[int], batch_size) -> None:
    """Raises ValueError unless num_microbatches is None or divides batch_size.

    ``batch_size`` may be a Python int or None (unknown statically; then only
    the type/range of num_microbatches is checked here and divisibility is
    asserted at run time by :func:`group_into_microbatches`).
    """
    if num_microbatches is None:
        return
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int):
        raise ValueError(
            "num_microbatches must be None or a positive integer that divides "
            f"the physical batch size; got {num_microbatches!r}."
        )
    if num_microbatches < 1:
        raise ValueError(
            "num_microbatches must be None or an integer >= 1 that divides the "
            f"physical batch size; got {num_microbatches}."
        )
    if batch_size is not None and batch_size % num_microbatches != 0:
        raise ValueError(
            f"num_microbatches={num_microbatches} does not divide the physical "
            f"batch size {batch_size}; choose num_microbatches in the divisors "
            f"of {batch_size} (or None for per-example clipping)."
        )


def group_into_microbatches(per_example_losses: tf.Tensor, num_microbatches: Optional[int]) -> tf.Tensor:
    """Maps a [batch] loss vector to a [num_records] vector of record losses.

    With ``num_microbatches=None`` this is the identity. Otherwise the batch is
    split into ``num_microbatches`` groups of consecutive examples and each
    record loss is ``sum(group) / group_size``.
    """
    if num_microbatches is None:
        return per_example_losses
    static_batch = per_example_losses.shape[0]
    check_num_microbatches(num_microbatches, static_batch)
    if static_batch is None:
        batch = tf.shape(per_example_losses)[0]
        tf.debugging.assert_equal(
            batch % num_microbatches,
            0,
            message=f"num_microbatches={num_microbatches} must divide the physical batch size",
        )
    grouped = tf.reshape(per_example_losses, [num_microbatches, -1])
    return tf.reduce_mean(grouped, axis=1)


def _as_tf_variable(v):
    # Keras 3 variables wrap a tf.Variable in `.value`; the tape and jacobian
    # need the tf.Variable itself.
    return v.value if hasattr(v, "value") and isinstance(v.value, tf.Variable) else v


def per_record_gradients(
    tape: tf.GradientTape,
    record_losses: tf.Tensor,
    variables: Sequence,
) -> list:
    """Jacobian of ``record_losses`` [R] w.r.t. ``variables``.

    Returns one float32 tensor of shape [R, *variable.shape] per variable.
    Variables the loss does not depend on get exact zeros. ``tape`` must have
    recorded the forward pass that produced ``record_losses`` (a persistent
    tape is not required: jacobian is called once).
    """
    tf_vars = [_as_tf_variable(v) for v in variables]
    jac = tape.jacobian(
        record_losses,
        tf_vars,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
        experimental_use_pfor=True,
    )
    out = []
    for j in jac:
        if isinstance(j, tf.IndexedSlices):
            j = tf.convert_to_tensor(j)
        out.append(tf.cast(j, tf.float32))
    return out


def per_example_gradients(model_fn, variables: Sequence, num_microbatches=None) -> list:
    """Convenience wrapper: runs ``model_fn()`` -> [batch] losses under a tape
    and returns per-record gradients (see :func:`per_record_gradients`)."""
    with tf.GradientTape() as tape:
        losses = model_fn()
        records = group_into_microbatches(losses, num_microbatches)
    return per_record_gradients(tape, records, variables)
