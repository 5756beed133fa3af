"""Per-record global-L2 clipping, with pluggable implementations.

Interface (stable; other implementations, e.g. ghost clipping in
``ewtune_tf/mechanism/ghost.py``, plug in through it)::

    class ClippedGradients(NamedTuple):
        grad_sum: list[tf.Tensor]   # one float32 tensor per variable: the sum
                                    # over records of the clipped gradients
        norms: tf.Tensor            # [num_records] float32 pre-clip global
                                    # norms (+inf for a dropped record)
        num_records: tf.Tensor      # scalar int32: number of records (incl.
                                    # zero-weight padding records)
        num_nonfinite: tf.Tensor    # scalar int32: records dropped because
                                    # their gradient was not finite (or None)
        rows_isolated: bool         # static: one row's NaN cannot reach
                                    # another record's contribution

    fn(model, per_example_loss_fn, variables, l2_norm_clip, groups=None)
        -> ClippedGradients

    register_clipping_impl(name, fn)
    clipped_gradient_sum(strategy_name, model, per_example_loss_fn, variables,
                         l2_norm_clip, records=None, groups=None)
    keyed_record_gradients(strategy_name, model, per_example_loss_fn,
                           variables, records) -> list  # unclipped [M, ...]

Contract of an implementation ``fn`` (records are examples):

* ``per_example_loss_fn()`` takes no arguments, runs the forward pass
  (``training=True``) under whatever tape(s) the implementation has open, and
  returns a float32 tensor ``[batch]`` of *weighted* per-example losses.
  Padding rows (sample weight 0) are exactly 0. It may be called more than
  once (e.g. a two-pass implementation); each call runs a fresh forward pass.
* Each record's gradient, over *all* of ``variables`` jointly, is scaled by
  ``min(1, l2_norm_clip / norm)`` so its global L2 norm is <= l2_norm_clip,
  and the scaled gradients are summed. ``l2_norm_clip=inf`` means no clipping.
  An implementation must never skip clipping for a variable it cannot handle:
  it must fall back (e.g. to "vectorized") or raise.
* A record whose gradient norm is not finite (NaN/inf anywhere in it)
  contributes exactly zero -- through ``tf.where``, since ``0 * NaN`` is NaN --
  is counted in ``num_nonfinite`` and reported with norm +inf. Dropping it
  keeps the sensitivity: the record's contribution is 0, inside the C ball.
  Why not abort: an abort at the step that sampled the example reveals that it
  was sampled (and XLA drops asserts). Where a batched backward pass can
  spread one row's NaN into other records (``0 * NaN`` in a weight-gradient
  product, see ``ewtune_tf.mechanism.per_example``), other records may be
  dropped too, or the sum may come out non-finite (two-pass ghost):
  ``rows_isolated`` is then False and the private step re-runs the chunk row
  by row, so a record is dropped only for its own non-finite gradient.
* Everything returned is float32, whatever the model's compute dtype.
* Group-wise clipping (``groups``, a :class:`ClipGroups`): the variables are
  partitioned into groups and record b's gradient restricted to group g is
  scaled by ``min(1, C_g / norm_{g,b})`` with ``C_g = l2_norm_clip *
  sqrt(share_g)`` and ``sum_g share_g = 1``. Each record's contribution then
  has global norm ``<= sqrt(sum_g C_g^2) = l2_norm_clip``, so the noise
  (``sigma * l2_norm_clip``) and the accounting are exactly those of global
  clipping. Why: with one global clip, a group with large per-example
  gradients (a freshly initialised classification head) takes nearly all of
  each record's clip norm and the other groups' (LoRA) signal drowns in the
  noise; a split budget bounds each group separately (He et al., 2022,
  "Exploring the limits of differentially private deep learning with
  group-wise clipping"). ``norms`` stays the global pre-clip norm. An
  implementation that does not accept ``groups`` is refused by
  :func:`clipped_gradient_sum` when groups are requested.

Keyed microbatch records (``records``, see ``ewtune_tf.mechanism.records``)
are groups of the whole logical batch, so their gradients are *accumulated
unclipped* over physical chunks (:func:`keyed_record_gradients`, memory
``M x parameters``) and clipped once per logical step with
:func:`clip_and_sum`. Only "vectorized" and "microbatch" form them: ghost
norms of a group do not add across chunks.

Built-in implementations:

* ``"vectorized"``: one forward pass, per-record gradients via
  ``tape.jacobian`` (pfor). Fast for small models, memory grows with
  batch x parameters.
* ``"microbatch"``: one forward pass under a persistent tape, then one ordinary
  backward pass per record in a ``tf.while_loop``; materializes one gradient
  at a time (low memory, slower).
* ``"ghost"``: registered by ``ewtune_tf.mechanism.ghost`` (imported lazily on
  first request).

Unknown names raise ValueError listing the registered ones.
"""

