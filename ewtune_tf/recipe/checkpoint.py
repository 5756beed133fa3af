"""Checkpoint and resume of a recipe run: the privacy state survives a kill.

Every ``checkpoint_every`` logical steps and at every epoch end the run saves
the model weights and the whole optimizer state (Adam slots, ``iterations``
and the EWTune privacy variables ``dp_steps``, ``dp_noise_multiplier``,
``dp_sampling_probability``, ``dp_delta``, ``dp_l2_norm_clip``) with
``tf.train.CheckpointManager`` to ``<output_dir>/checkpoints/ckpt-<step>``,
then an atomic JSON sidecar ``checkpoints/state.json`` naming that
checkpoint, the step, the epsilon history so far, the privacy plan and the
settings a resume must share. The sidecar is written *after* the checkpoint
it names, so it always points at a complete checkpoint.

Running the same settings with the same ``output_dir`` resumes: the plan is
recomputed and compared with the sidecar's (any difference is refused before
anything is written, naming each mismatching plan field and the settings
that determine it), the named checkpoint is restored (checkpoints newer than
the sidecar, left by a kill between the two writes, are deleted: their steps
were never recorded and are never released), and training continues from the
restored logical step for exactly the remaining steps. ``dp_steps`` comes
from the checkpoint, so epsilon never resets and never double counts.

Why resuming with fresh samples is sound: the accountant certifies the
T-fold adaptive composition of the Poisson-subsampled Gaussian mechanism.
Each step draws its batch and its noise independently, so the steps after
the restored step t are distributed exactly as in an uninterrupted run given
the state at t; composition allows each step to depend adaptively on the
previous outputs. Steps a killed process took after its last checkpoint never
reach any output (their checkpoints are deleted on resume), and the T steps
that do are counted once each.
"""

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional

from ewtune_tf.recipe.config import PLAN_SOURCES
from ewtune_tf.recipe.settings import ConfigError, escape
from ewtune_tf.utils.files import atomic_write_json, read_json

CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINT_STATE = "state.json"  # The sidecar: names the checkpoint to resume from.
CHECKPOINT_PREFIX = "ckpt"
STATE_FORMAT = 2  # 1: ewtune-train before the recipe (privacy_config instead of plan).


@dataclasses.dataclass
class StepCounter:
    """The run's logical step: ``dp_steps`` (noise releases) when private; for
    a non-private baseline, optimizer updates (Keras's ``iterations`` counts
    accumulated updates; only the boundary test reads the chunk counter)."""

    optimizer: Any
    private: bool
    accumulate: int = 1

    def logical(self) -> int:
        return int((self.optimizer.dp_steps if self.private else self.optimizer.iterations).numpy())

    def at_boundary(self) -> bool:
        return self.private or int(self.optimizer._iterations.numpy()) % self.accumulate == 0


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def plan_record(plan) -> Dict[str, Any]:
    """What the accountant's answer depends on; must match to resume."""
    record = plan.to_dict()
    record.pop("calibration")
    return record


def read_state(output_dir: str) -> Optional[Dict[str, Any]]:
    """The resume sidecar of ``output_dir`` (None if there is none).

    A sidecar that does not parse cannot come from this recipe (it is written
    atomically), so it is an error rather than a silent fresh start.
    """
    path = os.path.join(checkpoint_dir(output_dir), CHECKPOINT_STATE)
    if not os.path.isfile(path):
        return None
    try:
        state = read_json(path)
        int(state["step"]), str(state["checkpoint"]), dict(state["plan"])
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, this version reads {STATE_FORMAT}")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            "{output_dir} "
            + escape(f"{output_dir!r} holds an unreadable checkpoint state {path} ({e}); ")
            + "remove its checkpoints/ directory or use another output directory.",
            "output_dir",
        ) from None
    return state


