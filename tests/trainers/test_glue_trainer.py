"""ewtune-train end to end on a tiny model and the synthetic SST-2 fixture."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ewtune_tf.recipe.checkpoint import read_state
from ewtune_tf.tfx.gate import gate_decision
from trainers import glue as trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = str(ROOT / "tests" / "fixtures" / "glue")


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    from ewtune_tf.nlp import models

    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def _base_args(tmp_path, tiny_preset, *extra):
    return [
        "--model",
        tiny_preset,
        "--glue_dir",
        FIXTURES,
        "--task",
        "sst2",
        "--batch_size",
        "16",
        "--physical_batch_size",
        "8",
        "--epochs",
        "2",
        "--sequence_length",
        "32",
        "--learning_rate",
        "0.01",
        "--output_dir",
        str(tmp_path / "run"),
        "--export_dir",
        str(tmp_path / "saved_models"),
        *extra,
    ]


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--epsilon", "0"], "--epsilon must be a finite number > 0"),
        (["--delta", "1"], "--delta must be in (0, 1)"),
        (["--epochs", "-1"], "--epochs must be a finite number > 0"),
        (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
        (["--physical_batch_size", "0"], "--physical_batch_size must be"),
        (["--learning_rate", "nan"], "--learning_rate must be"),
        (["--l2_norm_clip", "-1"], "--l2_norm_clip must be"),
        (["--lora_rank", "-2"], "--lora_rank must be"),
        (["--sequence_length", "4"], "--sequence_length must be an integer in [8, 512]"),
        (["--accountant", "rdp"], "--accountant must be one of"),
        (["--strategy", "gpu"], "--strategy must be one of"),
        (["--task", "cola"], "--task must be one of"),
        (["--max_steps", "0"], "--max_steps must be"),
        (["--lr_schedule", "cosine"], "--lr_schedule must be one of"),
        (["--pooling", "max"], "--pooling must be one of"),
        (["--ema_momentum", "1"], "--ema_momentum must be in (0, 1) or unset"),
        (["--head_clip_share", "1"], "--head_clip_share must be in (0, 1) or unset"),
        (["--head_clip_share", "0"], "--head_clip_share must be in (0, 1) or unset"),
        (["--model", "no_such_model"], "--model 'no_such_model' is not a known model"),
    ],
)
def test_bad_flags_exit_2_before_writing(tmp_path, capsys, flags, fragment):
    out = tmp_path / "out"
    rc = trainer.main(["--output_dir", str(out), "--export_dir", str(tmp_path / "sm"), *flags])
    assert rc == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "sm").exists()


def test_batch_size_above_n_and_missing_data(tmp_path, tiny_preset, capsys):
    assert trainer.main(_base_args(tmp_path, tiny_preset, "--batch_size", "65")) == 2
    assert "--batch_size must be in [1, 64]" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = trainer.main(_base_args(tmp_path, tiny_preset, "--glue_dir", str(empty)))
    assert rc == 1
    err = capsys.readouterr().err
    assert "SST-2" in err and "--glue_dir" in err and "EWTUNE_GLUE_DIR" in err


def test_private_run_end_to_end(tmp_path, tiny_preset):
    """Runs the CLI as a user would (`python -m trainers.glue`) and checks outputs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run(
        [sys.executable, "-m", "trainers.glue", *_base_args(tmp_path, tiny_preset, "--max_eval_examples", "12")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ROOT),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) >= {"dev_accuracy", "epsilon", "noise_multiplier", "steps", "export_path"}
    assert 0 <= summary["dev_accuracy"] <= 1
    assert 0 < summary["epsilon"] <= 8.0 and summary["certified"] is True
    assert summary["steps"] == 8 and summary["noise_multiplier"] > 0  # 2 epochs x floor(64/16)
    assert any(line.startswith("certified epsilon:") for line in lines)
    # Issue 13.2: nothing computed from the private batches is printed by default.
    assert "loss" not in result.stdout and "accuracy" not in result.stdout.replace("dev accuracy", "").replace(
        '"dev_accuracy"', ""
    )
    assert any(line.startswith("[train] step 8/8 | epsilon <=") for line in lines)

    run = tmp_path / "run"
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["schema_version"] == 1 and report["private"] is True and report["sampling"] == "poisson"
    assert report["sampling_probability"] == 0.25 and report["steps"] == 8 and report["planned_steps"] == 8
    assert report["certified"] is True and report["uncertified_because"] == []
    assert report["epsilon"] == pytest.approx(summary["epsilon"]) and report["epsilon_estimate"] > 0
    assert report["released_without_privacy"] == []
    assert report["run"]["package_versions"]["tensorflow"]
    assert [h["steps"] for h in report["epsilon_history"]] == [4, 8]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev_accuracy"] == summary["dev_accuracy"] and metrics["steps"] == 8
    assert metrics["train_history"] is None
    assert metrics["optimizer_updates"] == 8 and metrics["final_learning_rate"] == pytest.approx(0.01)
    assert metrics["config"]["lr_schedule"] == "constant" and metrics["config"]["pooling"] == "auto"
    assert metrics["classifier"] == "BertTextClassifier"  # auto: the tiny Keras preset has no mean-pooling config
    assert (run / "privacy.png").stat().st_size > 1000
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]

    # TensorBoard: epsilon at the logical step; no training loss (not released).
    import tensorflow as tf

    tags = {}
    for event_file in (run / "tensorboard").rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    assert tags["epoch/epsilon"] == [4, 8] and tags["privacy/epsilon"] == [4, 8]
    assert "epoch/loss" not in tags and "epoch/accuracy" not in tags

    # Checkpoint: the sidecar names the final checkpoint and the privacy plan.
    state = read_state(str(run))
    assert state["step"] == 8 and (run / "checkpoints" / (state["checkpoint"] + ".index")).is_file()
    assert state["plan"]["noise_multiplier"] == summary["noise_multiplier"]
    assert state["plan"]["l2_norm_clip"] == 1.0 and state["plan"]["steps"] == 8
    assert [h["steps"] for h in state["epsilon_history"]] == [4, 8]
    assert report["run"]["checkpointing"]["resumed_from_step"] == 0

    # The export carries the same report, and the TFX privacy gate accepts it.
    export_path = pathlib.Path(summary["export_path"])
    assert export_path == tmp_path / "saved_models" / "glue_sst2" / "1"
    exported = json.loads((export_path / "assets" / "privacy_report.json").read_text())
    assert exported["epsilon"] == pytest.approx(summary["epsilon"])
    passed, reason = gate_decision(exported, 8.0)
    assert passed, reason
    assert not gate_decision(exported, summary["epsilon"] / 2)[0]
    assert (export_path / "saved_model.pb").is_file()


