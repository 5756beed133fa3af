"""Process-wide test settings, applied before anything imports TensorFlow.

TF_ENABLE_ONEDNN_OPTS=0: on x86 CPUs, vectorized per-example gradients
(`tf.vectorized_map` / pfor) through Keras 3 EinsumDense and MultiHeadAttention
segfault while oneDNN's custom ops are on. Turning them off avoids the crash at
a small CPU speed cost; it changes no results beyond float round-off.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No network in CI: never let a hub download hang a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KAGGLE_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_test_cache"))
