"""Local TFX pipeline: SST-2 sample -> private Trainer -> privacy report + gate -> Pusher.

    CsvExampleGen (a sample of SST-2 written as CSV)
      -> Trainer (run_fn = ewtune_tf.tfx.trainer_module.run_fn: DP-SGD,
                  certified epsilon, serving SavedModel with raw-text signature)
      -> PrivacyReportGen (PrivacyReport artifact in ML Metadata)
      -> PrivacyGate (ModelBlessing: blessed iff certified eps <= budget)
      -> Pusher (filesystem push to <serving_dir>/<version>/, only if blessed)

Runs with LocalDagRunner and a SQLite ML Metadata store. Needs the TFX
environment (.venv-tfx, Python 3.10, tfx 1.16.0):

    .venv-tfx/bin/python -m trainers.tfx_pipeline --glue_dir ../shared/data/glue \
        --sample_size 2000 --epsilon 8 --epsilon_budget 8 --serving_dir saved_models/sst2_tfx

The Trainer's custom_config flags (--epsilon, --batch_size, --lora_rank, ...)
are ewtune-train's: generated from ewtune_tf.recipe.FinetuneConfig, with its
defaults (the main job's) except the demo's batch size (DEMO_SETTINGS).

The last line printed is a JSON summary (pushed, push path, certified epsilon).
"""

import argparse
import csv
import json
import os
import random
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # Keras 3 attention + pfor segfault with oneDNN.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PIPELINE_NAME = "ewtune_sst2_private"


def write_sst2_sample_csv(glue_dir: str, out_dir: str, sample_size: int, seed: int = 0) -> str:
    """Writes a random sample of SST-2 train.tsv as CSV (sentence,label) for CsvExampleGen."""
    src = os.path.join(glue_dir, "SST-2", "train.tsv")
    if not os.path.exists(src):
        raise ValueError(f"--glue_dir: {src} not found (expected a GLUE-layout directory containing SST-2/train.tsv)")
    if sample_size < 2:
        raise ValueError(f"--sample_size must be >= 2, got {sample_size}")
    rows: List[List[str]] = []
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:2] != ["sentence", "label"]:
            raise ValueError(f"{src}: expected header 'sentence<TAB>label', got {header}")
        for row in reader:
            if len(row) >= 2 and row[1] in ("0", "1"):
                rows.append([row[0], row[1]])
    random.Random(seed).shuffle(rows)
    rows = rows[:sample_size]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sst2_sample.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def create_pipeline(
    *,
    data_dir: str,
    pipeline_root: str,
    metadata_path: str,
    serving_dir: str,
    epsilon_budget: float,
    custom_config: Dict[str, Any],
    use_module_file: bool = False,
    enable_cache: bool = False,
):
    """Builds the TFX pipeline object (nothing runs here)."""
    from tfx import v1 as tfx

    from ewtune_tf.tfx import trainer_module
    from ewtune_tf.tfx.components import PrivacyGate, PrivacyReportGen
    from ewtune_tf.tfx.config import parse_custom_config
    from ewtune_tf.tfx.gate import check_budget

    parse_custom_config(custom_config)  # Bad config fails here, before any component runs.
    check_budget(epsilon_budget)

    example_gen = tfx.components.CsvExampleGen(input_base=data_dir)
    trainer_kwargs: Dict[str, Any] = (
        {"module_file": os.path.abspath(trainer_module.__file__)}
        if use_module_file
        else {"run_fn": "ewtune_tf.tfx.trainer_module.run_fn"}
    )
    trainer = tfx.components.Trainer(
        examples=example_gen.outputs["examples"],
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=custom_config,
        **trainer_kwargs,
    )
    report = PrivacyReportGen(model=trainer.outputs["model"])
    gate = PrivacyGate(privacy_report=report.outputs["privacy_report"], epsilon_budget=float(epsilon_budget))
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=gate.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_dir)
        ),
    )
    return tfx.dsl.Pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=pipeline_root,
        components=[example_gen, trainer, report, gate, pusher],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path),
        enable_cache=enable_cache,
    )


def run_pipeline(pipeline) -> None:
    from tfx import v1 as tfx

    tfx.orchestration.LocalDagRunner().run(pipeline)


