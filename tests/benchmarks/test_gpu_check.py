"""``benchmarks/gpu_check.sh``: its dry run (tiny shapes, CPU) runs every part and prints one
JSON summary, and the real mode stops at once, naming what is missing, where no GPU is visible."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, *args, timeout=600):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=env,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:] + result.stderr[-4000:]  # one JSON summary, nothing else
    return result, json.loads(lines[0])


@pytest.mark.slow  # 1-2 minutes on CPU (more under load): test collection, 2 tiny benchmark settings, 2 tiny BERT steps
def test_dry_run_runs_every_part_and_prints_one_json_summary(tmp_path):
    result, summary = _run(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr[-4000:]
    assert summary["mode"] == "dry-run" and summary["status"] == "ok" and summary["targets_informational"]
    assert summary["versions"]["tensorflow"] and summary["device"]
    parts = summary["parts"]
    assert parts["prerequisites"]["missing"] == []
    assert parts["tests"]["status"] == "ok" and parts["main_job"]["status"] == "ok"
    assert parts["benchmark"]["status"] == "ok"
    assert len(summary["benchmark"]) == 2 and all(r["status"] == "ok" for r in summary["benchmark"].values())
    main_job = parts["main_job"]
    assert main_job["result"]["steps"] == 2 and main_job["privacy"]["certified"] is True
    assert set(summary["targets"]) == {
        "ghost_step_le_1.1x_nonprivate",
        "peak_memory_le_1.2x",
        "bf16_xla_faster_than_fp32_noxla",
    }
    assert summary["targets"]["bf16_xla_faster_than_fp32_noxla"]["settings"] == 1  # the pair was compared


def test_real_mode_without_a_gpu_stops_naming_what_is_missing(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: the real mode would run")
    result, summary = _run(tmp_path, "--glue_dir", str(tmp_path / "no_glue"), timeout=300)
    assert result.returncode == 2
    assert summary["status"] == "missing_prerequisites" and summary["passed"] is False
    missing = summary["parts"]["prerequisites"]["missing"]
    assert any(m.startswith("a GPU visible to TensorFlow") for m in missing)
    assert any(m.startswith("SST-2:") and "--glue_dir" in m for m in missing)
    assert "a GPU visible to TensorFlow" in result.stderr
    assert summary["parts"]["tests"] is None and summary["parts"]["main_job"] is None  # nothing else ran
