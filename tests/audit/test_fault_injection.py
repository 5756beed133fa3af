"""Fault injection: SIGKILL mid-epoch, resume, and the privacy state must match.

A private training run (EWTuneSGD + make_private + Poisson batches +
PrivacyBudget, checkpointed every batch by Keras's BackupAndRestore) is
killed with SIGKILL in the middle of its second epoch, then restarted with
the same command. The resumed run must end with exactly the step count and ε
of an uninterrupted run (ε never resets, never double counts), and every
file it writes must parse (atomic writes).

The trainer CLI (trainers/glue.py, `ewtune-train`) is tested the same way in
``test_trainer_cli_kill_and_resume``: killed mid-epoch once a checkpoint
exists, rerun with the same command, it resumes from its checkpoint.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import keras
    import tensorflow as tf
    import ewtune_tf
    from ewtune_tf.data import poisson_batches
    from ewtune_tf.utils.files import atomic_write_json as _atomic_write_json

    workdir, delay, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    N, Q, STEPS, EPOCHS, SIGMA, DELTA = 64, 0.25, 4, 3, 1.0, 1e-5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")[:, None]
    batches = poisson_batches(tf.data.Dataset.from_tensor_slices((x, y)), Q, steps=STEPS, epochs=EPOCHS)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    opt = ewtune_tf.EWTuneSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=SIGMA,
                              num_examples=N, batch_size=Q * N, target_delta=DELTA)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    ewtune_tf.make_private(model)

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            _atomic_write_json(os.path.join(workdir, "progress.json"),
                               {"epoch": self.epoch, "batch": batch,
                                "dp_steps": int(opt.dp_steps.numpy())})
            time.sleep(delay)

    budget = ewtune_tf.PrivacyBudget(history_path=os.path.join(workdir, "privacy_history.json"))
    if mode == "keras_backup":
        # Keras's own fault tolerance: restores the mid-epoch weights and
        # optimizer state (dp_steps included) but restarts the epoch at batch 0.
        callbacks = [keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=1,
                                                      double_checkpoint=True),
                     budget, Progress()]
        model.fit(batches.dataset, epochs=EPOCHS, callbacks=callbacks, verbose=0)
    else:
        # Step-aware resume: the checkpointed dp_steps says where to continue.
        ckpt = os.path.join(workdir, "ckpt.weights.h5")

        class AtomicCheckpoint(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                tmp = os.path.join(workdir, ".tmp_ckpt.weights.h5")
                model.save_weights(tmp)
                os.replace(tmp, ckpt)

        if os.path.exists(ckpt):
            opt.build(model.trainable_variables)
            model.load_weights(ckpt)
        epoch, done_in_epoch = divmod(int(opt.dp_steps.numpy()), STEPS)
        callbacks = [AtomicCheckpoint(), budget, Progress()]
        if done_in_epoch:
            model.fit(batches.dataset.take(STEPS - done_in_epoch), initial_epoch=epoch,
                      epochs=epoch + 1, callbacks=callbacks, verbose=0)
            epoch += 1
        if epoch < EPOCHS:
            model.fit(batches.dataset, initial_epoch=epoch, epochs=EPOCHS, callbacks=callbacks,
                      verbose=0)
    steps = int(opt.dp_steps.numpy())
    eps = ewtune_tf.compute_epsilon(sampling_probability=Q, noise_multiplier=SIGMA, steps=steps,
                                    delta=DELTA).epsilon
    print(json.dumps({"steps": steps, "epsilon": eps,
                      "history": [[h["epoch"], h["steps"], h["epsilon"]] for h in budget.history]}))
    """
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_to_end(script, workdir, mode):
    out = subprocess.run(
        [sys.executable, str(script), str(workdir), "0", mode], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_progress(workdir):
    try:
        return json.loads((workdir / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # decode error would be a bug: asserted below
        return None


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        "step_aware",
        pytest.param(
            "keras_backup",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "keras.callbacks.BackupAndRestore restores dp_steps mid-epoch but restarts the "
                    "epoch at batch 0, so a resumed run takes extra private steps (14 instead of 12 "
                    "here; epsilon is honestly counted for 14, but the run differs from an "
                    "uninterrupted one). Use a step-aware resume (skip dp_steps % steps_per_epoch "
                    "batches), as mode 'step_aware' and ewtune-train do."
                ),
            ),
        ),
    ],
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, mode):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()

    reference = _run_to_end(script, ref_dir, mode)
    assert reference["steps"] == 3 * 4

    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), "0.5", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            p = _read_progress(run_dir)
            if p is not None and p["epoch"] == 1 and p["batch"] >= 1:  # middle of epoch 2
                killed_at = p
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert 4 < killed_at["dp_steps"] < 8

    # Every file the killed run left behind parses (atomic writes).
    json.loads((run_dir / "progress.json").read_text())
    history = json.loads((run_dir / "privacy_history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0]
    assert not list(run_dir.glob(".tmp_*")), "temp files must not survive a completed write"

    resumed = _run_to_end(script, run_dir, mode)
    assert resumed["steps"] == reference["steps"], (killed_at, resumed)
    assert resumed["epsilon"] == reference["epsilon"]
    # epsilon history continues (no reset, no double count) across the kill.
    final_history = json.loads((run_dir / "privacy_history.json").read_text())["history"]
    assert [h["epoch"] for h in final_history] == [0, 1, 2]
    assert [h["steps"] for h in final_history] == [4, 8, 12]
    assert final_history[-1]["epsilon"] == reference["history"][-1][2]


ATOMIC_WRITER = textwrap.dedent(
    """
    import sys
    from ewtune_tf.utils.files import atomic_write_json as _atomic_write_json
    path = sys.argv[1]
    obj = {"history": [{"epoch": i, "epsilon": 1.0 + i, "pad": "x" * 200} for i in range(5000)]}
    i = 0
    while True:
        obj["i"] = i
        _atomic_write_json(path, obj)
        i += 1
    """
)


def test_kill_during_report_writes_never_leaves_a_corrupt_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(ATOMIC_WRITER)
    target = tmp_path / "out" / "report.json"
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], env=_env())
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if target.exists():
            assert len(json.loads(target.read_text())["history"]) == 5000


