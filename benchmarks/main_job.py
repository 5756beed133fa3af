"""``train_step.py --workload main_job``: one logical step of ewtune-train's own
path, private vs non-private, with the private step's per-chunk cost split.

What one measurement runs (in its own process, see ``train_step.py``):

* **Data and model, as the trainer builds them.** Real SST-2 sentences from
  ``--glue_dir`` tokenized by the classifier's preprocessor at the trainer's
  sequence length (``trainers.glue.DEFAULTS``), ``build_classifier`` with the
  trainer's model, dropout and pooling, wrapped in
  ``ewtune_tf.nlp.models.dynamic_padding_model`` (each chunk is cut to its
  longest row inside the graph).
* **One logical batch, as the trainer samples it.** ``poisson_batches`` at
  ``q = batch / N`` (a fixed seed, so every round times the same rows),
  ``sort_by_length``; the batch is then padded with weight-0 rows to whole
  chunks of ``physical_batch_size`` -- exactly the rows the private step
  processes.
* **Private step:** ``EWTuneAdam`` + ``make_private(physical_batch_size=64)``
  (ghost clipping, chunks accumulated in the step's loop, noise once, one
  update), one ``model.fit`` over a one-batch dataset whose batch dimension
  is unknown, as the trainer's Poisson dataset is.
* **Non-private step:** Keras ``Adam(gradient_accumulation_steps=K)`` over
  the *same* K chunks (same rows, same padding, same wrapper), one
  ``model.fit`` of K steps -- the trainer's ``--no_dp`` path.
* Both ``fit`` calls, and the parts of the cost split below, are timed
  interleaved (median over ``rounds``), after one untimed call each
  (tracing), so that load from other processes hits them alike. Peak memory:
  process peak RSS after the non-private step and after the private step
  (``ru_maxrss``; an upper bound on the private step's own peak ratio).
* **Cost split** of the private step, per logical step (sum over its chunks)
  and per chunk: the ghost *norm pass* (forward, backward to the layer
  outputs, per-example norms: ``ghost.ghost_norms``), the *clipped-sum pass*
  (book-keeping clipped sum minus the norm pass), *noise and update*
  (``apply_private_gradients``), and *accumulation* (the rest: the chunk loop,
  padding, dense adds, metrics). The non-private step is split into
  forward+backward and the rest (accumulation and update).

Settings: ``full`` (every weight trainable; the issue's ``--lora_rank 0
--learning_rate 5e-4 --l2_norm_clip 0.1``) and ``lora`` (the main job's
defaults: LoRA rank 8, 1e-2, C = 1). The learning rates only matter for
realism; the noise multiplier is fixed at 0.6 (the main job's calibrated
sigma is 0.593; calibration does not change the step).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import resource
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainers.glue import DEFAULTS  # noqa: E402  (numpy-only at import time)

SETTINGS: Dict[str, Dict] = {
    "full": {"lora_rank": 0, "learning_rate": 5e-4, "l2_norm_clip": 0.1},
    "lora": {"lora_rank": DEFAULTS["lora_rank"], "learning_rate": DEFAULTS["learning_rate"], "l2_norm_clip": 1.0},
}
NOISE_MULTIPLIER = 0.6
SAMPLING_SEED = 1234  # benchmark only: the trainer draws a secret seed


@dataclasses.dataclass
class MainJobConfig:
    """One measurement. ``batch_size``: expected logical batch (Poisson)."""

    setting: str = "full"
    model: str = DEFAULTS["model"]
    glue_dir: str = str(ROOT.parent / "shared" / "data" / "glue")
    batch_size: int = DEFAULTS["batch_size"]
    physical_batch_size: int = DEFAULTS["physical_batch_size"]
    sequence_length: int = DEFAULTS["sequence_length"]
    max_examples: Optional[int] = None
    rounds: int = 3
    cost_split: bool = True  # also time the parts of the private step
    # "dp" or "nonprivate": a memory-only run that builds the model and runs
    # only that step (twice), so its process peak RSS is that step's alone.
    only: Optional[str] = None


def rss_mb() -> float:
    """Process peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(cfg: MainJobConfig):
    """(classifier, token dict, labels) built as the trainer builds them."""
    from ewtune_tf.nlp import glue, models

    train = glue.load_glue("sst2", "train", glue_dir=cfg.glue_dir, max_examples=cfg.max_examples)
    classifier = models.build_classifier(
        cfg.model,
        num_classes=2,
        sequence_length=cfg.sequence_length,
        lora_rank=SETTINGS[cfg.setting]["lora_rank"],
        dropout=DEFAULTS["dropout"],
    )
    return classifier, models.tokenize(classifier.preprocessor, train.texts), train.labels


