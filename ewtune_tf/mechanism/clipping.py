"""Per-record global-L2 clipping, with pluggable implementations.

Interface (stable; other implementations, e.g. ghost clipping in
``ewtune_tf/mechanism/ghost.py``, plug in through it)::

    class ClippedGradients(NamedTuple):
        grad_sum: list[tf.Tensor]   # one float32 tensor per variable: the sum
                                    # over records of the clipped gradients
        norms: tf.Tensor            # [num_records] float32 pre-clip global norms
        num_records: tf.Tensor      # scalar int32: number of records (incl.
                                    # zero-weight padding records)

    fn(model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches)
        -> ClippedGradients

    register_clipping_impl(name, fn)
    clipped_gradient_sum(strategy_name, model, per_example_loss_fn, variables,
                         l2_norm_clip, num_microbatches=None) -> ClippedGradients

Contract of an implementation ``fn``:

* ``per_example_loss_fn()`` takes no arguments, runs the forward pass
  (``training=True``) under whatever tape(s) the implementation has open, and
  returns a float32 tensor ``[batch]`` of *weighted* per-example losses.
  Padding rows (sample weight 0) are exactly 0. It may be called more than
  once (e.g. a two-pass implementation); each call runs a fresh forward pass.
* Records are examples (``num_microbatches=None``) or ``num_microbatches``
  groups of consecutive examples whose record loss is
  ``sum(group) / group_size`` (see ``ewtune_tf.mechanism.per_example``).
  ``num_microbatches`` must divide the batch (ValueError otherwise).
* Each record's gradient, over *all* of ``variables`` jointly, is scaled by
  ``min(1, l2_norm_clip / norm)`` so its global L2 norm is <= l2_norm_clip,
  and the scaled gradients are summed. ``l2_norm_clip=inf`` means no clipping.
  An implementation must never skip clipping for a variable it cannot handle:
  it must fall back (e.g. to "vectorized") or raise.
* Everything returned is float32, whatever the model's compute dtype.

Built-in implementations:

* ``"vectorized"``: one forward pass, per-record gradients via
  ``tape.jacobian`` (pfor). Fast for small models, memory grows with
  batch x parameters.
* ``"microbatch"``: one forward pass under a persistent tape, then one ordinary
  backward pass per record in a ``tf.while_loop``; materializes one gradient
  at a time (low memory, slower). With ``num_microbatches=None`` every example
  is its own record.
* ``"ghost"``: registered by ``ewtune_tf.mechanism.ghost`` (imported lazily on
  first request).

Unknown names raise ValueError listing the registered ones.
"""

import importlib
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import tensorflow as tf

from ewtune_tf.mechanism import per_example


class ClippedGradients(NamedTuple):
    """Result of a clipping implementation (see module docstring)."""

    grad_sum: list
    norms: tf.Tensor
    num_records: tf.Tensor


ClippingFn = Callable[..., ClippedGradients]

_REGISTRY: Dict[str, ClippingFn] = {}
# Implementations that live in optional modules, imported on first request.
_LAZY_MODULES = {
    "ghost": "ewtune_tf.mechanism.ghost",
    "ghost_two_pass": "ewtune_tf.mechanism.ghost",
}


