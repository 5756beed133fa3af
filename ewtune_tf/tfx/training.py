"""DP-SGD fine-tuning used by the TFX Trainer's ``run_fn``.

Glue between the Trainer's in-memory split and the shared DP-SGD stack
(``ewtune_tf.nlp`` models, ``ewtune_tf.data`` Poisson batches,
``ewtune_tf.optimizers.EWTuneAdam``, ``ewtune_tf.training.make_private``).
One optimizer step: Poisson sampling at q = batch_size / N, per-example
clipping to C, Gaussian noise N(0, (sigma*C)^2) once per logical batch,
division by the expected batch size.
"""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ewtune_tf.nlp import models
from ewtune_tf.tfx.config import PrivateTrainerConfig


def build_classifier(config: PrivateTrainerConfig):
    """KerasHub BERT classifier (logits) with its preprocessor attached."""
    return models.build_classifier(
        config.model,
        num_classes=config.num_classes,
        sequence_length=config.sequence_length,
        lora_rank=config.lora_rank,
        dropout=config.dropout,
    )


def tokenize(classifier, texts: Sequence[str]) -> Dict[str, np.ndarray]:
    """Tokenises all texts once, up front (the split is held in memory)."""
    return models.tokenize(classifier.preprocessor, [np.asarray(texts, dtype=object)])


def num_steps(config: PrivateTrainerConfig, dataset_size: int) -> int:
    """Optimizer steps: epochs / q, capped by max_steps; at least 1."""
    q = sampling_probability(config, dataset_size)
    steps = max(1, int(round(config.epochs / q)))
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    return steps


def sampling_probability(config: PrivateTrainerConfig, dataset_size: int) -> float:
    if dataset_size <= 0:
        raise ValueError("the training split has no examples")
    if config.batch_size > dataset_size:
        raise ValueError(
            f"custom_config['batch_size']={config.batch_size} exceeds the training set "
            f"size {dataset_size}; it must be in [1, {dataset_size}]"
        )
    return config.batch_size / dataset_size


def private_fit(
    classifier,
    features: Dict[str, np.ndarray],
    labels: np.ndarray,
    config: PrivateTrainerConfig,
    noise_multiplier: float,
    steps: int,
) -> Dict[str, Any]:
    """Runs `steps` private steps with the shared DP-SGD stack.

    ``ewtune_tf.data.poisson_batches`` (Poisson sampling at q = B/N),
    ``EWTuneAdam`` (Gaussian noise once per logical batch, divided by the
    expected batch size) and ``make_private`` (per-example clipping, chunks
    of ``physical_batch_size``). The optimizer refuses non-private updates,
    so nothing trains without clipping and noise.

    Returns a history dict, including ``dp_steps`` (noise releases actually
    made; the accountant uses this count).
    """
    import keras
    import tensorflow as tf

    from ewtune_tf.data.poisson import poisson_batches
    from ewtune_tf.optimizers import EWTuneAdam
    from ewtune_tf.training import make_private

    if not classifier.trainable_weights:
        raise ValueError("the model has no trainable weights; nothing to train privately")
    n = int(labels.shape[0])
    q = sampling_probability(config, n)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    optimizer = EWTuneAdam(
        learning_rate=config.learning_rate,
        l2_norm_clip=config.l2_norm_clip,
        noise_multiplier=noise_multiplier,
        noise_multiplier_source="calibrated",
        target_epsilon=config.epsilon,
        target_delta=config.delta,
        num_examples=n,
        batch_size=config.batch_size,
        epochs=steps * q,
        sampling_probability=q,
        accountant_method=config.accountant,
        certify=True,
        sampling=config.sampling,
        noise_seed=config.seed,
    )
    # Token inputs (KerasHub's Task.fit would re-run the preprocessor), cut
    # per chunk to its longest row; shares the classifier's weights.
    model = models.dynamic_padding_model(classifier)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    make_private(model, physical_batch_size=config.physical_batch_size)
    dataset = tf.data.Dataset.from_tensor_slices(
        ({k: tf.constant(v) for k, v in features.items()}, tf.constant(labels))
    )
    # seed=None draws the batches from secret OS entropy (what the guarantee
    # assumes); a fixed seed is for reproducible tests.
    batches = poisson_batches(dataset, sampling_probability=q, steps=steps, epochs=1, seed=config.seed)
    history = model.fit(batches.dataset, epochs=1, verbose=2, shuffle=False)
    return {
        "loss": [float(x) for x in history.history.get("loss", [])],
        "dp_steps": int(optimizer.dp_steps.numpy()),
        "sampling": batches.report() if hasattr(batches, "report") else None,
    }


def accuracy(classifier, features: Dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 256) -> float:
    if labels.shape[0] == 0:
        return float("nan")
    preds = []
    for start in range(0, labels.shape[0], batch_size):
        x = {k: v[start : start + batch_size] for k, v in features.items()}
        preds.append(np.argmax(np.asarray(classifier(x, training=False)), axis=-1))
    return float(np.mean(np.concatenate(preds) == labels))


def split_xy(examples: Dict[str, np.ndarray], config: PrivateTrainerConfig) -> Tuple[List[str], np.ndarray]:
    """Text list and int labels from decoded Examples, with clear errors."""
    for key in (config.text_feature, config.label_feature):
        if key not in examples:
            raise ValueError(
                f"Examples have no feature {key!r} (features: {sorted(examples)}); set "
                f"custom_config['text_feature'] / custom_config['label_feature']"
            )
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in examples[config.text_feature]]
    labels = np.asarray(examples[config.label_feature]).astype(np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(
            f"labels must be in [0, {config.num_classes - 1}] "
            f"(custom_config['num_classes']={config.num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return texts, labels