def logical_batch(tokens, labels, cfg: MainJobConfig):
    """One Poisson batch, length-sorted, padded to whole chunks: (x, y, w, K)."""
    import tensorflow as tf

    from ewtune_tf.data import poisson
    from ewtune_tf.nlp import models

    base = tf.data.Dataset.from_tensor_slices(({k: tf.constant(v) for k, v in tokens.items()}, tf.constant(labels)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed-seed warning: intended here
        batches = poisson.poisson_batches(base, expected_batch_size=cfg.batch_size, steps=1, seed=SAMPLING_SEED)
    x, y, w = next(iter(batches.dataset.map(models.sort_by_length)))
    p = cfg.physical_batch_size
    pad = (-int(w.shape[0])) % p

    def padded(t):
        return tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))

    x, y, w = tf.nest.map_structure(padded, (x, y, w))
    return x, y, w, int(w.shape[0]) // p


def build_steps(classifier, batch, num_examples: int, cfg: MainJobConfig):
    """(private model, non-private model, private fit, non-private fit)."""
    import keras
    import tensorflow as tf

    from ewtune_tf.nlp import models
    from ewtune_tf.optimizers import EWTuneAdam
    from ewtune_tf.training import make_private

    x, y, w, chunks = batch
    s = SETTINGS[cfg.setting]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def metrics():
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    private = models.dynamic_padding_model(classifier)
    private.compile(
        optimizer=EWTuneAdam(
            learning_rate=s["learning_rate"],
            l2_norm_clip=s["l2_norm_clip"],
            noise_multiplier=NOISE_MULTIPLIER,
            num_examples=num_examples,
            batch_size=cfg.batch_size,
            sampling_probability=cfg.batch_size / num_examples,
            clipping=DEFAULTS["clipping"],
        ),
        loss=loss,
        metrics=metrics(),
    )
    make_private(private, physical_batch_size=cfg.physical_batch_size)
    nonprivate = models.dynamic_padding_model(classifier)
    nonprivate.compile(
        optimizer=keras.optimizers.Adam(learning_rate=s["learning_rate"], gradient_accumulation_steps=max(2, chunks)),
        loss=loss,
        metrics=metrics(),
    )
    # tf.data autotuning off: a fit() per logical step destroys its iterator,
    # which waits for the autotuning thread's current sleep (10 ms doubling up
    # to a minute) -- a stall the trainer pays once per epoch, not per step.
    options = tf.data.Options()
    options.autotune.enabled = False
    rows = tf.data.Dataset.from_tensor_slices((x, y, w)).with_options(options)
    # Batch dimension unknown (no drop_remainder), as for Poisson batches.
    dp_ds = rows.batch(int(w.shape[0]))
    np_ds = rows.batch(cfg.physical_batch_size, drop_remainder=True)

    def dp_step():
        private.fit(dp_ds, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)

    def np_step():
        nonprivate.fit(np_ds, epochs=1, steps_per_epoch=chunks, verbose=0, shuffle=False)

    return private, nonprivate, dp_step, np_step


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    """Times ``fns`` in turn, ``rounds`` times, so load hits them alike."""
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(timed(fn))
    return out


def _chunks(batch, p: int) -> list:
    """The K physical chunks ``(x, y, w)`` of a padded logical batch."""
    x, y, w, k = batch
    cut = [slice(i * p, (i + 1) * p) for i in range(k)]
    return [({key: v[c] for key, v in x.items()}, y[c], w[c]) for c in cut]


def _scalar(values) -> object:
    """A cheap scalar depending on every tensor (forces them, copies nothing)."""
    import tensorflow as tf

    return tf.add_n([tf.reduce_sum(v.values if isinstance(v, tf.IndexedSlices) else v) for v in values])


def component_fns(private, nonprivate, cfg: MainJobConfig):
    """tf.functions of one chunk: norm pass, full clipped sum, non-private
    gradient; and of one logical step's noise + update."""
    import tensorflow as tf

    from ewtune_tf.mechanism import clipping, ghost
    from ewtune_tf.training.per_example_loss import make_per_example_loss

    variables = list(private.trainable_variables)
    per_example = make_per_example_loss(private)
    clip = SETTINGS[cfg.setting]["l2_norm_clip"]
    opt = private.optimizer

    def loss_fn(x, y, w):
        return lambda: per_example(y, private(x, training=True), w)

    @tf.function
    def norm_pass(x, y, w):
        return tf.reduce_sum(ghost.ghost_norms(private, loss_fn(x, y, w), variables))

    @tf.function
    def clipped_sum(x, y, w):
        res = clipping.clipped_gradient_sum(DEFAULTS["clipping"], private, loss_fn(x, y, w), variables, clip)
        return _scalar(res.grad_sum)

    @tf.function
    def nonprivate_grad(x, y, w):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example(y, nonprivate(x, training=True), w))
        return _scalar(tape.gradient(loss, variables))

    zeros = [tf.zeros(v.shape, tf.float32) for v in variables]

    @tf.function
    def noise_update():
        grads = opt.apply_private_gradients(zeros, variables, physical_batch_size=cfg.physical_batch_size)
        return _scalar(grads)

    return {"norm_pass": norm_pass, "clipped_sum": clipped_sum, "nonprivate_grad": nonprivate_grad}, noise_update


