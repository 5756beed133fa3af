"""Capturing layer inputs and output gradients for ghost clipping.

This module knows how each supported Keras 3 layer uses its weights. While a
:func:`capture_layers` context is active, every supported layer that owns at
least one of the requested trainable variables has its ``call`` replaced (on
the instance only) by an equivalent computation that

1. reads its weights through a raw ``ReadVariableOp`` (so the gradient tape
   does *not* mark them as accessed; any other read of the same variable is
   then visible in ``tape.watched_variables()`` and forces the fallback),
2. computes the layer's pre-activation output(s) explicitly, watches them on
   the tape, and
3. records a *tap*: everything needed to form the per-example gradient of each
   weight from the gradient of the loss with respect to the watched tensor.

Supported layers (``SUPPORTED_LAYERS``), with the kind of tap:

* ``keras.layers.Dense`` -- kernel: einsum tap; bias: reduce tap; LoRA
  (``enable_lora``): ``lora_kernel_a`` / ``lora_kernel_b`` einsum taps.
* ``keras.layers.EinsumDense`` (attention projections) -- same as Dense, for
  any equation whose first input axis is the batch axis and that does not use
  the batch axis in the kernel.
* ``keras.layers.Embedding`` and ``ReversibleEmbedding`` (Keras and KerasHub,
  forward direction) -- embeddings: gather tap (sparse, by token ids); LoRA
  ``lora_embeddings_a`` gather tap and ``lora_embeddings_b`` einsum tap.
* ``keras.layers.LayerNormalization`` (normalization axes exclude the batch
  axis; ``rms_scaling`` included) -- gamma / beta: reduce taps.
* ``keras_hub.layers.PositionEmbedding`` (``positions=None``) -- position
  table: reduce tap on the used slice.

A layer outside this list, a quantized layer, a ReversibleEmbedding used in
reverse, or any unusual configuration runs its original ``call``; its
trainable variables are then read normally, show up as accessed on the tape
and are handled by the vectorized fallback in :mod:`ewtune_tf.mechanism.ghost`.
Nothing is ever silently left unclipped.

Every layer here acts on each example independently (no cross-example
statistics), which is what makes ``dL/dz_b`` (gradient of the summed loss
w.r.t. example b's pre-activation) equal to example b's own output gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import string
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import keras
import tensorflow as tf
from tensorflow.python.ops import gen_resource_variable_ops

SUPPORTED_LAYERS = (
    "Dense",
    "EinsumDense",
    "Embedding",
    "ReversibleEmbedding",
    "LayerNormalization",
    "PositionEmbedding (keras_hub)",
)


# --------------------------------------------------------------------------
# Taps
# --------------------------------------------------------------------------


@dataclasses.dataclass
class EinsumTap:
    """Weight used as ``out = einsum(equation, inputs, weight)``.

    ``equation`` is explicit (no ellipsis) and its first input letter is the
    batch axis. The per-example gradient of the weight is
    ``einsum(f"{in},{out}->{b}{kernel}", inputs, dL/dout)``.
    """

    var_index: int
    equation: str
    inputs: tf.Tensor
    output: tf.Tensor  # watched
    weight_read: tf.Tensor  # the raw read of the variable (for two-pass)


@dataclasses.dataclass
class GatherTap:
    """Weight used as ``out = take(weight, ids, axis=0)`` (an embedding table).

    ``ids`` is ``[B, ...]`` int, ``output`` is ``[B, ..., dim]``.
    """

    var_index: int
    ids: tf.Tensor
    output: tf.Tensor  # watched
    num_rows: int
    weight_read: tf.Tensor


@dataclasses.dataclass
class ReduceTap:
    """Weight whose per-example gradient is a cheap function of ``dL/dout``.

    ``per_example(g)`` returns ``[B, ...]`` per-example gradients in a compact
    layout whose squared entries sum to the squared gradient norm, and
    ``expand(x)`` maps a (batch-summed) compact gradient to the weight shape.
    Used for biases, LayerNormalization gamma/beta and position tables.
    """

    var_index: int
    output: tf.Tensor  # watched
    per_example: Callable[[tf.Tensor], tf.Tensor]
    expand: Callable[[tf.Tensor], tf.Tensor]
    weight_read: tf.Tensor


Tap = object  # EinsumTap | GatherTap | ReduceTap


class Recorder:
    """Collects taps during one forward pass under ``tape``."""

    def __init__(self, tape: tf.GradientTape, variables: Sequence, tf_variables: Sequence):
        self.tape = tape
        self.taps: List[Tap] = []
        self._index: Dict[int, int] = {id(v): i for i, v in enumerate(tf_variables)}
        self._tf_variables = list(tf_variables)

    def index_of(self, keras_var) -> Optional[int]:
        """Position of ``keras_var`` in the requested variables, or None."""
        if keras_var is None:
            return None
        return self._index.get(id(as_tf_variable(keras_var)))

    def wants_any(self, *keras_vars) -> bool:
        return any(self.index_of(v) is not None for v in keras_vars)

    def read(self, keras_var, dtype=None) -> tf.Tensor:
        """Reads a variable without registering an access on any tape."""
        v = as_tf_variable(keras_var)
        value = gen_resource_variable_ops.read_variable_op(v.handle, v.dtype)
        if dtype is not None and value.dtype != dtype:
            value = tf.cast(value, dtype)
        # Watched so that gradients w.r.t. this use of the weight can be taken
        # (two-pass mode, jacobian fallback); in graph mode the unused weight
        # gradients of the norm pass are pruned.
        self.tape.watch(value)
        return value

    def watch(self, t: tf.Tensor) -> tf.Tensor:
        self.tape.watch(t)
        return t

    def add(self, tap: Tap) -> None:
        self.taps.append(tap)


def as_tf_variable(v):
    """The ``tf.Variable`` behind a Keras 3 variable (or ``v`` itself)."""
    if isinstance(v, tf.Variable):
        return v
    inner = getattr(v, "_value", None)
    if isinstance(inner, tf.Variable):
        return inner
    inner = getattr(v, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"Cannot find the tf.Variable behind {v!r}.")


# --------------------------------------------------------------------------
# Einsum helpers
# --------------------------------------------------------------------------


def _unused_letters(used: str, n: int) -> str:
    free = [c for c in string.ascii_letters if c not in used]
    if len(free) < n:
        raise ValueError("einsum equation uses too many letters")
    return "".join(free[:n])


def expand_ellipsis(equation: str, input_rank: int) -> Optional[str]:
    """Rewrites an EinsumDense equation without ``...``; None if unsupported."""
    equation = equation.replace(" ", "")
    try:
        lhs, out = equation.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return None
    if "..." in ker:
        return None
    if "..." in inp:
        n = input_rank - (len(inp) - 3)
        if n < 0:
            return None
        fill = _unused_letters(inp + ker + out, n)
        inp = inp.replace("...", fill)
        if "..." in out:
            out = out.replace("...", fill)
        else:
            return None
    elif "..." in out:
        return None
    if len(inp) != input_rank:
        return None
    return f"{inp},{ker}->{out}"


def einsum_supported(equation: str) -> bool:
    """True if per-example gradients of the kernel follow from (in, dL/dout)."""
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    if not inp or not out:
        return False
    b = inp[0]
    if out[0] != b or b in ker or b in inp[1:] or b in out[1:]:
        return False
    if len(set(inp)) != len(inp) or len(set(ker)) != len(ker) or len(set(out)) != len(out):
        return False
    # A kernel axis that is summed in the forward pass (in neither the input
    # nor the output) would need a broadcast gradient; not supported.
    return all(c in inp or c in out for c in ker)


# --------------------------------------------------------------------------
# Patched layer calls
# --------------------------------------------------------------------------


def _apply_activation(layer, z):
    act = getattr(layer, "activation", None)
    return act(z) if act is not None else z


def _broadcast_reducer(out_rank: int, bias_shape: Sequence[int]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Per-example gradient of a bias broadcast (trailing-aligned) to outputs."""
    bias_shape = list(bias_shape)
    lead = list(range(1, out_rank - len(bias_shape)))

    def reduce(g: tf.Tensor) -> tf.Tensor:
        x = tf.reduce_sum(g, axis=lead) if lead else g
        # Remaining axes: batch + trailing bias axes; sum where the bias is 1.
        keep_axes = [i + 1 for i, d in enumerate(bias_shape) if d == 1]
        if keep_axes:
            x = tf.reduce_sum(x, axis=keep_axes, keepdims=True)
        return x

    return reduce


