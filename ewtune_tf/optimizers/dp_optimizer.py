"""EWTune optimizers: Keras 3 optimizers that only take private steps.

``make_ewtune_optimizer(keras.optimizers.X)`` builds ``EWTuneX``, a subclass
of X that

* takes X's usual hyperparameters plus its privacy: a
  :class:`ewtune_tf.privacy.PrivacyPlan` (``plan=``), or the plan's keyword
  arguments (``l2_norm_clip``; ``noise_multiplier`` or ``target_epsilon`` +
  ``target_delta`` + ``num_examples`` + ``batch_size`` + ``epochs``;
  ``sampling_probability``; ``accountant_method``/``accountant_order``/
  ``certify``; ``sampling``; see ``ewtune_tf.privacy.plan_from_arguments``),
  plus the mechanism options of
  :class:`ewtune_tf.optimizers.privacy_config.PrivacyConfig`
  (``num_microbatches``; ``clipping``; ``noise_seed``; adaptive clipping with
  ``target_unclipped_quantile``, ``clip_learning_rate``,
  ``clipped_count_stddev``; group-wise clipping with ``clip_groups``);
* keeps the privacy state as non-trainable optimizer variables, so that it is
  saved with the optimizer in ``.keras`` files and ``tf.train.Checkpoint``:
  ``dp_steps`` (private steps taken: noise releases), ``dp_noise_multiplier``,
  ``dp_sampling_probability``, ``dp_delta``, ``dp_l2_norm_clip`` (-1 = unknown),
  ``dp_max_steps`` (budget cap set by PrivacyBudget; -1 = none),
  ``dp_epsilon`` / ``dp_epsilon_estimate`` (last values logged),
  ``dp_adaptive_clip`` (current clip under adaptive clipping),
  ``dp_record_sensitivity`` (1 per example, 2 for keyed microbatches: a
  checkpoint is never resumed under another record definition), and
  ``dp_nonfinite_records`` (records dropped for a non-finite gradient: a
  statistic of the private data, kept in the process and its checkpoints,
  never logged or reported);
* refuses ``apply``/``apply_gradients`` outside a private training step
  (:class:`NonPrivateStepError`), so a model compiled with an EWTune optimizer
  but not made private fails at trace time of its first step, before any
  update. The private step (``ewtune_tf.training``) calls
  :meth:`apply_private_gradients` with the *clipped sum*; the optimizer adds
  the noise, normalizes by the expected batch size, checks its restored state
  against its configuration, and applies the base update.

Classes built by the factory are registered as Keras serializable under
package ``"ewtune_tf"``; a ``.keras`` file that uses ``EWTuneRMSprop`` can be
loaded once ``make_ewtune_optimizer(keras.optimizers.RMSprop)`` has run.
"""

import contextlib
import math
from typing import Dict, Optional, Sequence, Type

import keras
import numpy as np
import tensorflow as tf

from ewtune_tf.mechanism import noise as noise_lib
from ewtune_tf.optimizers.privacy_config import PRIVACY_ARGUMENTS, PrivacyConfig, resolve_privacy_config
from ewtune_tf.privacy import PrivacyPlan


class NonPrivateStepError(RuntimeError):
    """An EWTune optimizer was asked to apply gradients outside a private step."""


class PrivacyBudgetExhausted(RuntimeError):
    """Raised before a private step that would exceed the privacy budget."""


def _unknown(x: Optional[float]) -> float:
    return -1.0 if x is None else float(x)


