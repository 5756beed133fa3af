"""What non-finite record handling costs per private step: table + JSON.

Model: the default MiniLM-L6 BERT classifier with LoRA rank 8 (as in
``benchmarks/train_step.py``), batch 32, sequence length 64, random token
ids, dropout on.

Two steps are traced (``tf.function``, ``jit_compile=False``) and timed
*interleaved* in one process (median of ``--steps`` rounds), so that load
from other processes hits both alike:

* ``guarded``: ``ewtune_tf.training.clipped_sum.logical_clipped_sum``, the
  private step's clipped sum: records whose gradient is not finite are
  masked with ``tf.where`` and, for implementations whose rows are not
  isolated, a row-by-row recomputation sits behind a ``tf.cond`` (not taken
  here: every example is finite);
* ``baseline``: the clipping implementation called directly, with
  ``clipping.mask_records`` (the ``tf.where`` on every record's rows)
  replaced by the identity while it is traced: the clipped sum without the
  row masking and without the recomputation branch (what remains, a
  ``tf.where`` on the ``[R]`` clip factors, is negligible).

``ratio`` = guarded / baseline seconds. Measured on the shared 2-core CPU
machine (load average ~9, 5 rounds): ghost 4.23 s baseline, 4.12 s guarded,
ratio 0.97 (no measurable cost; rounds vary by +-25 %); vectorized 113 s vs
122 s, ratio 1.09 (its MiniLM jacobian alone takes ~20 minutes to trace
and run here, so it is not in the default run). Usage::

    python benchmarks/nonfinite_overhead.py [--impls ghost vectorized] [--steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fixed_step import minilm_dir  # benchmarks/ is not a package


def _steps(impl: str, batch: int, seq: int):
    """(guarded step, baseline step, inputs) for one clipping implementation."""
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from ewtune_tf.mechanism import clipping
    from ewtune_tf.training import clipped_sum

    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=2, preprocessor=None)
    model.backbone.enable_lora(rank=8)
    variables = list(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": tf.constant(rng.integers(1, model.backbone.vocabulary_size, size=(batch, seq)), tf.int32),
        "segment_ids": tf.zeros((batch, seq), tf.int32),
        "padding_mask": tf.ones((batch, seq), tf.int32),
    }
    y = tf.constant(rng.integers(0, 2, size=(batch,)), tf.int32)

    def loss_fn_for(rows, report):
        del report
        return lambda: keras.losses.sparse_categorical_crossentropy(rows.y, model(rows.x, training=True), True)

    spec = clipped_sum.ClipSpec(impl, 1.0, None, None, float(batch))
    rows = clipped_sum.Rows(x, y, tf.ones([batch], tf.float32), None)

    @tf.function(jit_compile=False)
    def guarded():
        return clipped_sum.logical_clipped_sum(model, spec, loss_fn_for, rows, variables).grad_sum

    @tf.function(jit_compile=False)
    def baseline():
        return clipping.clipped_gradient_sum(impl, model, loss_fn_for(rows, False), variables, 1.0).grad_sum

    original = clipping.mask_records
    clipping.mask_records = lambda t, finite: t
    try:
        baseline()  # traced without masking
    finally:
        clipping.mask_records = original
    guarded()
    return guarded, baseline


def measure(impl: str, batch: int, seq: int, steps: int) -> dict:
    import numpy as np

    guarded, baseline = _steps(impl, batch, seq)
    times = {"guarded": [], "baseline": []}
    for _ in range(steps):
        for name, fn in (("guarded", guarded), ("baseline", baseline)):
            t0 = time.perf_counter()
            [g.numpy() for g in fn()]
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "impl": impl,
        "batch": batch,
        "seq": seq,
        **{f"{k}_seconds": v for k, v in med.items()},
        "ratio": med["guarded"] / med["baseline"],
        "all_seconds": times,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=["ghost"], choices=["ghost", "ghost_two_pass", "vectorized"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--json", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    results = [measure(impl, args.batch, args.seq, args.steps) for impl in args.impls]
    print("| impl | batch | seq | baseline s | guarded s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['impl']} | {r['batch']} | {r['seq']} | {r['baseline_seconds']:.3f} | "
            f"{r['guarded_seconds']:.3f} | {r['ratio']:.3f} |"
        )
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"benchmark": "nonfinite_overhead", "results": results}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
