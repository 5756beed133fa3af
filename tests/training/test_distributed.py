"""tf.distribute: one device's noise (std sigma*C on the all-reduced sum).

Runs in a fresh interpreter: logical CPU devices must be configured before
TensorFlow initializes its devices, which this pytest process may have done.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import make_private

R = int(sys.argv[1])
sigma, c, b = 1.5, 0.5, 16.0
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
with strategy.scope():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(4000)])
    m.compile(EWTuneSGD(1.0, l2_norm_clip=c, noise_multiplier=sigma, batch_size=b), "mse")
make_private(m)
# Zero inputs: the kernel's clipped gradient sum is exactly 0, so its update
# is the noise alone, divided by the expected batch size.
x = np.zeros((16, 10), np.float32)
y = np.ones((16, 4000), np.float32)
k0 = m.layers[0].kernel.numpy().copy()
m.train_on_batch(x, y)
d1 = m.layers[0].kernel.numpy() - k0
k1 = m.layers[0].kernel.numpy().copy()
m.train_on_batch(x, y)
d2 = m.layers[0].kernel.numpy() - k1
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "ratio": float(d1.std() / (sigma * c / b)),
    "ratio2": float(d2.std() / (sigma * c / b)),
    "corr": float(np.corrcoef(d1.ravel(), d2.ravel())[0, 1]),
    "steps": int(m.optimizer.dp_steps.numpy()),
}))
"""


def _run(script: str, *args: str) -> dict:
    """Runs ``script`` in a fresh interpreter; returns its last line as JSON."""
    env = dict(
        os.environ,
        TF_ENABLE_ONEDNN_OPTS="0",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("replicas", [1, 2])
def test_mirrored_noise_scale(replicas):
    out = _run(_SCRIPT, str(replicas))
    assert out["replicas"] == replicas
    assert out["steps"] == 2
    # 40000 noise draws: the std estimate is within ~1%; allow 3%.
    assert abs(out["ratio"] - 1) < 0.03, out
    assert abs(out["ratio2"] - 1) < 0.03, out
    assert abs(out["corr"]) < 0.03, out


_REFUSAL_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from ewtune_tf.data import KeyedSampleWeight
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import make_private

def attempt(replicas, sample_weight=None, **opt_kw):
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        m.compile(EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8.0, **opt_kw), "mse")
    make_private(m)
    before = m.layers[0].kernel.numpy().copy()
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 3), np.float32)
    try:
        m.train_on_batch(x, y, sample_weight=sample_weight)
        error = None
    except ValueError as e:
        error = str(e)
    return {
        "error": error,
        "unchanged": bool(np.array_equal(before, m.layers[0].kernel.numpy())),
        "steps": int(m.optimizer.dp_steps.numpy()),
    }

keyed = KeyedSampleWeight(np.ones(8, np.float32), np.arange(8))
print(json.dumps({
    "global_clipnorm_2": attempt(2, global_clipnorm=1e-3),
    "clipnorm_2": attempt(2, clipnorm=1e-3),
    "clipvalue_2": attempt(2, clipvalue=1e-3),
    "global_clipnorm_1": attempt(1, global_clipnorm=1e-3),
    "keyed_2": attempt(2, sample_weight=keyed, num_microbatches=2, clipping="vectorized"),
}))
"""


def test_keras_gradient_clipping_and_keyed_records_refused_under_replicas():
    """Keras clips each replica's partial sum (noise sigma*C/sqrt(R)) before the
    all-reduce: refused with 2 replicas before any update, fine with 1."""
    out = _run(_REFUSAL_SCRIPT)
    for key, name in (
        ("global_clipnorm_2", "global_clipnorm"),
        ("clipnorm_2", "clipnorm"),
        ("clipvalue_2", "clipvalue"),
    ):
        assert out[key]["error"] and f"{name}=0.001" in out[key]["error"] and "2 replicas" in out[key]["error"], out
        assert out[key]["unchanged"] and out[key]["steps"] == 0, out
    assert out["global_clipnorm_1"] == {"error": None, "unchanged": False, "steps": 1}, out
    assert "num_microbatches=2 with 2 replicas" in out["keyed_2"]["error"], out
    assert out["keyed_2"]["unchanged"] and out["keyed_2"]["steps"] == 0, out