import importlib
import inspect
import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from ewtune_tf.mechanism import per_example
from ewtune_tf.mechanism import records as records_lib


class ClippedGradients(NamedTuple):
    """Result of a clipping implementation (see module docstring)."""

    grad_sum: list
    norms: tf.Tensor
    num_records: tf.Tensor
    num_nonfinite: Optional[tf.Tensor] = None
    rows_isolated: bool = False


class ClipGroups(NamedTuple):
    """A partition of the variables for group-wise clipping.

    Attributes:
      assignment: group index (in ``[0, len(shares))``) of each variable, in
        the order of the ``variables`` passed to the implementation.
      shares: share of the squared clip budget ``l2_norm_clip**2`` of each
        group; each in (0, 1], summing to 1.
    """

    assignment: Tuple[int, ...]
    shares: Tuple[float, ...]


def check_clip_groups(groups: Optional[ClipGroups], num_variables: int) -> Optional[ClipGroups]:
    """Validates ``groups`` against the number of variables (ValueError)."""
    if groups is None:
        return None
    if not isinstance(groups, ClipGroups):
        raise ValueError(f"groups must be None or a ClipGroups; got {type(groups).__name__}.")
    shares = tuple(float(s) for s in groups.shares)
    if not shares or any(not (0.0 < s <= 1.0) for s in shares):
        raise ValueError(f"groups.shares must be non-empty, each in (0, 1]; got {groups.shares!r}.")
    if abs(sum(shares) - 1.0) > 1e-9:
        raise ValueError(f"groups.shares must sum to 1; got {groups.shares!r} (sum {sum(shares)!r}).")
    assignment = tuple(int(a) for a in groups.assignment)
    if len(assignment) != num_variables:
        raise ValueError(f"groups.assignment has {len(assignment)} entries for {num_variables} variables.")
    if any(not (0 <= a < len(shares)) for a in assignment):
        raise ValueError(f"groups.assignment entries must be in [0, {len(shares) - 1}]; got {groups.assignment!r}.")
    return ClipGroups(assignment, shares)


def group_clips(l2_norm_clip, shares: Sequence[float]) -> list:
    """``C_g = l2_norm_clip * sqrt(share_g)`` (float, or tensor if C is one)."""
    return [l2_norm_clip * math.sqrt(s) for s in shares]


def clip_factors_by_group(
    sq_norms: Sequence[Tuple[int, tf.Tensor]],
    num_variables: int,
    num_records,
    l2_norm_clip,
    groups: Optional[ClipGroups] = None,
) -> Tuple[tf.Tensor, list, Tuple[int, ...]]:
    """Per-record clip factors of each clip group (global clipping: one group).

    Args:
      sq_norms: ``(variable index, [R] squared norms)`` terms; a variable may
        contribute several terms (they add up).
      num_variables: number of variables.
      num_records: R (scalar, for the all-zero case).
      l2_norm_clip: C (may be inf, or a tensor).
      groups: None (one global clip) or a validated :class:`ClipGroups`.

    Returns:
      ``(norms, factors, assignment)``: the global pre-clip norms ``[R]``; per
      group, the ``[R]`` factors (stop-gradient'ed) to scale its variables'
      per-record gradients by, 0 for a record whose global norm is not finite
      (the caller must still mask its gradient: ``0 * NaN`` is NaN); and the
      group index of each variable.
    """
    if groups is None:
        groups = ClipGroups((0,) * num_variables, (1.0,))
    zeros = tf.zeros([num_records], tf.float32)
    per_group = [[] for _ in groups.shares]
    for i, t in sq_norms:
        per_group[groups.assignment[i]].append(t)
    group_sq = [tf.add_n(ts) if ts else zeros for ts in per_group]
    norms = tf.sqrt(tf.add_n(group_sq))
    finite = finite_records(norms)
    factors = [
        tf.stop_gradient(tf.where(finite, clip_factors(tf.sqrt(sq), c), 0.0))
        for sq, c in zip(group_sq, group_clips(l2_norm_clip, groups.shares))
    ]
    return norms, factors, groups.assignment


