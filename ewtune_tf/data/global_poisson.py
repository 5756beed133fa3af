"""One Poisson draw per step for every replica of a cluster, each replica fed its own shard.

Under ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``,
``TPUStrategy``) R replicas take each step together and their clipped sums
are all-reduced into one noised update. For that update to be the
Poisson-subsampled Gaussian mechanism the accountant certifies (q, steps,
sensitivity C), the logical batch of step t must be *one* Poisson sample of
the N examples, and each sampled example must be processed by exactly one
replica. Independent samplers per worker (what tf.data auto-sharding of
per-worker Poisson batches gives) are neither.

:class:`GlobalPoissonSampler` therefore, on every worker:

1. draws the same global sample for step t: each of the N examples is
   included with probability exactly q (``poisson.inclusion_mask``, the
   single-process rule) from a stateless seed derived from the run's shared
   seed and t alone (``step_seed``), so every worker computes the same
   sorted list of sampled indices ``s_0 < s_1 < ... < s_{k-1}``;
2. gives replica r the rows ``s_r, s_{r+R}, s_{r+2R}, ...`` (by position in
   the global sample, never by a worker's own randomness), padded with
   weight-0 rows to ``P = max(1, ceil(k / R))`` rows, so every replica takes
   the step (and adds its noise share sigma*C/sqrt(R)) even when its shard is
   empty, and all shards of a step have one shape;
3. feeds only the shards of its own replicas (``replica_ids``).

The private step gives weight-0 rows a loss and a gradient of exactly 0, so
the all-reduced clipped sum is the sum over the global sample, each example
once: the released update is that of a single process running the same
sample, whatever R. With R = 1 this is the single-process sampler (one
shard: the whole sample, plus one weight-0 row when the sample is empty).

The seed: ``shared_seed`` broadcasts replica 0's draw from the OS entropy
pool to every replica through a collective (``broadcast_from_replica_zero``);
it lives in memory only, never in a file, a log or a checkpoint. A resumed
run draws a fresh seed: the steps after the restored one are then sampled by
the same process in distribution (``ewtune_tf.recipe.checkpoint`` explains
why that is sound). A fixed ``seed`` (tests only) makes the batch of step t
depend only on (seed, t), identical for every R.

Static shapes: with ``max_batch_size`` M every shard has exactly
``ceil(M / R)`` rows; a global sample larger than M fails the step before it
reaches the model (``overflow="error"`` of ``poisson_batches``; the
probability of that event over the run is ``overflow_probability_bound``).
"""

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ewtune_tf.accounting.calibration import steps_per_epoch
from ewtune_tf.data import poisson
from ewtune_tf.utils import checks

SHARDING = "one global Poisson draw per step from a seed shared by all workers; sampled example j to replica j mod R"


def _words(seed: Sequence[int]) -> Tuple[int, int]:
    words = tuple(int(s) for s in seed)
    if len(words) != 2 or not all(0 <= w < 2**63 for w in words):
        raise ValueError(f"seed must be two integers in [0, 2**63); got {seed!r}.")
    return words


def step_seed(seed: Tuple[int, int], step) -> tf.Tensor:
    """int64[2] stateless seed of the global draw of logical step ``step``."""
    return tf.random.experimental.stateless_fold_in(tf.constant(_words(seed), tf.int64), tf.cast(step, tf.int64))


def fixed_seed(seed: int) -> Tuple[int, int]:
    """The shared seed a fixed ``sampling_seed`` stands for (tests only; not secret)."""
    seed = checks.check_int("seed", seed, 0)
    warnings.warn(
        "global Poisson sampling with a fixed seed: batch membership is reproducible from a known seed; "
        "privacy amplification by sampling assumes it is secret. Tests only.",
        stacklevel=2,
    )
    return (seed % 2**63, 0x5A3D)


