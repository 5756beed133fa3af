"""The EW-Tune experiment, honestly: train with sigma chosen by each rule, report its certified epsilon.

The EW-Tune paper chooses the noise multiplier sigma with an order-1
Edgeworth point estimate of epsilon and compares against sigma chosen by RDP.
Its estimate is not a bound: at the paper's own settings its sigma gives a
certified epsilon of 8.3-9.6 at "epsilon = 8" (spec §10.3). This script runs
the comparison on real training runs of ewtune_tf's recipe. For each task,
each target epsilon and each sigma rule it trains once with
``ewtune_tf.recipe.finetune`` (nothing re-implemented) and records:

* ``noise_multiplier``: the sigma the rule chose for the planned steps;
* ``rule_epsilon``: the epsilon the rule believes that sigma gives (the RDP
  bound, the paper's order-1 estimate, or the certified bound);
* ``certified_epsilon``: the certified upper bound (PLD-checked) of the sigma
  that actually ran, at the steps actually taken -- the privacy report's
  ``epsilon`` when the report is ``certified`` (else null, with
  ``uncertified_because``);
* ``dev_accuracy`` (the task's first dev split; all in ``dev_accuracy_by_split``),
  ``steps``, ``seconds`` (wall time of the run: build, tokenize, train,
  evaluate) and ``train_seconds``.

Rules (``ewtune_tf/privacy/calibration.py``): ``rdp`` (smallest sigma whose
dp_accounting RDP epsilon is <= target: a looser upper bound), ``edgeworth_paper``
(the paper's grid search on its order-1 estimate: not a bound), ``certified``
(ewtune_tf's default: smallest sigma whose certified epsilon is <= target).

Every other setting is the recipe's (``FinetuneConfig``: the main job's
defaults unless given); any recipe flag except those the table decides
(``PER_RUN``) can be passed, e.g. ``--model``, ``--glue_dir``, ``--epochs``.

Usage (``make paper-plan`` and ``make paper-table`` run the first two)::

    # the plan only: each rule's sigma for the main job at eps 8, 3, 1 and the
    # certified epsilon it gives (seconds; nothing trained, accuracy "pending")
    python benchmarks/paper_table.py --plan_only --glue_dir ../shared/data/glue
    # the full SST-2 table (9 runs of the main job; hours on a CPU; rerun to resume)
    python benchmarks/paper_table.py --glue_dir ../shared/data/glue --json runs/paper_table/sst2.json
    # CI-sized: a tiny random BERT, fixture data, 2 steps per run (9 rows)
    python benchmarks/paper_table.py --quick --json out.json
    # GPU-scale (the paper's tasks, q and m; KerasHub preset and TFDS data downloaded when online)
    python benchmarks/paper_table.py --model bert_base_en_uncased --tasks sst2,qnli,qqp,mnli \
        --batch_size 2000 --epochs 20 --sequence_length 128 --physical_batch_size 256 \
        --json runs/paper_table/gpu.json

Resumable: rows already in ``--json`` (same task, rule and target epsilon,
same settings) are skipped, each finished run is appended to the JSON at once
(atomically), and a run interrupted midway resumes from its last checkpoint
in ``<output_dir>/<task>/<rule>_eps<epsilon>``. A ``--json`` file holding
rows of other settings is refused rather than mixed.

Before the first run every task's data is loaded (GLUE files, or TFDS when
no ``--glue_dir``) and the model is loaded once, so a missing file or an
offline machine fails at once with a message (exit status 1) instead of after
hours of training. Runs share one process and each task's data; Keras state
is cleared between runs (each row records the process's resident memory
after its run, so growth is visible; measured 2026-11-30 with MiniLM-L6 and
with the tiny BERT: ~50 MB more after each run, the same for both, so the
models are released). ``seconds`` counts the invocation that
finished the run (``resumed_from_step`` > 0 marks a resumed run).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN + per-example gradients crash on CPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ewtune_tf.nlp.glue import TASKS  # noqa: E402  (no TensorFlow at import)
from ewtune_tf.recipe.config import FinetuneConfig  # noqa: E402
from ewtune_tf.recipe.settings import ConfigError, add_arguments, cli_error, flag_name, settings_of  # noqa: E402
from ewtune_tf.utils.files import atomic_write_json, read_json  # noqa: E402

BENCHMARK = "paper_table"
PLAN_BENCHMARK = "paper_table_plan"  # --plan_only's JSON: never resumed from
RULES = ("rdp", "edgeworth_paper", "certified")
EPSILONS = (8.0, 3.0, 1.0)  # run order: the paper's headline epsilon first
# Settings the table decides for each run (or fixes): not flags of this script.
PER_RUN = (
    "task",
    "epsilon",
    "noise_multiplier",
    "noise_multiplier_rule",
    "no_dp",
    "output_dir",
    "export_dir",
    "no_export",
    "no_resume",
)
# --quick: a tiny random BERT (unless --model), the fixture GLUE data (unless
# --glue_dir), 2 steps per run. The plan is calibrated for those 2 steps, where
# the paper's order-1 Edgeworth estimate is far off (spec §12: small m).
QUICK = dict(batch_size=16, physical_batch_size=16, max_steps=2, max_train_examples=256, max_eval_examples=256)
FIXTURE_GLUE = ROOT / "tests" / "fixtures" / "glue"
# One row per run (README and tests name these fields).
FIELDS = (
    "task",
    "rule",
    "target_epsilon",
    "delta",
    "noise_multiplier",
    "rule_epsilon",
    "certified_epsilon",
    "certified",
    "uncertified_because",
    "dev_accuracy",
    "dev_accuracy_by_split",
    "steps",
    "planned_steps",
    "sampling_probability",
    "num_examples",
    "seconds",
    "train_seconds",
    "resumed_from_step",
    "process_rss_mb",
    "output_dir",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train with sigma chosen by each rule (rdp, edgeworth_paper, certified) at several target "
        "epsilons; report each run's certified epsilon and dev accuracy."
    )
    parser.add_argument("--tasks", default="sst2", help="Comma-separated GLUE tasks. Default: sst2.")
    parser.add_argument(
        "--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="Comma-separated target epsilons."
    )
    parser.add_argument("--rules", default=",".join(RULES), help=f"Comma-separated sigma rules, of {RULES}.")
    parser.add_argument("--quick", action="store_true", help=f"CI-sized: {QUICK}, tiny model, fixture data.")
    parser.add_argument("--json", help="Results JSON (read to resume, written after every run).")
    parser.add_argument("--markdown", help="Also write the markdown table to this path.")
    parser.add_argument(
        "--plan_only",
        "--plan-only",
        action="store_true",
        help="Train nothing: print each run's sigma and the certified epsilon it gives (accuracy pending). "
        "Reads only the training split's size; --json then holds the plan (never resumed from).",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="Train nothing: merge results files of the same settings (runs trained in parallel lanes, e.g. "
        "one --epsilons each, or on several machines) into --json (which, if it exists, is merged too) and "
        "print the table. A run found twice, or files of other settings, are refused and nothing is written.",
    )
    parser.add_argument(
        "--output_dir",
        help="Root of the runs' output directories. Default: runs/paper_table (--quick: runs/paper_table_quick).",
    )
    only = [f.name for f, _ in settings_of(FinetuneConfig) if f.name not in PER_RUN]
    add_arguments(parser, FinetuneConfig, only=only)
    parser.set_defaults(**{k: None for k in QUICK})  # Unset: the recipe's default, or --quick's.
    return parser


def _split(text: str, parse, name: str, allowed: Optional[Sequence] = None) -> List[Any]:
    try:
        values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        raise ConfigError(f"{{{name}}} must be a comma-separated list" + (f" of {allowed}" if allowed else ""), name)
    return values


def base_config(args: argparse.Namespace, model_dir: Optional[str] = None) -> FinetuneConfig:
    """The settings every run shares (task and privacy target set per run).
    ``model_dir``: the tiny model of --quick when no --model was given."""
    names = [f.name for f, _ in settings_of(FinetuneConfig) if f.name not in PER_RUN]
    values = {k: getattr(args, k) for k in names}
    defaults = FinetuneConfig()
    for k in QUICK:  # flags left unset: --quick's value, else the recipe's
        if values[k] is None:
            values[k] = QUICK[k] if args.quick else getattr(defaults, k)
    if args.quick:
        values["glue_dir"] = values["glue_dir"] or str(FIXTURE_GLUE)
        if model_dir is not None:
            values["model"] = model_dir
    values.update(no_export=True, no_resume=False)
    try:
        return FinetuneConfig(**values)
    except ConfigError as e:
        raise e.named(flag_name) from None


def shared_settings(config: FinetuneConfig) -> Dict[str, Any]:
    """The settings that must match for rows to belong to one table."""
    return {k: v for k, v in config.to_dict().items() if k not in PER_RUN}


def run_dir(root: str, task: str, rule: str, epsilon: float) -> str:
    return os.path.join(root, task, f"{rule}_eps{epsilon:g}")


def _rule_epsilon(report: Dict[str, Any]) -> Optional[float]:
    """The epsilon the rule believed its sigma gives (from the calibration record)."""
    cal = report.get("calibration") or {}
    if "rdp_epsilon" in cal:
        return float(cal["rdp_epsilon"])
    eps = (cal.get("epsilon") or {}).get("epsilon")
    return None if eps is None else float(eps)


def _rss_mb() -> Optional[float]:
    """Current resident memory of this process (MB), from /proc; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def privacy_fields(report: Dict[str, Any]) -> Dict[str, Any]:
    """A row's privacy columns, read from a privacy report (of a run, or of a plan)."""
    return {
        "delta": report["delta"],
        "noise_multiplier": report["noise_multiplier"],
        "rule_epsilon": _rule_epsilon(report),
        # The report's epsilon is the certified bound of that sigma only when the report says so.
        "certified_epsilon": report["epsilon"] if report["certified"] else None,
        "certified": report["certified"],
        "uncertified_because": report["uncertified_because"],
        "steps": report["steps"],
        "planned_steps": report["planned_steps"],
        "sampling_probability": report["sampling_probability"],
        "num_examples": report["num_examples"],
    }


