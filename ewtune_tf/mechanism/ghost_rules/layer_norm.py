"""Ghost rule for ``keras.layers.LayerNormalization``.

``out = xhat * gamma + beta`` with ``xhat`` the normalized input (Keras's own
op with ``gamma = beta = None``, in float32 as Keras computes it). Both
parameters are reduce taps: the per-example gradient of gamma is ``g * xhat``
and that of beta is ``g``, each summed over the non-normalized axes.
Normalizing over the batch axis would couple examples: not supported.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ewtune_tf.mechanism.ghost_layers import Recorder, register_ghost_rule


@register_ghost_rule(keras.layers.LayerNormalization)
def layer_norm_rule(layer, rec: Recorder, inputs, *args, **kwargs):
    x = inputs
    if args or kwargs or not isinstance(x, tf.Tensor) or x.shape.rank is None:
        return NotImplemented
    rank = x.shape.rank
    axes = sorted(a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]))
    if 0 in axes:  # normalizing across the batch couples examples
        return NotImplemented
    rms = bool(getattr(layer, "rms_scaling", False))
    extra = {"rms_scaling": True} if rms else {}
    xhat = tf.convert_to_tensor(
        keras.ops.layer_normalization(tf.cast(x, tf.float32), None, None, axes, layer.epsilon, **extra)
    )
    bshape = [x.shape[a] if a in axes else 1 for a in range(rank)]
    other = [i for i in range(1, rank) if i not in axes]

    def to_param(t):  # [B, ...] -> [B, *param_shape]
        t = tf.cast(t, tf.float32)
        return tf.reduce_sum(t, axis=other) if other else t

    scaled = xhat
    if getattr(layer, "scale", True):
        gamma = rec.read(layer.gamma, xhat.dtype)
        scaled = rec.reduce(layer.gamma, gamma, xhat * tf.reshape(gamma, bshape), lambda g: to_param(g * xhat))
    out = scaled
    if getattr(layer, "center", True) and not rms:
        beta = rec.read(layer.beta, out.dtype)
        # gamma's tap shares the output's gradient with beta's.
        out = rec.merge(rec.reduce(layer.beta, beta, scaled + tf.reshape(beta, bshape), to_param), [scaled])
    return tf.cast(out, layer.compute_dtype)