def _identity(x):
    return x


def _add_bias(layer, rec: Recorder, z: tf.Tensor, bias_var) -> tf.Tensor:
    """Adds a (possibly tapped) bias; returns the tensor to activate."""
    if bias_var is None:
        return z
    idx = rec.index_of(bias_var)
    b = rec.read(bias_var, z.dtype)
    z = z + b
    if idx is not None:
        z = rec.watch(z)
        rec.add(ReduceTap(idx, z, _broadcast_reducer(len(z.shape), b.shape), _identity, b))
    return z


def _linear_with_lora(layer, rec: Recorder, x: tf.Tensor, equation: str, kernel_var) -> tf.Tensor:
    """``einsum(equation, x, kernel [+ lora])`` with taps for tapped weights."""
    lora = bool(getattr(layer, "lora_enabled", False))
    w = rec.read(kernel_var, x.dtype)
    z = tf.einsum(equation, x, w)
    k_idx = rec.index_of(kernel_var)
    if k_idx is not None:
        z = rec.watch(z)
        rec.add(EinsumTap(k_idx, equation, x, z, w))
    if lora:
        lhs, out = equation.split("->")
        inp, ker = lhs.split(",")
        last = ker[-1]
        r = _unused_letters(equation, 1)
        eq_a = f"{inp},{ker[:-1]}{r}->{out.replace(last, r)}"
        eq_b = f"{out.replace(last, r)},{r}{last}->{out}"
        scale = layer.lora_alpha / layer.lora_rank
        a = rec.read(layer.lora_kernel_a, x.dtype)
        bmat = rec.read(layer.lora_kernel_b, x.dtype)
        u = tf.einsum(eq_a, x, a)
        a_idx = rec.index_of(layer.lora_kernel_a)
        if a_idx is not None:
            u = rec.watch(u)
            rec.add(EinsumTap(a_idx, eq_a, x, u, a))
        # Fold the LoRA scale into v so that dL/dv is the B factor's output
        # gradient up to that scale: v = einsum(u, scale * B).
        v = tf.einsum(eq_b, u, bmat * tf.cast(scale, x.dtype))
        b_idx = rec.index_of(layer.lora_kernel_b)
        if b_idx is not None:
            v = rec.watch(v)
            # d(loss)/dB = scale * u^T dL/dv: feed scale * u as the input.
            rec.add(EinsumTap(b_idx, eq_b, u * tf.cast(scale, x.dtype), v, bmat))
        z = z + v
    return z