def plan_row(config: FinetuneConfig, task: str, rule: str, epsilon: float, num_examples: int) -> Dict[str, Any]:
    """The row of one run before it runs (``--plan_only``): sigma as ``rule``
    chooses it for the recipe's plan on ``num_examples`` training examples, and
    the certified epsilon of that sigma after the planned steps, computed by the
    accountant alone (what a run reports when it takes every planned step).
    The training columns (accuracy, time) are None."""
    cfg = config.replace(task=task, epsilon=epsilon, noise_multiplier_rule=rule)
    plan = cfg.privacy_plan(num_examples)
    row = dict.fromkeys(FIELDS)
    row.update(task=task, rule=rule, target_epsilon=epsilon, **privacy_fields(plan.report(plan.steps)))
    return row


def run_one(config: FinetuneConfig, task: str, rule: str, epsilon: float, root: str, data) -> Dict[str, Any]:
    """Trains one run on ``data`` (train, {dev split: examples}) and returns its row (``FIELDS``)."""
    import keras

    from ewtune_tf.recipe import finetune

    out = run_dir(root, task, rule, epsilon)
    cfg = config.replace(task=task, epsilon=epsilon, noise_multiplier_rule=rule, output_dir=out)
    t0 = time.perf_counter()
    result = finetune(cfg, *data)
    seconds = time.perf_counter() - t0
    metrics = result.metrics
    row = dict(task=task, rule=rule, target_epsilon=epsilon, **privacy_fields(result.report))
    row.update(
        dev_accuracy=metrics["dev_accuracy"],
        dev_accuracy_by_split=metrics["dev_accuracy_by_split"],
        seconds=seconds,
        train_seconds=metrics["train_seconds"],
        resumed_from_step=metrics["resumed_from_step"],
        output_dir=out,
    )
    del result
    keras.backend.clear_session()  # Runs share the process: release the model and traced graphs.
    gc.collect()
    row["process_rss_mb"] = _rss_mb()
    return {k: row[k] for k in FIELDS}