def read_outcome(metadata_path: str) -> Dict[str, Any]:
    """Latest PrivacyReport, blessing and push, read back from ML Metadata."""
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    store = metadata_store.MetadataStore(config)

    def latest(type_name: str):
        artifacts = store.get_artifacts_by_type(type_name)
        return max(artifacts, key=lambda a: a.id) if artifacts else None

    out: Dict[str, Any] = {}
    report = latest("EWTunePrivacyReport")
    if report is not None:
        out["privacy_report"] = {k: getattr(v, v.WhichOneof("value")) for k, v in report.properties.items()}
    blessing = latest("ModelBlessing")
    if blessing is not None:
        out["blessed"] = bool(blessing.custom_properties["blessed"].int_value)
        out["gate_reason"] = blessing.custom_properties["reason"].string_value
    pushed = latest("PushedModel")
    if pushed is not None:
        out["pushed"] = bool(pushed.custom_properties["pushed"].int_value)
        if out["pushed"]:
            out["push_path"] = pushed.custom_properties["pushed_destination"].string_value
    return out


# The demo trains on a sample of SST-2 (2,000 examples by default), smaller
# than the main job's expected batch of 2,048: its one departure from the
# recipe's defaults (every other custom_config value is FinetuneConfig's).
DEMO_SETTINGS = {"batch_size": 256}


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from ewtune_tf.recipe.config import FinetuneConfig, tfx_keys
    from ewtune_tf.recipe.settings import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--glue_dir",
        default=os.environ.get("EWTUNE_GLUE_DIR", "../shared/data/glue"),
        help="GLUE-layout directory with SST-2/train.tsv",
    )
    p.add_argument("--sample_size", type=int, default=2000, help="SST-2 examples to use")
    p.add_argument(
        "--epsilon_budget",
        type=float,
        default=None,
        help="gate: push only if certified epsilon <= this (default: --epsilon)",
    )
    p.add_argument("--sample_seed", type=int, default=0, help="which SST-2 examples are sampled")
    p.add_argument("--pipeline_root", default=None, help="default: a new temporary directory")
    p.add_argument("--metadata_path", default=None, help="SQLite file (default: in pipeline_root)")
    p.add_argument(
        "--serving_dir",
        default=os.path.join("saved_models", "sst2_tfx"),
        help="Pusher base directory; versions land in <serving_dir>/<unix time>/",
    )
    p.add_argument(
        "--use_module_file",
        action="store_true",
        help="hand the Trainer module_file= instead of run_fn= (packages a wheel)",
    )
    p.add_argument("--enable_cache", action="store_true")
    # The Trainer's custom_config: the recipe's TFX settings, as ewtune-train's flags.
    settings = p.add_argument_group("Trainer custom_config (the recipe's settings)")
    add_arguments(settings, FinetuneConfig, only=tfx_keys())
    p.set_defaults(**DEMO_SETTINGS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from ewtune_tf.recipe.config import tfx_keys

    args = _parse_args(argv)
    pipeline_root = args.pipeline_root or tempfile.mkdtemp(prefix="ewtune_tfx_")
    metadata_path = args.metadata_path or os.path.join(pipeline_root, "metadata.sqlite")
    data_dir = os.path.join(pipeline_root, "data")
    custom_config = {key: getattr(args, key) for key in tfx_keys()}
    write_sst2_sample_csv(args.glue_dir, data_dir, args.sample_size, seed=args.sample_seed)
    pipeline = create_pipeline(
        data_dir=data_dir,
        pipeline_root=pipeline_root,
        metadata_path=metadata_path,
        serving_dir=os.path.abspath(args.serving_dir),
        epsilon_budget=args.epsilon if args.epsilon_budget is None else args.epsilon_budget,
        custom_config=custom_config,
        use_module_file=args.use_module_file,
        enable_cache=args.enable_cache,
    )
    run_pipeline(pipeline)
    outcome = read_outcome(metadata_path)
    outcome.update(pipeline_root=pipeline_root, metadata_path=metadata_path)
    print(json.dumps(outcome, sort_keys=True), flush=True)
    return outcome


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