def _lora_ok(layer, equation: str) -> bool:
    if not getattr(layer, "lora_enabled", False):
        return True
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    return ker[-1] not in inp and ker[-1] in out


def _plain_quantization(layer) -> bool:
    return getattr(layer, "quantization_mode", None) is None


def _layer_vars(layer, names: Sequence[str]) -> list:
    return [getattr(layer, n, None) for n in names]


def _dense_call(layer, rec: Recorder, original):
    def call(inputs, *args, **kwargs):
        x = inputs
        if not (
            _plain_quantization(layer) and isinstance(x, tf.Tensor) and x.shape.rank is not None and x.shape.rank >= 2
        ):
            return original(inputs, *args, **kwargs)
        rank = x.shape.rank
        letters = _unused_letters("", rank + 1)
        eq = f"{letters[:rank]},{letters[rank - 1]}{letters[rank]}->{letters[: rank - 1]}{letters[rank]}"
        if not _lora_ok(layer, eq):
            return original(inputs, *args, **kwargs)
        z = _linear_with_lora(layer, rec, x, eq, layer._kernel)
        z = _add_bias(layer, rec, z, layer.bias)
        return _apply_activation(layer, z)

    return call


def _einsum_dense_call(layer, rec: Recorder, original):
    def call(inputs, *args, **kwargs):
        x = inputs
        if not (_plain_quantization(layer) and isinstance(x, tf.Tensor) and x.shape.rank is not None):
            return original(inputs, *args, **kwargs)
        eq = expand_ellipsis(layer.equation, x.shape.rank)
        if eq is None or not einsum_supported(eq) or not _lora_ok(layer, eq):
            return original(inputs, *args, **kwargs)
        z = _linear_with_lora(layer, rec, x, eq, layer._kernel)
        z = _add_bias(layer, rec, z, layer.bias)
        return _apply_activation(layer, z)

    return call


