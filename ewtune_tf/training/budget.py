"""PrivacyBudget: epsilon logging and budget enforcement for Keras ``fit``.

Each epoch the callback computes epsilon for the optimizer's private step
count (``dp_steps``, checkpointed with the optimizer, so resumed runs continue
the count) and logs ``epsilon`` (the certified upper bound when
``certify=True``; otherwise the estimate, and ``epsilon_certified`` is 0),
``epsilon_estimate`` and ``dp_steps`` into the epoch logs, and to TensorBoard
when ``log_dir`` is given.

Budget enforcement (``target_epsilon``): at the start of training the
callback finds the largest step count ``max_steps`` whose epsilon stays
within the target, stores it in the optimizer (``dp_max_steps``), and
* raises :class:`PrivacyBudgetExhausted` before any step if even one more
  step would exceed the target;
* stops training (``model.stop_training``) after the batch that reaches
  ``max_steps``, so the step that would exceed the target never runs;
* as a backstop, the private step itself asserts ``dp_steps < dp_max_steps``
  (in-graph; XLA drops asserts, which is why the host-side checks exist).

Epsilon history (one entry per epoch) is kept in ``self.history`` and, with
``history_path``, written atomically as JSON (temp file + ``os.replace``), so
a kill never leaves a half-written file. On resume the file's entries are
loaded and continued.
"""

import json
import math
import os
import tempfile
import warnings
from typing import Optional

import keras

from ewtune_tf.optimizers import dp_optimizer

PrivacyBudgetExhausted = dp_optimizer.PrivacyBudgetExhausted


def _atomic_write_json(path: str, obj) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_data_matches(optimizer, data) -> None:
    """ValueError unless a PoissonBatches' q equals the optimizer's q."""
    q_opt = optimizer.privacy_config.sampling_probability
    q_data = getattr(data, "sampling_probability", None)
    if q_data is None:
        return
    if q_opt is None or abs(q_opt - q_data) > 1e-12 * max(1.0, q_data):
        raise ValueError(
            f"sampling_probability: the data are Poisson-sampled with q={q_data} but the "
            f"optimizer accounts for q={q_opt}; give the optimizer sampling_probability={q_data} "
            "(or num_examples and batch_size matching the sampler)."
        )