class EWTuneOptimizerMixin:
    """Privacy behaviour shared by all EWTune optimizers (see module doc)."""

    def __init__(self, *args, plan: Optional[PrivacyPlan] = None, **kwargs):
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "gradient_accumulation_steps is not supported by EWTune optimizers "
                "(it would average separately noised steps); use "
                "make_private(model, physical_batch_size=...) to process a logical "
                "batch in chunks with noise added once."
            )
        privacy = {k: kwargs.pop(k) for k in PRIVACY_ARGUMENTS if k in kwargs}
        # Validate (and calibrate) before building anything.
        config = resolve_privacy_config(plan, **privacy)
        super().__init__(*args, **kwargs)
        self._privacy = config
        self._ewtune_in_private_update = False
        self._create_privacy_variables()

    # ----------------------------------------------------------------- state
    def _create_privacy_variables(self) -> None:

        def var(name, value, dtype, aggregation="only_first_replica"):
            # A numpy initializer keeps float64 values exact (Constant would
            # round through float32, and the state checks compare exactly).
            def init(shape, dtype=None, _v=value):
                return np.full(shape, _v, dtype=dtype)

            return self.add_variable(
                shape=(),
                initializer=init,
                dtype=dtype,
                aggregation=aggregation,
                name=name,
            )

        self.dp_steps = var("dp_steps", 0, "int64")
        expected = self._expected_state()
        for name in ("dp_noise_multiplier", "dp_sampling_probability", "dp_delta", "dp_l2_norm_clip"):
            setattr(self, name, var(name, expected[name], "float64"))
        self.dp_max_steps = var("dp_max_steps", -1, "int64")
        self.dp_epsilon = var("dp_epsilon", -1.0, "float64")
        self.dp_epsilon_estimate = var("dp_epsilon_estimate", -1.0, "float64")
        # Current clip of adaptive clipping (= l2_norm_clip when fixed).
        self.dp_adaptive_clip = var("dp_adaptive_clip", expected["dp_l2_norm_clip"], "float32")
        self.dp_record_sensitivity = var("dp_record_sensitivity", expected["dp_record_sensitivity"], "float64")
        self.dp_nonfinite_records = var("dp_nonfinite_records", 0, "int64")

    def current_l2_norm_clip(self):
        """The clip to use now: a float (fixed) or a float32 tensor (adaptive)."""
        if self._privacy.adaptive_clipping:
            return tf.convert_to_tensor(self.dp_adaptive_clip)
        return self._privacy.plan.l2_norm_clip

    @property
    def privacy_config(self) -> PrivacyConfig:
        return self._privacy

    @property
    def privacy_plan(self) -> PrivacyPlan:
        """The plan this optimizer runs (``privacy_config.plan``)."""
        return self._privacy.plan

    def privacy_state(self) -> Dict[str, float]:
        """Current privacy state as Python numbers (eager only)."""
        return {
            "steps": int(self.dp_steps.numpy()),
            "noise_multiplier": float(self.dp_noise_multiplier.numpy()),
            "sampling_probability": float(self.dp_sampling_probability.numpy()),
            "delta": float(self.dp_delta.numpy()),
            "l2_norm_clip": float(self.dp_l2_norm_clip.numpy()),
            "max_steps": int(self.dp_max_steps.numpy()),
            "epsilon": float(self.dp_epsilon.numpy()),
            "epsilon_estimate": float(self.dp_epsilon_estimate.numpy()),
            "sampling": self._privacy.plan.sampling,
            "current_l2_norm_clip": float(self.dp_adaptive_clip.numpy()),
        }

    def check_privacy_state(self) -> None:
        """Raises ValueError if restored state disagrees with the config.

        Host-side twin of the in-graph asserts of apply_private_gradients
        (which XLA compiles away under jit_compile=True).
        """
        for name, want in self._expected_state().items():
            got = float(getattr(self, name).numpy())
            if got != want:
                raise ValueError(
                    f"Restored privacy state {name}={got} differs from this optimizer's "
                    f"configuration ({want}): the checkpoint was written with a "
                    "different privacy configuration; accounting across it would be "
                    "wrong. Use the configuration the checkpoint was trained with."
                )

    def _expected_state(self) -> Dict[str, float]:
        """The checkpointed privacy variables that must equal the configuration."""
        plan = self._privacy.plan
        return {
            "dp_noise_multiplier": plan.noise_multiplier,
            "dp_sampling_probability": _unknown(plan.sampling_probability),
            "dp_delta": _unknown(plan.delta),
            "dp_l2_norm_clip": plan.l2_norm_clip if math.isfinite(plan.l2_norm_clip) else -2.0,
            "dp_record_sensitivity": plan.sensitivity,
        }

    def check_budget(self, upcoming_steps: int = 1) -> None:
        """Raises PrivacyBudgetExhausted unless ``upcoming_steps`` more private
        steps fit under dp_max_steps (-1: no cap)."""
        steps, cap = int(self.dp_steps.numpy()), int(self.dp_max_steps.numpy())
        if cap >= 0 and steps + upcoming_steps > cap:
            raise PrivacyBudgetExhausted(
                f"Privacy budget exhausted: dp_steps={steps}, dp_max_steps={cap}; "
                f"{upcoming_steps} more private step(s) are not allowed."
            )

    def _state_asserts(self) -> list:
        msg = (
            "Restored privacy state differs from the optimizer's configuration "
            "(checkpoint from a different privacy configuration): "
        )
        ops = [
            tf.debugging.assert_equal(
                tf.convert_to_tensor(getattr(self, name)),
                tf.constant(want, tf.float64),
                message=msg + name[len("dp_") :],
            )
            for name, want in self._expected_state().items()
        ]
        steps = tf.convert_to_tensor(self.dp_steps)
        max_steps = tf.convert_to_tensor(self.dp_max_steps)
        ops.append(
            tf.debugging.Assert(
                tf.logical_or(max_steps < 0, steps < max_steps),
                [
                    "Privacy budget exhausted: dp_steps =",
                    steps,
                    ">= dp_max_steps =",
                    max_steps,
                    "; no further private step is allowed.",
                ],
            )
        )
        return ops

    # ---------------------------------------------------------------- guard
    @contextlib.contextmanager
    def _private_update_scope(self):
        prev = self._ewtune_in_private_update
        self._ewtune_in_private_update = True
        try:
            yield
        finally:
            self._ewtune_in_private_update = prev

    def apply(self, grads, trainable_variables=None):
        if not self._ewtune_in_private_update:
            raise NonPrivateStepError(
                f"{type(self).__name__} only applies differentially private "
                "updates, but apply()/apply_gradients() was called outside a "
                "private training step (no per-example clipping or noise). Call "
                "ewtune_tf.make_private(model) after compile() (or use a model "
                "that already is), and train with model.fit / model.train_on_batch."
            )
        return super().apply(grads, trainable_variables)

    # --------------------------------------------------------- private step
    def expected_records(self, physical_batch_size: Optional[int]) -> float:
        """Divisor of the noised sum: expected records per logical step.

        Per-example records: the expected batch size (or, when none is
        configured, ``physical_batch_size``, the static size of the chunk the
        clipping implementation sees). Keyed microbatch records: M, since a
        record's loss is its members' sum over the expected group size B / M.
        """
        cfg = self._privacy
        if cfg.num_microbatches is not None:
            return float(cfg.num_microbatches)
        b = cfg.plan.expected_batch_size
        if b is None:
            if physical_batch_size is None:
                raise ValueError(
                    "batch_size (the expected logical batch size) must be given to "
                    "the optimizer when the batch dimension is not static."
                )
            b = float(physical_batch_size)
        return float(b)

    def _check_replica_safe(self, num_replicas: int) -> None:
        """Refuses what would act on a replica's partial sum (ValueError).

        Keras applies clipnorm / global_clipnorm / clipvalue before it
        all-reduces the replicas' gradients: each replica would clip its own
        partial sum, which carries only noise std sigma*C/sqrt(R), and the
        R noises would no longer add up to sigma*C on the update.
        """
        if num_replicas <= 1:
            return
        set_ = {k: getattr(self, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue")}
        set_ = {k: v for k, v in set_.items() if v}
        if set_:
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in set_.items())}: with {num_replicas} replicas in sync Keras "
                "applies it to each replica's partial gradient before the all-reduce, where each carries only "
                "1/sqrt(replicas) of the noise; remove it (the privacy clipping is l2_norm_clip) or train on "
                "one replica."
            )
        if self._privacy.adaptive_clipping:
            raise ValueError(
                "target_unclipped_quantile (adaptive clipping) supports a single replica "
                f"only; this strategy has {num_replicas}. Use a fixed l2_norm_clip."
            )

    def apply_private_gradients(
        self,
        clipped_sum: Sequence[tf.Tensor],
        trainable_variables: Sequence,
        *,
        physical_batch_size: Optional[int],
        centered_unclipped_count: Optional[tf.Tensor] = None,
        num_nonfinite: Optional[tf.Tensor] = None,
    ):
        """Noises the local clipped sum, normalizes and applies one update.

        Must run in the replica context of the train step. Each replica adds
        noise std sigma*C/sqrt(R); Keras's all-reduce SUM of the gradients
        then carries noise std sigma*C (see ewtune_tf.mechanism.noise).
        ``num_nonfinite`` (records dropped for a non-finite gradient) is
        added to ``dp_nonfinite_records``.
        """
        cfg = self._privacy
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._check_replica_safe(num_replicas)
        ctx = tf.distribute.get_replica_context()
        replica_id = ctx.replica_id_in_sync_group if ctx is not None else 0
        divisor = self.expected_records(physical_batch_size)
        # Bug guard, not a data check: every record is masked and clipped, so
        # the sum is finite whatever the data (sum of records of norm <= C).
        finite = [
            tf.debugging.assert_all_finite(g, "Non-finite clipped sum in the private step (a bug); no update applied.")
            for g in clipped_sum
        ]
        with tf.control_dependencies(self._state_asserts() + finite):
            step = tf.identity(tf.convert_to_tensor(self.dp_steps))
        seed = noise_lib.make_seed(step, replica_id, cfg.noise_seed)
        noised, new_clip = self._noised_sum(clipped_sum, centered_unclipped_count, divisor, seed, num_replicas)
        grads = noise_lib.normalize(noised, divisor)
        grads = [tf.cast(g, v.dtype) for g, v in zip(grads, trainable_variables)]
        with self._private_update_scope():
            self.apply(grads, trainable_variables)
        if new_clip is not None:
            self.dp_adaptive_clip.assign(new_clip)
        if num_nonfinite is not None:
            dropped = tf.cast(num_nonfinite, tf.int64)
            if ctx is not None and num_replicas > 1:
                dropped = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dropped)
            self.dp_nonfinite_records.assign_add(dropped)
        self.dp_steps.assign_add(1)
        return grads

    def _noised_sum(self, clipped_sum, centered_unclipped_count, divisor, seed, num_replicas):
        """(noised sum, new adaptive clip or None)."""
        cfg = self._privacy
        if not cfg.adaptive_clipping:
            noised = noise_lib.add_gaussian_noise(
                clipped_sum,
                l2_norm_clip=cfg.plan.l2_norm_clip,
                noise_multiplier=cfg.plan.noise_multiplier,
                seed=seed,
                num_replicas=num_replicas,
            )
            return noised, None
        if centered_unclipped_count is None:
            raise ValueError("adaptive clipping needs the centered unclipped count from the train step.")
        return noise_lib.add_gaussian_noise_adaptive(
            clipped_sum,
            centered_unclipped_count,
            l2_norm_clip=self.current_l2_norm_clip(),
            noise_multiplier=cfg.plan.noise_multiplier,
            clipped_count_stddev=cfg.clipped_count_stddev,
            target_unclipped_quantile=cfg.target_unclipped_quantile,
            learning_rate=cfg.clip_learning_rate,
            expected_records=divisor,
            seed=seed,
        )

    # -------------------------------------------------------- serialization
    def get_config(self):
        config = super().get_config()
        config.update(self._privacy.to_arguments())
        return config


