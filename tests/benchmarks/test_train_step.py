"""Smoke tests of ``benchmarks/train_step.py``: its workloads run end to end on
a tiny BERT and fixture data and return self-describing results. No timing
assertions (speed is measured by the benchmark itself, not by tests)."""

import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fixed_step  # noqa: E402
import main_job  # noqa: E402
import train_step  # noqa: E402

from ewtune_tf.nlp import models  # noqa: E402

FIXTURES = str(ROOT / "tests" / "fixtures" / "glue")


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def test_main_job_runs_the_trainers_path_and_splits_the_cost(tiny_preset):
    cfg = main_job.MainJobConfig(
        setting="full",
        model=tiny_preset,
        glue_dir=FIXTURES,
        batch_size=16,
        physical_batch_size=4,
        sequence_length=32,
        rounds=1,
    )
    r = main_job.run(cfg)
    assert r["chunks"] >= 2 and r["chunks"] * 4 >= r["batch_rows"] > 0
    widths = r["chunk_widths"]
    assert widths == sorted(widths, reverse=True) and widths[0] <= 32  # sorted, cut per chunk
    for key in ("nonprivate_seconds", "dp_seconds", "ratio", "peak_memory_ratio"):
        assert r[key] > 0, key
    split = r["cost_split"]
    assert set(split["dp_seconds_per_step"]) == {"norm_pass", "clipped_sum_pass", "accumulation", "noise_and_update"}
    assert split["chunks"] == r["chunks"]
    json.dumps(r)  # JSON-serializable
    train_step.print_main_job_table({"main_job_full": r})
    # The memory-only mode runs one of the two steps and reports its process peak.
    only = main_job.run(dataclasses.replace(cfg, only="dp"))
    assert only["only"] == "dp" and only["peak_rss_mb"] > 0 and len(only["seconds"]) == 2


def test_gpu_settings_are_self_describing_and_shrink_for_cpu(capsys):
    full = train_step.gpu_specs(tiny=False, steps=3)
    tiny = train_step.gpu_specs(tiny=True, steps=1)
    assert len(full) == len(tiny) == 8  # batch x dtype policy x XLA
    assert {s.model for s in full.values()} == {"bert_base"} and {s.seq for s in full.values()} == {128}
    assert {s.batch for s in full.values()} == {32, 128}
    assert {s.dtype_policy for s in tiny.values()} == {"float32", "mixed_bfloat16"}
    assert {s.jit_compile for s in tiny.values()} == {False, True}
    r = fixed_step.measure_or_error(next(iter(tiny.values())))
    assert "error" not in r, r.get("error")
    for key in ("device", "dtype_policy", "jit_compile", "batch", "seq", "ratio", "dp_examples_per_second"):
        assert key in r, key
    assert r["peak_memory_ratio"] > 0 and r["memory_source"]


def test_cli_rejects_bad_flag_combinations(capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--tiny"])
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.main(["--steps", "0"])
