"""PrivacyBudget: epsilon logging, stopping before the target, resume."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf import accounting
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import PrivacyBudget, make_private
from ewtune_tf.training.budget import PrivacyBudgetExhausted

Q, SIGMA, DELTA = 0.25, 1.0, 1e-3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _eps(steps):
    return accounting.compute_epsilon(sampling_probability=Q, noise_multiplier=SIGMA, steps=steps, delta=DELTA)


def _model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    m.compile(
        EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=SIGMA, batch_size=8, num_examples=32, target_delta=DELTA),
        LOSS,
    )
    return make_private(m)


def _data():
    rs = np.random.RandomState(0)
    return rs.randn(32, 4).astype("float32"), rs.randint(0, 3, 32)


def test_logs_epsilon_and_stops_before_exceeding_target(tmp_path):
    x, y = _data()
    target = (_eps(5).epsilon + _eps(6).epsilon) / 2
    m = _model()
    hist_path = os.path.join(tmp_path, "eps.json")
    cb = PrivacyBudget(target, log_dir=os.path.join(tmp_path, "tb"), history_path=hist_path)
    h = m.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[cb])
    steps = int(m.optimizer.dp_steps.numpy())
    assert steps == 5  # the 6th step would exceed the target: never taken
    assert cb.max_steps == 5
    last = h.history["epsilon"][-1]
    assert last <= target
    assert last == pytest.approx(_eps(5).epsilon)
    assert h.history["epsilon_certified"][-1] == last
    assert "epsilon_estimate" in h.history and h.history["dp_steps"][-1] == 5
    with open(hist_path) as f:
        assert json.load(f)["history"][-1]["steps"] == 5
    assert os.listdir(os.path.join(tmp_path, "tb"))
    assert float(m.optimizer.dp_epsilon.numpy()) == pytest.approx(last)

    # Budget exhausted: the next fit refuses before any step.
    before = [w.numpy().copy() for w in m.trainable_weights]
    with pytest.raises(PrivacyBudgetExhausted, match="exhausted"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[PrivacyBudget(target, history_path=hist_path)])
    for a, b in zip(before, m.trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(m.optimizer.dp_steps.numpy()) == 5


def test_resume_continues_epsilon(tmp_path):
    x, y = _data()
    m = _model()
    ck = tf.train.Checkpoint(model=m, optimizer=m.optimizer)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[PrivacyBudget()])
    path = ck.write(os.path.join(tmp_path, "ck"))
    m2 = _model()
    m2.optimizer.build(m2.trainable_variables)
    tf.train.Checkpoint(model=m2, optimizer=m2.optimizer).read(path)
    h = m2.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[PrivacyBudget()])
    assert h.history["dp_steps"] == [8]
    assert h.history["epsilon"][0] == pytest.approx(_eps(8).epsilon)


def test_budget_needs_known_sampling_probability():
    x, y = _data()
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    m.compile(EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8), LOSS)
    make_private(m)
    with pytest.raises(ValueError, match="sampling_probability"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[PrivacyBudget(1.0, delta=1e-5)])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(target_epsilon=0), "target_epsilon"),
        (dict(target_epsilon=float("inf")), "target_epsilon"),
        (dict(delta=1.0), "delta"),
        (dict(certify="no"), "certify"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PrivacyBudget(**kwargs)


def test_privacy_report(tmp_path):
    from ewtune_tf.data import poisson_batches
    from ewtune_tf.privacy import validate_report
    from ewtune_tf.training import privacy_report

    x, y = _data()
    m = _model()
    rep0 = privacy_report(m)
    assert rep0["steps"] == 0 and rep0["epsilon"] == 0.0
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    pb = poisson_batches(tf.data.Dataset.from_tensor_slices((x, y)), Q, max_batch_size="auto")
    rep = privacy_report(m, pb)
    validate_report(rep)
    assert rep["steps"] == 4 and rep["certified"]
    assert rep["epsilon"] == pytest.approx(_eps(4).epsilon)
    assert rep["sampling"] == "poisson" and rep["sampler"]["max_batch_size"]
    # Bounded batches: the overflow probability (times 1 + e^eps) is added to delta.
    assert rep["delta"] == DELTA + rep["delta_batch_overflow"] and rep["delta_batch_overflow"] > 0
    json.dumps(rep, allow_nan=False)


def test_history_ahead_of_checkpoint_is_trimmed(tmp_path):
    x, y = _data()
    hist = os.path.join(tmp_path, "h.json")
    with open(hist, "w") as f:  # written by a run killed after its last checkpoint
        json.dump({"history": [{"epoch": 0, "steps": 4}, {"epoch": 1, "steps": 8}]}, f)
    m = _model()
    m.optimizer.dp_steps.assign(4)  # as restored from the epoch-0 checkpoint
    cb = PrivacyBudget(history_path=hist)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    with open(hist) as f:
        steps = [h["steps"] for h in json.load(f)["history"]]
    assert steps == [4, 8]


def test_data_sampling_probability_must_match_optimizer():
    from ewtune_tf.data import poisson_batches
    from ewtune_tf.training import privacy_report

    x, y = _data()
    m = _model()  # q = 8 / 32
    pb = poisson_batches(tf.data.Dataset.from_tensor_slices((x, y)), expected_batch_size=4)
    with pytest.raises(ValueError, match="sampling_probability"):
        privacy_report(m, pb)
    with pytest.raises(ValueError, match="sampling_probability"):
        m.fit(pb.dataset, epochs=1, verbose=0, callbacks=[PrivacyBudget(data=pb)])
    assert int(m.optimizer.dp_steps.numpy()) == 0