def _write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar; works without the tensorboard package installed."""
    import tensorflow as tf

    try:
        tf.summary.scalar(tag, value, step=step)
    except Exception:  # TBNotInstalledError: write the raw summary with the
        # scalars-plugin metadata, which is what tf.summary.scalar would write.
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


class PrivacyBudget(keras.callbacks.Callback):
    """Logs epsilon each epoch and stops before the target is exceeded.

    Args:
      target_epsilon: budget (> 0); None only logs. Defaults to the
        optimizer's target_epsilon when it was calibrated from one.
      delta: defaults to the optimizer's delta.
      method, order, certify: accountant options; default to the optimizer's.
      log_dir: TensorBoard directory for the epsilon scalars (optional).
      history_path: JSON file for the epsilon history (optional).
      data: the ``ewtune_tf.data.PoissonBatches`` being trained on (optional);
        its sampling probability must equal the optimizer's (ValueError).
    """

    def __init__(
        self,
        target_epsilon: Optional[float] = None,
        *,
        delta: Optional[float] = None,
        method: Optional[str] = None,
        order: Optional[int] = None,
        certify: Optional[bool] = None,
        log_dir: Optional[str] = None,
        history_path: Optional[str] = None,
        data=None,
    ):
        super().__init__()
        self.data = data
        if target_epsilon is not None and not (
            isinstance(target_epsilon, (int, float))
            and not isinstance(target_epsilon, bool)
            and target_epsilon > 0
            and math.isfinite(target_epsilon)
        ):
            raise ValueError(f"target_epsilon must be a finite number > 0; got {target_epsilon!r}.")
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1); got {delta!r}.")
        if certify is not None and not isinstance(certify, bool):
            raise ValueError(f"certify must be True or False; got {certify!r}.")
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.method = method
        self.order = order
        self.certify = certify
        self.log_dir = log_dir
        self.history_path = history_path
        self.history = []
        self.max_steps: Optional[int] = None
        self._writer = None

    # ------------------------------------------------------------ helpers
    def _optimizer(self):
        opt = dp_optimizer.unwrap_optimizer(self.model.optimizer)
        if not isinstance(opt, dp_optimizer.EWTuneOptimizerMixin):
            raise ValueError(
                f"PrivacyBudget needs a model compiled with an EWTune optimizer; got {type(opt).__name__}."
            )
        return opt

    def _params(self):
        opt = self._optimizer()
        cfg = opt.privacy_config
        q = cfg.sampling_probability
        if q is None:
            raise ValueError(
                "sampling_probability: unknown; give the optimizer sampling_probability "
                "in (0, 1] (or num_examples and batch_size) so epsilon can be computed."
            )
        delta = self.delta if self.delta is not None else cfg.delta
        if delta is None:
            raise ValueError("delta: unknown; give PrivacyBudget(delta=...) or the optimizer target_delta in (0, 1).")
        target = self.target_epsilon if self.target_epsilon is not None else cfg.target_epsilon
        return dict(
            q=q,
            # The accountant's sigma (noise multiplier / record sensitivity).
            sigma=cfg.accounted_noise_multiplier,
            delta=delta,
            method=self.method or cfg.accountant_method,
            order=self.order or cfg.accountant_order,
            certify=cfg.certify if self.certify is None else self.certify,
            target=target,
        )

    def epsilon(self, steps: int):
        """EpsilonResult for ``steps`` private steps (accountant call)."""
        from ewtune_tf import accounting

        p = self._params()
        if steps <= 0:
            return None
        if p["sigma"] == 0:
            return None
        return accounting.compute_epsilon(
            sampling_probability=p["q"],
            noise_multiplier=p["sigma"],
            steps=int(steps),
            delta=p["delta"],
            method=p["method"],
            order=p["order"],
            certify=p["certify"],
        )

    def _eps_value(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        if self._params()["sigma"] == 0:
            return math.inf
        return float(self.epsilon(steps).epsilon)

    def _find_max_steps(self, current: int, target: float, planned: Optional[int]) -> int:
        """Largest s >= current with eps(s) <= target (eps increases with s).

        Returns ``current`` when even one more step would exceed the target.
        With ``planned`` (the steps this fit() will run) feasible, returns
        it after one accountant call; the cap is recomputed on the next fit.
        """
        hi = planned if planned and planned > current else current + 1
        if self._eps_value(hi) <= target:
            if planned and hi == planned:
                return hi
            lo = hi
            while True:  # exponential search for an infeasible upper end
                hi = 2 * hi
                if hi > 10**9:
                    return lo
                if self._eps_value(hi) > target:
                    break
                lo = hi
        else:
            lo = current  # zero further steps is always "feasible"
        while hi - lo > 1:  # invariant: lo feasible (or current), hi infeasible
            mid = (lo + hi) // 2
            if self._eps_value(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    # ---------------------------------------------------------- callbacks
    def on_train_begin(self, logs=None):
        opt = self._optimizer()
        opt.check_privacy_state()
        p = self._params()
        if self.data is not None:
            check_data_matches(opt, self.data)
        if opt.privacy_config.sampling != "poisson":
            warnings.warn(
                "PrivacyBudget: the optimizer records sampling='shuffle'; the accountant "
                "assumes Poisson sampling, so the epsilon logged is that of Poisson "
                "sampling with the same q.",
                stacklevel=2,
            )
        if self.history_path and os.path.exists(self.history_path) and not self.history:
            with open(self.history_path) as f:
                self.history = json.load(f).get("history", [])
        steps = int(opt.dp_steps.numpy())
        # After a crash the history file may be ahead of the restored
        # checkpoint: entries for steps that the restored model does not
        # contain are dropped (they are re-logged as training redoes them).
        self.history = [h for h in self.history if h.get("steps", 0) <= steps]
        if p["target"] is not None:
            planned = None
            if self.params and self.params.get("steps") and self.params.get("epochs"):
                planned = steps + int(self.params["steps"]) * int(self.params["epochs"])
            self.max_steps = self._find_max_steps(steps, p["target"], planned)
            opt.dp_max_steps.assign(self.max_steps)
            if self.max_steps <= steps:
                raise PrivacyBudgetExhausted(
                    f"Privacy budget exhausted: {steps} private steps taken; one more "
                    f"would exceed target_epsilon={p['target']} (delta={p['delta']}). "
                    "No step was taken."
                )
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        if self.max_steps is None:
            return
        steps = int(self._optimizer().dp_steps.numpy())
        # The next train_function call runs up to steps_per_execution steps.
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if steps + per_call > self.max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        opt = self._optimizer()
        steps = int(opt.dp_steps.numpy())
        res = self.epsilon(steps)
        p = self._params()
        if res is None:
            eps = 0.0 if steps == 0 else math.inf
            est, certified = eps, p["certify"]
        else:
            eps = float(res.epsilon)
            est = float(getattr(res, "estimate", None) or eps)
            certified = bool(getattr(res, "certified", False))
        entry = {
            "epoch": int(epoch),
            "steps": steps,
            "epsilon": eps,
            "epsilon_estimate": est,
            "certified": certified,
            "delta": p["delta"],
            "noise_multiplier": opt.privacy_config.noise_multiplier,
            "accounted_noise_multiplier": p["sigma"],
            "sampling_probability": p["q"],
            "sampling": opt.privacy_config.sampling,
            "method": p["method"],
        }
        self.history.append(entry)
        opt.dp_epsilon.assign(eps if certified else -1.0)
        opt.dp_epsilon_estimate.assign(est)
        if logs is not None:
            logs["epsilon"] = eps
            logs["epsilon_estimate"] = est
            logs["epsilon_certified"] = eps if certified else 0.0
            logs["dp_steps"] = steps
        if self._writer is not None:
            with self._writer.as_default():
                _write_scalar("privacy/epsilon", eps, steps)
                _write_scalar("privacy/epsilon_estimate", est, steps)
            self._writer.flush()
        if self.history_path:
            _atomic_write_json(self.history_path, {"history": self.history})
