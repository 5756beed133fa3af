"""A tiny KerasHub BERT (built from a config, no download) trains privately."""

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip("keras_hub")

from ewtune_tf.data import poisson_batches  # noqa: E402
from ewtune_tf.optimizers import EWTuneAdamW  # noqa: E402
from ewtune_tf.training import PrivacyBudget, make_private  # noqa: E402

SEQ = 16


def _tiny_bert():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=SEQ
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


def _dataset(n=24):
    rs = np.random.RandomState(0)
    lengths = rs.randint(4, SEQ + 1, n)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    tokens = np.where(mask, rs.randint(1, 100, (n, SEQ)), 0).astype("int32")
    x = {"token_ids": tokens, "segment_ids": np.zeros((n, SEQ), "int32"), "padding_mask": mask}
    y = (tokens[:, 0] % 2).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y))


@pytest.mark.filterwarnings("ignore:poisson_batches\\(seed")
def test_tiny_bert_trains_privately_with_poisson_chunks():
    pb = poisson_batches(_dataset(), expected_batch_size=6, max_batch_size=12, seed=0, steps=3, overflow="truncate")
    model = _tiny_bert()
    opt = EWTuneAdamW(
        1e-3,
        weight_decay=0.01,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        num_examples=24,
        batch_size=6,
        target_delta=1e-3,
    )
    model.compile(
        optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    make_private(model, physical_batch_size=4, report_train_metrics=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    h = model.fit(pb.dataset, epochs=1, verbose=0, shuffle=False, callbacks=[PrivacyBudget()])
    assert int(opt.dp_steps.numpy()) == 3
    assert np.isfinite(h.history["loss"][0])
    assert h.history["epsilon"][0] > 0
    changed = sum(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
    assert changed == len(before)  # noise reaches every trainable variable
