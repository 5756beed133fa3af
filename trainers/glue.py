"""``ewtune-train``: differentially private fine-tuning of a KerasHub BERT on GLUE.

Example (the README's main job)::

    ewtune-train --task sst2 --epsilon 8 --delta 1e-5 --glue_dir ../shared/data/glue

A thin adapter over the library's recipe, ``ewtune_tf.recipe.finetune``: its
flags are generated from the fields of ``ewtune_tf.recipe.FinetuneConfig``
(one ``--<field>`` per setting, with the setting's default, allowed values and
help), so the command line, the TFX Trainer's ``custom_config`` and Python
share one set of settings, defaults and checks. What one run does, and how
checkpoints and resume work, is documented in ``ewtune_tf.recipe.finetuning``
and ``ewtune_tf.recipe.checkpoint``.

Exit status 2 and a message naming the flag and its allowed range for a bad
setting (before anything is loaded or written); 1 for missing data, or when
a padded Poisson batch overflows under --jit_compile / --strategy tpu (rerun
to resume); 138 when another worker of a ``--strategy multi_worker`` run
stopped (Kubeflow's ``restartPolicy: ExitCode`` retries it; rerunning every
worker resumes). Run it once per host with ``TF_CONFIG`` set; see
``docs/distributed.md``.

GPU and TPU: ``--precision mixed_bfloat16`` and ``--jit_compile`` (XLA on
static shapes; ``ewtune_tf.recipe.compute``); ``benchmarks/gpu_check.sh``
runs the GPU check.

Outputs in --output_dir: privacy_report.json (the ``ewtune_tf.privacy``
report schema), metrics.json, epsilon_history.json, TensorBoard logs,
privacy.png and checkpoints/; the SavedModel under
``<export_dir>/glue_<task>/<version>/`` carries the same privacy report. The
last line printed is one JSON object: dev_accuracy, epsilon (certified;
``Infinity`` with --no_dp), delta, certified, private, noise_multiplier,
steps, export_path.

Nothing computed from the private training data is printed or written
without noise unless --report_train_metrics asks for it (the privacy report
then lists it under ``released_without_privacy``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ewtune_tf.recipe.config import FinetuneConfig
from ewtune_tf.recipe.settings import ConfigError, add_arguments, cli_error, config_from_arguments

PROG = "ewtune-train"
# The main job's settings (FinetuneConfig's defaults) as a dict, for scripts
# that time or reproduce it (benchmarks); the defaults live in the config.
DEFAULTS = FinetuneConfig().to_dict()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Differentially private fine-tuning of a KerasHub BERT classifier on GLUE "
        "with the Edgeworth accountant (certified epsilon).",
    )
    add_arguments(parser, FinetuneConfig)
    return parser


def _print_summary(summary: dict) -> None:
    for split, acc in summary["dev_accuracy_by_split"].items():
        print(f"dev accuracy ({split}): {acc:.4f}", flush=True)
    if not summary["private"]:
        print("epsilon: inf (NON-PRIVATE baseline, --no_dp)", flush=True)
    else:
        kind = "certified epsilon" if summary["certified"] else "epsilon (NOT certified)"
        print(f"{kind}: {summary['epsilon']:.4f} (delta={summary['delta']:g}, private)", flush=True)
    print(f"noise multiplier (sigma): {summary['noise_multiplier']:.4f}; steps: {summary['steps']}", flush=True)
    if summary["export_path"]:
        print(f"SavedModel: {summary['export_path']}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Before TensorFlow loads: oneDNN + per-example gradients crash (see conftest.py).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    from ewtune_tf.nlp.glue import GlueDataError
    from ewtune_tf.recipe import BatchOverflowError, finetune
    from ewtune_tf.recipe.cluster import WORKER_LOST_EXIT_CODE, WorkerLost

    try:
        result = finetune(config_from_arguments(FinetuneConfig, args))
    except (ConfigError, GlueDataError, BatchOverflowError) as e:
        return cli_error(parser, e)
    except WorkerLost as e:
        cli_error(parser, e)  # Printed as any error; the status is the retryable one.
        return WORKER_LOST_EXIT_CODE
    summary = result.summary()
    _print_summary(dict(summary, dev_accuracy_by_split=result.metrics["dev_accuracy_by_split"]))
    print(json.dumps(summary), flush=True)  # The last line (Infinity for the non-private baseline).
    return 0


if __name__ == "__main__":
    sys.exit(main())
