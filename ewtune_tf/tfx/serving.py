"""Serving SavedModel for the TFX Trainer: raw text in, probabilities out.

Signatures:
  serving_default(text: string[batch]) -> {probabilities: float[batch, C],
                                           label: int64[batch]}
      The KerasHub tokenizer runs inside the graph.
  serve_token_ids(token_ids, padding_mask, segment_ids: int32[batch, L])
      -> same outputs, for callers that tokenise themselves.
The privacy report travels in the SavedModel's assets
(``assets/privacy_report.json``), so the served model carries its guarantee.

Loaders must ``import tensorflow_text`` before ``tf.saved_model.load``: the
BERT tokenizer's WordPiece ops live in that op library.
"""

import json
import os
import tempfile
from typing import Any, Dict

PRIVACY_REPORT_ASSET = "privacy_report.json"


def export_serving_model(classifier, preprocessor, export_dir: str,
                         privacy_report: Dict[str, Any]) -> str:
    """Writes the serving SavedModel to `export_dir` and returns it."""
    import tensorflow as tf

    sequence_length = int(preprocessor.sequence_length)

    class _Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier
            self.preprocessor = preprocessor

        def _predict(self, features):
            logits = self.classifier(features, training=False)
            probabilities = tf.nn.softmax(logits, axis=-1)
            return {"probabilities": probabilities,
                    "label": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve_text(self, text):
            return self._predict(self.preprocessor(text))

        @tf.function(input_signature=[
            tf.TensorSpec([None, sequence_length], tf.int32, name="token_ids"),
            tf.TensorSpec([None, sequence_length], tf.int32, name="padding_mask"),
            tf.TensorSpec([None, sequence_length], tf.int32, name="segment_ids")])
        def serve_token_ids(self, token_ids, padding_mask, segment_ids):
            return self._predict({"token_ids": token_ids, "padding_mask": padding_mask,
                                  "segment_ids": segment_ids})

    module = _Serving()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, PRIVACY_REPORT_ASSET)
        with open(report_path, "w") as f:
            json.dump(privacy_report, f, indent=2, sort_keys=True)
        module.privacy_report = tf.saved_model.Asset(report_path)
        tf.saved_model.save(
            module, export_dir,
            signatures={"serving_default": module.serve_text,
                        "serve_token_ids": module.serve_token_ids})
    return export_dir