def test_atomic_writer_replaces_in_one_step(tmp_path, monkeypatch):
    from ewtune_tf.utils import files

    path = tmp_path / "h.json"
    files.atomic_write_json(str(path), {"a": 1})

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        files.atomic_write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # no temp left


# ------------------------------------------------ ewtune-train (the CLI)

GLUE_FIXTURES = ROOT / "tests" / "fixtures" / "glue"
# 64 fixture rows, B=8: q=1/8, 8 logical steps per epoch, 3 epochs = 24 steps.
CLI_STEPS_PER_EPOCH, CLI_EPOCHS = 8, 3


def _cli_command(preset, output_dir):
    return [
        sys.executable,
        "-m",
        "trainers.glue",
        "--model",
        str(preset),
        "--glue_dir",
        str(GLUE_FIXTURES),
        "--task",
        "sst2",
        "--batch_size",
        "8",
        "--physical_batch_size",
        "8",
        "--epochs",
        str(CLI_EPOCHS),
        "--sequence_length",
        "32",
        "--max_eval_examples",
        "8",
        "--checkpoint_every",
        "1",
        "--no_export",
        "--output_dir",
        str(output_dir),
    ]


def _cli_state(output_dir):
    try:
        return json.loads((output_dir / "checkpoints" / "state.json").read_text())
    except FileNotFoundError:
        return None


def _cli_finish(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


@pytest.mark.slow
def test_trainer_cli_kill_and_resume(tmp_path):
    """SIGKILL `ewtune-train` mid-epoch (after a checkpoint), rerun the same
    command: it resumes from the checkpointed logical step and ends with the
    step count, epsilon and epsilon history of an uninterrupted run."""
    from ewtune_tf.nlp.models import save_tiny_bert_preset

    preset = save_tiny_bert_preset(str(tmp_path / "tiny_bert"))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    total = CLI_STEPS_PER_EPOCH * CLI_EPOCHS

    # The run to kill and the uninterrupted reference run side by side.
    proc = subprocess.Popen(
        _cli_command(preset, run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )
    ref = subprocess.Popen(
        _cli_command(preset, ref_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            state = _cli_state(run_dir)  # Atomic: never half-written (a decode error fails the test).
            if state is not None and CLI_STEPS_PER_EPOCH < state["step"] < 2 * CLI_STEPS_PER_EPOCH:
                os.kill(proc.pid, signal.SIGKILL)  # In the middle of the second epoch.
                killed_at = state["step"]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        ref_out, ref_err = ref.communicate(timeout=300)
    assert killed_at is not None, f"the run finished or stalled before it could be killed: {err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert ref.returncode == 0, ref_err[-3000:]
    reference = json.loads(ref_out.strip().splitlines()[-1])
    assert reference["steps"] == total

    # What the kill left: a sidecar naming a complete checkpoint at or after
    # the observed step, one epsilon entry (epoch 0), no report yet.
    state = _cli_state(run_dir)
    assert killed_at <= state["step"] < 2 * CLI_STEPS_PER_EPOCH
    assert [h["epoch"] for h in state["epsilon_history"]] == [0]
    assert (run_dir / "checkpoints" / (state["checkpoint"] + ".index")).is_file()
    assert not (run_dir / "privacy_report.json").exists()

    resumed, stdout = _cli_finish(_cli_command(preset, run_dir))
    assert f"resumed from {run_dir / 'checkpoints' / state['checkpoint']}" in stdout
    for key in ("steps", "epsilon", "noise_multiplier", "certified"):
        assert resumed[key] == reference[key], key

    report, ref_report = (json.loads((d / "privacy_report.json").read_text()) for d in (run_dir, ref_dir))
    for key in ("steps", "planned_steps", "noise_multiplier", "sampling_probability", "epsilon", "certified"):
        assert report[key] == ref_report[key], key
    assert report["run"]["checkpointing"]["resumed_from_step"] == state["step"]
    # epsilon history continues across the kill: no reset, no double count.
    strip = lambda hist: [(h["epoch"], h["steps"], h["epsilon"]) for h in hist]
    assert strip(report["epsilon_history"]) == strip(ref_report["epsilon_history"])
    assert [h["steps"] for h in report["epsilon_history"]] == [8, 16, 24]
    final = _cli_state(run_dir)
    assert final["step"] == total and strip(final["epsilon_history"]) == strip(report["epsilon_history"])
    assert not [p for p in run_dir.rglob(".tmp*")], "temp files must not survive"
