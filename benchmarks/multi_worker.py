"""Steps per second: the recipe's training loop vs Keras ``fit``, and 2 local workers vs 1 process.

Two measurements, both on the fixture SST-2 data (``tests/fixtures/glue``, 64
rows), B = 16 (q = 1/4), physical chunks of 8, sequence length 32:

* ``loop_vs_fit`` (one process): the same private classifier (``EWTuneAdam``
  + ``make_private``, ghost clipping) takes ``--steps`` Poisson steps with
  Keras ``fit`` (what the recipe ran before it had its own loop) and with
  ``ewtune_tf.recipe.loop.EpochLoop`` (what it runs now, under every strategy),
  on the same batches, interleaved over ``--rounds`` (median seconds per step),
  after one untimed epoch each (tracing). ``ratio`` = loop / fit time.
* ``workers``: ``python -m trainers.glue`` as one process (``--strategy
  default``) and as two loopback workers (``--strategy multi_worker``,
  ``TF_CONFIG`` on 127.0.0.1, no GPU), alternated ``--rounds`` times; steps
  per second = 1 / the chief's ``seconds_per_step_after_first``
  (metrics.json: training time after the first, traced, step). On one
  2-core machine the two workers share the cores the single process has to
  itself, so this measures the collectives' overhead, not a speed-up.

Usage::

    python benchmarks/multi_worker.py [--model minilm|tiny] [--rounds 2] [--steps 8] [--json PATH]

``--model tiny``: the tiny test BERT (seconds); ``minilm`` (default): the main
job's MiniLM-L6 (LoRA rank 8).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures" / "glue"
BATCH, PHYSICAL, SEQUENCE = 16, 8, 32


def _model_path(model: str, scratch: str) -> str:
    if model != "tiny":
        return model
    from ewtune_tf.nlp.models import save_tiny_bert_preset

    return save_tiny_bert_preset(os.path.join(scratch, "tiny_bert"))


def _private_classifier(model: str, n: int, steps: int):
    import keras

    import ewtune_tf
    from ewtune_tf.nlp import build_classifier

    clf = build_classifier(model, num_classes=2, sequence_length=SEQUENCE, lora_rank=8)
    opt = ewtune_tf.EWTuneAdam(
        learning_rate=1e-2, l2_norm_clip=1.0, noise_multiplier=0.6, num_examples=n, batch_size=BATCH, steps=steps
    )
    clf.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ewtune_tf.make_private(clf, physical_batch_size=PHYSICAL)
    return clf


def loop_vs_fit(model: str, steps: int, rounds: int) -> Dict[str, float]:
    """Median seconds per private step: ``fit`` vs ``EpochLoop``, same model and batches."""
    import tensorflow as tf

    from ewtune_tf.data import poisson_batches
    from ewtune_tf.nlp import load_glue, tokenize
    from ewtune_tf.nlp.models import sort_by_length
    from ewtune_tf.recipe.loop import EpochLoop

    train = load_glue("sst2", "train", glue_dir=str(FIXTURES))
    clf = _private_classifier(model, len(train), steps * (2 * rounds + 2))
    tokens = tokenize(clf.preprocessor, train.texts)
    clf.preprocessor = None
    base = tf.data.Dataset.from_tensor_slices((dict(tokens), train.labels))
    batches = poisson_batches(base, expected_batch_size=BATCH, steps=steps, epochs=1, seed=0)
    data = batches.dataset.map(sort_by_length).cache()
    loop = EpochLoop(clf, [])

    def run_fit():
        clf.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)

    def run_loop():
        loop.run_epoch(0, data, steps)

    times: Dict[str, List[float]] = {"fit": [], "loop": []}
    run_fit(), run_loop()  # Tracing.
    for _ in range(rounds):
        for name, fn in (("fit", run_fit), ("loop", run_loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / steps)
    fit, own = statistics.median(times["fit"]), statistics.median(times["loop"])
    return {"fit_seconds_per_step": fit, "loop_seconds_per_step": own, "ratio": own / fit}


def _free_ports(n: int) -> List[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _trainer_run(model: str, steps: int, workers: int, output_dir: str) -> float:
    """The chief's seconds per step after the first, for one run of ``workers`` processes."""
    argv = [sys.executable, "-m", "trainers.glue", "--model", model, "--glue_dir", str(FIXTURES), "--task", "sst2"]
    argv += ["--batch_size", str(BATCH), "--physical_batch_size", str(PHYSICAL), "--sequence_length", str(SEQUENCE)]
    argv += ["--epochs", str(-(-steps // 4)), "--max_steps", str(steps), "--max_eval_examples", "8", "--no_export"]
    argv += ["--output_dir", output_dir, "--checkpoint_every", "0"]
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(workers)]
    procs = []
    for i in range(workers):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})
        strategy = ["--strategy", "multi_worker"] if workers > 1 else []
        procs.append(subprocess.Popen(argv + strategy, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, text=True))
    for p in procs:
        p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"trainer run with {workers} worker(s) failed (status {p.returncode})")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return float(json.load(f)["seconds_per_step_after_first"])


def workers_vs_single(model: str, steps: int, rounds: int, scratch: str) -> Dict[str, float]:
    times: Dict[int, List[float]] = {1: [], 2: []}
    for r in range(rounds):
        for workers in (1, 2):
            times[workers].append(_trainer_run(model, steps, workers, os.path.join(scratch, f"run{r}_{workers}")))
    single, two = statistics.median(times[1]), statistics.median(times[2])
    return {
        "single_steps_per_second": 1 / single,
        "two_workers_steps_per_second": 1 / two,
        "ratio": single / two,  # two workers' steps/s over one process's
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (default), tiny, or a KerasHub preset path")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="logical steps per timed run (>= 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip", choices=("loop_vs_fit", "workers"), default=None)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be >= 2 and --rounds >= 1")
    results = {"model": args.model, "steps": args.steps, "rounds": args.rounds, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        model = _model_path(args.model, scratch)
        if args.skip != "workers":
            results["workers"] = workers_vs_single(model, args.steps, args.rounds, scratch)
        if args.skip != "loop_vs_fit":
            results["loop_vs_fit"] = loop_vs_fit(model, args.steps, args.rounds)
    print("| measurement | baseline | this | ratio |\n|---|---|---|---|")
    if "workers" in results:
        w = results["workers"]
        print(
            f"| steps/s, 2 local workers vs 1 process | {w['single_steps_per_second']:.3f} | "
            f"{w['two_workers_steps_per_second']:.3f} | {w['ratio']:.2f} |"
        )
    if "loop_vs_fit" in results:
        f = results["loop_vs_fit"]
        print(
            f"| s/step, recipe loop vs fit (1 process) | {f['fit_seconds_per_step']:.3f} | "
            f"{f['loop_seconds_per_step']:.3f} | {f['ratio']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