def _mismatches(saved: Dict, current: Dict, sources: Dict[str, tuple], settings: set) -> List[str]:
    """``key [settings that set it]: checkpoint a, this run b`` for each difference."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            names = ", ".join("{" + s + "}" if s in settings else s for s in sources.get(key, (key,)))
            out.append(f"{key} [{names}]: " + escape(f"checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"))
    return out


def decide_resume(config, plan) -> Optional[Dict[str, Any]]:
    """Fresh start (None) or the sidecar to resume, decided before anything is written.

    Raises ConfigError for ``no_resume`` over an existing checkpoint, or a
    checkpoint of another privacy plan or model/training settings.
    """
    state = read_state(config.output_dir)
    if state is None:
        return None
    where = escape(os.path.join(checkpoint_dir(config.output_dir), state["checkpoint"]))
    settings = set(config.to_dict())
    if config.no_resume:
        raise ConfigError(
            f"{{no_resume}}: {{output_dir}} already holds a checkpoint ({where}, logical step {state['step']}); "
            "refusing to overwrite it. Use another output directory, remove its checkpoints/ directory, or "
            "resume it.",
            *settings,
        )
    comparisons = (
        (state["plan"], plan_record(plan), PLAN_SOURCES, "privacy plan; resuming would compose different mechanisms"),
        (state.get("settings", {}), config.resume_settings(), {}, "model/training configuration"),
    )
    for saved, current, sources, what in comparisons:
        bad = _mismatches(saved, current, sources, settings)
        if bad:
            raise ConfigError(
                f"{{output_dir}} holds a checkpoint ({where}) of a different {what}. Mismatching: "
                + "; ".join(bad)
                + ". Rerun with the checkpoint's settings, or use another output directory.",
                *settings,
            )
    if not 0 <= int(state["step"]) <= plan.steps:
        raise ConfigError(f"checkpoint state {where}: step {state['step']} outside [0, {plan.steps}] (planned steps)")
    return state


def _checkpoint_number(name: str) -> Optional[int]:
    head = name.split(".", 1)[0]
    if not head.startswith(CHECKPOINT_PREFIX + "-"):
        return None
    try:
        return int(head[len(CHECKPOINT_PREFIX) + 1 :])
    except ValueError:
        return None


def remove_checkpoints_after(ckpt_dir: str, step: int) -> List[str]:
    """Deletes checkpoint files numbered > step (a kill between a checkpoint
    and its sidecar leaves one: its steps were never recorded, so no output may
    reflect them)."""
    removed = []
    if not os.path.isdir(ckpt_dir):
        return removed
    for name in sorted(os.listdir(ckpt_dir)):
        number = _checkpoint_number(name)
        if number is not None and number > step:
            os.unlink(os.path.join(ckpt_dir, name))
            removed.append(name)
    return removed


def make_checkpointer(model, optimizer, ckpt_dir: str, every: int, counter: StepCounter, budget, sidecar: Dict):
    """Keras callback: checkpoint every ``every`` logical steps and at epoch end.

    Order of writes: the TF checkpoint (CheckpointManager: temp files, then
    the index) and only then the sidecar naming it (atomic replace). A kill at
    any point leaves the previous sidecar pointing at a complete checkpoint.
    Place it after PrivacyBudget so the epoch-end sidecar has that epoch's
    epsilon entry. ``sidecar``: the plan and settings records.
    """
    import keras
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    # max_to_keep >= 2: the sidecar may still name the previous checkpoint
    # while the next one is being written.
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=2, checkpoint_name=CHECKPOINT_PREFIX)

    class Checkpointer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last_saved: Optional[int] = None
            self.checkpoint = checkpoint

        def save(self) -> None:
            step = counter.logical()
            if step == self.last_saved:
                return
            path = manager.save(checkpoint_number=step)
            state = dict(sidecar, format=STATE_FORMAT, step=step, checkpoint=os.path.basename(path))
            state.update(epsilon_history=list(budget.history) if budget is not None else [])
            state.update(privacy_state=optimizer.privacy_state() if counter.private else None)
            atomic_write_json(os.path.join(ckpt_dir, CHECKPOINT_STATE), dict(state, saved_unix_time=time.time()))
            self.last_saved = step

        def on_train_batch_end(self, batch, logs=None):
            steps_this_epoch = (self.params or {}).get("steps")
            if steps_this_epoch and batch + 1 >= steps_this_epoch:
                return  # The epoch-end save covers it (with the epoch's epsilon entry).
            if every and counter.at_boundary() and counter.logical() % every == 0:
                self.save()

        def on_epoch_end(self, epoch, logs=None):
            if counter.at_boundary():
                self.save()

    return Checkpointer()


def start_fresh(ckpt_dir: str, history_path: str) -> List[str]:
    """Removes what a killed earlier run left without a sidecar (unrecorded steps)."""
    removed = remove_checkpoints_after(ckpt_dir, -1)
    index = os.path.join(ckpt_dir, "checkpoint")  # CheckpointManager's index of them.
    if os.path.isfile(index):
        os.unlink(index)
    if os.path.isfile(history_path):  # A previous run's history is not this run's.
        atomic_write_json(history_path, {"history": []})
    return removed


def restore(checkpointer, ckpt_dir: str, state: Dict, counter: StepCounter, model, budget, history_path: str) -> str:
    """Restores the sidecar's checkpoint and the epsilon history up to its step; returns its path."""
    step = int(state["step"])
    optimizer = counter.optimizer
    optimizer.build(model.trainable_variables)
    path = os.path.join(ckpt_dir, state["checkpoint"])
    status = checkpointer.checkpoint.restore(path)
    status.assert_existing_objects_matched()  # Every weight and optimizer slot restored.
    status.expect_partial()  # Values for objects built later (none needed) stay unused, quietly.
    if counter.logical() != step or not counter.at_boundary():
        raise RuntimeError(
            f"checkpoint {path}: restored logical step {counter.logical()} != recorded {step}; "
            "refusing to resume with an inconsistent privacy state."
        )
    if budget is not None:
        optimizer.check_privacy_state()  # Restored sigma/q/delta/C equal this run's (exact).
        history = [h for h in state.get("epsilon_history", []) if int(h["steps"]) <= step]
        budget.history = list(history)
        atomic_write_json(history_path, {"history": history})
    checkpointer.last_saved = step
    return path
