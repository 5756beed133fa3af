"""MultiWorkerMirroredStrategy, 2 local workers on loopback: one device's noise.

Each worker is a fresh interpreter with its own TF_CONFIG. Each adds noise
std sigma*C/sqrt(2) from its own process secret; the cross-worker all-reduce
carries std sigma*C. Both workers must end with identical weights. Both set
the same Keras/TF seed on purpose: had the noise followed that seed, the two
workers' noise would coincide and the std would be sqrt(2) too large.

The step runs through ``strategy.run(model.train_step)`` in a tf.function:
Keras 3.15's ``fit`` fails under MultiWorkerMirroredStrategy before the first
step even for non-private models (``_maybe_symbolic_build`` eagerly reduces a
PerReplica batch), so this is the custom-loop route.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

_SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
import keras
from ewtune_tf.optimizers import EWTuneSGD
from ewtune_tf.training import make_private

strategy = tf.distribute.MultiWorkerMirroredStrategy()
sigma, c, b = 1.5, 0.5, 16.0
with strategy.scope():
    keras.utils.set_random_seed(0)  # same init (and same TF seed!) on both workers
    m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(4000)])
    m.compile(EWTuneSGD(1.0, l2_norm_clip=c, noise_multiplier=sigma, batch_size=b), "mse")
    m.optimizer.build(m.trainable_variables)
make_private(m)
ds = tf.data.Dataset.from_tensor_slices((np.zeros((32, 10), np.float32), np.ones((32, 4000), np.float32))).batch(16)
it = iter(strategy.experimental_distribute_dataset(ds))

@tf.function
def step(batch):
    strategy.run(m.train_step, args=(batch,))

k0 = m.layers[0].kernel.numpy().copy()
step(next(it))
d = m.layers[0].kernel.numpy() - k0
np.save(sys.argv[1], d)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "ratio": float(d.std() / (sigma * c / b)),
                  "steps": int(m.optimizer.dp_steps.numpy())}))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multiworker_noise_scale(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            TF_ENABLE_ONEDNN_OPTS="0",
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, str(tmp_path / f"d{i}.npy")],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for o in outs:
        assert o["replicas"] == 2 and o["steps"] == 1
        assert abs(o["ratio"] - 1) < 0.03, outs
    np.testing.assert_array_equal(np.load(tmp_path / "d0.npy"), np.load(tmp_path / "d1.npy"))
