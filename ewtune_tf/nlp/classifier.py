"""A BERT text classifier over the masked mean of the token outputs.

KerasHub's ``BertTextClassifier`` classifies from ``pooled_output``: the
[CLS] token through the checkpoint's pooler dense layer. That is right for
checkpoints pre-trained with a next-sentence objective, but sentence-embedding
checkpoints such as all-MiniLM-L6-v2 were trained on the *mean* of the token
outputs; their [CLS] token and pooler carry little sentence meaning. A linear
probe on frozen MiniLM-L6 features from 6,000 SST-2 training sentences scores
80.3 % dev accuracy on the masked mean against 69.5 % on ``pooled_output``.

Under DP the head also matters for the noise: the classifier below has no
pooler to train (the logits layer reads the 384-wide mean directly), which
removes ~148k parameters, and so their share of the noise, from the LoRA
trainable set.

The model is an ordinary KerasHub ``TextClassifier`` (``backbone``,
``preprocessor``, the same token-dict inputs and logits outputs), so training,
ghost clipping and SavedModel export treat it like ``BertTextClassifier``.
"""

from __future__ import annotations

import keras
import keras_hub

__all__ = ["MaskedMeanPooling", "BertMeanPoolingClassifier"]


@keras.saving.register_keras_serializable(package="ewtune_tf")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the sequence axis of ``[batch, seq, dim]`` inputs, counting
    only positions where ``padding_mask`` is true. No weights.

    Each row is averaged on its own, so examples stay independent (a
    requirement of per-example clipping). A row with no unmasked position
    gives zeros instead of NaN.
    """

    def call(self, sequence, padding_mask):
        mask = keras.ops.cast(padding_mask, sequence.dtype)[..., None]
        total = keras.ops.sum(sequence * mask, axis=1)
        count = keras.ops.maximum(keras.ops.sum(mask, axis=1), keras.ops.cast(1.0, sequence.dtype))
        return total / count

    def compute_output_shape(self, sequence_shape, padding_mask_shape=None):
        return (sequence_shape[0], sequence_shape[-1])


@keras.saving.register_keras_serializable(package="ewtune_tf")
class BertMeanPoolingClassifier(keras_hub.models.TextClassifier):
    """BERT backbone -> masked mean of ``sequence_output`` -> dropout -> logits.

    Args:
      backbone: a ``keras_hub.models.BertBackbone``.
      num_classes: number of output classes.
      preprocessor: a ``BertTextClassifierPreprocessor`` or None.
      activation: activation of the logits layer (None: logits).
      dropout: dropout rate on the pooled features, in ``[0, 1)``.

    Its ``pooled_output`` branch (the pooler) is computed by the backbone but
    unused; ``models.set_trainable`` keeps it frozen so no trainable weight
    lacks a gradient.
    """

    backbone_cls = keras_hub.models.BertBackbone
    preprocessor_cls = keras_hub.models.BertTextClassifierPreprocessor

    def __init__(self, backbone, num_classes, preprocessor=None, activation=None, dropout=0.1, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooling = MaskedMeanPooling(dtype=backbone.dtype_policy, name="mean_pooling")
        self.output_dropout = keras.layers.Dropout(dropout, dtype=backbone.dtype_policy, name="classifier_dropout")
        self.output_dense = keras.layers.Dense(
            num_classes,
            # BERT's initializer (truncated normal, stddev 0.02), as KerasHub uses.
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            activation=activation,
            dtype=backbone.dtype_policy,
            name="logits",
        )

        # === Functional Model ===
        inputs = backbone.input
        sequence = backbone(inputs)["sequence_output"]
        pooled = self.pooling(sequence, inputs["padding_mask"])
        outputs = self.output_dense(self.output_dropout(pooled))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.activation = keras.activations.get(activation)
        self.dropout = dropout

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "activation": keras.activations.serialize(self.activation),
                "dropout": self.dropout,
            }
        )
        return config
