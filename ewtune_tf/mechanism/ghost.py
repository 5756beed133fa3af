"""Ghost clipping: per-record gradient norms without per-record gradients.

Registers two clipping implementations with
:func:`ewtune_tf.mechanism.clipping.register_clipping_impl` (see that module
for the contract):

* ``"ghost"`` -- *book-keeping* (Bu et al., 2022): one forward pass, one
  backward pass to the layers' pre-activation outputs, per-record norms from
  the captured (input, output-gradient) pairs, then the clipped gradient sum
  ``sum_b c_b * grad_b`` formed directly from the same pairs
  (``sum_b c_b a_b^T g_b`` for a linear layer). No second backward pass.
* ``"ghost_two_pass"`` -- the classic two-pass ghost clipping (Li et al.,
  2021): the same norms, then an ordinary backward pass of the re-weighted loss
  ``sum_b stop_gradient(c_b) * loss_b`` on the same (persistent) tape, so the
  forward pass, including its dropout masks, is shared by both passes.

Both give the same result as the ``"vectorized"`` implementation up to float
round-off. :func:`ghost_norms` runs the norm pass alone.

Which layers are covered: those with a ghost rule
(:mod:`ewtune_tf.mechanism.ghost_layers`; built-in rules for Dense,
EinsumDense, Embedding, ReversibleEmbedding, LayerNormalization and KerasHub
PositionEmbedding, LoRA included, in :mod:`ewtune_tf.mechanism.ghost_rules`;
:func:`supported_layers` lists them). Users add rules for their own layers
with :func:`register_ghost_rule`. The per-record math of each kind of weight
use is in :mod:`ewtune_tf.mechanism.ghost_taps` (including the cost-based
choice between ghost and materialized norms, made at run time when the
sequence length is dynamic).

Fallback, never silent skipping: any requested variable that is read by code
other than a rule (a layer without a rule, a tied weight, a quantized layer,
...) shows up in ``tape.watched_variables()``; so does a variable used by
more than one rule call (a shared layer: its per-record gradient is a sum of
uses, whose norm is not the sum of their norms). Per-record gradients of
those variables are computed with ``tape.jacobian`` (pfor) and enter both the
norms and the clipped sum. This keeps correctness but is as slow as the
vectorized path for the network below such a variable.

Privacy note: in book-keeping mode the released sum is built from exactly the
per-record gradients whose norms were measured, so each record's contribution
is at most ``l2_norm_clip`` by construction.

Assumption: no layer couples examples (e.g. BatchNormalization in training
mode); with such a layer, per-example gradients themselves are ill-defined for
DP-SGD and every implementation here is wrong.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from ewtune_tf.mechanism import clipping, ghost_layers, ghost_rules
from ewtune_tf.mechanism.ghost_layers import as_tf_variable, register_ghost_rule
from ewtune_tf.mechanism.ghost_taps import Tap, sq_norms

__all__ = [
    "bookkeeping_clipped_gradients",
    "ghost_clipped_gradients",
    "ghost_norms",
    "register_ghost_rule",
    "supported_layers",
    "two_pass_clipped_gradients",
]

_LOG = logging.getLogger(__name__)
_BUILTIN_RULES = ghost_rules  # imported for its registrations


def supported_layers() -> Tuple[str, ...]:
    """Names of the layer classes that have a ghost rule (built-in and user)."""
    return ghost_layers.registered_layers()


# --------------------------------------------------------------------------
# Norm pass
# --------------------------------------------------------------------------


class _Capture(NamedTuple):
    """One forward pass under a persistent tape, with the rules' taps."""

    tape: tf.GradientTape
    rec: ghost_layers.Recorder
    losses: tf.Tensor  # [batch] float32 per-example losses (records are examples)
    total: tf.Tensor  # their sum (recorded on the tape)


class _NormPass(NamedTuple):
    capture: _Capture
    taps: List[Tap]  # taps of the variables without fallback
    out_grads: List[tf.Tensor]  # dL/d tap.output
    states: list  # per tap, what its clipped sum reuses
    sq_terms: List[Tuple[int, tf.Tensor]]  # (variable index, [B] squared norms)
    fallback: List[int]  # variable indices on the jacobian fallback
    jac: List[tf.Tensor]  # their [B, ...] per-example gradients


def _check_per_example_records(num_microbatches: Optional[int]) -> None:
    """Ghost records are examples.

    Keyed microbatch records (``ewtune_tf.mechanism.records``) are groups of
    the whole logical batch, accumulated over physical chunks before they are
    clipped; ghost norms of a group do not add across chunks, so ghost
    clipping refuses them (records of consecutive rows are not sound: adding
    one example shifts every later group).
    """
    if num_microbatches is not None:
        raise ValueError(
            f"num_microbatches={num_microbatches!r}: ghost clipping forms per-example records only; use "
            "clipping='vectorized' or 'microbatch' for keyed microbatch records."
        )


