"""BertMeanPoolingClassifier: pooling math, padding invariance, the trainable
set, ghost clipping against the jacobian, serialization, and the checkpoint's
pooling config."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.mechanism import clipping
from ewtune_tf.nlp import classifier as classifier_lib
from ewtune_tf.nlp import models


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert_mean")))


def _tiny_model(lora_rank: int = 0):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        dropout=0.0,
    )
    model = classifier_lib.BertMeanPoolingClassifier(backbone, num_classes=3, dropout=0.0)
    models.set_trainable(model, lora_rank=lora_rank)
    rng = np.random.default_rng(3)
    for v in model.trainable_variables:
        if "lora" in v.path:  # LoRA's B starts at zero: randomize so its gradient path is exercised.
            v.assign(rng.normal(size=v.shape, scale=0.2).astype("float32"))
    return model


def _batch(batch: int = 4, seq: int = 8):
    rng = np.random.default_rng(1)
    padding = np.ones((batch, seq), "int32")
    padding[:, seq - 2 :] = 0  # The last two columns are padding in every row.
    padding[1, 5:] = 0
    padding[3, 2:] = 0
    token_ids = rng.integers(1, 100, size=(batch, seq)).astype("int32") * padding
    return {
        "token_ids": tf.constant(token_ids),
        "segment_ids": tf.zeros((batch, seq), tf.int32),
        "padding_mask": tf.constant(padding),
    }


def test_masked_mean_pooling_matches_numpy_and_handles_empty_rows():
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    got = np.asarray(classifier_lib.MaskedMeanPooling()(x, mask))
    np.testing.assert_allclose(got[0], x[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[1], x[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(got[2], np.zeros(4, "float32"))  # no NaN


def test_logits_ignore_padding_columns_and_padded_values():
    model = _tiny_model()
    x = _batch()
    trimmed = {k: v[:, :6] for k, v in x.items()}
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model(trimmed)), atol=1e-5)
    # Token ids under padding do not matter either (attention and pooling mask them).
    noisy = dict(x, token_ids=tf.where(tf.cast(x["padding_mask"], tf.bool), x["token_ids"], 42))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model(noisy)), atol=1e-5)


def test_lora_trainable_set_excludes_the_unused_pooler():
    model = _tiny_model(lora_rank=2)
    names = [v.path for v in model.trainable_variables]
    assert "logits/kernel" in names and any("lora_kernel_a" in n for n in names)
    assert not [n for n in names if "pooled_dense" in n]
    # Full fine-tuning: the pooler is frozen too (it would get no gradient).
    full = _tiny_model(lora_rank=0)
    assert not [v.path for v in full.trainable_variables if "pooled_dense" in v.path]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(full(_batch()))
    grads = tape.gradient(loss, full.trainable_variables)
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("impl", ["ghost", "ghost_two_pass"])
def test_ghost_clipping_matches_the_jacobian(impl, monkeypatch):
    """Per-example norms and the clipped sum equal the jacobian's, with no
    fallback: the pooling layer has no weights and mixes no examples."""
    model = _tiny_model(lora_rank=2)
    x, labels = _batch(), tf.constant([0, 1, 2, 0])

    def loss_fn():
        logits = model(x, training=True)
        return tf.cast(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True), tf.float32)

    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        losses = loss_fn()
    jac = [
        np.asarray(j, np.float64)
        for j in tape.jacobian(losses, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    ]
    norms = np.sqrt(sum(np.sum(j.reshape(4, -1) ** 2, axis=1) for j in jac))
    clip = 0.5 * float(np.median(norms))  # Some rows clipped, some not.
    factors = np.minimum(1.0, clip / norms)

    def no_jacobian(*a, **k):
        raise AssertionError("jacobian fallback used")

    monkeypatch.setattr(tf.GradientTape, "jacobian", no_jacobian)
    out = clipping.get_clipping_impl(impl)(model, loss_fn, variables, clip, None)
    np.testing.assert_allclose(out.norms.numpy(), norms, rtol=1e-4)
    for v, got, j in zip(variables, out.grad_sum, jac):
        want = np.tensordot(factors, j, axes=[[0], [0]])
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got.numpy() / scale, want / scale, atol=1e-4, err_msg=v.path)


@pytest.mark.filterwarnings(r"ignore:`compile\(\)` was not called")
def test_keras_save_and_load_round_trip(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "mean.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, classifier_lib.BertMeanPoolingClassifier)
    np.testing.assert_allclose(np.asarray(model(_batch())), np.asarray(loaded(_batch())), atol=1e-6)


def _write_sentence_transformers_dir(path, pooling_config):
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
            f,
        )
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        f.write(pooling_config)


def test_checkpoint_pooling_reads_sentence_transformers_config(tmp_path):
    mean_dir, cls_dir, bad_dir = (str(tmp_path / n) for n in ("mean", "cls", "bad"))
    _write_sentence_transformers_dir(mean_dir, json.dumps({"pooling_mode_mean_tokens": True}))
    _write_sentence_transformers_dir(
        cls_dir, json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    _write_sentence_transformers_dir(bad_dir, "{not json")
    assert models.checkpoint_pooling(mean_dir) == "mean"
    assert models.checkpoint_pooling(cls_dir) == "cls"
    assert models.checkpoint_pooling(bad_dir) == "cls"
    assert models.checkpoint_pooling(str(tmp_path)) == "cls"  # No modules.json.
    assert models.checkpoint_pooling("bert_tiny_en_uncased") == "cls"  # A preset name.


def test_build_classifier_pooling_option(tiny_preset):
    # The tiny preset is a Keras preset (no sentence-transformers config): auto = cls.
    assert type(models.build_classifier(tiny_preset, sequence_length=16)).__name__ == "BertTextClassifier"
    clf = models.build_classifier(tiny_preset, sequence_length=16, lora_rank=2, pooling="mean")
    assert isinstance(clf, classifier_lib.BertMeanPoolingClassifier)
    assert clf.preprocessor is not None
    assert not [v.path for v in clf.trainable_variables if "pooled_dense" in v.path]
    with pytest.raises(ValueError, match="^pooling must be one of auto, mean, cls"):
        models.build_classifier(tiny_preset, pooling="max")