def machine() -> Dict[str, Any]:
    """Where the table ran (its wall times mean nothing without it)."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "load_average_at_start": load,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def _read_results(path: str, flag: str) -> Dict[str, Any]:
    """The results file at ``path`` (ConfigError naming ``flag`` if it is not one)."""
    table = read_json(path)
    if table.get("benchmark") != BENCHMARK or not isinstance(table.get("rows"), list):
        raise ConfigError(f"{{{flag}}} {path!r} is not a {BENCHMARK} results file (a plan is not one)", flag)
    return table


def _differing(table: Dict[str, Any], settings: Dict[str, Any], quick: bool) -> List[str]:
    """The settings (or "quick") in which ``table``'s rows differ from ``settings``; empty if none."""
    old = table.get("settings") or {}
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    return differ or ([] if table.get("quick") == quick else ["quick"])


def load_table(path: Optional[str], settings: Dict[str, Any], quick: bool) -> Dict[str, Any]:
    """The table in ``path`` (to resume), or a new one; refuses rows of other settings."""
    fresh = {"benchmark": BENCHMARK, "quick": quick, "settings": settings, "machine": None, "rows": []}
    if not path or not os.path.exists(path):
        return fresh
    table = _read_results(path, "json")
    differ = _differing(table, settings, quick)
    if differ:
        raise ConfigError(
            f"{{json}} {path!r} holds rows of other settings (differing: {differ}); give another path or remove it",
            "json",
        )
    return table


