"""Vectorized per-record gradients.

A *record* is the unit whose gradient is clipped: one example, or one keyed
microbatch group (``ewtune_tf.mechanism.records``).

The gradients are computed with ``tf.GradientTape.jacobian`` of the vector of
per-record losses, vectorized with pfor (``experimental_use_pfor=True``), in
the manner of TF Privacy's vectorized optimizers. We do not use
``tf.vectorized_map`` over the forward pass: through Keras 3 ``EinsumDense`` /
``MultiHeadAttention`` it segfaults on x86 while oneDNN custom ops are on.

Caveat (why the private step re-runs a chunk row by row when a record is not
finite): the jacobian differentiates one *batched* forward pass, so a
weight-gradient product ``activations^T @ upstream`` mixes rows, and one row's
NaN/inf activation times another record's zero upstream gradient is NaN. A
single non-finite example therefore makes *every* row of the jacobian
non-finite.
"""

from typing import Optional, Sequence

import tensorflow as tf

from ewtune_tf.mechanism import records as records_lib


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


def per_example_gradients(
    model_fn, variables: Sequence, records: Optional[records_lib.MicrobatchRecords] = None
) -> list:
    """Convenience wrapper: runs ``model_fn()`` -> [batch] losses under a tape
    and returns per-record gradients (see :func:`per_record_gradients`)."""
    with tf.GradientTape() as tape:
        losses = model_fn()
        rec = records_lib.record_losses(losses, records)
    return per_record_gradients(tape, rec, variables)