def _capture(model, per_example_loss_fn, tf_vars) -> _Capture:
    with tf.GradientTape(persistent=True) as tape:
        rec = ghost_layers.Recorder(tape, tf_vars)
        with ghost_layers.capture_layers(model, rec):
            losses = tf.cast(per_example_loss_fn(), tf.float32)
        if losses.shape.rank != 1:
            raise ValueError(
                f"per_example_loss_fn must return a [batch] vector of per-example losses; got shape {losses.shape}."
            )
        total = tf.reduce_sum(losses)
    return _Capture(tape, rec, losses, total)


def _fallback_indices(cap: _Capture, variables: Sequence, tf_vars: Sequence) -> List[int]:
    """Variables read outside a rule, or by more than one rule call."""
    outside = {id(v) for v in cap.tape.watched_variables()}
    uses: Dict[int, int] = {}
    for t in cap.rec.taps:
        uses[t.var_index] = uses.get(t.var_index, 0) + 1
    fallback = [i for i, v in enumerate(tf_vars) if id(v) in outside or uses.get(i, 0) > 1]
    if fallback:
        # Logged at trace time: correct, but as slow as the vectorized path.
        _LOG.warning(
            "ghost clipping: %d variable(s) are not covered by a ghost rule (rules: %s; add one with "
            "register_ghost_rule) and use the per-example jacobian fallback: %s",
            len(fallback),
            ", ".join(supported_layers()),
            [getattr(variables[i], "path", getattr(variables[i], "name", str(i))) for i in fallback],
        )
    return fallback


def _jacobian(cap: _Capture, tf_vars: Sequence, fallback: List[int]) -> List[tf.Tensor]:
    """[B, ...] per-example gradients of the fallback variables.

    A variable's total gradient is the sum over its raw reads inside rules and
    its ordinary (auto-watched) reads elsewhere.
    """
    sources, owner = [], []
    for i in fallback:
        reads = [t.weight_read for t in cap.rec.taps if t.var_index == i]
        sources.extend([tf_vars[i]] + reads)
        owner.extend([i] * (1 + len(reads)))
    parts = cap.tape.jacobian(
        cap.losses, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
    )
    per_var: Dict[int, tf.Tensor] = {}
    for i, j in zip(owner, parts):
        j = tf.cast(tf.convert_to_tensor(j), tf.float32)
        per_var[i] = j if i not in per_var else per_var[i] + j
    return [per_var[i] for i in fallback]