def _embedding_call(layer, rec: Recorder, original):
    def call(inputs, *args, **kwargs):
        if (
            args
            or kwargs.get("reverse", False)
            or not _plain_quantization(layer)
            # Keras's ReversibleEmbedding attaches its mask inside `call`.
            or (getattr(layer, "mask_zero", False) and type(layer).call is not keras.layers.Embedding.call)
        ):
            return original(inputs, *args, **kwargs)
        if not isinstance(inputs, tf.Tensor) or inputs.shape.rank is None:
            return original(inputs, *args, **kwargs)
        ids = inputs
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        table_var = layer._embeddings
        e = rec.read(table_var)
        dtype = tf.as_dtype(layer.compute_dtype)
        z = tf.cast(tf.gather(e, ids), dtype)
        idx = rec.index_of(table_var)
        if idx is not None:
            z = rec.watch(z)
            rec.add(GatherTap(idx, ids, z, int(e.shape[0]), e))
        if getattr(layer, "lora_enabled", False):
            scale = layer.lora_alpha / layer.lora_rank
            a = rec.read(layer.lora_embeddings_a)
            bmat = rec.read(layer.lora_embeddings_b)
            u = tf.cast(tf.gather(a, ids), dtype)
            a_idx = rec.index_of(layer.lora_embeddings_a)
            if a_idx is not None:
                u = rec.watch(u)
                rec.add(GatherTap(a_idx, ids, u, int(a.shape[0]), a))
            rank = ids.shape.rank
            letters = _unused_letters("", rank + 2)
            eq = f"{letters[: rank + 1]},{letters[rank]}{letters[rank + 1]}->{letters[:rank]}{letters[rank + 1]}"
            sb = tf.cast(bmat, dtype) * tf.cast(scale, dtype)
            v = tf.einsum(eq, u, sb)
            b_idx = rec.index_of(layer.lora_embeddings_b)
            if b_idx is not None:
                v = rec.watch(v)
                rec.add(EinsumTap(b_idx, eq, u * tf.cast(scale, dtype), v, bmat))
            z = z + v
        return z

    return call


def _layer_norm_call(layer, rec: Recorder, original):
    def call(inputs, *args, **kwargs):
        x = inputs
        if args or kwargs or not isinstance(x, tf.Tensor) or x.shape.rank is None:
            return original(inputs, *args, **kwargs)
        rank = x.shape.rank
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        axes = sorted(a % rank for a in axes)
        if 0 in axes:  # normalizing across the batch couples examples
            return original(inputs, *args, **kwargs)
        rms = bool(getattr(layer, "rms_scaling", False))
        # Keras's own op with gamma=beta=None gives exactly its normalization.
        # (Computed in float32 whatever the compute dtype, as Keras does.)
        x32 = tf.cast(x, tf.float32)
        if rms:
            xhat = keras.ops.layer_normalization(x32, None, None, axes, layer.epsilon, rms_scaling=True)
        else:
            xhat = keras.ops.layer_normalization(x32, None, None, axes, layer.epsilon)
        xhat = tf.convert_to_tensor(xhat)
        bshape = [1] * rank
        for a in axes:
            bshape[a] = x.shape[a]
        other = [i for i in range(1, rank) if i not in axes]

        def to_param(t):  # [B, ...] -> [B, *param_shape]
            t = tf.reduce_sum(t, axis=other) if other else t
            return t

        out = xhat
        gamma_var = layer.gamma if getattr(layer, "scale", True) else None
        beta_var = layer.beta if (getattr(layer, "center", True) and not rms) else None
        if gamma_var is not None:
            gamma = rec.read(gamma_var, xhat.dtype)
            out = out * tf.reshape(gamma, bshape)
            g_idx = rec.index_of(gamma_var)
            if g_idx is not None:
                out = rec.watch(out)
                # d out / d gamma = xhat (elementwise), so per-example grad
                # of gamma is sum over non-normalized axes of g * xhat.
                xh = xhat
                rec.add(
                    ReduceTap(
                        g_idx,
                        out,
                        (lambda g, xh=xh: to_param(tf.cast(g, tf.float32) * tf.cast(xh, tf.float32))),
                        (lambda s, shp=tuple(gamma.shape): tf.reshape(s, shp)),
                        gamma,
                    )
                )
        if beta_var is not None:
            beta = rec.read(beta_var, out.dtype)
            out = out + tf.reshape(beta, bshape)
            b_idx = rec.index_of(beta_var)
            if b_idx is not None:
                out = rec.watch(out)
                rec.add(
                    ReduceTap(
                        b_idx,
                        out,
                        (lambda g: to_param(tf.cast(g, tf.float32))),
                        (lambda s, shp=tuple(beta.shape): tf.reshape(s, shp)),
                        beta,
                    )
                )
        return tf.cast(out, layer.compute_dtype)

    return call


