"""KerasHub BERT text classifiers and GLUE data for private fine-tuning.

* ``ewtune_tf.nlp.models``: ``build_classifier`` (MiniLM default, local
  HF/Keras preset dirs, KerasHub presets; LoRA or top-k trainable layers),
  ``tokenize`` / ``encode_text`` and dynamic padding (``trim_padding``;
  for training ``sort_by_length`` and ``dynamic_padding_model``).
* ``ewtune_tf.nlp.classifier``: ``BertMeanPoolingClassifier``, the head for
  sentence-embedding checkpoints (logits on the masked mean of the tokens).
* ``ewtune_tf.nlp.glue``: ``load_glue`` for SST-2, QNLI, MNLI and QQP from a
  GLUE-layout directory or TFDS.

Submodules are imported on demand so ``import ewtune_tf.nlp`` stays cheap.

Layer 5: may import layers 0-4; the privacy core never imports it.
"""

from ewtune_tf.utils.lazy import lazy_getattr

_LAZY = {
    "accuracy": "ewtune_tf.nlp.models",
    "build_classifier": "ewtune_tf.nlp.models",
    "checkpoint_pooling": "ewtune_tf.nlp.models",
    "BertMeanPoolingClassifier": "ewtune_tf.nlp.classifier",
    "MaskedMeanPooling": "ewtune_tf.nlp.classifier",
    "resolve_model": "ewtune_tf.nlp.models",
    "tokenize": "ewtune_tf.nlp.models",
    "encode_text": "ewtune_tf.nlp.models",
    "trim_padding": "ewtune_tf.nlp.models",
    "sort_by_length": "ewtune_tf.nlp.models",
    "dynamic_padding_model": "ewtune_tf.nlp.models",
    "save_tiny_bert_preset": "ewtune_tf.nlp.models",
    "load_glue": "ewtune_tf.nlp.glue",
    "get_task": "ewtune_tf.nlp.glue",
    "GlueSplit": "ewtune_tf.nlp.glue",
    "GlueTask": "ewtune_tf.nlp.glue",
    "GlueDataError": "ewtune_tf.nlp.glue",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
