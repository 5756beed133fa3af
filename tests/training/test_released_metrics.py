"""Issue 13.2: by default nothing computed from the private batches leaves the private step."""

import keras
import numpy as np

from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import PrivacyBudget, make_private


def _model(**private):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    opt = EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=32, target_delta=1e-3)
    m.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return make_private(m, **private)


def _data():
    rs = np.random.RandomState(0)
    return rs.randn(32, 4).astype("float32"), rs.randint(0, 2, 32)


def test_default_logs_no_training_statistics():
    x, y = _data()
    m = _model()
    logged = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: logged.append(dict(logs)))
    h = m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[record, PrivacyBudget()])
    assert set(h.history) == {"dp_steps", "epsilon", "epsilon_estimate", "epsilon_certified"}
    assert all(set(logs) == {"dp_steps"} for logs in logged)
    assert [int(logs["dp_steps"]) for logs in logged] == list(range(1, 9))
    # No metric state either: nothing to leak through a checkpoint.
    assert all(float(v.numpy()) == 0.0 for metric in m.metrics for v in metric.variables)


def test_opt_in_releases_loss_and_accuracy():
    x, y = _data()
    h = _model(report_train_metrics=True).fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert {"loss", "accuracy"} <= set(h.history)
