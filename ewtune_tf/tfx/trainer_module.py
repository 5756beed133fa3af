"""TFX Trainer module: ``run_fn(fn_args)`` runs the library's private fine-tuning recipe.

Use it with the standard Trainer, either as a module file or by path:

    tfx.components.Trainer(
        module_file=ewtune_tf.tfx.trainer_module.__file__,   # or
        # run_fn="ewtune_tf.tfx.trainer_module.run_fn",
        examples=example_gen.outputs["examples"],
        custom_config={"epsilon": 8.0, "delta": 1e-5, "model": "minilm", ...})

A thin adapter: ``custom_config`` is parsed into the same
``ewtune_tf.recipe.FinetuneConfig`` that ``ewtune-train`` builds from its
flags (``ewtune_tf.tfx.config``; validated before any data is read), and
``ewtune_tf.recipe.finetune`` trains on the Examples' train split and
evaluates on the eval split: the same plan (steps, sigma), the same
defaults, the same privacy report. The Examples need a text feature
(default ``sentence``) and an integer label (default ``label``).
``TrainArgs(num_steps=...)`` caps the run like ``max_steps``.

Outputs:
  fn_args.serving_model_dir  the serving SavedModel (raw-text signature,
                             ``assets/privacy_report.json``);
  fn_args.model_run_dir      privacy_report.json, metrics.json, TensorBoard
                             logs, privacy.png, checkpoints.
"""

import json
import os
from typing import Any, Dict, List, Optional

from ewtune_tf.tfx.config import PrivateTrainerConfig, parse_custom_config

PRIVACY_REPORT = "privacy_report.json"


def find_privacy_report(model_uri: str) -> str:
    """Path of the privacy report inside a Trainer ``Model`` artifact."""
    candidates = [
        os.path.join(model_uri, "Format-Serving", "assets", PRIVACY_REPORT),
        os.path.join(model_uri, "assets", PRIVACY_REPORT),
        os.path.join(model_uri, PRIVACY_REPORT),
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"no {PRIVACY_REPORT} in model artifact {model_uri} (looked at {candidates}); "
        "was the model trained by ewtune_tf.tfx.trainer_module.run_fn?"
    )


def _schema(config: PrivateTrainerConfig, schema_path: Optional[str]):
    """The Examples' schema: SchemaGen's when wired, else the two features we need."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    if schema_path:
        from tfx.utils import io_utils

        return io_utils.parse_pbtxt_file(schema_path, schema_pb2.Schema())
    schema = schema_pb2.Schema()
    for name, kind in ((config.text_feature, schema_pb2.BYTES), (config.label_feature, schema_pb2.INT)):
        feature = schema.feature.add(name=name, type=kind)
        # Present in every example, exactly one value: decoded as dense [batch, 1].
        feature.presence.min_fraction = 1.0
        feature.shape.dim.add(size=1)
    return schema


def read_examples(fn_args, file_pattern: List[str], config: PrivateTrainerConfig):
    """One split, read completely through the Trainer's data accessor, as
    ``TextExamples`` (Poisson sampling needs random access to the whole split)."""
    import numpy as np
    from tfx_bsl.public.tfxio import TensorFlowDatasetOptions

    from ewtune_tf.recipe.data import TextExamples

    schema = _schema(config, getattr(fn_args, "schema_path", None))
    wanted = (config.text_feature, config.label_feature)
    dataset = fn_args.data_accessor.tf_dataset_factory(
        file_pattern, TensorFlowDatasetOptions(batch_size=1024, num_epochs=1, shuffle=False), schema
    )
    columns: Dict[str, list] = {k: [] for k in wanted}
    for batch in dataset.as_numpy_iterator():
        for key in wanted:
            if key not in batch:
                raise ValueError(
                    f"Examples have no feature {key!r} (features: {sorted(batch)}); set "
                    "custom_config['text_feature'] / custom_config['label_feature']"
                )
            columns[key].append(np.asarray(batch[key]).reshape(-1))
    texts, labels = (np.concatenate(columns[k]) if columns[k] else np.zeros([0]) for k in wanted)
    texts = np.array([t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts], dtype=object)
    return TextExamples((texts,), labels.astype(np.int64), (config.text_feature,), source=f"tfx:{file_pattern}")


def run_fn(fn_args) -> None:
    """TFX Trainer entry point: the recipe, then the serving export with its privacy report."""
    config = parse_custom_config(fn_args.custom_config)  # Fails before any I/O.
    from ewtune_tf.export import save_serving_model
    from ewtune_tf.recipe import finetune

    settings: Dict[str, Any] = dict(output_dir=fn_args.model_run_dir, no_export=True)
    if getattr(fn_args, "train_steps", None) and config.finetune.max_steps is None:
        settings["max_steps"] = int(fn_args.train_steps)  # TrainArgs(num_steps=...) caps the run.
    train = read_examples(fn_args, fn_args.train_files, config)
    dev = read_examples(fn_args, fn_args.eval_files, config) if getattr(fn_args, "eval_files", None) else None
    result = finetune(config.finetune.replace(**settings), train, None if dev is None else {"eval": dev})
    save_serving_model(
        result.classifier,
        fn_args.serving_model_dir,
        text_keys=(config.text_feature,),
        privacy_report=result.report,
    )
    print(f"[ewtune_tf.tfx] {json.dumps(result.summary())}", flush=True)
