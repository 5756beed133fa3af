"""End to end: CsvExampleGen -> private Trainer -> PrivacyReport -> gate -> Pusher.

Runs the real TFX pipeline (LocalDagRunner, SQLite ML Metadata) on a small
SST-2 sample with a tiny BERT preset built here, so it stays within CI time on
2 cores. Needs the TFX environment (`make test-tfx`); skipped elsewhere.

The second run reuses the first run's pipeline root and metadata store with
caching on: ExampleGen, Trainer and PrivacyReportGen come from the cache, only
the gate (with a budget below the certified epsilon) and the Pusher run.
"""

import collections
import json
import os
import pathlib
import re

import pytest

# "tfx.v1", not "tfx": outside the TFX env, pytest's rootdir on sys.path makes
# the tests/tfx folder importable as an empty namespace package named "tfx".
pytest.importorskip("tfx.v1", reason="needs the TFX environment (.venv-tfx); run `make test-tfx`")

pytestmark = pytest.mark.tfx

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"
FIXTURE_GLUE = ROOT / "tests" / "fixtures" / "glue"
GLUE_DIR = SHARED_GLUE if (SHARED_GLUE / "SST-2" / "train.tsv").exists() else FIXTURE_GLUE

EPSILON = 20.0
DELTA = 1e-3  # The sample has ~90 training examples; delta << 1/N.


def _tiny_preset(directory: str, csv_path: str) -> str:
    """A 1-layer, 16-wide BERT whose vocabulary is the sample's commonest words."""
    import csv as _csv

    from ewtune_tf.nlp import models

    counts = collections.Counter()
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in _csv.DictReader(f):
            counts.update(re.findall(r"[a-z]+|[^a-z\s]", row["sentence"].lower()))
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-():;")
    words = [w for w, _ in counts.most_common(300) if w not in chars]
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + chars
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
        + words
    )
    return models.save_tiny_bert_preset(
        directory, vocab, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32, max_sequence_length=32
    )


def _run(tmp, *, budget: float, serving_dir: str):
    from trainers import tfx_pipeline

    pipeline = tfx_pipeline.create_pipeline(
        data_dir=str(tmp / "data"),
        pipeline_root=str(tmp / "root"),
        metadata_path=str(tmp / "metadata.sqlite"),
        serving_dir=serving_dir,
        epsilon_budget=budget,
        enable_cache=True,
        # The standard `Trainer(module_file=...)` path (TFX packages the module
        # as a wheel); `run_fn=` is covered by the CLI default.
        use_module_file=True,
        custom_config={
            "epsilon": EPSILON,
            "delta": DELTA,
            "model": str(tmp / "tiny_bert"),
            "sequence_length": 32,
            "epochs": 1.0,
            "batch_size": 16,
            "physical_batch_size": 16,
            "learning_rate": 1e-2,
            "seed": 0,  # Initialisation only: the DP sampling and noise stay secret (certified).
        },
    )
    tfx_pipeline.run_pipeline(pipeline)
    return tfx_pipeline.read_outcome(str(tmp / "metadata.sqlite"))


@pytest.fixture(scope="module")
def blessed_run(tmp_path_factory):
    from trainers import tfx_pipeline

    tmp = tmp_path_factory.mktemp("tfx_pipeline")
    csv_path = tfx_pipeline.write_sst2_sample_csv(str(GLUE_DIR), str(tmp / "data"), 128, seed=0)
    _tiny_preset(str(tmp / "tiny_bert"), csv_path)
    serving_dir = str(tmp / "saved_models" / "sst2_tfx_test")
    outcome = _run(tmp, budget=EPSILON, serving_dir=serving_dir)
    return tmp, serving_dir, outcome


def _store(metadata_path: str):
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def test_within_budget_is_blessed_and_pushed(blessed_run):
    _, serving_dir, outcome = blessed_run
    assert outcome["blessed"] is True, outcome
    assert outcome["pushed"] is True, outcome
    versions = [d for d in os.listdir(serving_dir) if d.isdigit()]
    assert len(versions) == 1
    assert outcome["push_path"] == os.path.join(serving_dir, versions[0])


def test_pushed_model_answers_raw_text(blessed_run):
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 -- registers the tokenizer's ops before loading.

    _, _, outcome = blessed_run
    model = tf.saved_model.load(outcome["push_path"])
    serve = model.signatures["serving_default"]
    out = serve(sentence=tf.constant(["a gorgeous , witty film", "dull and tedious"]))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert set(out["label"].numpy().tolist()) <= {0, 1}
    # The served model carries its guarantee.
    with open(os.path.join(outcome["push_path"], "assets", "privacy_report.json")) as f:
        report = json.load(f)
    assert report["certified"] is True and report["schema"] == "ewtune_tf.privacy_report"
    assert 0 < report["epsilon"] <= EPSILON
    assert report["sampling"] == "poisson"


def test_privacy_report_is_recorded_in_ml_metadata(blessed_run):
    tmp, _, outcome = blessed_run
    store = _store(str(tmp / "metadata.sqlite"))
    [report] = store.get_artifacts_by_type("EWTunePrivacyReport")
    props = {k: getattr(v, v.WhichOneof("value")) for k, v in report.properties.items()}
    assert 0 < props["certified_epsilon"] <= EPSILON
    assert props["delta"] == pytest.approx(DELTA)
    assert props["noise_multiplier"] > 0
    assert 0 < props["sampling_probability"] < 1
    assert props["steps"] >= 1
    assert props["sampling_method"] == "poisson"
    assert "ewtune_tf.accounting" in props["accountant"]
    assert props["estimated_epsilon"] > 0
    # Same numbers as the file the Trainer wrote into the SavedModel assets.
    with open(os.path.join(outcome["push_path"], "assets", "privacy_report.json")) as f:
        on_disk = json.load(f)
    assert props["certified_epsilon"] == pytest.approx(on_disk["epsilon"])
    assert props["steps"] == on_disk["steps"]
    # Lineage: the report was produced by an execution that consumed the Trainer's Model.
    [event] = [e for e in store.get_events_by_artifact_ids([report.id]) if e.type == e.OUTPUT]
    inputs = [e for e in store.get_events_by_execution_ids([event.execution_id]) if e.type == e.INPUT]
    [model] = store.get_artifacts_by_id([e.artifact_id for e in inputs])
    assert store.get_artifact_types_by_id([model.type_id])[0].name == "Model"


def test_small_budget_refuses_the_push(blessed_run):
    tmp, _, first = blessed_run
    certified = first["privacy_report"]["certified_epsilon"]
    serving_dir = str(tmp / "saved_models" / "refused")
    outcome = _run(tmp, budget=certified / 2, serving_dir=serving_dir)
    assert outcome["blessed"] is False, outcome
    assert "> budget" in outcome["gate_reason"]
    assert outcome["pushed"] is False, outcome
    assert not os.path.exists(serving_dir) or not os.listdir(serving_dir)
    # The model itself was the cached one: same certified epsilon.
    assert outcome["privacy_report"]["certified_epsilon"] == pytest.approx(certified)