def _norm_pass(model, per_example_loss_fn, variables, tf_vars, num_microbatches) -> _NormPass:
    _check_per_example_records(num_microbatches)
    cap = _capture(model, per_example_loss_fn, tf_vars)
    fallback = _fallback_indices(cap, variables, tf_vars)
    skip = set(fallback)
    taps = [t for t in cap.rec.taps if t.var_index not in skip]
    # Taps may share an output (Recorder.merge): one gradient each.
    outputs = {id(t.output): t.output for t in taps}
    grads = (
        cap.tape.gradient(cap.total, list(outputs.values()), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if taps
        else []
    )
    by_output = {key: tf.convert_to_tensor(g) for key, g in zip(outputs, grads)}
    out_grads = [by_output[id(t.output)] for t in taps]
    sq_terms, states = [], []
    for tap, g in zip(taps, out_grads):
        sq, state = tap.norm_pass(g)
        sq_terms.append((tap.var_index, sq))
        states.append(state)
    jac = _jacobian(cap, tf_vars, fallback) if fallback else []
    sq_terms.extend((i, sq_norms(j)) for i, j in zip(fallback, jac))
    return _NormPass(cap, taps, out_grads, states, sq_terms, fallback, jac)


# --------------------------------------------------------------------------
# Clipped-sum pass
# --------------------------------------------------------------------------


def _bookkeeping_sums(npass: _NormPass, factors: list, assignment, finite) -> List[Tuple[int, tf.Tensor]]:
    """Each tap's clipped sum from its own (input, output-gradient) pair; the
    rows of non-finite examples are zeroed, so a NaN stays in its own row."""
    return [
        (tap.var_index, tap.clipped_sum(g, factors[assignment[tap.var_index]], state, finite))
        for tap, g, state in zip(npass.taps, npass.out_grads, npass.states)
    ]


def _two_pass_sums(npass: _NormPass, factors: list, assignment, finite) -> List[Tuple[int, tf.Tensor]]:
    """One re-weighted backward pass per clip group (a single pass under
    global clipping), each restricted to the taps of its group. A non-finite
    example has factor 0, but the batched pass can still spread its NaN
    (``0 * NaN``): the result reports rows as not isolated."""
    del finite
    cap = npass.capture
    members: Dict[int, List[Tap]] = {}
    for tap in npass.taps:
        members.setdefault(assignment[tap.var_index], []).append(tap)
    out = []
    for grp, taps in members.items():
        with cap.tape:
            weighted = tf.reduce_sum(cap.losses * factors[grp])
        grads = cap.tape.gradient(
            weighted, [t.weight_read for t in taps], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        out.extend((t.var_index, tf.convert_to_tensor(g)) for t, g in zip(taps, grads))
    return out


def _check_args(mode: str, l2_norm_clip, variables, groups):
    if mode not in ("bookkeeping", "two_pass"):
        raise ValueError(f"mode must be 'bookkeeping' or 'two_pass'; got {mode!r}.")
    clipping.check_l2_norm_clip(l2_norm_clip)
    variables = list(variables)
    return variables, clipping.check_clip_groups(groups, len(variables))


def ghost_clipped_gradients(
    model,
    per_example_loss_fn: Callable[[], tf.Tensor],
    variables: Sequence,
    l2_norm_clip,
    num_microbatches: Optional[int] = None,
    *,
    mode: str = "bookkeeping",
    groups: Optional["clipping.ClipGroups"] = None,
) -> "clipping.ClippedGradients":
    """Clipped gradient sum via ghost norms (see module docstring).

    Args:
      model: the Keras model whose layers run inside ``per_example_loss_fn``.
      per_example_loss_fn: no-arg callable running the forward pass and
        returning the weighted per-example losses ``[batch]``.
      variables: the trainable variables to differentiate.
      l2_norm_clip: clipping bound C (> 0, may be ``inf``), L2 norm over all
        ``variables`` jointly.
      num_microbatches: must be None: records are examples (ghost norms of a
        keyed microbatch record do not add across chunks; ValueError).
      mode: ``"bookkeeping"`` or ``"two_pass"``.
      groups: None (one global clip) or a :class:`clipping.ClipGroups` for
        group-wise clipping (two-pass mode then runs one re-weighted backward
        pass per group).

    Returns:
      ``ClippedGradients(grad_sum, norms, num_records, num_nonfinite,
      rows_isolated)``: float32 sums and norms (+inf for an example dropped
      for a non-finite gradient, which contributes exactly 0).
    """
    variables, groups = _check_args(mode, l2_norm_clip, variables, groups)
    tf_vars = [as_tf_variable(v) for v in variables]
    npass = _norm_pass(model, per_example_loss_fn, variables, tf_vars, num_microbatches)
    num_records = tf.shape(npass.capture.losses)[0]
    norms, factors, assignment = clipping.clip_factors_by_group(
        npass.sq_terms, len(variables), num_records, l2_norm_clip, groups
    )
    # A non-finite example contributes exactly 0: its factor is 0 and its rows
    # are masked (tf.where), since 0 * NaN is NaN.
    finite = clipping.finite_records(norms)
    sums = (_two_pass_sums if mode == "two_pass" else _bookkeeping_sums)(npass, factors, assignment, finite)
    sums += [
        (i, tf.tensordot(factors[assignment[i]], clipping.mask_records(j, finite), axes=[[0], [0]]))
        for i, j in zip(npass.fallback, npass.jac)
    ]
    grad_sum: List[Optional[tf.Tensor]] = [None] * len(variables)
    for i, value in sums:
        value = tf.reshape(tf.cast(value, tf.float32), tf_vars[i].shape)
        grad_sum[i] = value if grad_sum[i] is None else grad_sum[i] + value
    result = [g if g is not None else tf.zeros(v.shape, tf.float32) for g, v in zip(grad_sum, tf_vars)]
    norms, dropped = clipping.dropped_records(norms)
    # Book-keeping sums are formed per row from captured tap pairs, so a NaN
    # stays in its own record; the jacobian fallback and the two-pass
    # backward pass mix rows (0 * NaN), so the caller must isolate them.
    isolated = mode != "two_pass" and not npass.fallback
    return clipping.ClippedGradients(result, norms, num_records, dropped, isolated)


def ghost_norms(
    model,
    per_example_loss_fn: Callable[[], tf.Tensor],
    variables: Sequence,
    num_microbatches: Optional[int] = None,
) -> tf.Tensor:
    """The norm pass alone: ``[batch]`` float32 per-example gradient norms over
    all ``variables`` jointly (NaN/inf for a non-finite gradient; arguments as
    in :func:`ghost_clipped_gradients`)."""
    variables = list(variables)
    tf_vars = [as_tf_variable(v) for v in variables]
    npass = _norm_pass(model, per_example_loss_fn, variables, tf_vars, num_microbatches)
    num_records = tf.shape(npass.capture.losses)[0]
    norms, _, _ = clipping.clip_factors_by_group(npass.sq_terms, len(variables), num_records, float("inf"))
    return norms


def bookkeeping_clipped_gradients(
    model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches=None, groups=None
):
    """``"ghost"``: book-keeping ghost clipping (single backward pass)."""
    return ghost_clipped_gradients(
        model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches, mode="bookkeeping", groups=groups
    )


def two_pass_clipped_gradients(model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches=None, groups=None):
    """``"ghost_two_pass"``: norms first, then re-weighted backward pass(es)."""
    return ghost_clipped_gradients(
        model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches, mode="two_pass", groups=groups
    )


clipping.register_clipping_impl("ghost", bookkeeping_clipped_gradients)
clipping.register_clipping_impl("ghost_two_pass", two_pass_clipped_gradients)
