"""Who does what in a run: every worker trains, the chief writes.

A multi-worker run (``--strategy multi_worker``) is the same command started
once per host, each with its own ``TF_CONFIG`` (Kubeflow's TFJob and Vertex AI
set it). Every worker loads the data, builds the model, restores the same
checkpoint and takes every step on its replicas' shards of the global Poisson
sample (``ewtune_tf.data.global_poisson``). Only the chief writes to
``output_dir`` and ``export_dir``: checkpoints and their sidecar, the epsilon
history, TensorBoard logs, the privacy report, metrics, the plot and the
SavedModel. The other workers take part in every collective (checkpoint saves
read synchronized variables, so all workers save together) but write into a
private scratch directory that is removed when they finish.

``output_dir`` must be one location every worker reads (a bucket or a shared
volume): a resumed run restores the chief's checkpoint on every worker.
:meth:`Cluster.check_agreement` refuses to train when a worker would start
from another step, another plan or other data than the chief.

When a worker dies, the collectives of the others fail within seconds (the
coordination service stops hearing its heartbeats); they raise
:class:`WorkerLost`, and ``ewtune-train`` exits with status 138, which
Kubeflow's ``restartPolicy: ExitCode`` treats as retryable. Rerunning the same
command on every worker resumes from the last checkpoint
(``ewtune_tf.recipe.checkpoint``): no step is counted twice.
"""

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
from typing import Any, Dict, Iterator, Optional, Tuple

from ewtune_tf.recipe.settings import ConfigError

# ewtune-train's exit status when a worker was lost: Kubeflow's TFJob
# (restartPolicy: ExitCode) restarts the job for 138 (128 + SIGUSR1, its
# user-defined retryable code), not for 1 or 2.
WORKER_LOST_EXIT_CODE = 138


class WorkerLost(RuntimeError):
    """Another worker of the cluster stopped; rerun every worker to resume."""


@dataclasses.dataclass
class Cluster:
    """This process's place in the run.

    Attributes:
      strategy: the ``tf.distribute`` strategy.
      chief: whether this process writes the outputs.
      worker, num_workers: this worker's index (the chief is 0) and their number.
      replica_ids: the global ids of this process's replicas.
      num_replicas: replicas of all workers (R).
      write_dir: where this process writes: ``output_dir`` on the chief, a
        scratch directory elsewhere.
    """

    strategy: Any
    chief: bool
    worker: int
    num_workers: int
    replica_ids: Tuple[int, ...]
    num_replicas: int
    write_dir: str
    scratch: Optional[str] = None

    @classmethod
    def of(cls, strategy, output_dir: str) -> "Cluster":
        from ewtune_tf.training import distributed

        chief = distributed.is_chief(strategy)
        worker, num_workers = distributed.worker_index(strategy)
        scratch = None if chief else tempfile.mkdtemp(prefix=f"ewtune-worker{worker}-")
        ids = distributed.local_replica_ids(strategy)
        return cls(
            strategy, chief, worker, num_workers, ids, strategy.num_replicas_in_sync, scratch or output_dir, scratch
        )

    def describe(self) -> str:
        role = "the chief: writes the outputs" if self.chief else "writes nothing outside a scratch directory"
        return (
            f"worker {self.worker} of {self.num_workers} ({role}); replicas {list(self.replica_ids)} "
            f"of {self.num_replicas}"
        )

    def check_agreement(self, facts: Dict[str, Any]) -> None:
        """ConfigError unless this worker's ``facts`` (resume step, plan, data)
        equal the chief's. A collective: every worker calls it at the same point."""
        if self.num_workers == 1:
            return
        from ewtune_tf.training.distributed import broadcast_from_replica_zero

        names = sorted(facts)
        mine = [fingerprint(facts[k]) for k in names]
        chiefs = [int(v) for v in broadcast_from_replica_zero(self.strategy, mine)]
        differ = [k for k, a, b in zip(names, mine, chiefs) if a != b]
        if differ:
            raise ConfigError(
                f"worker {self.worker} and the chief disagree on {', '.join(differ)}. Every worker must run the "
                "same command on the same data, and {output_dir} must be one location all workers read (a bucket "
                "or a shared volume, the same path on each): a resumed run restores the chief's checkpoint on "
                "every worker.",
                "output_dir",
            )

    def close(self) -> None:
        """Removes the scratch directory (non-chief workers)."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def fingerprint(value: Any) -> int:
    """A 62-bit digest of a JSON-able value (compared across workers, never logged)."""
    if isinstance(value, int) and 0 <= value < 2**62:
        return value
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 2


@contextlib.contextmanager
def worker_loss(cluster: Optional[Cluster], output_dir: str) -> Iterator[None]:
    """Turns the errors a lost peer causes in a collective into :class:`WorkerLost`."""
    import tensorflow as tf

    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
    try:
        yield
    except lost as e:
        if cluster is None or cluster.num_workers == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkerLost(
            f"worker {cluster.worker}: another worker of the cluster stopped ({type(e).__name__}: {first}). "
            f"Rerun the same command on every worker: training resumes from the last checkpoint in {output_dir}."
        ) from e
