"""PrivacyBudget: epsilon logging and budget enforcement for Keras ``fit``.

Each epoch the callback computes epsilon (the optimizer's
``PrivacyPlan.epsilon``) for its private step count (``dp_steps``,
checkpointed with the optimizer, so resumed runs continue the count) and
logs ``epsilon`` (the certified upper bound when ``certify=True``; otherwise
the estimate, and ``epsilon_certified`` is 0),
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

Epsilon history (one entry per epoch, the privacy report's
``epsilon_history`` entries) is kept in ``self.history`` and, with
``history_path``, written atomically as JSON (temp file + ``os.replace``), so
a kill never leaves a half-written file. On resume the file's entries are
loaded and continued.
"""

import json
import math
import os
import warnings
from typing import Optional

import keras

from ewtune_tf.optimizers import dp_optimizer
from ewtune_tf.privacy import PrivacyPlan, history_entry
from ewtune_tf.privacy.report import check_sampler_matches
from ewtune_tf.training.summaries import write_scalar
from ewtune_tf.utils import checks
from ewtune_tf.utils.files import atomic_write_json

PrivacyBudgetExhausted = dp_optimizer.PrivacyBudgetExhausted


def check_data_matches(optimizer, data) -> None:
    """ValueError unless a PoissonBatches' q equals the optimizer's q."""
    q_data = getattr(data, "sampling_probability", None)
    check_sampler_matches(optimizer.privacy_plan, {"sampling_probability": q_data})


class PrivacyBudget(keras.callbacks.Callback):
    """Logs epsilon each epoch and stops before the target is exceeded.

    Epsilon is the optimizer's ``PrivacyPlan.epsilon`` (with the overrides
    below) for the private steps taken.

    Args:
      target_epsilon: budget (> 0); None only logs. Defaults to the plan's
        target_epsilon when its sigma was chosen to meet it by a rule that
        bounds epsilon (``PrivacyPlan.bounds_target``).
      delta: defaults to the plan's delta.
      method, order, certify: accountant options; default to the plan's.
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
        self.target_epsilon = checks.check_real("target_epsilon", target_epsilon, 0.0, optional=True)
        self.delta = checks.check_real("delta", delta, 0.0, 1.0, optional=True)
        self.certify = None if certify is None else checks.check_bool("certify", certify)
        self.method = method
        self.order = order
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

    def plan(self) -> PrivacyPlan:
        """The optimizer's plan with this callback's delta/accountant overrides."""
        plan = self._optimizer().privacy_plan
        overrides = dict(delta=self.delta, accountant=self.method, accountant_order=self.order, certify=self.certify)
        plan = plan.replace(**{k: v for k, v in overrides.items() if v is not None})
        if plan.sampling_probability is None:
            raise ValueError(
                "sampling_probability: unknown; give the optimizer sampling_probability "
                "in (0, 1] (or num_examples and batch_size) so epsilon can be computed."
            )
        if plan.delta is None:
            raise ValueError("delta: unknown; give PrivacyBudget(delta=...) or the optimizer target_delta in (0, 1).")
        return plan

    def _target(self, plan: PrivacyPlan) -> Optional[float]:
        if self.target_epsilon is not None:
            return self.target_epsilon
        return plan.target_epsilon if plan.bounds_target else None

    def epsilon(self, steps: int):
        """EpsilonResult for ``steps`` private steps (accountant call); None
        before any step or without noise."""
        plan = self.plan()
        if steps <= 0 or not plan.private:
            return None
        return plan.epsilon(int(steps))

    # ---------------------------------------------------------- callbacks
    def on_train_begin(self, logs=None):
        opt = self._optimizer()
        opt.check_privacy_state()
        plan = self.plan()
        if self.data is not None:
            check_data_matches(opt, self.data)
        if plan.sampling != "poisson":
            warnings.warn(
                "PrivacyBudget: the optimizer records sampling='shuffle'; the accountant "
                "assumes Poisson sampling, so the epsilon logged is that of Poisson "
                "sampling with the same q.",
                stacklevel=2,
            )
        self._load_history(int(opt.dp_steps.numpy()))
        target = self._target(plan)
        if target is not None:
            self._cap(opt, plan, target)
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _load_history(self, steps: int) -> None:
        if self.history_path and os.path.exists(self.history_path) and not self.history:
            with open(self.history_path) as f:
                self.history = json.load(f).get("history", [])
        # After a crash the history file may be ahead of the restored
        # checkpoint: entries for steps that the restored model does not
        # contain are dropped (they are re-logged as training redoes them).
        self.history = [h for h in self.history if h.get("steps", 0) <= steps]

    def _cap(self, opt, plan: PrivacyPlan, target: float) -> None:
        """Sets ``dp_max_steps`` to the last step within ``target``; refuses to start past it."""
        steps = int(opt.dp_steps.numpy())
        planned = None
        if self.params and self.params.get("steps") and self.params.get("epochs"):
            planned = steps + int(self.params["steps"]) * int(self.params["epochs"])
        self.max_steps = plan.max_steps_within(target, steps, planned) if plan.private else steps
        opt.dp_max_steps.assign(self.max_steps)
        if self.max_steps <= steps:
            raise PrivacyBudgetExhausted(
                f"Privacy budget exhausted: {steps} private steps taken; one more "
                f"would exceed target_epsilon={target} (delta={plan.delta}). "
                "No step was taken."
            )

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
        result = self.epsilon(steps)
        entry = history_entry(epoch, steps, result)
        if steps and not self.plan().private:
            entry.update(epsilon=None, epsilon_estimate=None)
        # No finite epsilon (no noise, or a sigma below the accountant's range):
        # the history keeps null, the optimizer's state and the logs inf.
        eps, est = (math.inf if v is None else v for v in (entry["epsilon"], entry["epsilon_estimate"]))
        certified = result is None or bool(result.certified)
        self.history.append(entry)
        opt.dp_epsilon.assign(eps if certified else -1.0)
        opt.dp_epsilon_estimate.assign(est)
        if logs is not None:
            logs.update(epsilon=eps, epsilon_estimate=est, epsilon_certified=eps if certified else 0.0)
            logs["dp_steps"] = steps
        if self._writer is not None:
            with self._writer.as_default():
                write_scalar("privacy/epsilon", eps, steps)
                write_scalar("privacy/epsilon_estimate", est, steps)
            self._writer.flush()
        if self.history_path:
            atomic_write_json(self.history_path, {"history": self.history})
