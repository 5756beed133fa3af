"""DP-SGD fine-tuning used by the TFX Trainer's ``run_fn``.

One optimizer step:
  1. Poisson sampling: every training example joins the step's batch
     independently with probability q = batch_size / N (what the accountant
     certifies; the batch size is random and may be 0);
  2. per-example gradients of the loss (one backward pass per example,
     vectorised with ``tape.jacobian`` / pfor), each clipped to L2 norm C;
  3. the clipped sum plus Gaussian noise N(0, (sigma*C)^2 I), divided by the
     expected batch size, is handed to a Keras optimizer.
The sampled batch is processed in fixed-size physical chunks (padding masked
out), so one traced graph serves every step whatever its batch size.

Privacy is enforced before the first update: there must be trainable weights,
a positive clipping norm and a positive noise multiplier, or this raises.
"""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ewtune_tf.nlp import models
from ewtune_tf.tfx.config import PrivateTrainerConfig


def build_classifier(config: PrivateTrainerConfig):
    """KerasHub BERT classifier (logits) with its preprocessor attached."""
    return models.build_classifier(
        config.model, num_classes=config.num_classes, sequence_length=config.sequence_length,
        lora_rank=config.lora_rank, dropout=config.dropout)


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
            f"size {dataset_size}; it must be in [1, {dataset_size}]")
    return config.batch_size / dataset_size


def private_fit(classifier, features: Dict[str, np.ndarray], labels: np.ndarray,
                config: PrivateTrainerConfig, noise_multiplier: float, steps: int,
                log_every: int = 10) -> Dict[str, Any]:
    """Runs `steps` DP-SGD steps (Poisson sampling, clipping, Gaussian noise).

    Returns a small history dict: per-step sampled batch size and mean loss of
    the sampled examples (a training-data statistic, for logs only).
    """
    import keras
    import tensorflow as tf

    trainable = list(classifier.trainable_variables)
    if not trainable:
        raise ValueError("the model has no trainable weights; nothing to train privately")
    if not noise_multiplier > 0 or not config.l2_norm_clip > 0:
        raise ValueError(
            f"refusing to train without privacy: noise_multiplier={noise_multiplier}, "
            f"l2_norm_clip={config.l2_norm_clip} (both must be > 0)")

    n = int(labels.shape[0])
    q = sampling_probability(config, n)
    chunk = config.physical_batch_size
    clip = float(config.l2_norm_clip)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(trainable)
    rng = np.random.default_rng(config.seed)
    noise_gen = tf.random.Generator.from_seed(config.seed + 1)

    @tf.function(reduce_retracing=True)
    def clipped_sum(x, y, mask):
        with tf.GradientTape() as tape:
            logits = classifier(x, training=True)
            losses = loss_fn(y, logits)
        jac = tape.jacobian(losses, trainable, experimental_use_pfor=True)
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(j), [tf.shape(j)[0], -1]), axis=1)
                       for j in jac])
        factor = mask * tf.minimum(1.0, clip / (tf.sqrt(sq) + 1e-12))
        sums = [tf.tensordot(factor, j, axes=1) for j in jac]
        return sums, tf.reduce_sum(losses * mask)

    @tf.function
    def apply(sums):
        expected = tf.constant(q * n, tf.float32)
        grads = [(s + noise_gen.normal(tf.shape(s), stddev=noise_multiplier * clip)) / expected
                 for s in sums]
        optimizer.apply_gradients(zip(grads, trainable))

    history = {"batch_size": [], "loss": []}
    for step in range(steps):
        idx = np.flatnonzero(rng.random(n) < q)
        totals = [tf.zeros_like(v) for v in trainable]
        loss_total = 0.0
        for start in range(0, max(len(idx), 1), chunk):
            part = idx[start:start + chunk]
            pad = chunk - len(part)
            take = np.concatenate([part, np.zeros(pad, dtype=np.int64)]).astype(np.int64)
            mask = np.concatenate([np.ones(len(part)), np.zeros(pad)]).astype(np.float32)
            x = {k: tf.constant(v[take]) for k, v in features.items()}
            sums, loss_sum = clipped_sum(x, tf.constant(labels[take]), tf.constant(mask))
            totals = [t + s for t, s in zip(totals, sums)]
            loss_total += float(loss_sum)
        apply(totals)
        history["batch_size"].append(int(len(idx)))
        history["loss"].append(loss_total / max(len(idx), 1))
        if log_every and (step + 1) % log_every == 0:
            print(f"[ewtune_tf.tfx] step {step + 1}/{steps} "
                  f"batch={len(idx)} loss={history['loss'][-1]:.4f}", flush=True)
    return history


def accuracy(classifier, features: Dict[str, np.ndarray], labels: np.ndarray,
             batch_size: int = 256) -> float:
    if labels.shape[0] == 0:
        return float("nan")
    preds = []
    for start in range(0, labels.shape[0], batch_size):
        x = {k: v[start:start + batch_size] for k, v in features.items()}
        preds.append(np.argmax(np.asarray(classifier(x, training=False)), axis=-1))
    return float(np.mean(np.concatenate(preds) == labels))


def split_xy(examples: Dict[str, np.ndarray], config: PrivateTrainerConfig) -> Tuple[List[str], np.ndarray]:
    """Text list and int labels from decoded Examples, with clear errors."""
    for key in (config.text_feature, config.label_feature):
        if key not in examples:
            raise ValueError(
                f"Examples have no feature {key!r} (features: {sorted(examples)}); set "
                f"custom_config['text_feature'] / custom_config['label_feature']")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
             for t in examples[config.text_feature]]
    labels = np.asarray(examples[config.label_feature]).astype(np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(
            f"labels must be in [0, {config.num_classes - 1}] "
            f"(custom_config['num_classes']={config.num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]")
    return texts, labels
