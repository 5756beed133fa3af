"""GLUE loading: real SST-2 (when present) and synthetic pair-task fixtures."""

import pathlib

import numpy as np
import pytest

from ewtune_tf.nlp import glue

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = str(ROOT / "tests" / "fixtures" / "glue")
REAL_GLUE = ROOT.parent / "shared" / "data" / "glue"


@pytest.mark.skipif(not (REAL_GLUE / "SST-2" / "dev.tsv").is_file(), reason="no real SST-2 copy")
def test_real_sst2_counts_and_labels():
    train = glue.load_glue("sst2", "train", glue_dir=str(REAL_GLUE))
    dev = glue.load_glue("sst2", "dev", glue_dir=str(REAL_GLUE))
    assert len(train) == 67349 and len(dev) == 872
    assert set(np.unique(dev.labels)) == {0, 1}
    assert dev.texts[0][0] == "it 's a charming and often affecting journey ."
    assert train.source.endswith("train.tsv") and train.texts[0][0] == "hide new secretions from the parental units"


def test_sst2_fixture_and_max_examples():
    s = glue.load_glue("SST-2", "validation", glue_dir=FIXTURES, max_examples=5)
    assert len(s) == 5 and s.task.text_keys == ("sentence",) and s.task.num_classes == 2
    assert s.model_inputs() is s.texts[0]
    full = glue.load_glue("sst2", "dev", glue_dir=FIXTURES)
    assert any(t.startswith('"') for t in full.texts[0])


def test_qnli_pairs_by_header_names():
    s = glue.load_glue("qnli", "train", glue_dir=FIXTURES)
    assert s.task.is_pair and set(s.features()) == {"question", "sentence"}
    assert s.texts[0][0] == "what is the film about?"
    assert s.labels.tolist()[:2] == [0, 1]  # entailment, not_entailment


def test_mnli_matched_and_mismatched_skip_unlabeled_rows():
    m = glue.load_glue("mnli", "dev", glue_dir=FIXTURES)  # dev == matched
    mm = glue.load_glue("mnli", "dev_mismatched", glue_dir=FIXTURES)
    assert m.split == "dev_matched" and len(m) == 6  # 7 rows, one with gold label "-"
    assert len(mm) == 3
    assert m.task.num_classes == 3 and m.task.dev_splits == ("dev_matched", "dev_mismatched")
    assert m.texts[1][1] == "a man plays well ." and m.labels[1] == 1


def test_qqp_skips_malformed_row(caplog):
    s = glue.load_glue("qqp", "train", glue_dir=FIXTURES)
    assert len(s) == 10 and s.labels.tolist()[:2] == [0, 1]
    assert "skipped 1" in caplog.text


def test_env_var_source(monkeypatch):
    monkeypatch.setenv(glue.GLUE_DIR_ENV, FIXTURES)
    assert len(glue.load_glue("qqp", "dev")) == 4


def test_missing_files_name_files_and_flags(tmp_path):
    with pytest.raises(glue.GlueDataError) as e:
        glue.load_glue("qnli", "train", glue_dir=str(tmp_path))
    msg = str(e.value)
    assert "QNLI" in msg and "train.tsv" in msg and "--glue_dir" in msg and "EWTUNE_GLUE_DIR" in msg


def test_tfds_failure_is_clear(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("tensorflow_datasets")

    def load(*a, **k):
        raise ConnectionError("no network")

    fake.load = load
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.delenv(glue.GLUE_DIR_ENV, raising=False)
    with pytest.raises(glue.GlueDataError, match="--glue_dir.*EWTUNE_GLUE_DIR"):
        glue.load_glue("sst2", "dev")


def test_bad_task_split_and_header(tmp_path):
    with pytest.raises(ValueError, match="--task must be one of"):
        glue.get_task("cola")
    with pytest.raises(ValueError, match="split"):
        glue.load_glue("sst2", "dev_matched", glue_dir=FIXTURES)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("text\tlabel\nhi\t1\n")
    with pytest.raises(glue.GlueDataError, match="sentence"):
        glue.load_glue("sst2", "dev", glue_dir=str(tmp_path))


def test_to_dataset():
    ds = glue.load_glue("qnli", "dev", glue_dir=FIXTURES).to_dataset()
    x, y = next(iter(ds))
    assert set(x) == {"question", "sentence"} and int(y) == 0
