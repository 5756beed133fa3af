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
round-off.

How the pairs are captured: see :mod:`ewtune_tf.mechanism.ghost_layers`
(``SUPPORTED_LAYERS`` lists the layers; Dense, EinsumDense, Embedding,
ReversibleEmbedding, LayerNormalization, KerasHub PositionEmbedding, including
LoRA-enabled Dense / EinsumDense / Embedding). Because the loss is a sum of
per-example losses and these layers do not mix examples, the gradient of the
summed loss w.r.t. a layer's output, restricted to row b, is example b's own
output gradient.

Per-record squared norm of a weight used as ``out = einsum(in, W)`` with
sequence-like axes ``t`` (in both input and output, not in the kernel):

* ghost: ``sum_{t,s} <a_t, a_s> <g_t, g_s>``, cost ~ ``T^2 (d_in + d_out)``;
* materialized: ``|| sum_t a_t g_t^T ||^2``, cost ~ ``T d_in d_out``;

the cheaper one is chosen per layer from static shapes (Bu et al.'s "mixed"
rule). Embedding tables use ``sum_{t,s} [id_t = id_s] <g_t, g_s>``.

Fallback, never silent skipping: any requested variable that is read by code
other than a patched layer call (an unsupported layer, a tied weight, a
quantized layer, ...) shows up in ``tape.watched_variables()``; its
per-record gradients are then computed with ``tape.jacobian`` (pfor) for those
variables only, and enter both the norms and the clipped sum. This keeps
correctness but is as slow as the vectorized path for the network below such a
variable.

Privacy note: in book-keeping mode the released sum is built from exactly the
per-record gradients whose norms were measured, so each record's contribution
is at most ``l2_norm_clip`` by construction.

Assumption: no layer couples examples (e.g. BatchNormalization in training
mode); with such a layer, per-example gradients themselves are ill-defined for
DP-SGD and every implementation here is wrong.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from ewtune_tf.mechanism import clipping, ghost_layers
from ewtune_tf.mechanism.ghost_layers import (
    SUPPORTED_LAYERS,
    EinsumTap,
    GatherTap,
    ReduceTap,
    as_tf_variable,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "ghost_clipped_gradients",
    "bookkeeping_clipped_gradients",
    "two_pass_clipped_gradients",
]

_LOG = logging.getLogger(__name__)

# When the sequence length is unknown at trace time, cost estimates assume it.
_ASSUMED_SEQ_LEN = 512
# Testing hook: None (cost-based choice), "ghost" or "materialize".
_FORCE_NORM_METHOD: Optional[str] = None


# --------------------------------------------------------------------------
# Record grouping (microbatches)
# --------------------------------------------------------------------------