def finite_records(norms: tf.Tensor) -> tf.Tensor:
    """[R] bool: the record's gradient norm is finite (so is every entry)."""
    return tf.math.is_finite(norms)


def mask_records(x: tf.Tensor, finite: tf.Tensor) -> tf.Tensor:
    """Zeroes the rows ``x[r]`` of non-finite records (``tf.where``, not ``*``)."""
    rank = x.shape.rank
    keep = tf.reshape(finite, [-1] + [1] * (rank - 1)) if rank and rank > 1 else finite
    return tf.where(keep, x, tf.zeros_like(x))


def dropped_records(norms: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(norms with +inf for non-finite records, number of such records)``."""
    finite = finite_records(norms)
    inf = tf.fill(tf.shape(norms), tf.constant(float("inf"), norms.dtype))
    return tf.where(finite, norms, inf), tf.reduce_sum(tf.cast(~finite, tf.int32))


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
                f"clipping={name!r} is not available: importing {_LAZY_MODULES[name]} failed ({e})."
            ) from e
    if name not in _REGISTRY:
        raise ValueError(f"Unknown clipping implementation {name!r}; allowed values: {available_clipping_impls()}.")
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
        raise ValueError(f"l2_norm_clip must be a number in (0, inf]; got {l2_norm_clip!r}.") from None
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
    sq = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g in per_record_grads]
    return tf.sqrt(tf.add_n(sq))


def _sq_norms(g: tf.Tensor) -> tf.Tensor:
    """[R] squared L2 norms of a per-record tensor [R, ...]."""
    return tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)


def clip_and_sum(
    per_record_grads: Sequence[tf.Tensor], l2_norm_clip, groups: Optional[ClipGroups] = None
) -> ClippedGradients:
    """Clips each record's gradient (global or group-wise norm) and sums."""
    grads = [tf.cast(g, tf.float32) for g in per_record_grads]
    num_records = tf.shape(grads[0])[0]
    norms, factors, assignment = clip_factors_by_group(
        [(i, _sq_norms(g)) for i, g in enumerate(grads)], len(grads), num_records, l2_norm_clip, groups
    )
    finite = finite_records(norms)
    grad_sum = [tf.tensordot(factors[a], mask_records(g, finite), axes=[[0], [0]]) for a, g in zip(assignment, grads)]
    norms, dropped = dropped_records(norms)
    return ClippedGradients(grad_sum, norms, tf.shape(norms)[0], dropped)


def _vectorized(model, per_example_loss_fn, variables, l2_norm_clip, groups=None):
    del model
    return clip_and_sum(_jacobian_records(per_example_loss_fn, variables, None), l2_norm_clip, groups)


def _jacobian_records(per_example_loss_fn, variables, records):
    with tf.GradientTape() as tape:
        losses = tf.cast(per_example_loss_fn(), tf.float32)
        rec = records_lib.record_losses(losses, records)
    return per_example.per_record_gradients(tape, rec, variables)


def _record_losses_on_tape(per_example_loss_fn, variables, records):
    """(persistent tape, [R] record losses, tf variables) for looped backprops."""
    tf_vars = [per_example._as_tf_variable(v) for v in variables]
    with tf.GradientTape(persistent=True) as tape:
        losses = tf.cast(per_example_loss_fn(), tf.float32)
        rec = records_lib.record_losses(losses, records)
    return tape, rec, tf_vars


def _one_record_gradient(tape, rec, tf_vars, i) -> list:
    # Gradient of record i alone: backprop a one-hot output gradient, so no
    # new op has to be recorded on the tape inside the loop.
    g = tape.gradient(
        rec,
        tf_vars,
        output_gradients=tf.one_hot(i, tf.shape(rec)[0], dtype=rec.dtype),
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return [tf.cast(tf.convert_to_tensor(x), tf.float32) for x in g]


def _microbatch(model, per_example_loss_fn, variables, l2_norm_clip, groups=None):
    del model
    tape, rec, tf_vars = _record_losses_on_tape(per_example_loss_fn, variables, None)
    num_records = tf.shape(rec)[0]

    def body(i, acc, ta):
        one = _one_record_gradient(tape, rec, tf_vars, i)
        res = clip_and_sum([x[None] for x in one], l2_norm_clip, groups)
        return i + 1, [a + x for a, x in zip(acc, res.grad_sum)], ta.write(i, res.norms[0])

    zeros = [tf.zeros(v.shape, tf.float32) for v in tf_vars]
    _, acc, norms_ta = tf.while_loop(
        lambda i, *_: i < num_records,
        body,
        (tf.constant(0), zeros, tf.TensorArray(tf.float32, size=num_records)),
    )
    norms, dropped = dropped_records(norms_ta.stack())
    return ClippedGradients(list(acc), norms, num_records, dropped)


def _looped_record_gradients(per_example_loss_fn, variables, records):
    tape, rec, tf_vars = _record_losses_on_tape(per_example_loss_fn, variables, records)

    def body(i, tas):
        return i + 1, [ta.write(i, x) for ta, x in zip(tas, _one_record_gradient(tape, rec, tf_vars, i))]

    tas = [tf.TensorArray(tf.float32, size=records.num_records, element_shape=v.shape) for v in tf_vars]
    _, tas = tf.while_loop(lambda i, *_: i < records.num_records, body, (tf.constant(0), tas))
    return [ta.stack() for ta in tas]


# Implementations that can form keyed microbatch records: unclipped [M, ...]
# per-record gradients of one chunk, to be summed over chunks.
_KEYED_RECORD_GRADIENTS = {
    "vectorized": _jacobian_records,
    "microbatch": _looped_record_gradients,
}


def keyed_record_impls() -> Tuple[str, ...]:
    """Implementations that can form keyed microbatch records."""
    return tuple(sorted(_KEYED_RECORD_GRADIENTS))


def keyed_record_gradients(
    strategy_name: str,
    model,
    per_example_loss_fn: Callable[[], tf.Tensor],
    variables: Sequence,
    records: records_lib.MicrobatchRecords,
) -> list:
    """Unclipped ``[M, *variable.shape]`` float32 gradients of the keyed records
    of one chunk (rows of other chunks add to the same records)."""
    del model
    fn = _KEYED_RECORD_GRADIENTS.get(strategy_name)
    if fn is None:
        raise ValueError(
            f"clipping={strategy_name!r} cannot form keyed microbatch records (num_microbatches): a group's "
            "gradient must be accumulated over the physical chunks of a logical batch before it is clipped, "
            f"which needs materialized per-record gradients; use clipping in {list(keyed_record_impls())} "
            "or per-example records (num_microbatches=None)."
        )
    return fn(per_example_loss_fn, list(variables), records)


register_clipping_impl("vectorized", _vectorized)
register_clipping_impl("microbatch", _microbatch)


def clipped_gradient_sum(
    strategy_name: str,
    model,
    per_example_loss_fn: Callable[[], tf.Tensor],
    variables: Sequence,
    l2_norm_clip,
    records: Optional[records_lib.MicrobatchRecords] = None,
    groups: Optional[ClipGroups] = None,
) -> ClippedGradients:
    """Runs the named clipping implementation (see module docstring).

    With keyed ``records`` the rows given are the whole logical batch (one
    chunk): the record gradients are formed and clipped here.
    """
    check_l2_norm_clip(l2_norm_clip)
    variables = list(variables)
    groups = check_clip_groups(groups, len(variables))
    if records is not None:
        grads = keyed_record_gradients(strategy_name, model, per_example_loss_fn, variables, records)
        return clip_and_sum(grads, l2_norm_clip, groups)
    fn = get_clipping_impl(strategy_name)
    if groups is None:
        return fn(model, per_example_loss_fn, variables, l2_norm_clip)
    if not _accepts_groups(fn):
        # Never fall back to global clipping silently: the caller asked for a
        # different per-group bound than global clipping gives.
        raise ValueError(
            f"clipping={strategy_name!r} does not support group-wise clipping (groups); "
            "use one of 'ghost', 'ghost_two_pass', 'vectorized', 'microbatch', or no groups."
        )
    return fn(model, per_example_loss_fn, variables, l2_norm_clip, groups=groups)


def _accepts_groups(fn: ClippingFn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return "groups" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
