"""TFX Trainer module: ``run_fn(fn_args)`` fine-tunes a BERT classifier with DP-SGD.

Use it with the standard Trainer, either as a module file or by path:

    tfx.components.Trainer(
        module_file=ewtune_tf.tfx.trainer_module.__file__,   # or
        # run_fn="ewtune_tf.tfx.trainer_module.run_fn",
        examples=example_gen.outputs["examples"],
        custom_config={"epsilon": 8.0, "delta": 1e-5, "model": "minilm", ...})

``custom_config`` keys are those of ``ewtune_tf.tfx.config.PrivateTrainerConfig``
and are validated before any data is read. The Examples need a text feature
(default ``sentence``) and an integer label (default ``label``); the train
split trains, the eval split is only used for the accuracy printed at the end.

Outputs:
  fn_args.serving_model_dir  the serving SavedModel (raw-text signature,
                             ``assets/privacy_report.json``);
  fn_args.model_run_dir      privacy_report.json and metrics.json.
"""

import json
import os
import time
from typing import Any, Dict, List, Optional

from ewtune_tf.tfx import accounting
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


def read_examples(fn_args, file_pattern: List[str], config: PrivateTrainerConfig) -> Dict[str, Any]:
    """Reads one split completely, through the Trainer's data accessor.

    Poisson sampling needs random access to the whole split, so the (small)
    split is read once, in order, into memory.
    """
    import numpy as np
    from tfx_bsl.public.tfxio import TensorFlowDatasetOptions

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
    return {k: (np.concatenate(v) if v else np.zeros([0])) for k, v in columns.items()}


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("tensorflow", "keras", "keras-hub", "tfx", "dp-accounting", "ewtune-tf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_fn(fn_args) -> None:
    """TFX Trainer entry point: private fine-tuning, export, privacy report."""
    config = parse_custom_config(fn_args.custom_config)  # Fails before any I/O.
    from ewtune_tf.export import save_serving_model
    from ewtune_tf.tfx import training

    start = time.time()
    train = read_examples(fn_args, fn_args.train_files, config)
    texts, labels = training.split_xy(train, config)
    n = len(texts)
    q = training.sampling_probability(config, n)
    steps = training.num_steps(config, n)
    if fn_args.train_steps and config.max_steps is None:
        # TrainArgs(num_steps=...) caps the run like custom_config['max_steps'].
        steps = min(steps, int(fn_args.train_steps))
    sigma = accounting.calibrate_noise_multiplier(config.epsilon, q, steps, config.delta, method=config.accountant)
    print(
        f"[ewtune_tf.tfx] N={n} q={q:.5g} steps={steps} sigma={sigma:.5g} "
        f"(certified eps <= {config.epsilon}, delta={config.delta})",
        flush=True,
    )

    classifier = training.build_classifier(config)
    features = training.tokenize(classifier, texts)
    history = training.private_fit(classifier, features, labels, config, sigma, steps)
    if history["dp_steps"] != steps:
        # Account for the noise releases actually made, never fewer. More
        # than planned pushes epsilon over the target and fails below.
        print(f"[ewtune_tf.tfx] ran {history['dp_steps']} private steps (planned {steps})")
        steps = max(int(history["dp_steps"]), 1)

    metrics: Dict[str, Any] = {"train_examples": n, "train_seconds": time.time() - start}
    if fn_args.eval_files:
        eval_split = read_examples(fn_args, fn_args.eval_files, config)
        eval_texts, eval_labels = training.split_xy(eval_split, config)
        if eval_texts:
            metrics["eval_accuracy"] = training.accuracy(
                classifier, training.tokenize(classifier, eval_texts), eval_labels
            )
            metrics["eval_examples"] = len(eval_texts)

    report = accounting.privacy_report(
        target_epsilon=config.epsilon,
        delta=config.delta,
        noise_multiplier=sigma,
        sampling_probability=q,
        steps=steps,
        dataset_size=n,
        batch_size=config.batch_size,
        l2_norm_clip=config.l2_norm_clip,
        sampling=config.sampling,
        method=config.accountant,
        extra={
            "config": config.to_dict(),
            "versions": _versions(),
            "train_loss": history["loss"],
            "poisson_sampling": history["sampling"],
        },
    )
    if report["certified_epsilon"] > config.epsilon * (1 + 1e-9):
        # Calibration certified the planned steps; this only triggers if more
        # steps ran than planned. An over-target model must not be exported.
        raise RuntimeError(
            f"certified epsilon {report['certified_epsilon']} exceeds the target {config.epsilon}; refusing to export"
        )

    save_serving_model(classifier, fn_args.serving_model_dir, text_keys=(config.text_feature,), privacy_report=report)
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    with open(os.path.join(fn_args.model_run_dir, PRIVACY_REPORT), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(fn_args.model_run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    print(
        f"[ewtune_tf.tfx] certified epsilon={report['certified_epsilon']:.4f} "
        f"sigma={sigma:.4f} steps={steps} metrics={json.dumps(metrics)}",
        flush=True,
    )