class PreflightError(RuntimeError):
    """The data or the model cannot be loaded (before any run)."""


def preflight(config: FinetuneConfig, tasks: Sequence[str]) -> Dict[str, tuple]:
    """Each task's (train, {dev split: examples}), after checking every task's
    settings and loading the model once (a download when it is a preset name)."""
    from ewtune_tf.nlp import glue, models
    from ewtune_tf.recipe.data import load_task_data

    data = {}
    if not tasks:
        return data  # Nothing left to run.
    for task in tasks:
        cfg = config.replace(task=task)
        cfg.check_environment()
        try:
            data[task] = load_task_data(cfg)
        except glue.GlueDataError as e:
            raise PreflightError(str(e)) from None
    try:
        models.build_classifier(config.model, num_classes=2, sequence_length=config.sequence_length, lora_rank=0)
    except Exception as e:  # Offline (no download), a corrupt cache, ...
        raise PreflightError(
            f"--model {config.model!r} could not be loaded ({type(e).__name__}: {e}). A KerasHub preset name "
            "needs internet access (or its cached download); offline, give a local model directory."
        ) from None
    return data


def _key(task: str, rule: str, epsilon: float) -> tuple:
    return (task, rule, float(epsilon))


def fmt(value: Optional[float], spec: str, pending: bool = False) -> str:
    if value is None:
        return "pending" if pending else "n/a"
    return format(value, spec)