def component_steps(private, nonprivate, batch, cfg: MainJobConfig) -> Dict[str, Callable[[], object]]:
    """One logical step's worth of each part, as no-arg callables: the norm
    pass, the full clipped sum and the non-private gradient over every chunk,
    and one noise + update."""
    per_chunk, noise_update = component_fns(private, nonprivate, cfg)
    chunks = _chunks(batch, cfg.physical_batch_size)

    def over_chunks(fn):
        return lambda: [fn(*c).numpy() for c in chunks]

    steps = {name: over_chunks(fn) for name, fn in per_chunk.items()}
    steps["noise_update"] = lambda: noise_update().numpy()
    return steps


def cost_split(seconds: Dict[str, float], chunks: int) -> Dict:
    """Seconds per logical step (and per chunk) of each part, from the medians
    of the interleaved timings (see module docstring). "accumulation" is the
    rest of the private step; timing noise can make it slightly negative."""
    dp = {
        "norm_pass": seconds["norm_pass"],
        "clipped_sum_pass": seconds["clipped_sum"] - seconds["norm_pass"],
        "noise_and_update": seconds["noise_update"],
        "accumulation": seconds["dp"] - seconds["clipped_sum"] - seconds["noise_update"],
    }
    npv = {
        "forward_backward": seconds["nonprivate_grad"],
        "accumulation_and_update": seconds["nonprivate"] - seconds["nonprivate_grad"],
    }
    return {
        "chunks": chunks,
        "dp_seconds_per_step": dp,
        "dp_seconds_per_chunk": {key: v / chunks for key, v in dp.items()},
        "nonprivate_seconds_per_step": npv,
        "nonprivate_seconds_per_chunk": {key: v / chunks for key, v in npv.items()},
    }


def run(cfg: MainJobConfig) -> Dict:
    """One measurement in this process (see module docstring)."""
    import keras
    import numpy as np

    if cfg.setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}; got {cfg.setting!r}.")
    keras.utils.set_random_seed(0)
    classifier, tokens, labels = load(cfg)
    batch = logical_batch(tokens, labels, cfg)
    private, nonprivate, dp_step, np_step = build_steps(classifier, batch, len(labels), cfg)
    if cfg.only is not None:
        step = {"dp": dp_step, "nonprivate": np_step}[cfg.only]
        seconds = [timed(step) for _ in range(2)]  # the first traces
        return {"setting": cfg.setting, "only": cfg.only, "seconds": seconds, "peak_rss_mb": rss_mb()}
    first = {"nonprivate": timed(np_step)}
    rss_nonprivate = rss_mb()
    first["dp"] = timed(dp_step)
    rss_both = rss_mb()
    steps = {"nonprivate": np_step, "dp": dp_step}
    if cfg.cost_split:
        steps.update(component_steps(private, nonprivate, batch, cfg))
    for name, fn in steps.items():
        if name not in first:
            first[name] = timed(fn)  # traces
    times = interleaved(steps, cfg.rounds)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    np_s, dp_s = medians["nonprivate"], medians["dp"]
    lengths = np.asarray(batch[0]["padding_mask"]).sum(axis=1)
    real = int(np.asarray(batch[2]).astype(bool).sum())
    return {
        "setting": cfg.setting,
        "model": cfg.model,
        "examples": int(len(labels)),
        "expected_batch_size": cfg.batch_size,
        "batch_rows": real,
        "chunks": int(batch[3]),
        "physical_batch_size": cfg.physical_batch_size,
        "mean_length": float(lengths[:real].mean()),
        "chunk_widths": [int(lengths[i]) for i in range(0, len(lengths), cfg.physical_batch_size)],
        "trainable_params": int(sum(np.prod(v.shape) for v in classifier.trainable_variables)),
        "first_step_seconds": first,
        "nonprivate_seconds": np_s,
        "dp_seconds": dp_s,
        "ratio": dp_s / np_s,
        "all_seconds": times,
        "nonprivate_peak_rss_mb": rss_nonprivate,
        "peak_rss_mb": rss_both,
        # An upper bound (it also counts the non-private step's state);
        # train_step.py replaces it, except under --quick, with the ratio of
        # two single-step processes and keeps this one under its own name.
        "peak_memory_ratio": rss_both / rss_nonprivate,
        "in_process_peak_memory_ratio": rss_both / rss_nonprivate,
        "memory_source": "process peak RSS (ru_maxrss) after both steps, one process: an upper bound",
        "cost_split": cost_split(medians, int(batch[3])) if cfg.cost_split else None,
    }


def default_glue_dir() -> str:
    return os.environ.get("EWTUNE_GLUE_DIR") or MainJobConfig.glue_dir
