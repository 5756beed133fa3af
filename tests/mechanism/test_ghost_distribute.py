"""Ghost clipping under MirroredStrategy (2 logical CPUs, parallel replica threads).

Runs in a subprocess: logical devices must be configured before TensorFlow
initializes, which the pytest process has already done.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from ewtune_tf.mechanism import ghost, ghost_layers
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    inp = keras.Input((5, 6))
    h = keras.layers.LayerNormalization()(keras.layers.Dense(4)(inp))
    model = keras.Model(inp, keras.layers.Dense(3)(h))
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(8, 5, 6)), tf.float32)
y = tf.constant(rng.normal(size=(8, 5, 3)), tf.float32)
ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))

@tf.function
def step(xb, yb):
    def replica(xb, yb):
        lf = lambda: tf.reduce_sum(tf.square(model(xb, training=True) - yb), axis=[1, 2])
        return ghost.bookkeeping_clipped_gradients(model, lf, model.trainable_variables, 0.5).norms
    return strategy.run(replica, (xb, yb))

for xb, yb in ds:
    out = step(xb, yb)
got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
with tf.GradientTape() as t:
    l = tf.reduce_sum(tf.square(model(x) - y), axis=[1, 2])
j = t.jacobian(l, model.trainable_variables)
ref = np.sqrt(sum(np.sum(np.reshape(a.numpy(), (8, -1)) ** 2, 1) for a in j))
np.testing.assert_allclose(got, ref, rtol=1e-4)
assert not ghost_layers._PATCHED, ghost_layers._PATCHED
print("OK")
"""


def test_mirrored_strategy_two_replicas():
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT)
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
