"""Ghost rules for embedding tables: ``keras.layers.Embedding``,
``ReversibleEmbedding`` (Keras and KerasHub; the forward lookup only) and
KerasHub ``PositionEmbedding``.

A token table is a gather tap: per-example norms from the output gradients of
positions holding the same id, the clipped sum by a segment sum over ids
(:class:`~ewtune_tf.mechanism.ghost_taps.GatherTap`). A position table
(``positions=None``) is a reduce tap on the slice in use. KerasHub classes are
registered by name, so KerasHub is not imported here.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ewtune_tf.mechanism.ghost_layers import Recorder, register_ghost_rule
from ewtune_tf.mechanism.ghost_rules import lora


def embedding_rule(layer, rec: Recorder, inputs, *args, **kwargs):
    if (
        args
        or kwargs.get("reverse", False)
        or getattr(layer, "quantization_mode", None) is not None
        # Keras's ReversibleEmbedding attaches its mask inside `call`.
        or (getattr(layer, "mask_zero", False) and type(layer).call is not keras.layers.Embedding.call)
        or not isinstance(inputs, tf.Tensor)
        or inputs.shape.rank is None
    ):
        return NotImplemented
    ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
    dtype = tf.as_dtype(layer.compute_dtype)
    z = rec.gather(layer._embeddings, ids, dtype)
    if lora.enabled(layer):
        z = z + lora.embedding_delta(layer, rec, ids, dtype)
    return z


register_ghost_rule(keras.layers.Embedding, embedding_rule)
if hasattr(keras.layers, "ReversibleEmbedding"):
    register_ghost_rule(keras.layers.ReversibleEmbedding, embedding_rule)
register_ghost_rule("keras_hub.src.layers.modeling.reversible_embedding:ReversibleEmbedding", embedding_rule)


def position_embedding_rule(layer, rec: Recorder, inputs, start_index=0, positions=None, **kwargs):
    if positions is not None or kwargs or not isinstance(inputs, tf.Tensor) or inputs.shape.rank is None:
        return NotImplemented
    table = rec.read(layer.position_embeddings)
    shape = tf.shape(inputs)
    used = tf.slice(table, tf.stack([start_index, 0]), tf.stack([shape[-2], shape[-1]]))
    z = tf.broadcast_to(tf.cast(used, inputs.dtype), shape)
    rank, num_rows = inputs.shape.rank, int(table.shape[0])

    def per_example(g):
        # [B, ..., T, D] -> [B, T, D]: the slice is broadcast over middle axes.
        g = tf.cast(g, tf.float32)
        return tf.reduce_sum(g, axis=list(range(1, rank - 2))) if rank > 3 else g

    def expand(s):
        return tf.pad(s, [[start_index, num_rows - start_index - tf.shape(s)[0]], [0, 0]])

    return rec.reduce(layer.position_embeddings, table, z, per_example, expand)


register_ghost_rule("keras_hub.src.layers.modeling.position_embedding:PositionEmbedding", position_embedding_rule)
