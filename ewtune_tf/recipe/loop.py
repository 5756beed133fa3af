"""The recipe's training loop: Keras ``fit``'s epoch loop, run by the recipe.

``fit`` cannot run under ``MultiWorkerMirroredStrategy`` on the pinned Keras
(``ewtune_tf.training.distributed``), so the recipe drives its epochs itself,
under every strategy (one code path): each epoch is what one ``fit(...,
initial_epoch=e, epochs=e + 1)`` call did -- the callbacks (``PrivacyBudget``,
the checkpointer, TensorBoard, progress) get the same calls with the same
``params``, ``model.stop_training`` ends the epoch (the budget cap), and a
``History`` collects the epoch-end logs after the callbacks added theirs.

Each element of an epoch's dataset is one replica's input of one step; a
process with L replicas takes L consecutive elements per step
(``strategy.distribute_datasets_from_function``: nothing is re-batched or
auto-sharded, so each replica gets exactly the shard it was given).
"""

import time
from typing import Any, Dict, Optional, Sequence

import tensorflow as tf

from ewtune_tf.training import distributed


class EpochLoop:
    """Runs epochs of ``model.train_step`` with ``callbacks``, like ``fit``.

    Attributes:
      history: ``keras.callbacks.History`` of the epoch-end logs.
      first_step_seconds: wall time of the first step (tracing included), or None.
    """

    def __init__(self, model, callbacks: Sequence[Any]):
        import keras

        self.model = model
        self.history = keras.callbacks.History()
        self.callbacks = keras.callbacks.CallbackList(list(callbacks) + [self.history], model=model)
        self.first_step_seconds: Optional[float] = None
        self._step = None

    def _distribute(self, dataset: tf.data.Dataset):
        strategy = self.model.distribute_strategy
        if self._step is None:
            distributed.build_for_training(self.model, dataset.element_spec)
            self._step = distributed.make_step_function(self.model)
        return iter(strategy.distribute_datasets_from_function(lambda _: dataset))

    def run_epoch(self, epoch: int, dataset: tf.data.Dataset, steps: int) -> Dict[str, Any]:
        """Up to ``steps`` steps on ``dataset`` as epoch ``epoch``; returns the epoch-end logs."""
        model, callbacks = self.model, self.callbacks
        iterator = self._distribute(dataset)
        callbacks.set_params({"verbose": 0, "epochs": epoch + 1, "steps": steps})
        model.stop_training = False
        callbacks.on_train_begin()
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        logs: Dict[str, Any] = {}
        for batch in range(steps):
            callbacks.on_train_batch_begin(batch)
            t0 = time.perf_counter()
            logs = self._step(iterator)
            if self.first_step_seconds is None:
                self.first_step_seconds = time.perf_counter() - t0
            callbacks.on_train_batch_end(batch, logs)
            if model.stop_training:
                break
        # As fit: the compiled metrics' epoch results when the step reports them, else the last step's logs.
        metrics = model.get_metrics_result()
        epoch_logs = dict(metrics if set(logs) == set(metrics) else logs)
        callbacks.on_epoch_end(epoch, epoch_logs)
        callbacks.on_train_end(epoch_logs)
        return self.history.history


def split_rows(dataset: tf.data.Dataset, num_replicas: int, replica_ids: Sequence[int]) -> tf.data.Dataset:
    """Each ``(x, y, ...)`` batch as one element per replica of ``replica_ids``:
    replica r gets rows r, r + R, ... (the non-private baseline's batches under
    several replicas; R = 1 returns ``dataset``)."""
    if num_replicas == 1:
        return dataset
    ids = tf.constant(list(replica_ids), tf.int64)

    def split(*element):
        rows = tf.shape(tf.nest.flatten(element)[0], out_type=tf.int64)[0]

        def shard(r):
            index = tf.range(r, rows, num_replicas)
            return tf.nest.map_structure(lambda t: tf.gather(t, index), element)

        return tf.data.Dataset.from_tensor_slices(ids).map(shard)

    return dataset.flat_map(split)
