"""What a run shows while it trains: progress lines, TensorBoard scalars, the privacy plot.

Nothing here computes anything from private training data: progress shows
the logical step, the certified epsilon spent so far and timing; TensorBoard
gets the epoch-end logs, which hold only privacy numbers unless the training
loss and accuracy were released by opt-in (``report_train_metrics``).
"""

import os
import time
from typing import Dict, List, Optional, Sequence


def _log(msg: str) -> None:
    print(msg, flush=True)


def progress_callback(plan, counter, total_steps: int, show_logs: bool = False, every: Optional[int] = None):
    """Keras callback printing ``[train] step t/T | epsilon <= e | s/step`` every
    ``every`` logical steps (default: ~20 lines per run) and at the last one.
    Epsilon is the plan's certified epsilon after t steps (one accountant call,
    ~50 ms). ``show_logs``: also the training logs (loss, accuracy), which are
    statistics of the private batches (``report_train_metrics`` only)."""
    import keras

    every = every or max(1, total_steps // 20)

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not hasattr(self, "start"):  # Once per run: fit() runs once per epoch.
                self.start, self.start_step = time.perf_counter(), counter.logical()

        def on_train_batch_end(self, batch, logs=None):
            step = counter.logical()
            if not counter.at_boundary() or (step % every and step != total_steps):
                return
            done = step - self.start_step
            rate = (time.perf_counter() - self.start) / done if done else float("nan")
            if plan.private:
                result = plan.epsilon(step)
                privacy = f"epsilon {'<=' if result.certified else '~'} {result.epsilon:.4g}"
            else:
                privacy = "NOT PRIVATE"
            logs = (logs or {}) if show_logs else {}
            extra = "".join(f" | {k} {float(v):.4g}" for k, v in logs.items() if _is_number(v))
            _log(f"[train] step {step}/{total_steps} | {privacy} | {rate:.2f} s/step{extra}")

    return Progress()


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def scalar_logger(log_dir: str, counter, keys: Optional[Sequence[str]] = None):
    """Keras callback writing the epoch-end logs as TensorBoard scalars
    ``epoch/<key>`` at x = the logical step (continues across a resume).
    ``keys``: only these logs (None: all, training statistics included)."""
    import keras
    import tensorflow as tf

    from ewtune_tf.training.summaries import write_scalar

    class ScalarLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(log_dir)

        def on_epoch_end(self, epoch, logs=None):
            step = counter.logical()
            with self.writer.as_default():
                for key, value in (logs or {}).items():
                    if _is_number(value) and (keys is None or key in keys):
                        write_scalar(f"epoch/{key}", float(value), step)
            self.writer.flush()

    return ScalarLogger()


def privacy_plot(path: str, plan, steps: int) -> Dict[str, List[float]]:
    """PNG: certified epsilon vs step, and the certified privacy curve delta(epsilon)
    after ``steps`` steps. Returns the plotted numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ewtune_tf import accounting

    grid = sorted({int(s) for s in np.unique(np.linspace(1, steps, num=min(steps, 20)).round())})
    eps = [plan.epsilon(s).epsilon for s in grid]
    eps_grid = [float(e) for e in np.linspace(max(0.05, eps[-1] / 10), max(2 * eps[-1], 1.0), 15)]
    deltas = [
        accounting.compute_delta(
            sampling_probability=plan.sampling_probability,
            noise_multiplier=plan.accounted_noise_multiplier,
            steps=steps,
            epsilon=e,
            method=plan.accountant,
            certify=True,
        ).delta
        for e in eps_grid
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(grid, eps, marker="o")
    if plan.target_epsilon is not None:
        a.axhline(plan.target_epsilon, color="red", linestyle="--", label=f"target eps={plan.target_epsilon:g}")
        a.legend()
    a.set(xlabel="logical step", ylabel=f"certified epsilon (delta={plan.delta:g})")
    a.set_title(f"epsilon vs step (q={plan.sampling_probability:.4g}, sigma={plan.noise_multiplier:.4g})")
    b.semilogy(eps_grid, np.maximum(deltas, 1e-300), marker="o")
    b.axhline(plan.delta, color="red", linestyle="--", label=f"delta={plan.delta:g}")
    b.set(xlabel="epsilon", ylabel="certified delta(epsilon)", title=f"privacy curve after {steps} steps")
    b.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return {"steps": grid, "epsilon": eps, "curve_epsilon": eps_grid, "curve_delta": deltas}