def _position_embedding_call(layer, rec: Recorder, original):
    def call(inputs, start_index=0, positions=None, **kwargs):
        if positions is not None or kwargs or not isinstance(inputs, tf.Tensor):
            return original(inputs, start_index=start_index, positions=positions, **kwargs)
        table_var = layer.position_embeddings
        table = rec.read(table_var)
        shape = tf.shape(inputs)
        seq_len, feat = shape[-2], shape[-1]
        used = tf.slice(table, tf.stack([start_index, 0]), tf.stack([seq_len, feat]))
        z = tf.broadcast_to(tf.cast(used, inputs.dtype), shape)
        idx = rec.index_of(table_var)
        if idx is not None:
            z = rec.watch(z)
            rank = inputs.shape.rank
            num_rows = int(table.shape[0])

            def per_example(g, rank=rank):
                # [B, ..., T, D] -> [B, T, D]: the table slice is broadcast
                # over any middle axes.
                g = tf.cast(g, tf.float32)
                return tf.reduce_sum(g, axis=list(range(1, rank - 2))) if rank > 3 else g

            def expand(s, start=start_index, n=num_rows):
                t = tf.shape(s)[0]
                return tf.pad(s, [[start, n - start - t], [0, 0]])

            rec.add(ReduceTap(idx, z, per_example, expand, table))
        return z

    return call


def _patch_factory(layer) -> Optional[Callable]:
    """The patched-call factory for ``layer``, or None if not supported."""
    cls = type(layer)
    L = keras.layers
    if isinstance(layer, L.EinsumDense) and cls.call is L.EinsumDense.call:
        return _einsum_dense_call
    if isinstance(layer, L.Dense) and cls.call is L.Dense.call:
        return _dense_call
    if isinstance(layer, L.LayerNormalization) and cls.call is L.LayerNormalization.call:
        return _layer_norm_call
    if isinstance(layer, L.Embedding):
        if cls.call is L.Embedding.call or cls.call in _reversible_embedding_calls():
            return _embedding_call
        return None
    pe = _position_embedding_class()
    if pe is not None and isinstance(layer, pe) and cls.call is pe.call:
        return _position_embedding_call
    return None


def _reversible_embedding_calls() -> tuple:
    calls = []
    rev = getattr(keras.layers, "ReversibleEmbedding", None)
    if rev is not None:
        calls.append(rev.call)
    try:
        from keras_hub.src.layers.modeling import reversible_embedding as khr

        calls.append(khr.ReversibleEmbedding.call)
    except Exception:  # keras_hub is optional
        pass
    return tuple(calls)


def _position_embedding_class():
    try:
        from keras_hub.src.layers.modeling.position_embedding import PositionEmbedding

        return PositionEmbedding
    except Exception:  # keras_hub is optional
        return None


def _all_layers(model) -> list:
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=True, recursive=True))
    return [model]


# Patches are shared between threads: tf.distribute.MirroredStrategy traces
# one replica function per device in parallel threads on the *same* layer
# objects. A layer is patched once (reference counted, under a lock) with a
# dispatcher that uses the calling thread's active Recorder, and the
# original ``call`` when that thread has none.
_LOCK = threading.Lock()
_PATCHED: Dict[int, list] = {}  # id(layer) -> [layer, had_instance_call, original, count]
_TLS = threading.local()


def _dispatcher(layer, factory, original):
    def call(*args, **kwargs):
        rec = getattr(_TLS, "recorder", None)
        if rec is None or not rec.wants_any(*layer.trainable_weights):
            return original(*args, **kwargs)
        return factory(layer, rec, original)(*args, **kwargs)

    return call


@contextlib.contextmanager
def capture_layers(model, rec: Recorder) -> Iterator[None]:
    """Routes supported layers of ``model`` that own a requested variable
    through their tapped implementation, for calls made by this thread."""
    installed = []
    previous = getattr(_TLS, "recorder", None)
    _TLS.recorder = rec
    try:
        with _LOCK:
            for layer in _all_layers(model):
                factory = _patch_factory(layer)
                if factory is None or not rec.wants_any(*layer.trainable_weights):
                    continue
                entry = _PATCHED.get(id(layer))
                if entry is None:
                    had = "call" in layer.__dict__
                    original = layer.call
                    object.__setattr__(layer, "call", _dispatcher(layer, factory, original))
                    entry = _PATCHED[id(layer)] = [layer, had, original, 0]
                entry[3] += 1
                installed.append(id(layer))
        yield
    finally:
        _TLS.recorder = previous
        with _LOCK:
            for key in reversed(installed):
                entry = _PATCHED[key]
                entry[3] -= 1
                if entry[3] == 0:
                    layer, had, original, _ = entry
                    if had:
                        object.__setattr__(layer, "call", original)
                    else:
                        object.__delattr__(layer, "call")
                    del _PATCHED[key]