def test_linear_schedule_counts_logical_steps(tmp_path, tiny_preset, capsys):
    """One optimizer update per noise release (not per physical chunk), so a
    linear schedule ends at 0 on the last planned step. A fixed sampling seed
    makes the export uncertified, and the TFX privacy gate refuses it."""
    rc = trainer.main(
        _base_args(tmp_path, tiny_preset, "--lr_schedule", "linear", "--sampling_seed", "3", "--max_eval_examples", "4")
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["optimizer_updates"] == 8
    assert metrics["final_learning_rate"] == pytest.approx(0.0, abs=1e-9)
    assert summary["certified"] is False
    exported = json.loads((pathlib.Path(summary["export_path"]) / "assets" / "privacy_report.json").read_text())
    assert exported["certified"] is False and "fixed sampling seed" in exported["uncertified_because"][0]
    passed, reason = gate_decision(exported, 100.0)
    assert not passed and "fixed sampling seed" in reason


def test_head_clip_share_splits_the_clip_budget(tmp_path, tiny_preset, capsys):
    """Group-wise clipping: the report records both groups' clip norms, whose
    squares add up to C^2 (so epsilon is that of global clipping at C)."""
    rc = trainer.main(
        _base_args(
            tmp_path,
            tiny_preset,
            "--head_clip_share",
            "0.25",
            "--l2_norm_clip",
            "2",
            "--max_steps",
            "2",
            "--no_export",
            "--max_eval_examples",
            "4",
        )
    )
    assert rc == 0
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    groups = report["mechanism"]["clip_group_norms"]
    assert groups["head"]["l2_norm_clip"] == pytest.approx(1.0)
    assert groups["head"]["l2_norm_clip"] ** 2 + groups["rest"]["l2_norm_clip"] ** 2 == pytest.approx(4.0)
    assert report["l2_norm_clip"] == 2.0 and report["certified"]


def test_ema_and_opt_in_training_metrics(tmp_path, tiny_preset, capsys):
    """--report_train_metrics releases the training loss/accuracy, and the
    privacy report lists them (issue 13.2)."""
    rc = trainer.main(
        _base_args(
            tmp_path,
            tiny_preset,
            "--ema_momentum",
            "0.5",
            "--max_steps",
            "3",
            "--report_train_metrics",
            "--no_export",
            "--max_eval_examples",
            "4",
        )
    )
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and "| loss " in out
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert [r["name"] for r in report["released_without_privacy"]] == ["train_loss", "train_accuracy"]
    assert report["certified"] is True  # The model's guarantee is unchanged; the release is listed.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["train_history"]["loss"]) == 1


def test_no_dp_baseline_is_labelled(tmp_path, tiny_preset, capsys):
    rc = trainer.main(_base_args(tmp_path, tiny_preset, "--no_dp", "--max_steps", "2", "--no_export"))
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["private"] is False and summary["epsilon"] == float("inf") and summary["export_path"] is None
    assert summary["steps"] == 2  # logical steps (accumulated updates), not physical batches
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["optimizer_updates"] == 2
    assert any("NON-PRIVATE" in line for line in out)
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["private"] is False and "NON-PRIVATE" in report["run"]["label"]
    assert report["certified"] is False and report["epsilon"] is None
    assert not gate_decision(report, 1e9)[0]


def _snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob("*"))


