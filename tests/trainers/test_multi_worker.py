"""``ewtune-train --strategy multi_worker``: two local worker processes on loopback.

Each worker is ``python -m trainers.glue`` with its own ``TF_CONFIG`` (ports on
127.0.0.1 only), no GPU, the tiny BERT preset and the fixture data: what a
TFJob runs on each host (``docs/distributed.md``).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = str(ROOT / "tests" / "fixtures" / "glue")
# 64 fixture rows, B = 16: q = 1/4, 4 logical steps per epoch.
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    from ewtune_tf.nlp import models

    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(tf_config=None):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_ENABLE_ONEDNN_OPTS="0",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _launch(argv, workers=None, index=0):
    """One process of ``argv``; a worker of ``workers`` (loopback addresses) when given."""
    tf_config = (
        None if workers is None else {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tf_config), cwd=str(ROOT)
    )


def _cluster(argv, n=2):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(n)]
    return [_launch(argv, workers, i) for i in range(n)]


def _finish(procs, timeout=300):
    """[(returncode, stdout, stderr)] of ``procs``; kills any still running at the end."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _trainer(preset, output_dir, *extra):
    """``python -m trainers.glue`` on the tiny preset and the fixture data (q = 1/4)."""
    flags = dict(model=preset, glue_dir=FIXTURES, task="sst2", batch_size=16, physical_batch_size=8)
    flags.update(sequence_length=32, max_eval_examples=8, output_dir=output_dir)
    return [sys.executable, "-m", "trainers.glue", *(f"--{k}={v}" for k, v in flags.items()), "--no_export", *extra]


def _summary(result):
    rc, out, err = result
    assert rc == 0, out[-2000:] + err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


PLAN_FIELDS = ("sampling_probability", "noise_multiplier", "steps", "planned_steps", "epsilon", "certified", "delta")


@pytest.mark.slow
def test_two_workers_release_the_single_process_plan(tmp_path, tiny_preset):
    """Both workers finish; the chief's report has the q, sigma, steps and
    certified epsilon of the same command run as one process; only the chief writes."""
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    workers = _cluster(_trainer(tiny_preset, run_dir, "--epochs", "2", "--strategy", "multi_worker"))
    chief, other = _finish(workers)
    single = _summary(_finish([_launch(_trainer(tiny_preset, ref_dir, "--epochs", "2"))])[0])
    chief_summary = _summary(chief)
    assert _summary(other)["steps"] == chief_summary["steps"] == 2 * STEPS_PER_EPOCH
    for key in ("epsilon", "noise_multiplier", "steps", "certified"):
        assert chief_summary[key] == single[key], key
    assert "worker 0 of 2 (the chief" in chief[1] and "worker 1 of 2" in other[1]

    report, ref = (json.loads((d / "privacy_report.json").read_text()) for d in (run_dir, ref_dir))
    for key in PLAN_FIELDS:
        assert report[key] == ref[key], key
    assert report["certified"] is True and report["uncertified_because"] == []
    assert report["sampler"]["replicas"] == 2 and ref["sampler"]["replicas"] == 1
    assert [h["steps"] for h in report["epsilon_history"]] == [4, 8]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["replicas"] == 2 and metrics["optimizer_updates"] == 8
    assert (run_dir / "checkpoints" / "state.json").is_file()


_SAMPLER_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
from ewtune_tf.data.global_poisson import GlobalPoissonSampler, shared_seed
from ewtune_tf.recipe.cluster import Cluster

n, q, steps, out = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seed = None if sys.argv[5] == "secret" else int(sys.argv[5])
strategy = tf.distribute.MultiWorkerMirroredStrategy()
cluster = Cluster.of(strategy, out)
ds = tf.data.Dataset.from_tensor_slices(({"ids": np.arange(n, dtype=np.int32)[:, None]}, np.arange(n)))
# What the recipe builds on every worker (finetuning._private_batches).
sampler = GlobalPoissonSampler(ds, q, seed=shared_seed(strategy, seed), num_replicas=cluster.num_replicas,
                               replica_ids=cluster.replica_ids, seeded=seed is not None, total_steps=steps)
width = n // cluster.num_replicas + 1

def padded(t):
    shards = sampler.replica_indices(t)
    return tf.pad(shards, [[0, 0], [0, width - tf.shape(shards)[1]]], constant_values=-1)

