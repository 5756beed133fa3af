"""Ghost rules for ``keras.layers.Dense`` and ``keras.layers.EinsumDense``.

The kernel is an einsum tap (``out = einsum(equation, x, kernel)``), the bias
a reduce tap (its per-example gradient is ``g`` summed over the axes it is
broadcast along), LoRA factors as in :mod:`.lora`. EinsumDense is supported
for any equation whose first input axis is the batch axis, which the kernel
does not use, and whose kernel axes all occur in the input or the output.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf

from ewtune_tf.mechanism.ghost_layers import Recorder, register_ghost_rule
from ewtune_tf.mechanism.ghost_rules import lora
from ewtune_tf.mechanism.ghost_taps import unused_letters


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
        if n < 0 or "..." not in out:
            return None
        fill = unused_letters(inp + ker + out, n)
        inp, out = inp.replace("...", fill), out.replace("...", fill)
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


def _broadcast_reducer(out_rank: int, bias_shape: Sequence[int]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Per-example gradient of a bias broadcast (trailing-aligned) to outputs."""
    bias_shape = list(bias_shape)
    lead = list(range(1, out_rank - len(bias_shape)))
    keep_axes = [i + 1 for i, d in enumerate(bias_shape) if d == 1]

    def reduce(g: tf.Tensor) -> tf.Tensor:
        x = tf.reduce_sum(g, axis=lead) if lead else g
        # Remaining axes: batch + trailing bias axes; sum where the bias is 1.
        return tf.reduce_sum(x, axis=keep_axes, keepdims=True) if keep_axes else x

    return reduce


def add_bias(rec: Recorder, bias_var, z: tf.Tensor) -> tf.Tensor:
    """``z + bias`` (bias broadcast over leading axes), tapped if clipped."""
    if bias_var is None:
        return z
    b = rec.read(bias_var, z.dtype)
    return rec.reduce(bias_var, b, z + b, _broadcast_reducer(z.shape.rank, b.shape))


def _plain(layer, x) -> bool:
    return getattr(layer, "quantization_mode", None) is None and isinstance(x, tf.Tensor) and x.shape.rank is not None


def linear(layer, rec: Recorder, x: tf.Tensor, equation: str) -> tf.Tensor:
    """``activation(einsum(equation, x, kernel) [+ LoRA] [+ bias])``."""
    parts = [rec.einsum(equation, x, layer._kernel)]
    if lora.enabled(layer):
        parts.append(lora.linear_delta(layer, rec, x, equation))
    z = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    # Kernel, LoRA B and bias taps share the pre-activation's gradient.
    z = rec.merge(add_bias(rec, layer.bias, z), parts)
    act = getattr(layer, "activation", None)
    return act(z) if act is not None else z


@register_ghost_rule(keras.layers.Dense)
def dense_rule(layer, rec: Recorder, inputs, *args, **kwargs):
    if not _plain(layer, inputs) or inputs.shape.rank < 2:
        return NotImplemented
    rank = inputs.shape.rank
    letters = unused_letters("", rank + 1)
    eq = f"{letters[:rank]},{letters[rank - 1]}{letters[rank]}->{letters[: rank - 1]}{letters[rank]}"
    if not lora.linear_supported(layer, eq):
        return NotImplemented
    return linear(layer, rec, inputs, eq)


@register_ghost_rule(keras.layers.EinsumDense)
def einsum_dense_rule(layer, rec: Recorder, inputs, *args, **kwargs):
    if not _plain(layer, inputs):
        return NotImplemented
    eq = expand_ellipsis(layer.equation, inputs.shape.rank)
    if eq is None or not einsum_supported(eq) or not lora.linear_supported(layer, eq):
        return NotImplemented
    return linear(layer, rec, inputs, eq)
