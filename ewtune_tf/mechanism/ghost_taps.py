"""Taps: what ghost clipping records about one use of a weight, and the
per-record math on it.

A *tap* is recorded by a ghost rule (:mod:`ewtune_tf.mechanism.ghost_rules`)
while the layer runs. It pairs a watched tensor ``output`` -- the tensor the
weight feeds, before any nonlinearity -- with what is needed to form the
per-record gradients of the weight from ``g = dL/d output``. Because the loss
is a sum of per-example losses and the layers do not mix examples, row b of
``g`` is example b's own output gradient.

Records are examples. Every tap kind answers two questions:

* ``norm_pass(g) -> (sq, state)``: the ``[B]`` squared norms of the
  per-example gradients of its weight, plus whatever the sum needs again;
* ``clipped_sum(g, factors, state, finite)``: ``sum_b factors[b] * grad_b``
  over the examples whose ``finite[b]`` is True, in the weight's shape (or a
  shape with the same number of elements). The other examples' rows are
  zeroed with ``tf.where`` first, since ``0 * NaN`` is NaN (their factor is 0).

Kinds:

* :class:`EinsumTap` -- ``output = einsum(equation, inputs, weight)`` (dense
  and attention kernels, LoRA factors). Norms by the ghost identity
  ``sum_{t,s} <a_t, a_s> <g_t, g_s>`` (cost ~ ``T^2 (d_in + d_out)``) or by
  materializing ``sum_t a_t g_t^T`` (cost ~ ``T d_in d_out``), whichever is
  cheaper (Bu et al.'s mixed rule). When the sequence length T is only known
  at run time (dynamic padding), the choice is made at run time from the
  actual T, with ``tf.cond``.
* :class:`GatherTap` -- ``output = take(weight, ids)`` (embedding tables):
  norms ``sum_{t,s} [id_t = id_s] <g_t, g_s>``; sum by segment sum over ids.
* :class:`ReduceTap` -- the per-example gradient is a cheap function of
  ``g`` (biases, LayerNormalization, position tables): it is materialized.

All math is float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf

from ewtune_tf.mechanism.clipping import mask_records

# Testing hook: None (cost-based choice), "ghost" or "materialize".
_FORCE_NORM_METHOD: Optional[str] = None


def unused_letters(used: str, n: int) -> str:
    """``n`` einsum letters that do not occur in ``used``."""
    free = [c for c in string.ascii_letters if c not in used]
    if len(free) < n:
        raise ValueError("einsum equation uses too many letters")
    return "".join(free[:n])


def sq_norms(x: tf.Tensor) -> tf.Tensor:
    """``[B]`` squared L2 norms of a per-example tensor ``[B, ...]``."""
    return tf.reduce_sum(tf.reshape(tf.square(x), [tf.shape(x)[0], -1]), axis=1)


def _f32(t: tf.Tensor) -> tf.Tensor:
    return tf.cast(t, tf.float32)


@dataclasses.dataclass
class Tap:
    """Base of the tap kinds: the weight's index among the clipped variables,
    the watched ``output`` and the raw read of the weight (``weight_read``,
    differentiated by two-pass clipping and the jacobian fallback)."""

    var_index: int
    output: tf.Tensor
    weight_read: tf.Tensor

    def norm_pass(self, g: tf.Tensor) -> Tuple[tf.Tensor, object]:
        raise NotImplementedError

    def clipped_sum(self, g: tf.Tensor, factors: tf.Tensor, state: object, finite: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


@dataclasses.dataclass
class EinsumTap(Tap):
    """Weight used as ``output = einsum(equation, inputs, weight)``.

    ``equation`` is explicit (no ellipsis), its first input letter is the batch
    axis, and every kernel letter occurs in the input or the output.
    """

    equation: str
    inputs: tf.Tensor

    def norm_pass(self, g):
        plan = _EinsumPlan(self)
        g = _f32(g)
        method = plan.norm_method(g)
        if isinstance(method, str):
            if method == "ghost":
                return plan.ghost_sq(g), (plan, None)
            pe = plan.per_example(g)
            return sq_norms(pe), (plan, pe)
        # Length known only at run time: choose per call; the sum then never
        # reuses materialized gradients (they would have to leave the cond).
        sq = tf.cond(method, lambda: plan.ghost_sq(g), lambda: sq_norms(plan.per_example(g)))
        return sq, (plan, None)

    def clipped_sum(self, g, factors, state, finite):
        plan, pe = state
        if pe is not None:  # materialized per-example gradients
            return tf.tensordot(factors, mask_records(pe, finite), axes=[[0], [0]])
        a = mask_records(plan.a, finite)
        scaled = a * tf.reshape(factors, [-1] + [1] * (a.shape.rank - 1))
        return tf.einsum(f"{plan.inp},{plan.out}->{plan.ker}", scaled, mask_records(_f32(g), finite))


class _EinsumPlan:
    """Axis bookkeeping of an :class:`EinsumTap`.

    Letters: ``b`` batch (example), ``t`` sequence-like axes (input and output,
    not kernel), ``s`` axes shared by all three (weight slices), ``k_in`` /
    ``k_out`` kernel axes also in the input / output only.
    """

    def __init__(self, tap: EinsumTap):
        lhs, out = tap.equation.split("->")
        inp, ker = lhs.split(",")
        a = _f32(tap.inputs)
        # Input axes in neither the kernel nor the output are summed in the
        # forward pass; pre-sum them (grad = (sum_axis a) x g).
        in_only = [i for i, c in enumerate(inp) if i > 0 and c not in ker and c not in out]
        if in_only:
            a = tf.reduce_sum(a, axis=in_only)
            inp = "".join(c for i, c in enumerate(inp) if i not in in_only)
        self.a, self.inp, self.ker, self.out = a, inp, ker, out
        self.b = inp[0]
        self.t = "".join(c for c in inp[1:] if c in out and c not in ker)
        self.s = "".join(c for c in ker if c in inp and c in out)
        self.k_in = "".join(c for c in ker if c in inp and c not in out)
        self.k_out = "".join(c for c in ker if c in out and c not in inp)
        self.kernel_sizes = dict(zip(ker, tap.weight_read.shape.as_list()))

    def _t_size(self, g: tf.Tensor) -> Union[int, tf.Tensor]:
        """Product of the sequence-like axes: a Python int if static."""
        static, dynamic = 1, []
        for c in self.t:
            pos = self.inp.index(c)
            d = self.a.shape[pos]
            if d is None:
                d = g.shape[self.out.index(c)]
            if d is None:
                dynamic.append(tf.shape(self.a)[pos])
            else:
                static *= d
        if not dynamic:
            return static
        return static * tf.reduce_prod(tf.stack(dynamic))

    def norm_method(self, g: tf.Tensor) -> Union[str, tf.Tensor]:
        """``"ghost"`` / ``"materialize"``, or a bool tensor (True: ghost)."""
        if _FORCE_NORM_METHOD is not None:
            return _FORCE_NORM_METHOD
        kin = _prod(self.kernel_sizes[c] for c in self.k_in)
        kout = _prod(self.kernel_sizes[c] for c in self.k_out)
        t = self._t_size(g)
        # Per weight slice: ghost ~ T^2 (d_in + d_out), materialized ~ T d_in d_out.
        if isinstance(t, int):
            return "ghost" if t * (kin + kout) < kin * kout else "materialize"
        return tf.cast(t, tf.int64) * (kin + kout) < kin * kout

    def ghost_sq(self, g: tf.Tensor) -> tf.Tensor:
        tp = unused_letters(self.inp + self.ker + self.out, len(self.t))
        ren = str.maketrans(self.t, tp) if self.t else None
        inp2 = self.inp.translate(ren) if ren else self.inp
        out2 = self.out.translate(ren) if ren else self.out
        res = f"{self.b}{self.s}{self.t}{tp}"
        ga = tf.einsum(f"{self.inp},{inp2}->{res}", self.a, self.a)
        gg = tf.einsum(f"{self.out},{out2}->{res}", g, g)
        return tf.reduce_sum(tf.reshape(ga * gg, [tf.shape(ga)[0], -1]), axis=1)

    def per_example(self, g: tf.Tensor) -> tf.Tensor:
        return tf.einsum(f"{self.inp},{self.out}->{self.b}{self.ker}", self.a, g)


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


@dataclasses.dataclass
class GatherTap(Tap):
    """Weight used as ``output = take(weight, ids, axis=0)`` (an embedding
    table); ``ids`` is ``[B, ...]`` int, ``output`` is ``[B, ..., dim]``."""

    ids: tf.Tensor
    num_rows: int

    def norm_pass(self, g):
        g = _f32(g)
        dim = tf.shape(g)[-1]
        batch = tf.shape(g)[0]
        ids = tf.reshape(self.ids, [batch, -1])
        rows = tf.reshape(g, [batch, -1, dim])
        gram = tf.einsum("rnd,rmd->rnm", rows, rows)
        same = tf.equal(ids[:, :, None], ids[:, None, :])
        return tf.reduce_sum(tf.where(same, gram, tf.zeros_like(gram)), axis=[1, 2]), None

    def clipped_sum(self, g, factors, state, finite):
        g = mask_records(_f32(g), finite)
        scaled = g * tf.reshape(factors, [-1] + [1] * (g.shape.rank - 1))
        dim = tf.shape(g)[-1]
        return tf.math.unsorted_segment_sum(tf.reshape(scaled, [-1, dim]), tf.reshape(self.ids, [-1]), self.num_rows)


def _identity(x):
    return x


@dataclasses.dataclass
class ReduceTap(Tap):
    """Weight whose per-example gradient is a cheap function of ``g``.

    ``per_example(g)`` returns ``[B, ...]`` per-example gradients in a compact
    layout whose squared entries sum to the squared gradient norm;
    ``expand(x)`` maps a summed compact gradient to the weight's shape.
    """

    per_example: Callable[[tf.Tensor], tf.Tensor]
    expand: Callable[[tf.Tensor], tf.Tensor] = _identity

    def norm_pass(self, g):
        pe = _f32(self.per_example(g))
        return sq_norms(pe), pe

    def clipped_sum(self, g, factors, state, finite):
        return self.expand(tf.tensordot(factors, mask_records(state, finite), axes=[[0], [0]]))
