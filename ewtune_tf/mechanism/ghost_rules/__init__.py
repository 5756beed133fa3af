"""Built-in ghost-clipping rules, one module per layer family.

Importing this package registers (see
:func:`ewtune_tf.mechanism.ghost_layers.register_ghost_rule`):

* :mod:`.dense` -- ``keras.layers.Dense`` and ``keras.layers.EinsumDense``
  (attention projections): kernel einsum taps, bias reduce taps;
* :mod:`.lora` -- the LoRA factors of LoRA-enabled Dense / EinsumDense /
  Embedding (``enable_lora``), used by the dense and embedding rules;
* :mod:`.embedding` -- ``keras.layers.Embedding``, ``ReversibleEmbedding``
  (Keras and KerasHub, forward direction) and KerasHub ``PositionEmbedding``;
* :mod:`.layer_norm` -- ``keras.layers.LayerNormalization`` (``rms_scaling``
  included; normalization axes must exclude the batch axis).

A quantized layer, a ReversibleEmbedding used in reverse, or any other
configuration a rule does not cover runs the layer's own ``call``; its
variables then take the exact jacobian fallback. Nothing is ever silently
left unclipped.
"""

from ewtune_tf.mechanism.ghost_rules import dense, embedding, layer_norm, lora

__all__ = ["dense", "embedding", "layer_norm", "lora"]
