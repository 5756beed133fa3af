"""What static shapes (``--jit_compile``, ``--strategy tpu``) cost the main job in
tokens per logical step, against dynamic padding: table + JSON.

Static shapes (``ewtune_tf.recipe.compute``) pad every Poisson batch to
``FinetuneConfig.static_batch_rows`` rows at the full ``sequence_length``, so
that XLA compiles one program for the whole run (the trainer test
``test_jit_compile_runs_static_shapes_and_adds_the_overflow_to_delta`` checks
that the traces do not grow with the steps). Dynamic padding (the default)
sorts each batch by length and cuts each physical chunk to its longest row.
Both skip the chunks that hold padding rows only. The work of a step is
proportional to the tokens its chunks hold (rows x width; attention adds a
width^2 term this count leaves out), so the token ratio is the compute
cost of static shapes before what XLA saves; it is counted, not timed.

The count uses SST-2's real token lengths (the main job's MiniLM tokenizer
at its ``sequence_length``) and Poisson batches at the main job's q, drawn
with numpy from a public seed (a benchmark, not a training run). Usage::

    python benchmarks/static_shapes.py [--glue_dir DIR] [--steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import numpy as np

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ewtune_tf.recipe import FinetuneConfig
from ewtune_tf.utils.files import atomic_write_json


def token_lengths(config: FinetuneConfig, glue_dir: str) -> np.ndarray:
    """Non-padding tokens of every SST-2 training sentence under the config's tokenizer."""
    from ewtune_tf.nlp import load_glue, models

    data = load_glue("sst2", "train", glue_dir=glue_dir)
    classifier = models.build_classifier(config.model, num_classes=2, sequence_length=config.sequence_length)
    mask = models.tokenize(classifier.preprocessor, data.texts)["padding_mask"]
    return mask.sum(axis=1)


def tokens_per_step(lengths: np.ndarray, config: FinetuneConfig, rows: int, steps: int, seed: int) -> Dict:
    """Mean tokens of a logical step's non-empty chunks, dynamic vs static, over ``steps`` Poisson batches."""
    rng = np.random.default_rng(seed)
    p, width = config.physical_batch_size, config.sequence_length
    q = config.batch_size / len(lengths)
    dynamic, static, overflows = [], [], 0
    for _ in range(steps):
        batch = np.sort(lengths[rng.random(len(lengths)) < q])[::-1]
        overflows += len(batch) > rows
        chunks = [batch[i : i + p] for i in range(0, len(batch), p)]
        dynamic.append(sum(p * int(c.max()) for c in chunks))  # each chunk: p rows (padded) x its longest row
        static.append(len(chunks) * p * width)  # real rows first; padding-only chunks skipped
    return {
        "dynamic_tokens": float(np.mean(dynamic)),
        "static_tokens": float(np.mean(static)),
        "ratio": float(np.mean(static) / np.mean(dynamic)),
        "overflows": int(overflows),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue_dir", default=os.environ.get("EWTUNE_GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--steps", type=int, default=96, help="Poisson batches to draw (default: the main job's 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    config = FinetuneConfig(jit_compile=True)
    lengths = token_lengths(config, args.glue_dir)
    rows = config.static_batch_rows(config.privacy_plan(len(lengths)))
    result = {
        "num_examples": len(lengths),
        "batch_size": config.batch_size,
        "static_batch_rows": rows,
        "sequence_length": config.sequence_length,
        "physical_batch_size": config.physical_batch_size,
        "mean_tokens_per_example": float(lengths.mean()),
        **tokens_per_step(lengths, config, rows, args.steps, args.seed),
    }
    print(f"{'padding':<10}{'tokens/step':>14}")
    print(f"{'dynamic':<10}{result['dynamic_tokens']:>14,.0f}")
    print(f"{'static':<10}{result['static_tokens']:>14,.0f}   ratio {result['ratio']:.2f}")
    print(f"static batches: {rows} rows x {config.sequence_length} tokens; overflows in {args.steps} draws: "
          f"{result['overflows']}")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
