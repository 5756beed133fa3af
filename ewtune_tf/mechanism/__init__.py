"""The DP mechanism: per-example clipping and Gaussian noise (TensorFlow).

Layer 2 of the package: may import ``ewtune_tf.accounting``, nothing above it.
"""
