"""The training step under any ``tf.distribute`` strategy, without Keras ``fit``.

Keras 3.15's ``fit`` cannot run under ``MultiWorkerMirroredStrategy``: its
symbolic build reduces an eager per-replica batch, and its train function
reduces scalar logs with ``strategy.reduce(MEAN, axis=0)``, which fails for
0-d values across workers. :func:`make_step_function` is the loop body
``fit`` would run -- ``strategy.run(model.train_step)`` on the next element
of a distributed iterator, traced once, XLA-compiled when the model is --
returning the first replica's logs (the private step returns ``dp_steps``, the
same on every replica). It serves every strategy, so there is one code path.

With a private model (``make_private``) each call first runs the host-side
privacy checks (``private_step.check_before_steps``: restored state and the
budget cap), which XLA would otherwise compile away.

The cluster helpers are collectives: every worker must call them at the same
point, in the same order.
"""

from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ewtune_tf.training import private_step


def is_multi_worker(strategy) -> bool:
    """Whether the strategy spans several processes (each runs this program)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy) -> bool:
    """Whether this process writes the run's outputs (the strategy's checkpointing worker)."""
    return bool(strategy.extended.should_checkpoint)


def worker_index(strategy) -> Tuple[int, int]:
    """(this worker's index, number of workers); (0, 1) for a single process.

    The chief is index 0 (a ``chief`` task of TF_CONFIG, else worker 0).
    """
    if not is_multi_worker(strategy):
        return 0, 1
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    index = int(resolver.task_id) + (chiefs if resolver.task_type == "worker" else 0)
    return index, chiefs + len(jobs.get("worker", []))


def local_replica_ids(strategy) -> Tuple[int, ...]:
    """The global ids (``replica_id_in_sync_group``) of this process's
    replicas, in the order its devices take distributed values."""
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ctx.replica_id_in_sync_group, tf.int64)
    )
    return tuple(int(v.numpy()) for v in strategy.experimental_local_results(values))


def broadcast_from_replica_zero(strategy, values: Sequence[int]) -> np.ndarray:
    """Replica 0's int64 ``values`` on every worker (an all-reduce SUM to which
    every other replica contributes zeros). A single-process strategy returns
    ``values`` (its one process already holds them)."""
    values = np.asarray(values, np.int64)
    if not is_multi_worker(strategy):
        return values
    zeros = np.zeros_like(values)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(values if ctx.replica_id_in_sync_group == 0 else zeros)
    )
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def build_for_training(model, element_spec) -> None:
    """Builds the model, its compiled loss/metrics and optimizer from one
    replica's element spec (what ``fit`` does from a batch), in the strategy's scope."""
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=element_spec)


def make_step_function(model) -> Callable[[Any], Dict[str, Any]]:
    """``step(iterator) -> logs``: one ``model.train_step`` on every replica."""
    strategy = model.distribute_strategy

    def on_data(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], outputs)

    on_data = tf.function(on_data, reduce_retracing=True, jit_compile=bool(model.jit_compile))

    @tf.function
    def on_iterator(iterator):
        return on_data(next(iterator))

    if not private_step.is_private(model):
        return on_iterator

    def guarded(iterator):
        private_step.check_before_steps(model, 1)
        return on_iterator(iterator)

    return guarded