def register_clipping_impl(name: str, fn: ClippingFn) -> None:
    """Registers ``fn`` under ``name`` (overwrites an existing entry)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"clipping impl name must be a non-empty string; got {name!r}")
    if not callable(fn):
        raise ValueError(f"clipping impl {name!r} must be callable; got {fn!r}")
    _REGISTRY[name] = fn


def available_clipping_impls() -> list:
    """Names that :func:`get_clipping_impl` can resolve (lazy ones included)."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def get_clipping_impl(name: str) -> ClippingFn:
    """Looks up an implementation by name; raises ValueError if unknown."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        try:
            importlib.import_module(_LAZY_MODULES[name])
        except ImportError as e:  # pragma: no cover - depends on other helper
            raise ValueError(
                f"clipping={name!r} is not available: importing "
                f"{_LAZY_MODULES[name]} failed ({e})."
            ) from e
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown clipping implementation {name!r}; allowed values: "
            f"{available_clipping_impls()}."
        )
    return _REGISTRY[name]


def check_l2_norm_clip(l2_norm_clip) -> float:
    """Validates l2_norm_clip: a float in (0, inf].

    A tensor (the current clip of adaptive clipping, read from a variable) is
    returned unchecked: its value is produced and kept positive in-graph.
    """
    if tf.is_tensor(l2_norm_clip) or isinstance(l2_norm_clip, tf.Variable):
        return l2_norm_clip
    try:
        c = float(l2_norm_clip)
    except (TypeError, ValueError):
        raise ValueError(
            f"l2_norm_clip must be a number in (0, inf]; got {l2_norm_clip!r}."
        ) from None
    if not c > 0:  # also rejects NaN
        raise ValueError(f"l2_norm_clip must be in (0, inf]; got {l2_norm_clip!r}.")
    return c


def clip_factors(norms: tf.Tensor, l2_norm_clip) -> tf.Tensor:
    """``min(1, C / norm)`` per record; 1 where norm == 0 or C == inf."""
    norms = tf.cast(norms, tf.float32)
    c = tf.cast(l2_norm_clip, tf.float32)
    # C / 0 = inf and inf / finite = inf; both map to 1 through the minimum.
    return tf.minimum(1.0, c / norms)


def global_norms(per_record_grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """[R] global L2 norms of per-record gradients ([R, ...] each)."""
    sq = [
        tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
        for g in per_record_grads
    ]
    return tf.sqrt(tf.add_n(sq))


def clip_and_sum(per_record_grads: Sequence[tf.Tensor], l2_norm_clip) -> ClippedGradients:
    """Clips each record's gradient (global norm across variables) and sums."""
    grads = [tf.cast(g, tf.float32) for g in per_record_grads]
    norms = global_norms(grads)
    factors = clip_factors(norms, l2_norm_clip)
    grad_sum = [tf.tensordot(factors, g, axes=[[0], [0]]) for g in grads]
    return ClippedGradients(grad_sum, norms, tf.shape(norms)[0])


def _vectorized(model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches):
    del model
    with tf.GradientTape() as tape:
        losses = tf.cast(per_example_loss_fn(), tf.float32)
        records = per_example.group_into_microbatches(losses, num_microbatches)
    grads = per_example.per_record_gradients(tape, records, variables)
    return clip_and_sum(grads, l2_norm_clip)


def _microbatch(model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches):
    del model
    tf_vars = [per_example._as_tf_variable(v) for v in variables]
    with tf.GradientTape(persistent=True) as tape:
        losses = tf.cast(per_example_loss_fn(), tf.float32)
        records = per_example.group_into_microbatches(losses, num_microbatches)
    num_records = tf.shape(records)[0]
    zeros = [tf.zeros(v.shape, tf.float32) for v in tf_vars]

    def body(i, acc, ta):
        # Gradient of record i alone: backprop a one-hot output gradient, so
        # no new op has to be recorded on the tape inside the loop.
        g = tape.gradient(
            records,
            tf_vars,
            output_gradients=tf.one_hot(i, num_records, dtype=records.dtype),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        g = [tf.cast(tf.convert_to_tensor(x), tf.float32) for x in g]
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(x)) for x in g]))
        f = clip_factors(norm, l2_norm_clip)
        return i + 1, [a + f * x for a, x in zip(acc, g)], ta.write(i, norm)

    _, acc, norms_ta = tf.while_loop(
        lambda i, *_: i < num_records,
        body,
        (tf.constant(0), zeros, tf.TensorArray(tf.float32, size=num_records)),
    )
    del tape
    return ClippedGradients(list(acc), norms_ta.stack(), num_records)


register_clipping_impl("vectorized", _vectorized)
register_clipping_impl("microbatch", _microbatch)


def clipped_gradient_sum(
    strategy_name: str,
    model,
    per_example_loss_fn: Callable[[], tf.Tensor],
    variables: Sequence,
    l2_norm_clip,
    num_microbatches: Optional[int] = None,
) -> ClippedGradients:
    """Runs the named clipping implementation (see module docstring)."""
    check_l2_norm_clip(l2_norm_clip)
    per_example.check_num_microbatches(num_microbatches, None)
    fn = get_clipping_impl(strategy_name)
    return fn(model, per_example_loss_fn, list(variables), l2_norm_clip, num_microbatches)
