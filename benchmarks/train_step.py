"""Training-step time and peak memory: non-private vs DP, as ratios measured in
one process (tables + JSON).

Three workloads:

* ``--workload fixed`` (default): the default MiniLM-L6 BERT classifier, one
  physical batch of 32 random-token sequences at a fixed length (128 and 64),
  dropout on, Adam; ``full_seq{128,64}`` (every weight trainable) and
  ``lora_seq{128,64}`` (``enable_lora(rank=8)``: LoRA factors of the attention
  query/value projections, their biases and the head). One DP step per
  clipping implementation registered in ``ewtune_tf.mechanism.clipping``
  (``vectorized``: per-example jacobian; ``microbatch``: 8 microbatches;
  ``ghost``: book-keeping ghost clipping; ``ghost_two_pass``). See
  ``benchmarks/fixed_step.py``.
* ``--workload main_job``: one *logical* step of ewtune-train's own path on
  real SST-2 sentences (Poisson batch of 2048, length-sorted, chunks of 64
  cut to their longest row, 32 chunks accumulated, noise once, one update),
  private vs the trainer's non-private ``--no_dp`` path over the same chunks,
  for full fine-tuning (``main_job_full``) and LoRA (``main_job_lora``), with
  the private step's per-chunk cost split (norm pass, clipped-sum pass,
  accumulation, noise and update). See ``benchmarks/main_job.py``.
* ``--device gpu``: GPU settings -- a BERT-base-shaped classifier from a
  KerasHub config with random weights, full fine-tuning, batch 32 and 128,
  sequence 128, float32 and ``mixed_bfloat16``, with and without XLA:
  non-private vs ghost step time, examples/second and peak device memory.
  ``--tiny`` shrinks these settings (1-layer width-16 BERT, batch 4 and 8,
  sequence 16) so that they run on a CPU in seconds (for dry runs in CI).

Each measurement runs in a fresh subprocess (``--tiny``: all in this
process) that traces and runs both steps, then times them *interleaved*, so
that load from other processes on a shared machine hits both alike.
``ratio`` is DP time / non-private time of the same process;
``peak_memory_ratio`` is DP peak / non-private peak (device memory on a GPU;
on a CPU the process peak RSS: for ``fixed``, whose DP figure also covers the
non-private phase, an upper bound on the DP step's own ratio; for
``main_job``, measured in two more processes that each run only one of the
two steps, so each step's optimizer state and graph count only for it).

Usage::

    python benchmarks/train_step.py [--quick] [--json PATH] [--steps N]
    python benchmarks/train_step.py --workload main_job [--quick] [--glue_dir DIR] [--json PATH]
    python benchmarks/train_step.py --device gpu [--tiny] [--json PATH]

``--quick``: fixed -- sequence 64 only, ghost only, one timed round; main_job
-- a logical batch of 256 (4 chunks) from the first 4096 SST-2 sentences, one
timed round, and the one-process peak-memory upper bound instead of the two
single-step processes (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import fixed_step  # noqa: E402
import main_job  # noqa: E402

DEFAULT_IMPL = "ghost"
ALL_IMPLS = ("vectorized", "microbatch", "ghost", "ghost_two_pass")
WORKLOADS = ("fixed", "main_job")
DEVICES = ("cpu", "gpu")
QUICK_MAIN_JOB = {"batch_size": 256, "max_examples": 4096, "rounds": 1}


# --------------------------------------------------------------------------
# Subprocess plumbing
# --------------------------------------------------------------------------


def _subprocess(kind: str, payload: Dict, timeout: float) -> Dict:
    """Runs one measurement in a fresh process; its result or an error."""
    cmd = [sys.executable, __file__, "--_worker", kind, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def _worker(kind: str, payload: str) -> Dict:
    if kind == "main_job":
        return main_job.run(main_job.MainJobConfig(**json.loads(payload)))
    return fixed_step.measure_or_error(fixed_step.spec_from_json(payload))


# --------------------------------------------------------------------------
# Fixed-length settings (CPU)
# --------------------------------------------------------------------------


def _fixed_summary(batch: int, seq: int, steps: int, raw: Dict[str, Dict]) -> Dict:
    ok = {i: r for i, r in raw.items() if "error" not in r}
    ratios = {i: r["ratio"] for i, r in ok.items()}
    default = DEFAULT_IMPL if DEFAULT_IMPL in ok else (min(ratios, key=ratios.get) if ratios else None)
    ref = ok.get(default, {})
    return {
        "batch": batch,
        "seq": seq,
        # Non-private time measured interleaved with the default DP step.
        "nonprivate_seconds": ref.get("nonprivate_seconds"),
        "dp_seconds": {i: r["dp_seconds"] for i, r in ok.items()},
        "default_impl": default,
        "ratio": ratios.get(default),
        "ratios": ratios,
        "nonprivate_peak_rss_mb": ref.get("nonprivate_peak_mb"),
        "peak_rss_mb": {i: r["dp_peak_mb"] for i, r in ok.items()},
        # Upper bound: the DP worker's process peak also covers its
        # non-private phase.
        "peak_memory_ratio": ref.get("peak_memory_ratio"),
        "peak_memory_ratios": {i: r["peak_memory_ratio"] for i, r in ok.items()},
        "trainable_params": ref.get("trainable_params"),
        "steps_timed": steps,
        "raw": raw,
    }


def run_fixed(args) -> Dict[str, Dict]:
    if args.quick:
        plan, impls, steps = [("full", 64), ("lora", 64)], [DEFAULT_IMPL], 1
    else:
        plan, impls, steps = [("full", 128), ("full", 64), ("lora", 128), ("lora", 64)], list(args.impls), args.steps
    results: Dict[str, Dict] = {}
    for setting, seq in plan:
        key = f"{setting}_seq{seq}"
        raw: Dict[str, Dict] = {}
        for impl in impls:
            if impl == "vectorized" and seq >= 128 and args.skip_vectorized_seq128:
                raw[impl] = {"error": "skipped (--skip-vectorized-seq128)"}
            else:
                spec = fixed_step.StepSpec(setting=setting, impl=impl, batch=args.batch, seq=seq, steps=steps)
                raw[impl] = _subprocess("fixed", dataclasses.asdict(spec), args.timeout)
            print(f"[{key}] {impl}: {_fmt(raw[impl])}", flush=True)
        results[key] = _fixed_summary(args.batch, seq, steps, raw)
    return results


def _fmt(r: Dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    return (
        f"dp {r['dp_seconds']:.3f} s/step vs nonprivate {r['nonprivate_seconds']:.3f} s/step "
        f"({r['ratio']:.2f}x); peak memory ratio {r['peak_memory_ratio']:.2f}"
    )


def print_fixed_table(results: Dict[str, Dict]) -> None:
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
            s, q = r["dp_seconds"].get(i), r["ratios"].get(i)
            row += f"{s:>12.3f}s ({q:5.2f}x)" if s else f"{'-':>22}"
        row += f"{str(r['default_impl']):>16}" + _num(r["ratio"], 8) + _num(r["peak_memory_ratio"], 10)
        print(row)


def _num(x: Optional[float], width: int, fmt: str = ".2f") -> str:
    return f"{x:>{width}{fmt}}" if x is not None else f"{'-':>{width}}"


# --------------------------------------------------------------------------
# The main job
# --------------------------------------------------------------------------


def run_main_job(args) -> Dict[str, Dict]:
    results: Dict[str, Dict] = {}
    for setting in ("full", "lora"):
        cfg = main_job.MainJobConfig(
            setting=setting,
            glue_dir=args.glue_dir,
            model=args.model,
            rounds=args.steps,
            cost_split=not args.no_cost_split,
        )
        if args.quick:
            cfg = dataclasses.replace(cfg, **QUICK_MAIN_JOB)
        r = _subprocess("main_job", dataclasses.asdict(cfg), args.timeout)
        if "error" not in r and not args.quick:  # --quick keeps the one-process upper bound
            r.update(_main_job_memory(cfg, args.timeout))
        results[f"main_job_{setting}"] = r
        print(f"[main_job_{setting}] {_fmt(r)}", flush=True)
    return results


def _main_job_memory(cfg: "main_job.MainJobConfig", timeout: float) -> Dict:
    """Peak memory of each step in a process of its own (model, data and only
    that step's optimizer state and graph), so neither step's footprint is
    counted against the other's; whole-process RSS, tracing included."""
    peak = {}
    for only in ("nonprivate", "dp"):
        r = _subprocess("main_job", dataclasses.asdict(dataclasses.replace(cfg, only=only, cost_split=False)), timeout)
        if "error" in r:
            return {"memory_error": r["error"]}
        peak[only] = r["peak_rss_mb"]
    return {
        "nonprivate_peak_rss_mb": peak["nonprivate"],
        "peak_rss_mb": peak["dp"],
        "peak_memory_ratio": peak["dp"] / peak["nonprivate"],
        "memory_source": "process peak RSS (ru_maxrss), one process per step",
    }


def print_main_job_table(results: Dict[str, Dict]) -> None:
    head = f"{'setting':<16}{'chunks':>7}{'nonprivate':>12}{'dp':>10}{'ratio':>7}{'mem ratio':>10}"
    print(head + "   (seconds per logical step)")
    print("-" * len(head))
    for key, r in results.items():
        if "error" in r:
            print(f"{key:<16} ERROR {r['error']}")
            continue
        row = f"{key:<16}{r['chunks']:>7}{r['nonprivate_seconds']:>11.2f}s{r['dp_seconds']:>9.2f}s"
        print(row + f"{r['ratio']:>7.2f}{r['peak_memory_ratio']:>10.2f}")
    parts = ("norm_pass", "clipped_sum_pass", "accumulation", "noise_and_update")
    print(f"\nprivate step, cost split per chunk (seconds; per logical step in brackets)\n{'setting':<16}", end="")
    print("".join(f"{p:>24}" for p in parts) + f"{'nonprivate fwd+bwd':>24}")
    for key, r in results.items():
        if "error" in r or not r["cost_split"]:
            continue
        split = r["cost_split"]
        chunk, step = split["dp_seconds_per_chunk"], split["dp_seconds_per_step"]
        cells = [(chunk[p], step[p]) for p in parts]
        cells.append(
            (
                split["nonprivate_seconds_per_chunk"]["forward_backward"],
                split["nonprivate_seconds_per_step"]["forward_backward"],
            )
        )
        print(f"{key:<16}" + "".join(f"{c:>13.3f} ({s:>7.2f})" for c, s in cells))


# --------------------------------------------------------------------------
# GPU settings
# --------------------------------------------------------------------------


def gpu_specs(tiny: bool, steps: int) -> Dict[str, "fixed_step.StepSpec"]:
    """The GPU settings (``--tiny``: the same grid at tiny shapes)."""
    model, batches, seq = ("tiny", (4, 8), 16) if tiny else ("bert_base", (32, 128), 128)
    specs = {}
    for batch in batches:
        for policy in ("float32", "mixed_bfloat16"):
            for jit in (False, True):
                key = f"gpu_b{batch}_s{seq}_{'bf16' if policy != 'float32' else 'fp32'}_{'xla' if jit else 'noxla'}"
                specs[key] = fixed_step.StepSpec(
                    setting="full", impl=DEFAULT_IMPL, batch=batch, seq=seq, steps=steps, model=model,
                    dtype_policy=policy, jit_compile=jit,
                )  # fmt: skip
    return specs


def run_gpu(args) -> Dict[str, Dict]:
    if not args.tiny:
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            raise SystemExit("--device gpu: TensorFlow sees no GPU here; use --tiny for a CPU dry run.")
    results: Dict[str, Dict] = {}
    for key, spec in gpu_specs(args.tiny, 1 if args.tiny else args.steps).items():
        if args.tiny:  # seconds each: one process for all
            r = fixed_step.measure_or_error(spec)
        else:
            r = _subprocess("fixed", dataclasses.asdict(spec), args.timeout)
        # bfloat16 that does not run yet is "pending" (the private step is being
        # made precision-safe), not a benchmark failure.
        r["status"] = "ok" if "error" not in r else ("pending" if spec.dtype_policy != "float32" else "error")
        results[key] = {**dataclasses.asdict(spec), **r}
        print(f"[{key}] {_fmt(r)}", flush=True)
    return results


def print_gpu_table(results: Dict[str, Dict]) -> None:
    head = (
        f"{'setting':<26}{'device':>22}{'nonprivate':>12}{'ghost':>10}{'ratio':>7}"
        f"{'ex/s np':>10}{'ex/s dp':>10}{'mem np MB':>11}{'mem dp MB':>11}{'mem ratio':>10}"
    )
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        if r.get("status") != "ok":
            print(f"{key:<26} {r['status'].upper()}: {r.get('error', '')}")
            continue
        print(
            f"{key:<26}{r['device'][:21]:>22}{r['nonprivate_seconds']:>11.4f}s{r['dp_seconds']:>9.4f}s"
            f"{r['ratio']:>7.2f}{r['nonprivate_examples_per_second']:>10.1f}{r['dp_examples_per_second']:>10.1f}"
            f"{r['nonprivate_peak_mb']:>11.0f}{r['dp_peak_mb']:>11.0f}{r['peak_memory_ratio']:>10.2f}"
        )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="fixed", help="what to time (default: fixed)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="gpu: the GPU settings (see above)")
    p.add_argument("--tiny", action="store_true", help="with --device gpu: tiny shapes, runs on a CPU in seconds")
    p.add_argument("--quick", action="store_true", help="a smaller, faster version of the workload (see above)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--batch", type=int, default=32, help="fixed workload: physical batch size (default 32)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds per measurement (median; default 3)")
    p.add_argument("--impls", nargs="+", default=list(ALL_IMPLS), choices=ALL_IMPLS)
    p.add_argument("--glue_dir", default=main_job.default_glue_dir(), help="main_job: GLUE-layout data directory")
    p.add_argument("--model", default=main_job.MainJobConfig.model, help="main_job: ewtune-train --model")
    p.add_argument("--no_cost_split", action="store_true", help="main_job: time the two steps only")
    p.add_argument(
        "--skip-vectorized-seq128",
        action="store_true",
        help="skip the per-example jacobian at seq 128 (~13 GB, ~40 s/step)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="per-measurement timeout (s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_worker":
        print("RESULT " + json.dumps(_worker(argv[1], argv[2])), flush=True)
        return 0
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1; got {args.batch}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    if args.tiny and args.device != "gpu":
        p.error("--tiny shrinks the GPU settings; use it with --device gpu")
    if args.device == "gpu":
        results = run_gpu(args)
        print_gpu_table(results)
    elif args.workload == "main_job":
        results = run_main_job(args)
        print_main_job_table(results)
    else:
        results = run_fixed(args)
        print_fixed_table(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
