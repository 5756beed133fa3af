"""SavedModel export of a fine-tuned KerasHub text classifier for TF Serving.

Layout (what TF Serving's file-system source polls)::

    <export_dir>/<name>/<version>/saved_model.pb
                                 /variables/...
                                 /assets/privacy_report.json
                                 /assets/<tokenizer vocabulary>

Signatures:

* ``serving_default``: raw text in, one ``tf.string [batch]`` input per text
  field of the task (``sentence``; or ``question`` + ``sentence``,
  ``premise`` + ``hypothesis``, ...). The tokenizer runs inside the graph.
  Outputs ``probabilities`` (float32 ``[batch, num_classes]``), ``label``
  (int64 ``[batch]``, the argmax class id), ``label_name`` (string) and
  ``logits``.
* ``predict_token_ids``: already-tokenized input, ``token_ids``,
  ``segment_ids`` and ``padding_mask`` (all int32 ``[batch, length]``; a
  mask is 1 for real tokens), with the same outputs minus ``label_name``.

The privacy report (the accountant's inputs and certified epsilon) is a
``tf.saved_model.Asset``, so it travels with the model into serving; read it
back with ``load_privacy_report``.

Loading needs the TensorFlow Text op library, because KerasHub's WordPiece
tokenizer is built from its ops: ``import tensorflow_text`` before
``tf.saved_model.load``. A model server must likewise be linked with the
TF Text ops of a matching version (see docs/serving.md).

Writes are atomic: the model is saved into a hidden temporary directory next
to the target and renamed into place, so a crash never leaves a partial
version that a server could pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Optional, Sequence

PRIVACY_REPORT_ASSET = "privacy_report.json"
TOKEN_SIGNATURE = "predict_token_ids"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def next_version(model_dir: str) -> int:
    """1 + the largest integer version directory in ``model_dir`` (1 if none)."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def export_versioned(
    classifier,
    export_dir: str,
    name: str,
    *,
    text_keys: Sequence[str] = ("sentence",),
    label_names: Optional[Sequence[str]] = None,
    privacy_report: Optional[dict] = None,
    version: Optional[int] = None,
) -> str:
    """Exports to ``<export_dir>/<name>/<version>/`` and returns that path.

    Args:
      classifier: a ``keras_hub.models.TextClassifier`` with its
        preprocessor (tokenizer + packer) attached.
      export_dir: root of the model repository (``saved_models/``).
      name: model name, letters/digits/``._-``.
      text_keys: names of the raw-text inputs of ``serving_default``, in the
        order the model takes them (one or two).
      label_names: class names (default ``"0"``, ``"1"``, ...).
      privacy_report: JSON-serializable dict stored as an asset.
      version: positive integer; default: next free version.

    Raises:
      ValueError: bad name/version, or the version already exists.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"export name must match {_NAME_RE.pattern}, got {name!r}.")
    model_dir = os.path.join(export_dir, name)
    if version is None:
        version = next_version(model_dir)
    if int(version) < 1:
        raise ValueError(f"export version must be a positive integer, got {version}.")
    target = os.path.join(model_dir, str(int(version)))
    if os.path.exists(target):
        raise ValueError(f"{target} already exists; TF Serving versions are immutable, pick another version.")
    return save_serving_model(
        classifier, target, text_keys=text_keys, label_names=label_names, privacy_report=privacy_report
    )


def save_serving_model(
    classifier,
    path: str,
    *,
    text_keys: Sequence[str] = ("sentence",),
    label_names: Optional[Sequence[str]] = None,
    privacy_report: Optional[dict] = None,
) -> str:
    """Saves the serving SavedModel at exactly ``path`` (atomically).

    This is the un-versioned building block (the TFX trainer writes to
    ``fn_args.serving_model_dir`` with it). See ``export_versioned``.
    """
    import tensorflow as tf

    text_keys = tuple(text_keys)
    if len(text_keys) not in (1, 2):
        raise ValueError(f"text_keys must name one or two text inputs, got {text_keys}.")
    if getattr(classifier, "preprocessor", None) is None:
        raise ValueError("classifier has no preprocessor; the raw-text signature needs its tokenizer.")
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; refusing to overwrite an exported model.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Hidden, non-numeric name: TF Serving never loads it as a version.
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    staging = tempfile.mkdtemp(prefix="ewtune_export_")
    try:
        module = _serving_module(classifier, text_keys, label_names, privacy_report, staging)
        tf.saved_model.save(
            module,
            tmp,
            signatures={
                "serving_default": module.serve_text,
                TOKEN_SIGNATURE: module.serve_token_ids,
            },
        )
        os.rename(tmp, path)  # Atomic on one file system.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _serving_module(classifier, text_keys, label_names, privacy_report, staging):
    import tensorflow as tf

    from ewtune_tf.nlp.models import encode_text

    preprocessor = classifier.preprocessor
    num_classes = int(classifier.output_shape[-1])
    if label_names is None:
        label_names = [str(i) for i in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names for {num_classes} classes.")

    module = tf.Module()
    # Attributes are tracked: variables and tokenizer resources are saved.
    module.classifier = classifier
    module.preprocessor = preprocessor
    module.label_table = tf.constant(list(label_names))
    report_path = os.path.join(staging, PRIVACY_REPORT_ASSET)
    with open(report_path, "w") as f:
        json.dump(privacy_report or {"note": "no privacy report supplied"}, f, indent=2, sort_keys=True)
    module.privacy_report = tf.saved_model.Asset(report_path)

    def outputs_from_tokens(token_ids, segment_ids, padding_mask):
        # Dynamic padding: drop columns past the longest row. Positions are
        # absolute and padding is masked, so logits do not change.
        width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(padding_mask, tf.int32), axis=1)), 1)
        x = {
            "token_ids": tf.cast(token_ids[:, :width], tf.int32),
            "segment_ids": tf.cast(segment_ids[:, :width], tf.int32),
            "padding_mask": tf.cast(padding_mask[:, :width], tf.bool),
        }
        logits = tf.cast(classifier(x, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        label = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {"logits": logits, "probabilities": probabilities, "label": label}

    text_spec = [tf.TensorSpec([None], tf.string, name=k) for k in text_keys]

    @tf.function(input_signature=text_spec)
    def serve_text(*texts):
        x = encode_text(preprocessor, list(texts))
        out = outputs_from_tokens(x["token_ids"], x["segment_ids"], x["padding_mask"])
        out["label_name"] = tf.gather(module.label_table, out["label"])
        return out

    # Signature input names come from the Python argument names, so wrap
    # with the task's names (``sentence`` or ``question``, ``sentence``...).
    if len(text_keys) == 1:
        k0 = text_keys[0]
        serve = tf.function(lambda **kw: serve_text(kw[k0]), input_signature=None)
        serve_fn = serve.get_concrete_function(**{k0: text_spec[0]})
    else:
        k0, k1 = text_keys
        serve = tf.function(lambda **kw: serve_text(kw[k0], kw[k1]))
        serve_fn = serve.get_concrete_function(**{k0: text_spec[0], k1: text_spec[1]})
    module.serve_text = serve_fn

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None, None], tf.int32, name="segment_ids"),
            tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
        ]
    )
    def serve_token_ids(token_ids, segment_ids, padding_mask):
        return outputs_from_tokens(token_ids, segment_ids, padding_mask)

    module.serve_token_ids = serve_token_ids
    return module


def load_privacy_report(export_path: str) -> dict:
    """Reads the privacy report stored in an exported model's assets."""
    path = os.path.join(export_path, "assets", PRIVACY_REPORT_ASSET)
    if not os.path.isfile(path):
        raise ValueError(f"{export_path} has no assets/{PRIVACY_REPORT_ASSET}; was it exported by ewtune_tf?")
    with open(path) as f:
        return json.load(f)