_CLASS_CACHE: Dict[type, type] = {}


def make_ewtune_optimizer(keras_optimizer_class: Type[keras.optimizers.Optimizer]) -> type:
    """Builds (once) and returns the EWTune subclass of a Keras 3 optimizer.

    The returned class takes the base class's arguments plus the privacy
    arguments (keyword-only) described in the module docstring.
    """
    if isinstance(keras_optimizer_class, type) and issubclass(keras_optimizer_class, EWTuneOptimizerMixin):
        return keras_optimizer_class
    if not (isinstance(keras_optimizer_class, type) and issubclass(keras_optimizer_class, keras.optimizers.Optimizer)):
        raise ValueError(
            "keras_optimizer_class must be a Keras 3 optimizer class (a subclass of "
            f"keras.optimizers.Optimizer); got {keras_optimizer_class!r}."
        )
    if keras_optimizer_class in _CLASS_CACHE:
        return _CLASS_CACHE[keras_optimizer_class]
    name = f"EWTune{keras_optimizer_class.__name__}"
    cls = type(
        name,
        (EWTuneOptimizerMixin, keras_optimizer_class),
        {
            "__doc__": (
                f"Differentially private {keras_optimizer_class.__name__} (see ewtune_tf.optimizers.dp_optimizer)."
            ),
            "__module__": __name__,
        },
    )
    cls = keras.saving.register_keras_serializable(package="ewtune_tf", name=name)(cls)
    _CLASS_CACHE[keras_optimizer_class] = cls
    return cls


EWTuneAdam = make_ewtune_optimizer(keras.optimizers.Adam)
EWTuneSGD = make_ewtune_optimizer(keras.optimizers.SGD)
EWTuneAdamW = make_ewtune_optimizer(keras.optimizers.AdamW)


def unwrap_optimizer(optimizer):
    """Returns the EWTune optimizer inside a LossScaleOptimizer, or itself."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return inner if inner is not None else optimizer


def is_ewtune_optimizer(optimizer) -> bool:
    return isinstance(unwrap_optimizer(optimizer), EWTuneOptimizerMixin)