class GlobalPoissonSampler:
    """Per-step shards of one global Poisson sample (see the module docstring).

    Args:
      dataset: finite dataset of ``(x, y)`` or ``(x, y, w)`` examples with a
        fixed shape per example (materialized in memory once, as by
        ``poisson_batches``).
      sampling_probability: q in (0, 1].
      seed: the run's shared seed, two integers in [0, 2**63)
        (``shared_seed``, or ``fixed_seed(k)`` for tests).
      num_replicas: R, all replicas of all workers.
      replica_ids: the replicas this process feeds, in the order its devices
        take them (``ewtune_tf.training.distributed.local_replica_ids``).
      seeded: whether ``seed`` is known (a fixed test seed): reported as
        ``fixed_seed`` (the report is then not certified).
      max_batch_size: None (shards of ``max(1, ceil(k / R))`` rows), or an int
        M in [1, N] (shards of ``ceil(M / R)`` rows; larger samples fail).
      total_steps: planned steps (for the overflow bound only).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        sampling_probability: float,
        *,
        seed: Tuple[int, int],
        num_replicas: int = 1,
        replica_ids: Sequence[int] = (0,),
        seeded: bool = False,
        max_batch_size: Optional[int] = None,
        total_steps: int = 1,
    ):
        self.num_replicas = checks.check_int("num_replicas", num_replicas, 1)
        ids = tuple(checks.check_int("replica_ids", r, 0, self.num_replicas - 1) for r in replica_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"replica_ids must be distinct replicas in [0, {self.num_replicas}); got {replica_ids!r}.")
        self.replica_ids, self.seeded, self._seed = ids, bool(seeded), _words(seed)
        n, tensors = poisson._materialize(dataset)
        self.num_examples = n
        self.sampling_probability = poisson._resolve_q(n, sampling_probability, None)
        self.total_steps = checks.check_int("total_steps", total_steps, 1)
        self.max_batch_size = poisson._resolve_max_batch_size(
            max_batch_size, n, self.sampling_probability, self.total_steps, 1e-9
        )
        if poisson._split(tensors)[1] is None:
            raise ValueError("dataset: GlobalPoissonSampler needs (x, y) or (x, y, w) examples; got x only.")
        self._sampler = poisson._Sampler(tensors, n, self.sampling_probability, self.max_batch_size, "error", None)

    @property
    def shard_size(self) -> Optional[int]:
        """Static rows per shard (with ``max_batch_size``), else None."""
        return None if self.max_batch_size is None else -(-self.max_batch_size // self.num_replicas)

    def global_indices(self, step) -> tf.Tensor:
        """int32 [k]: the sorted indices of the global sample of ``step`` (same on every worker)."""
        return self._sampler._indices(step_seed(self._seed, step))

    def replica_indices(self, step) -> tf.Tensor:
        """int32 [len(replica_ids), P]: row i of this process's replica j's shard
        is global sample position ``replica_ids[j] + i * R``; -1 marks padding."""
        idx = self.global_indices(step)
        r = self.num_replicas
        k = tf.size(idx)
        rows = tf.maximum(1, (k + r - 1) // r) if self.shard_size is None else tf.constant(self.shard_size)
        padded = tf.pad(idx, [[0, rows * r - k]], constant_values=-1)
        by_replica = tf.transpose(tf.reshape(padded, [rows, r]))  # row j: positions j, j + R, ...
        return tf.gather(by_replica, list(self.replica_ids))

    def _gather(self, indices: tf.Tensor):
        """(x, y, w) of ``indices`` [L, P]; -1 rows are zeros of weight 0."""
        real = indices >= 0
        safe = tf.maximum(indices, 0)

        def take(t):
            g = tf.gather(t, safe)
            mask = tf.reshape(real, tf.concat([tf.shape(real), tf.ones([t.shape.rank - 1], tf.int32)], 0))
            return tf.where(mask, g, tf.zeros_like(g))

        s = self._sampler
        return tf.nest.map_structure(take, s.x), tf.nest.map_structure(take, s.y), take(s.w)

    def batches(self, start: int, stop: int) -> tf.data.Dataset:
        """Steps ``start .. stop - 1``: for each, one ``(x, y, w)`` shard per
        replica of ``replica_ids``, in that order (``len(replica_ids)``
        consecutive elements per step)."""
        start = checks.check_int("start", start, 0)
        stop = checks.check_int("stop", stop, start)
        steps = tf.data.Dataset.range(start, stop)
        return steps.map(lambda t: self._gather(self.replica_indices(t))).unbatch().prefetch(2)

    def report(self) -> Dict[str, Any]:
        """The privacy report's ``sampler`` facts."""
        m = self.max_batch_size
        bound = 0.0
        if m is not None:
            bound = poisson.overflow_probability_bound(
                self.num_examples, self.sampling_probability, self.total_steps, m
            )
        return {
            "sampling": "poisson",
            "num_examples": self.num_examples,
            "sampling_probability": self.sampling_probability,
            "expected_batch_size": self.sampling_probability * self.num_examples,
            "steps_per_epoch": steps_per_epoch(self.sampling_probability),
            "max_batch_size": m,
            "overflow": "error",
            "overflow_probability_bound": bound,
            "overflow_count": None,
            "fixed_seed": self.seeded,
            "example_keys": False,
            "replicas": self.num_replicas,
            "sharding": SHARDING,
        }


def draw_seed(seed: Optional[int] = None) -> Tuple[int, int]:
    """This process's proposal for the shared seed: ``fixed_seed(seed)``, or
    two 62-bit words from the OS entropy pool (``secrets``), never from
    TensorFlow's global seed (which ``keras.utils.set_random_seed`` makes public)."""
    if seed is not None:
        return fixed_seed(seed)
    import secrets

    return (secrets.randbits(62), secrets.randbits(62))


def shared_seed(strategy, seed: Optional[int] = None) -> Tuple[int, int]:
    """The run's sampling seed, the same on every worker: replica 0's
    ``draw_seed(seed)``, broadcast through the strategy's collectives.

    Every worker must call it at the same point (it is a collective).
    """
    from ewtune_tf.training.distributed import broadcast_from_replica_zero

    return tuple(int(v) for v in broadcast_from_replica_zero(strategy, np.asarray(draw_seed(seed), np.int64)))