def test_resume_refuses_other_privacy_config_and_no_resume(tmp_path, tiny_preset, capsys):
    """A checkpoint from another privacy configuration, or --no_resume over a
    checkpoint: exit 2 naming the parameter, nothing written. The same command
    resumes (here: at the final step, so no step is taken and epsilon is that
    of the recorded steps, not more)."""
    args = _base_args(
        tmp_path,
        tiny_preset,
        "--max_steps",
        "3",
        "--epochs",
        "1",
        "--checkpoint_every",
        "2",
        "--no_export",
        "--max_eval_examples",
        "4",
    )
    assert trainer.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "run"
    state = read_state(str(run))
    assert first["steps"] == 3 and state["step"] == 3  # Saved at step 2 and at the epoch end (3).
    before = _snapshot(run)

    assert trainer.main(args + ["--l2_norm_clip", "0.5"]) == 2
    err = capsys.readouterr().err.split("error:")[-1]
    assert (
        "different privacy plan" in err
        and "l2_norm_clip [--l2_norm_clip, --no_dp]: checkpoint 1.0, this run 0.5" in err
    )
    assert "noise_multiplier" not in err  # sigma does not depend on the clip norm: only the clip is named.
    assert trainer.main(args + ["--epsilon", "4"]) == 2
    err = capsys.readouterr().err.split("error:")[-1]
    assert "target_epsilon [--epsilon]: checkpoint 8.0, this run 4.0" in err and "noise_multiplier [--epsilon" in err
    assert trainer.main(args + ["--lora_rank", "2"]) == 2
    assert "lora_rank [--lora_rank]: checkpoint 8, this run 2" in capsys.readouterr().err.split("error:")[-1]
    assert trainer.main(args + ["--no_resume"]) == 2
    assert "--no_resume" in capsys.readouterr().err.split("error:")[-1]
    assert _snapshot(run) == before

    assert trainer.main(args) == 0  # Same command: resumes at step 3 of 3.
    out = capsys.readouterr().out
    again = json.loads(out.strip().splitlines()[-1])
    assert "resumed from" in out
    assert again["steps"] == 3 and again["epsilon"] == first["epsilon"]
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["run"]["checkpointing"]["resumed_from_step"] == 3 and len(report["epsilon_history"]) == 1