rows = tf.data.Dataset.range(steps).map(padded).batch(steps).get_single_element().numpy()
np.save(f"{out}/shards{cluster.worker}.npy", rows[:, 0, :])
print(json.dumps({"worker": cluster.worker, "replicas": list(cluster.replica_ids), "of": cluster.num_replicas}))
"""


def _sampled_shards(tmp_path, n, q, steps, seed):
    argv = [sys.executable, "-c", _SAMPLER_SCRIPT, str(n), str(q), str(steps), str(tmp_path), seed]
    for rc, _, err in _finish(_cluster(argv)):
        assert rc == 0, err[-4000:]
    return [np.load(tmp_path / f"shards{w}.npy") for w in range(2)]


@pytest.mark.slow
def test_two_workers_share_one_poisson_draw_per_step(tmp_path):
    """The draw the recipe makes on two real workers (seed shared through the
    collective): the global batch sizes are Binomial(N, q), and no example is
    in both workers' shards of a step. With a fixed test seed the union is the
    single-process draw of that step."""
    from ewtune_tf.data.global_poisson import GlobalPoissonSampler, fixed_seed

    n, q, steps = 200, 0.05, 2000
    (tmp_path / "secret").mkdir()
    first, second = _sampled_shards(tmp_path / "secret", n, q, steps, "secret")
    sizes = (first >= 0).sum(1) + (second >= 0).sum(1)
    for a, b in zip(first, second):
        a, b = a[a >= 0], b[b >= 0]
        assert not set(a) & set(b)  # no example on two workers in one step
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    edges = [0, 5, *range(6, 15), 15, n + 1]  # tails pooled: every expected count >= 5
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges) - 1, n, q)) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected).pvalue > 1e-3

    (tmp_path / "fixed").mkdir()
    first, second = _sampled_shards(tmp_path / "fixed", n, q, 50, "7")
    import tensorflow as tf

    single = GlobalPoissonSampler(
        tf.data.Dataset.from_tensor_slices((np.zeros((n, 1)), np.arange(n))), q, seed=fixed_seed(7)
    )
    for t in range(50):
        union = sorted(list(first[t][first[t] >= 0]) + list(second[t][second[t] >= 0]))
        assert union == list(single.global_indices(t).numpy())


def _state(output_dir):
    try:
        return json.loads((output_dir / "checkpoints" / "state.json").read_text())
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_killed_worker_then_rerun_resumes_without_double_counting(tmp_path, tiny_preset):
    """SIGKILL the non-chief worker mid-run: the chief stops with the
    retryable exit status; rerunning the same command on both workers resumes
    from the chief's last checkpoint and takes exactly the remaining steps."""
    from ewtune_tf.recipe.cluster import WORKER_LOST_EXIT_CODE

    run_dir = tmp_path / "run"
    argv = _trainer(tiny_preset, run_dir, "--epochs", "3", "--strategy", "multi_worker", "--checkpoint_every", "1")
    chief, other = _cluster(argv)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and chief.poll() is None:
            state = _state(run_dir)
            if state is not None and STEPS_PER_EPOCH < state["step"] < 2 * STEPS_PER_EPOCH:
                os.kill(other.pid, signal.SIGKILL)
                killed_at = state["step"]
                break
            time.sleep(0.05)
    finally:
        (rc, out, err), _ = _finish([chief, other], timeout=180)
    assert killed_at is not None, f"the run finished or stalled before it could be killed: {err[-3000:]}"
    assert rc == WORKER_LOST_EXIT_CODE, err[-3000:]
    assert "another worker of the cluster stopped" in err
    state = _state(run_dir)
    assert killed_at <= state["step"] < 3 * STEPS_PER_EPOCH
    assert not (run_dir / "privacy_report.json").exists()

    chief, other = _finish(_cluster(argv))
    summary = _summary(chief)
    assert _summary(other)["steps"] == summary["steps"] == 3 * STEPS_PER_EPOCH
    assert f"resumed from {run_dir / 'checkpoints' / state['checkpoint']}" in chief[1]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["steps"] == report["planned_steps"] == 3 * STEPS_PER_EPOCH and report["certified"] is True
    assert report["run"]["checkpointing"]["resumed_from_step"] == state["step"]
    assert [h["steps"] for h in report["epsilon_history"]] == [4, 8, 12]  # no step counted twice
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_updates"] == 3 * STEPS_PER_EPOCH