def markdown(table: Dict[str, Any]) -> str:
    """The table as markdown: one row per run, grouped by task and target epsilon.
    Columns of runs not trained yet (``--plan_only``) read "pending"."""
    planned = table.get("plan_only", False)
    cert_head = "certified ε of σ (computed, no training)" if planned else "certified ε of the σ that ran"
    head = (
        f"| task | target ε | rule | σ | ε the rule claims | {cert_head} | dev accuracy (%) "
        "| steps | wall (min) |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    order = {r: i for i, r in enumerate(RULES)}
    rows = sorted(table["rows"], key=lambda r: (r["task"], -r["target_epsilon"], order.get(r["rule"], 99)))
    lines = [head]
    for r in rows:
        cert = fmt(r["certified_epsilon"], ".2f") + ("" if r["certified"] else " (NOT certified)")
        if r["certified_epsilon"] is not None and r["certified_epsilon"] > r["target_epsilon"]:
            cert += " **> target**"
        acc = None if r["dev_accuracy"] is None else 100 * r["dev_accuracy"]
        wall = None if r["seconds"] is None else r["seconds"] / 60
        lines.append(
            f"| {r['task']} | {r['target_epsilon']:g} | {r['rule']} | {r['noise_multiplier']:.4f} "
            f"| {fmt(r['rule_epsilon'], '.2f')} | {cert} | {fmt(acc, '.1f', planned)} | {r['steps']} "
            f"| {fmt(wall, '.1f', planned)} |"
        )
    return "\n".join(lines) + f"\n\n{caption(table)}\n"


def caption(table: Dict[str, Any]) -> str:
    """The settings every row shares (the table means nothing without them)."""
    s = table["settings"]
    n = sorted({(r["task"], r["num_examples"]) for r in table["rows"]})
    text = (
        f"δ = {s['delta']:g}; N = {', '.join(f'{k} {v}' for k, v in n)}; model {s['model']}, "
        f"lora_rank {s['lora_rank']}, B = {s['batch_size']}, epochs {s['epochs']:g}"
        + (f", max_steps {s['max_steps']}" if s.get("max_steps") else "")
        + f", lr {s['learning_rate']:g} {s['lr_schedule']}, C = {s['l2_norm_clip']:g}, dropout {s['dropout']:g}, "
        f"seq {s['sequence_length']}, accountant {s['accountant']}, seed {s['seed']}."
    )
    if table.get("plan_only"):
        text += " Planned only (`--plan_only`): σ and ε computed by the accountant, nothing trained."
    return text


def _quick_model(args: argparse.Namespace) -> Optional[str]:
    """--quick without --model: a tiny random BERT preset under --output_dir
    (a fixed path and seed, so a rerun has the same settings and resumes)."""
    if not args.quick or args.plan_only or args.model != FinetuneConfig().model:
        return None
    from ewtune_tf.nlp.models import save_tiny_bert_preset

    path = os.path.join(args.output_dir, "tiny_bert_preset")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        save_tiny_bert_preset(path)
    return os.path.abspath(path)


def plan_only(config: FinetuneConfig, todo: Sequence[tuple], settings: Dict[str, Any]) -> Dict[str, Any]:
    """The table of ``todo`` runs as planned (no model, no training): each
    task's training split is read for N, nothing else."""
    from ewtune_tf.nlp import glue
    from ewtune_tf.recipe.data import load_task_data

    sizes = {}
    for task in sorted({t for t, _, _ in todo}):
        try:
            sizes[task] = len(load_task_data(config.replace(task=task))[0])
        except glue.GlueDataError as e:
            raise PreflightError(str(e)) from None
    rows = [plan_row(config, t, r, e, sizes[t]) for t, e, r in todo]
    return {"benchmark": PLAN_BENCHMARK, "plan_only": True, "settings": settings, "rows": rows}


def _plan_runs(args: argparse.Namespace) -> tuple:
    """(config, table to extend, runs still to do), every flag checked (ConfigError otherwise)."""
    tasks = _split(args.tasks, lambda t: t.lower().replace("-", ""), "tasks", tuple(TASKS))
    epsilons = _split(args.epsilons, float, "epsilons")
    if not all(0 < e < math.inf for e in epsilons):
        raise ConfigError(f"{{epsilons}} must be positive numbers; got {args.epsilons!r}", "epsilons")
    rules = _split(args.rules, str, "rules", RULES)
    config = base_config(args, _quick_model(args))
    settings = shared_settings(config)
    if args.plan_only:  # A plan is never resumed from, nor mixed with trained rows.
        table = {"rows": []}
    else:
        table = load_table(args.json, settings, args.quick)
    done = {_key(r["task"], r["rule"], r["target_epsilon"]) for r in table["rows"]}
    todo = [(t, e, r) for t in tasks for e in epsilons for r in rules if _key(t, r, e) not in done]
    return config, table, todo


def merge_tables(paths: Sequence[str]) -> Dict[str, Any]:
    """One table of the rows of several results files of the same settings.

    The files are runs of one table trained apart (parallel lanes on one machine,
    or several machines), each written by this script. Refused (ConfigError naming
    ``--merge``): a file that is not a trained table, settings or ``--quick`` that
    differ, or a run (task, rule, target epsilon) present in two files. The merged
    table keeps every file's ``machine`` (``machines``, in file order: the wall
    times of lanes that shared a machine are each longer than a run alone)."""
    for path in paths:
        if not os.path.exists(path):
            raise ConfigError(f"{{merge}} {path!r} does not exist", "merge")
    tables = [_read_results(path, "merge") for path in paths]
    first = tables[0]
    for path, t in zip(paths[1:], tables[1:]):
        differ = _differing(t, first.get("settings") or {}, first.get("quick"))
        if differ:
            raise ConfigError(
                f"{{merge}} {path!r} holds rows of other settings than {paths[0]!r} (differing: {differ})", "merge"
            )
    seen: Dict[tuple, str] = {}
    rows = []
    for path, t in zip(paths, tables):
        for r in t["rows"]:
            key = _key(r["task"], r["rule"], r["target_epsilon"])
            if key in seen:
                raise ConfigError(f"{{merge}} run {key} is in both {seen[key]!r} and {path!r}", "merge")
            seen[key] = path
            rows.append(r)
    machines = [m for t in tables for m in (t.get("machines") or [t.get("machine")]) if m]
    merged = {"benchmark": BENCHMARK, "quick": first.get("quick"), "settings": first.get("settings"), "rows": rows}
    merged.update(machine=machines[0] if machines else None, machines=machines, merged_from=list(paths))
    for key, pick in (("started", min), ("finished", max)):  # ISO timestamps sort as times
        stamps = [t[key] for t in tables if t.get(key)]
        if stamps:
            merged[key] = pick(stamps)
    return merged


def _write(table: Dict[str, Any], args: argparse.Namespace) -> None:
    text = markdown(table)
    print(text, flush=True)
    if args.markdown:
        path = pathlib.Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or ("runs/paper_table_quick" if args.quick else "runs/paper_table")
    if args.merge:
        if not args.json or args.plan_only:
            error = (
                "{merge} needs --json, the merged results file to write, and trains or plans nothing (no --plan_only)"
            )
            return cli_error(parser, ConfigError(error, "merge"))
        sources = list(args.merge) + ([args.json] if os.path.exists(args.json) else [])
        try:
            table = merge_tables(sources)
        except ConfigError as e:
            return cli_error(parser, e)
        atomic_write_json(args.json, table)
        _write(table, args)
        return 0
    try:  # Every setting, task and target checked, and the data (and model) loaded, before the first run.
        config, table, todo = _plan_runs(args)
        if args.plan_only:
            table = plan_only(config, todo, shared_settings(config))
            if args.json:
                atomic_write_json(args.json, table)
            _write(table, args)
            return 0
        data = preflight(config, sorted({t for t, _, _ in todo}))
    except (ConfigError, PreflightError) as e:
        return cli_error(parser, e)
    table["machine"] = table["machine"] or machine()
    table.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
    if len(table["rows"]):
        print(f"[paper_table] {len(table['rows'])} run(s) already in {args.json}: skipped", flush=True)
    for task, eps, rule in todo:
        print(f"[paper_table] {task} eps={eps:g} {rule}: training", flush=True)
        table["rows"].append(run_one(config, task, rule, eps, args.output_dir, data[task]))
        table["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        if args.json:  # After every run: a crash loses at most the run in progress.
            atomic_write_json(args.json, table)
    _write(table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
