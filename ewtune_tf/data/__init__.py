"""Sampling for private training: Poisson logical batches (what the
accountant assumes) and shuffled fixed-size batches (recorded as such).

Layer 3: imports TensorFlow (and scipy for the overflow bound).
"""

from ewtune_tf.data.poisson import (
    PoissonBatches,
    auto_max_batch_size,
    inclusion_mask,
    overflow_probability_bound,
    poisson_batches,
    shuffled_batches,
    steps_per_epoch,
)
from ewtune_tf.mechanism.records import KeyedSampleWeight

__all__ = [
    "KeyedSampleWeight",
    "PoissonBatches",
    "auto_max_batch_size",
    "inclusion_mask",
    "overflow_probability_bound",
    "poisson_batches",
    "shuffled_batches",
    "steps_per_epoch",
]