def test_checkpoint_flags_validated(tmp_path, capsys):
    out = tmp_path / "out"
    assert trainer.main(["--output_dir", str(out), "--checkpoint_every", "-1"]) == 2
    assert "--checkpoint_every must be an integer >= 0" in capsys.readouterr().err.split("error:")[-1]
    assert trainer.main(["--output_dir", str(out), "--sampling_seed", "-3"]) == 2
    assert "--sampling_seed must be" in capsys.readouterr().err.split("error:")[-1]
    assert not out.exists()


def _trace_recorder(monkeypatch):
    """Records, per trace of the train step, the shape it was traced for (and the classifier built)."""
    from ewtune_tf.recipe import finetuning

    seen = {"shapes": []}
    compile_model = finetuning._compile

    def compile_and_record(run):
        compile_model(run)
        model, step = run.objects["model"], run.objects["model"].train_step
        seen["classifier"] = run.objects["classifier"]

        def train_step(data):
            seen["shapes"].append(tuple(data[0]["token_ids"].shape))  # Python runs once per trace
            return step(data)

        model.train_step = train_step

    monkeypatch.setattr(finetuning, "_compile", compile_and_record)
    return seen


@pytest.mark.slow  # about a minute on CPU: XLA compiles the private step of the tiny BERT
def test_jit_compile_runs_static_shapes_and_adds_the_overflow_to_delta(tmp_path, tiny_preset, capsys, monkeypatch):
    """Issue 15.3 / 17.1: --jit_compile pads every Poisson batch to one row count
    at the full sequence length (one trace, one XLA program), and the report's
    delta is the accountant's plus the overflow term the plan reserved for."""
    import keras

    from ewtune_tf.privacy.report import overflow_delta

    seen = _trace_recorder(monkeypatch)
    flags = ("--jit_compile", "--precision", "mixed_bfloat16", "--max_steps", "3", "--physical_batch_size", "16")
    rc = trainer.main(_base_args(tmp_path, tiny_preset, *flags, "--epochs", "1", "--no_export"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "[shapes] static: Poisson batches padded to 48 rows x 32 tokens" in out
    # One shape for every step, so one XLA program: the traces (tf.function traces a first call
    # twice when it creates variables, here the optimizer's) do not grow with the steps.
    assert set(seen["shapes"]) == {(48, 32)} and len(seen["shapes"]) <= 2
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    assert seen["classifier"].dtype_policy.name == "mixed_bfloat16"
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["certified"] and report["steps"] == 3 and report["sampler"]["max_batch_size"] == 48
    assert report["delta_accountant"] == pytest.approx(1e-5 * (1 - 1e-3))
    extra = overflow_delta(64, 0.25, 3, 48, report["epsilon"])
    assert report["delta_batch_overflow"] == pytest.approx(extra) and extra > 0
    assert report["delta"] == pytest.approx(report["delta_accountant"] + extra) and report["delta"] <= 1e-5


def test_static_batch_overflow_stops_the_run_before_the_step(tmp_path, tiny_preset, capsys, monkeypatch):
    """An overflow is never truncated: the run stops (exit 1) before that step, saying what happened."""
    from ewtune_tf.recipe.config import FinetuneConfig

    # B=16: overflows at once. (The padded batches without XLA: the overflow is the sampler's, before the model.)
    monkeypatch.setattr(FinetuneConfig, "static_batch_rows", lambda self, plan: 8)
    flags = ("--sampling_seed", "3", "--max_steps", "2", "--physical_batch_size", "8", "--no_export")
    rc = trainer.main(_base_args(tmp_path, tiny_preset, *flags))
    assert rc == 1
    err = capsys.readouterr().err
    assert "a Poisson batch exceeded the static batch size of 8 rows" in err and "Rerun the same command" in err
    assert not (tmp_path / "run" / "privacy_report.json").exists()