def _group(x: tf.Tensor, k: int) -> tf.Tensor:
    """``[B, ...] -> [B // k, k, ...]`` (records of k consecutive examples)."""
    if k == 1:
        return x
    shape = tf.shape(x)
    new = tf.concat([[shape[0] // k, k], shape[1:]], axis=0)
    out = tf.reshape(x, new)
    if x.shape.rank is not None:
        b = x.shape[0]
        out.set_shape([b // k if b is not None else None, k] + x.shape.as_list()[1:])
    return out


def _group_equation_side(sub: str, new_letter: str) -> str:
    return sub[0] + new_letter + sub[1:]


# --------------------------------------------------------------------------
# Per-tap norms and clipped sums
# --------------------------------------------------------------------------


class _EinsumPlan:
    """Axis bookkeeping for an :class:`EinsumTap` (optionally grouped)."""

    def __init__(self, tap: EinsumTap, k: int):
        eq = tap.equation
        lhs, out = eq.split("->")
        inp, ker = lhs.split(",")
        a = tf.cast(tap.inputs, tf.float32)
        # Input axes neither in the kernel nor in the output are summed in the
        # forward pass; pre-sum them (grad = (sum_axis a) x g).
        in_only = [i for i, c in enumerate(inp) if i > 0 and c not in ker and c not in out]
        if in_only:
            a = tf.reduce_sum(a, axis=in_only)
            inp = "".join(c for i, c in enumerate(inp) if i not in in_only)
        self.a = a
        self.k = k
        if k > 1:
            m = ghost_layers._unused_letters(eq, 1)
            inp = _group_equation_side(inp, m)
            out = _group_equation_side(out, m)
            self.a = _group(self.a, k)
        self.inp, self.ker, self.out = inp, ker, out
        b = inp[0]
        self.b = b
        self.t = "".join(c for c in inp[1:] if c in out and c not in ker)
        self.s = "".join(c for c in ker if c in inp and c in out)
        self.k_in = "".join(c for c in ker if c in inp and c not in out)
        self.k_out = "".join(c for c in ker if c in out and c not in inp)
        self.var_shape = tap.weight_read.shape

    def _size(self, letters: str, sizes: Dict[str, Optional[int]], default: int) -> int:
        n = 1
        for c in letters:
            d = sizes.get(c)
            n *= d if d is not None else default
        return n

    def use_ghost(self, g: tf.Tensor) -> bool:
        sizes: Dict[str, Optional[int]] = {}
        for sub, t in ((self.inp, self.a), (self.out, g)):
            for c, d in zip(sub, t.shape.as_list()):
                if sizes.get(c) is None:
                    sizes[c] = d
        for c, d in zip(self.ker, self.var_shape):
            if sizes.get(c) is None:
                sizes[c] = d
        t = self._size(self.t, sizes, _ASSUMED_SEQ_LEN)
        kin = self._size(self.k_in, sizes, 1)
        kout = self._size(self.k_out, sizes, 1)
        if _FORCE_NORM_METHOD is not None:
            return _FORCE_NORM_METHOD == "ghost"
        # Ghost: T^2 (d_in + d_out) per S-slice; materialized: T d_in d_out.
        return t * (kin + kout) < kin * kout

    def sq_norms(self, g: tf.Tensor, ghost: bool) -> tuple:
        """Returns (squared norms [R], materialized per-record grads or None)."""
        g = _group(tf.cast(g, tf.float32), self.k)
        if ghost:
            tp = ghost_layers._unused_letters(self.inp + self.ker + self.out, len(self.t))
            ren = str.maketrans(self.t, tp) if self.t else None
            inp2 = self.inp.translate(ren) if ren else self.inp
            out2 = self.out.translate(ren) if ren else self.out
            res = f"{self.b}{self.s}{self.t}{tp}"
            ga = tf.einsum(f"{self.inp},{inp2}->{res}", self.a, self.a)
            gg = tf.einsum(f"{self.out},{out2}->{res}", g, g)
            sq = tf.reduce_sum(tf.reshape(ga * gg, [tf.shape(ga)[0], -1]), axis=1)
            return sq, None
        pe = tf.einsum(f"{self.inp},{self.out}->{self.b}{self.ker}", self.a, g)
        sq = tf.reduce_sum(tf.reshape(tf.square(pe), [tf.shape(pe)[0], -1]), axis=1)
        return sq, pe

    def weighted_sum(self, g: tf.Tensor, factors: tf.Tensor, pe: Optional[tf.Tensor]) -> tf.Tensor:
        if pe is not None:
            return tf.tensordot(factors, pe, axes=[[0], [0]])
        g = _group(tf.cast(g, tf.float32), self.k)
        rank = self.a.shape.rank
        scaled = self.a * tf.reshape(factors, [-1] + [1] * (rank - 1))
        return tf.einsum(f"{self.inp},{self.out}->{self.ker}", scaled, g)


def _gather_sq_norms(tap: GatherTap, g: tf.Tensor, k: int) -> tf.Tensor:
    g = tf.cast(g, tf.float32)
    dim = tf.shape(g)[-1]
    num_records = tf.shape(g)[0] // k
    ids = tf.reshape(tap.ids, [num_records, -1])
    rows = tf.reshape(g, [num_records, -1, dim])
    gram = tf.einsum("rnd,rmd->rnm", rows, rows)
    same = tf.equal(ids[:, :, None], ids[:, None, :])
    return tf.reduce_sum(tf.where(same, gram, tf.zeros_like(gram)), axis=[1, 2])


def _gather_weighted_sum(tap: GatherTap, g: tf.Tensor, factors: tf.Tensor, k: int) -> tf.Tensor:
    g = tf.cast(g, tf.float32)
    per_example = tf.repeat(factors, k) if k > 1 else factors
    rank = g.shape.rank
    scaled = g * tf.reshape(per_example, [-1] + [1] * (rank - 1))
    dim = tf.shape(g)[-1]
    return tf.math.unsorted_segment_sum(tf.reshape(scaled, [-1, dim]), tf.reshape(tap.ids, [-1]), tap.num_rows)


def _reduce_per_record(tap: ReduceTap, g: tf.Tensor, k: int) -> tf.Tensor:
    pe = tf.cast(tap.per_example(g), tf.float32)
    if k > 1:
        pe = tf.reduce_sum(_group(pe, k), axis=1)
    return pe


def _sq(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.reshape(tf.square(x), [tf.shape(x)[0], -1]), axis=1)


# --------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------


def _records_per_group(batch_size, num_microbatches: Optional[int]) -> tuple:
    """(1, 1.0): ghost records are examples.

    Keyed microbatch records (``ewtune_tf.mechanism.records``) are groups of
    the whole logical batch, accumulated over physical chunks before they are
    clipped; ghost norms of a group do not add across chunks, so ghost
    clipping refuses them (records of consecutive rows are not sound: adding
    one example shifts every later group).
    """
    del batch_size
    if num_microbatches is not None:
        raise ValueError(
            f"num_microbatches={num_microbatches!r}: ghost clipping forms per-example records only; use "
            "clipping='vectorized' or 'microbatch' for keyed microbatch records."
        )
    return 1, tf.constant(1.0)


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
      num_microbatches: None (per-example records) or the number of records of
        consecutive examples; a record loss is the mean of its examples.
      mode: ``"bookkeeping"`` or ``"two_pass"``.
      groups: None (one global clip) or a :class:`clipping.ClipGroups` for
        group-wise clipping (two-pass mode then runs one re-weighted backward
        pass per group).

    Returns:
      ``ClippedGradients(grad_sum, norms, num_records)``, all float32.
    """
    if mode not in ("bookkeeping", "two_pass"):
        raise ValueError(f"mode must be 'bookkeeping' or 'two_pass'; got {mode!r}.")
    clipping.check_l2_norm_clip(l2_norm_clip)
    variables = list(variables)
    groups = clipping.check_clip_groups(groups, len(variables))
    tf_vars = [as_tf_variable(v) for v in variables]
    two_pass = mode == "two_pass"

    with tf.GradientTape(persistent=True) as tape:
        rec = ghost_layers.Recorder(tape, variables, tf_vars)
        with ghost_layers.capture_layers(model, rec):
            losses = tf.cast(per_example_loss_fn(), tf.float32)
        if losses.shape.rank != 1:
            raise ValueError(
                f"per_example_loss_fn must return a [batch] vector of per-example losses; got shape {losses.shape}."
            )
        k, k_float = _records_per_group(losses.shape[0], num_microbatches)
        total = tf.reduce_sum(losses)
        records = losses if k == 1 else tf.reduce_mean(_group(losses, k), axis=1)

    # Variables read outside a patched call, or by more than one patched call
    # (a shared layer: the per-record gradient is then a sum of uses, whose
    # norm is not the sum of their norms): per-record gradients by jacobian.
    outside = {id(v) for v in tape.watched_variables()}
    tap_count: Dict[int, int] = {}
    for t in rec.taps:
        tap_count[t.var_index] = tap_count.get(t.var_index, 0) + 1
    fallback = [i for i, v in enumerate(tf_vars) if id(v) in outside or tap_count.get(i, 0) > 1]
    fallback_set = set(fallback)
    taps = [t for t in rec.taps if t.var_index not in fallback_set]
    if fallback:
        # Logged at trace time: correct, but as slow as the vectorized path.
        _LOG.warning(
            "ghost clipping: %d variable(s) are not covered by a supported layer "
            "(%s) and use the per-example jacobian fallback: %s",
            len(fallback),
            ", ".join(SUPPORTED_LAYERS),
            [getattr(variables[i], "path", getattr(variables[i], "name", str(i))) for i in fallback],
        )

    out_grads = (
        tape.gradient(
            total,
            [t.output for t in taps],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        if taps
        else []
    )
    out_grads = [tf.convert_to_tensor(g) for g in out_grads]

    inv_k2 = 1.0 / (k_float * k_float)
    sq_terms: List[tuple] = []  # (variable index, [R] squared norms)
    plans: List[object] = []
    for tap, g in zip(taps, out_grads):
        if isinstance(tap, EinsumTap):
            plan = _EinsumPlan(tap, k)
            ghost = plan.use_ghost(g)
            sq, pe = plan.sq_norms(g, ghost)
            plans.append((plan, pe))
        elif isinstance(tap, GatherTap):
            sq = _gather_sq_norms(tap, g, k)
            plans.append(None)
        elif isinstance(tap, ReduceTap):
            pe = _reduce_per_record(tap, g, k)
            sq = _sq(pe)
            plans.append(pe)
        else:  # pragma: no cover - defensive
            raise TypeError(f"unknown tap {tap!r}")
        sq_terms.append((tap.var_index, sq * inv_k2))

    jac = []
    if fallback:
        # A variable's total gradient is the sum over its raw reads inside
        # patched calls and its ordinary (auto-watched) reads elsewhere.
        sources, owner = [], []
        for i in fallback:
            sources.append(tf_vars[i])
            owner.append(i)
            for t in rec.taps:
                if t.var_index == i:
                    sources.append(t.weight_read)
                    owner.append(i)
        parts = tape.jacobian(
            records,
            sources,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=True,
        )
        per_var: Dict[int, tf.Tensor] = {}
        for i, j in zip(owner, parts):
            j = tf.cast(tf.convert_to_tensor(j), tf.float32)
            per_var[i] = j if i not in per_var else per_var[i] + j
        jac = [per_var[i] for i in fallback]
        sq_terms.extend((i, _sq(j)) for i, j in zip(fallback, jac))

    num_records = tf.shape(records)[0]
    norms, factors, assignment = clipping.clip_factors_by_group(
        sq_terms, len(variables), num_records, l2_norm_clip, groups
    )
    # A record with a non-finite norm contributes exactly 0: its factor is 0
    # and, since 0 * NaN is NaN, its rows of every tap are masked too.
    finite = clipping.finite_records(norms)

    grad_sum: List[Optional[tf.Tensor]] = [None] * len(variables)

    def add(i: int, value: tf.Tensor) -> None:
        value = tf.reshape(tf.cast(value, tf.float32), tf_vars[i].shape)
        grad_sum[i] = value if grad_sum[i] is None else grad_sum[i] + value

    scaled = [f / k_float for f in factors]  # per group: factor / examples per record
    if two_pass:
        # One re-weighted backward pass per clip group (a single pass under
        # global clipping), each restricted to the taps of its group.
        members: Dict[int, List[int]] = {}
        for n, tap in enumerate(taps):
            members.setdefault(assignment[tap.var_index], []).append(n)
        for grp, ns in members.items():
            weights = tf.repeat(scaled[grp], k) if k > 1 else scaled[grp]
            with tape:
                weighted = tf.reduce_sum(losses * weights)
            grads = tape.gradient(
                weighted, [taps[n].weight_read for n in ns], unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            for n, gr in zip(ns, grads):
                add(taps[n].var_index, tf.convert_to_tensor(gr))
    else:
        for tap, g, plan in zip(taps, out_grads, plans):
            sc = scaled[assignment[tap.var_index]]
            g = clipping.mask_records(g, finite)
            if isinstance(tap, EinsumTap):
                p, pe = plan
                if pe is None:
                    p.a = clipping.mask_records(p.a, finite)
                else:
                    pe = clipping.mask_records(pe, finite)
                add(tap.var_index, p.weighted_sum(g, sc, pe))
            elif isinstance(tap, GatherTap):
                add(tap.var_index, _gather_weighted_sum(tap, g, sc, k))
            else:
                add(tap.var_index, tap.expand(tf.tensordot(sc, clipping.mask_records(plan, finite), axes=[[0], [0]])))
    # Fallback variables: the clipped sum of their jacobian rows (the records
    # already include the 1/k of a microbatch mean).
    for i, j in zip(fallback, jac):
        add(i, tf.tensordot(factors[assignment[i]], clipping.mask_records(j, finite), axes=[[0], [0]]))
    del tape

    result = [g if g is not None else tf.zeros(v.shape, tf.float32) for g, v in zip(grad_sum, tf_vars)]
    norms, dropped = clipping.dropped_records(norms)
    # Book-keeping sums are formed per row from captured tap pairs, so a NaN
    # stays in its own record; the jacobian fallback and the two-pass
    # backward pass mix rows (0 * NaN), so the caller must isolate them.
    isolated = not two_pass and not fallback
    return clipping.ClippedGradients(result, norms, num_records, dropped, isolated)


def bookkeeping_clipped_gradients(
    model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches=None, groups=None
):
    """``"ghost"``: book-keeping ghost clipping (single backward pass)."""
    return ghost_clipped_gradients(
        model,
        per_example_loss_fn,
        variables,
        l2_norm_clip,
        num_microbatches,
        mode="bookkeeping",
        groups=groups,
    )


def two_pass_clipped_gradients(model, per_example_loss_fn, variables, l2_norm_clip, num_microbatches=None, groups=None):
    """``"ghost_two_pass"``: norms first, then re-weighted backward pass(es)."""
    return ghost_clipped_gradients(
        model,
        per_example_loss_fn,
        variables,
        l2_norm_clip,
        num_microbatches,
        mode="two_pass",
        groups=groups,
    )


clipping.register_clipping_impl("ghost", bookkeeping_clipped_gradients)
clipping.register_clipping_impl("ghost_two_pass", two_pass_clipped_gradients)
