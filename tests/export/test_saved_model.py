"""SavedModel export: fresh-process load matches Keras, signatures, asset, atomicity."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ewtune_tf import export
from ewtune_tf.nlp import models

VENV_BIN = pathlib.Path(sys.executable).parent
PAIRS = (["what is the film about?", "why is it dull"], ["the film is good .", 'the plot is "awful" .'])
SINGLE = (["a charming , moving story", "bad", "really very boring film ."],)

_LOADER = r"""
import json, sys
import tensorflow_text  # noqa: F401  (registers the tokenizer ops; must precede load)
import tensorflow as tf
path, texts, keys = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
m = tf.saved_model.load(path)
out = m.signatures["serving_default"](**{k: tf.constant(t) for k, t in zip(keys, texts)})
tok = json.loads(sys.argv[4])
out2 = m.signatures["predict_token_ids"](**{k: tf.constant(v, tf.int32) for k, v in tok.items()})
print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                  "label": out["label"].numpy().tolist(),
                  "label_name": [s.decode() for s in out["label_name"].numpy()],
                  "token_probabilities": out2["probabilities"].numpy().tolist()}))
"""


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def _keras_probabilities(classifier, texts):
    import tensorflow as tf

    x = models.encode_text(classifier.preprocessor, [tf.constant(t) for t in texts])
    return np.asarray(tf.nn.softmax(classifier(x, training=False))), {
        k: np.asarray(v).astype(np.int32).tolist() for k, v in x.items()
    }


def _fresh_load(path, texts, keys, tokens):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, path, json.dumps(texts), json.dumps(list(keys)), json.dumps(tokens)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "keys,texts,num_classes",
    [(("question", "sentence"), PAIRS, 2), (("sentence",), SINGLE, 3)],
    ids=["pair", "single"],
)
def test_export_loads_in_fresh_process_and_matches_keras(tiny_preset, tmp_path, keys, texts, num_classes):
    clf = models.build_classifier(tiny_preset, num_classes=num_classes, sequence_length=32, lora_rank=2)
    report = {"epsilon": 8.0, "delta": 1e-5, "certified": True}
    labels = [f"class_{i}" for i in range(num_classes)]
    path = export.export_versioned(
        clf, str(tmp_path / "saved_models"), "tiny", text_keys=keys, label_names=labels, privacy_report=report
    )
    assert path == str(tmp_path / "saved_models" / "tiny" / "1")
    expected, tokens = _keras_probabilities(clf, [list(t) for t in texts])

    got = _fresh_load(path, [list(t) for t in texts], keys, tokens)
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(got["token_probabilities"], expected, atol=1e-5)
    assert got["label"] == expected.argmax(-1).tolist()
    assert got["label_name"] == [labels[i] for i in got["label"]]

    # The served model carries its privacy guarantee.
    assert export.load_privacy_report(path) == report
    assert (pathlib.Path(path) / "assets" / export.PRIVACY_REPORT_ASSET).is_file()
    # No staging directories left behind.
    assert sorted(os.listdir(tmp_path / "saved_models" / "tiny")) == ["1"]

    if keys == ("sentence",):
        cli = VENV_BIN / "saved_model_cli"
        if not cli.exists():
            pytest.skip("saved_model_cli not installed next to the interpreter")
        show = subprocess.run(
            [str(cli), "show", "--all", "--dir", path],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        assert show.returncode == 0, show.stderr[-3000:]
        assert "signature_def['serving_default']" in show.stdout
        assert "signature_def['predict_token_ids']" in show.stdout
        assert "inputs['sentence']" in show.stdout and "outputs['probabilities']" in show.stdout


def test_versions_increment_and_are_immutable(tiny_preset, tmp_path):
    clf = models.build_classifier(tiny_preset, sequence_length=16)
    root = str(tmp_path)
    assert export.export_versioned(clf, root, "m").endswith(os.path.join("m", "1"))
    assert export.export_versioned(clf, root, "m").endswith(os.path.join("m", "2"))
    with pytest.raises(ValueError, match="already exists"):
        export.export_versioned(clf, root, "m", version=2)
    with pytest.raises(ValueError, match="export name"):
        export.export_versioned(clf, root, "../evil")


def test_crash_during_save_leaves_no_version(tiny_preset, tmp_path, monkeypatch):
    import tensorflow as tf

    clf = models.build_classifier(tiny_preset, sequence_length=16)

    def crash(module, path, **kwargs):
        os.makedirs(os.path.join(path, "variables"))  # Half-written...
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(tf.saved_model, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_versioned(clf, str(tmp_path), "m")
    assert os.listdir(tmp_path / "m") == []
