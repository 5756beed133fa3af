"""``make_private(model)``: Keras ``fit`` takes differentially private steps.

Route chosen: patch the *instance's* ``train_step`` (Keras 3 TF backend calls
``self.train_step(data)`` inside its tf.function). This works unchanged for
Sequential, Functional, subclassed and KerasHub task models (e.g.
``BertTextClassifier``), needs no new model class, and leaves ``evaluate`` /
``predict`` alone. ``make_private`` may be called before or after
``compile``; everything is resolved when the step is traced. A model loaded
from ``.keras`` is *not* private until ``make_private`` is called again --
its EWTune optimizer then refuses to update (NonPrivateStepError).

One private step on a logical batch ``(x, y, sample_weight)``:

1. The per-example loss is derived from the compiled loss with its reduction
   disabled (``ewtune_tf.training.per_example_loss``); sample weights scale
   it, weight-0 rows (padding) contribute exactly 0.
2. The rows' clipped sum is formed by ``ewtune_tf.training.clipped_sum``:
   without ``physical_batch_size`` the whole batch is one chunk; with it, the
   batch is processed in chunks of that many rows. Records are examples, or
   keyed microbatch groups of the whole logical batch (``num_microbatches``
   on the optimizer; the batch's sample-weight slot must then be a
   ``KeyedSampleWeight(sample_weight, example_key)``, as
   ``poisson_batches(..., example_keys=True)`` yields). A record whose
   gradient is not finite contributes 0 and is counted in the optimizer's
   ``dp_nonfinite_records`` (never logged); training goes on.
3. Once per logical step, the optimizer adds Gaussian noise to the
   accumulated sum, divides by the expected number of records, and applies
   the update; its ``dp_steps`` counts logical steps (= noise releases).

Distribution (``tf.distribute``): the step runs per replica on its shard;
each replica adds noise std ``sigma*C/sqrt(R)`` to its local clipped sum
(independent streams: process secret + global replica id), and Keras's
all-reduce SUM of the gradients yields std ``sigma*C`` once per step (see
``ewtune_tf.mechanism.noise``). ``MirroredStrategy`` works with ``fit``. For
``MultiWorkerMirroredStrategy`` Keras 3.15's ``fit`` fails before the first
step even for non-private models (``_maybe_symbolic_build`` eagerly reduces a
PerReplica batch); use the loop body of ``ewtune_tf.training.distributed``
(``make_step_function``), as the recipe does. Every example of a logical
step must be processed by exactly one replica, and every replica must take
every step: ``ewtune_tf.data.global_poisson`` feeds each replica its shard of
one global Poisson sample.

Keyed microbatch records need one replica: tf.distribute splits a batch
into consecutive slices, so a group's members would be clipped per replica,
and the slice an example lands in moves with the data.

Mixed precision: the clipped sum, the noise and the update are float32
whatever the compute dtype; ``mixed_bfloat16`` is supported. ``mixed_float16``
is refused before the first step: float16 per-example gradients need loss
scaling, and Keras's dynamic LossScaleOptimizer skips steps and changes its
scale according to whether the (private, un-noised) gradients overflowed --
a data-dependent output outside the mechanism. Use ``mixed_bfloat16`` (same
exponent range as float32, no loss scaling) or float32. Under
``jit_compile=True`` and on TPUs XLA drops in-graph asserts, so the budget
and state checks also run on the host before each step.

Training metrics (loss, compiled metrics) are computed on the private batch
and are *not* covered by the DP guarantee, so by default none are computed or
logged (``report_train_metrics=False``): ``fit`` logs only ``dp_steps``, the
private step count. ``report_train_metrics=True`` releases them (progress bar,
history, callbacks, the metrics' checkpointed state); list them as released
without privacy wherever the model's guarantee is reported.
"""

import dataclasses
import types
from typing import Optional

import keras
import tensorflow as tf

from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import records as records_lib
from ewtune_tf.optimizers import dp_optimizer
from ewtune_tf.optimizers import privacy_config as privacy_config_lib
from ewtune_tf.training import clipped_sum as clipped_sum_lib
from ewtune_tf.training.per_example_loss import make_per_example_loss


@dataclasses.dataclass(frozen=True)
class PrivateStepOptions:
    """Options of the private train step (None = take the optimizer's)."""

    physical_batch_size: Optional[int] = None
    clipping: Optional[str] = None
    report_train_metrics: bool = False


_FLOAT16_MESSAGE = (
    "the float16 compute dtype (mixed_float16) is not supported by private training: float16 "
    "per-example gradients need loss scaling, and Keras's dynamic loss scaling skips steps according "
    "to whether the private, un-noised gradients overflowed. Use the 'mixed_bfloat16' policy (float32's "
    "exponent range, no loss scaling) or float32."
)


def _check_layers(model) -> None:
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise ValueError(
                f"model: layer {layer.name!r} is a trainable BatchNormalization. Batch "
                "statistics mix examples, so per-example clipping does not bound one "
                "example's influence. Set layer.trainable = False (inference-mode "
                "BN) or use LayerNormalization/GroupNormalization."
            )
        if getattr(layer, "compute_dtype", None) == "float16":
            raise ValueError(f"model: layer {layer.name!r} computes in float16; {_FLOAT16_MESSAGE}")


def make_private(
    model: keras.Model,
    *,
    physical_batch_size: Optional[int] = None,
    clipping: Optional[str] = None,
    num_microbatches: None = None,
    report_train_metrics: bool = False,
) -> keras.Model:
    """Makes ``model.fit`` / ``train_on_batch`` take DP steps; returns model.

    Args:
      model: a Keras 3 model, compiled (now or later) with an EWTune optimizer
        and a loss.
      physical_batch_size: process each logical batch in chunks of this many
        rows (gradient accumulation; noise is added once per logical batch).
        None: one chunk. Must be >= 1.
      clipping: clipping implementation name (overrides the optimizer's).
      num_microbatches: must be None. Microbatching changes the record and
        its sensitivity, hence the accounting, so it is set on the optimizer.
      report_train_metrics: also compute and log the loss and compiled
        metrics on the private batches. They are NOT differentially private:
        off by default, so nothing computed from the private data but the
        noised update leaves the step.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; got {type(model).__name__}.")
    if physical_batch_size is not None and (
        isinstance(physical_batch_size, bool) or not isinstance(physical_batch_size, int) or physical_batch_size < 1
    ):
        raise ValueError(f"physical_batch_size must be None or an integer >= 1; got {physical_batch_size!r}.")
    if clipping is not None:
        clipping_lib.get_clipping_impl(clipping)  # ValueError if unknown.
    if num_microbatches is not None:
        raise ValueError(
            f"num_microbatches={num_microbatches!r}: give it to the EWTune optimizer, not make_private; "
            "keyed microbatch records have sensitivity 2C, which the optimizer's accounting must know."
        )
    if not isinstance(report_train_metrics, bool):
        raise ValueError(f"report_train_metrics must be a bool; got {report_train_metrics!r}.")
    _check_layers(model)
    model._ewtune_private = PrivateStepOptions(
        physical_batch_size=physical_batch_size,
        clipping=clipping,
        report_train_metrics=report_train_metrics,
    )
    model.train_step = types.MethodType(private_train_step, model)
    model.make_train_function = types.MethodType(_guarded_make_train_function, model)
    model._symbolic_build = types.MethodType(_symbolic_build_without_keys, model)
    # Force a retrace with the private step if fit() already ran.
    model.train_function = None
    return model


def _symbolic_build_without_keys(self, iterator=None, data_batch=None):
    """Keras's ``_symbolic_build`` on the batch with plain sample weights.

    Keras builds the compiled loss and metrics on a symbolic sample batch; a
    ``KeyedSampleWeight`` there would be taken for a weight structure. The
    keys are for the private step only.
    """
    if isinstance(data_batch, tuple) and len(data_batch) == 3:
        x, y, sample_weight = data_batch
        if isinstance(sample_weight, records_lib.KeyedSampleWeight):
            data_batch = (x, y, sample_weight.sample_weight)
    return type(self)._symbolic_build(self, iterator=iterator, data_batch=data_batch)


def _guarded_make_train_function(self, force=False):
    """Keras's make_train_function, plus a host-side guard under XLA.

    XLA compiles ``tf.debugging`` asserts away, so with ``jit_compile=True``
    or on a TPU the in-graph checks of the private step (restored state matches the
    configuration, budget cap, the finite-sum bug guard) do not run. The
    budget and configuration checks are then done on the host before every
    step. (Non-finite records need no assert: they are masked in-graph.)
    """
    type(self).make_train_function(self, force=force)
    fn = self.train_function
    if fn is not None and _compiled_by_xla(self) and not getattr(fn, "_ewtune_host_guard", False):

        def guarded(iterator):
            # One call runs up to steps_per_execution private steps.
            check_before_steps(self, int(getattr(self, "steps_per_execution", 1) or 1))
            return fn(iterator)

        guarded._ewtune_host_guard = True
        self.train_function = guarded
    return self.train_function


def check_before_steps(model, steps: int = 1) -> None:
    """Host-side privacy checks before ``steps`` private steps of ``model``:
    the restored privacy state equals the optimizer's configuration
    (ValueError) and ``steps`` more steps fit under the budget cap
    (PrivacyBudgetExhausted). The in-graph asserts check the same, but XLA
    compiles them away."""
    opt = _resolve_optimizer(model)
    opt.check_privacy_state()
    opt.check_budget(steps)


def _compiled_by_xla(model) -> bool:
    """``jit_compile``, or a TPU (whose steps XLA always compiles)."""
    return bool(model.jit_compile) or isinstance(model.distribute_strategy, tf.distribute.TPUStrategy)


def is_private(model) -> bool:
    return getattr(model, "_ewtune_private", None) is not None


def _first_leaf(x):
    for t in tf.nest.flatten(x):
        if t is not None:
            return t
    raise ValueError("x: the batch has no input tensors.")


def _resolve_optimizer(model):
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(f"optimizer: a LossScaleOptimizer wraps the EWTune optimizer; {_FLOAT16_MESSAGE}")
    opt = dp_optimizer.unwrap_optimizer(model.optimizer)
    if not isinstance(opt, dp_optimizer.EWTuneOptimizerMixin):
        raise ValueError(
            "optimizer: make_private needs the model compiled with an EWTune "
            "optimizer (ewtune_tf.EWTuneAdam/EWTuneSGD/EWTuneAdamW or "
            f"make_ewtune_optimizer(...)); got {type(opt).__name__}."
        )
    return opt


def _update_metrics(model, y, y_pred, per_ex_loss, sample_weight, report: bool = True):
    """Updates the loss tracker and compiled metrics (non-private stats).

    With ``report=False`` the compiled metrics are only built (Keras's fit
    reads their result at epoch end), never updated: they stay empty.
    """
    cm = getattr(model, "_compile_metrics", None)
    if not report:
        if cm is not None and not cm.built:
            cm.build(y, y_pred)
        return
    tracker = getattr(model, "_loss_tracker", None)
    active = tf.cast(sample_weight != 0, tf.float32)
    n = tf.reduce_sum(active)
    if tracker is not None:
        tracker.update_state(tf.reduce_sum(per_ex_loss) / tf.maximum(n, 1.0), sample_weight=n)
    if cm is not None:
        cm.update_state(y, y_pred, sample_weight)


def private_train_step(self, data):
    """The DP replacement of ``Model.train_step`` (bound by make_private)."""
    opts: PrivateStepOptions = self._ewtune_private
    opt = _resolve_optimizer(self)
    cfg = opt.privacy_config
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = list(self.trainable_variables)
    if not variables:
        raise ValueError("model: no trainable variables; nothing to train privately.")
    if not opt.built:
        opt.build(variables)
    _check_layers(self)
    spec = clipped_sum_lib.ClipSpec(
        clipping=opts.clipping or cfg.clipping,
        l2_norm_clip=opt.current_l2_norm_clip(),  # a tensor under adaptive clipping
        # Group-wise clipping: resolved at trace time, when the variables are
        # known (ValueError before the first update if a group is unusable).
        groups=privacy_config_lib.resolve_clip_groups(cfg.clip_groups, [getattr(v, "path", v.name) for v in variables]),
        num_microbatches=cfg.num_microbatches,
        expected_batch_size=cfg.plan.expected_batch_size,
    )
    rows = _rows(x, y, sample_weight, cfg.num_microbatches)
    result = clipped_sum_lib.logical_clipped_sum(
        self,
        spec,
        _loss_fn_factory(self),
        rows,
        variables,
        physical=opts.physical_batch_size,
        report=opts.report_train_metrics,
    )
    opt.apply_private_gradients(
        result.grad_sum,
        variables,
        physical_batch_size=opts.physical_batch_size or _first_leaf(x).shape[0],
        centered_unclipped_count=result.centered_unclipped_count if cfg.adaptive_clipping else None,
        num_nonfinite=result.num_nonfinite,
    )
    if opts.report_train_metrics:
        return self.get_metrics_result()
    # Not empty: Keras's fit loop needs at least one log value. The private
    # step count is public (it is what the accountant counts).
    return {"dp_steps": opt.dp_steps}


def _loss_fn_factory(model):
    """``(rows, report) -> loss_fn`` for ``ewtune_tf.training.clipped_sum``."""
    per_example_loss = make_per_example_loss(model)

    def loss_fn_for(rows, report):
        # Metrics are updated (or, unreported, only built) on the first
        # forward pass only (a two-pass clipping implementation calls loss_fn twice).
        pending = [True]

        def loss_fn():
            y_pred = model(rows.x, training=True) if model._call_has_training_arg else model(rows.x)
            if model.losses:
                raise ValueError(
                    "model: the model has regularization/auxiliary losses "
                    f"({len(model.losses)}); the private step clips only the compiled "
                    "per-example loss. Remove layer regularizers (use AdamW weight "
                    "decay instead)."
                )
            losses = per_example_loss(rows.y, y_pred, rows.sample_weight)
            if pending[0]:
                pending[0] = False
                _update_metrics(model, rows.y, y_pred, losses, rows.sample_weight, report)
            return losses

        return loss_fn

    return loss_fn_for


def _rows(x, y, sample_weight, num_microbatches) -> clipped_sum_lib.Rows:
    """The batch as ``Rows``: float32 [batch] weights, keyed record ids."""
    keys = None
    if isinstance(sample_weight, records_lib.KeyedSampleWeight):
        sample_weight, keys = sample_weight
    leaf = _first_leaf(x)
    if leaf.shape[0] is None and isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
        raise ValueError(
            "x: TPU training needs a static batch size; use "
            "ewtune_tf.data.poisson_batches(..., max_batch_size='auto') (padded Poisson "
            "batches) or drop_remainder=True batching."
        )
    batch = tf.shape(leaf)[0]
    if sample_weight is None:
        sample_weight = tf.ones([batch], tf.float32)
    else:
        sample_weight = tf.cast(sample_weight, tf.float32)
        if sample_weight.shape.rank is not None and sample_weight.shape.rank > 1:
            sample_weight = tf.reshape(sample_weight, [batch])
    return clipped_sum_lib.Rows(x, y, sample_weight, _group_ids(keys, batch, num_microbatches))


def _group_ids(keys, batch, num_microbatches):
    """[batch] int32 keyed record of each row (None: per-example records)."""
    if num_microbatches is None:
        return None
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        raise ValueError(
            f"num_microbatches={num_microbatches} with {replicas} replicas: a keyed record would be "
            "split over replicas by position in the batch; use one replica or per-example records."
        )
    if num_microbatches == 1:
        return tf.zeros([batch], tf.int32)  # one record: no key needed
    if keys is None:
        raise ValueError(
            f"num_microbatches={num_microbatches} needs a per-example key to group examples into records "
            "(groups of consecutive rows move when one example is added, so their sensitivity is not 2C): "
            "feed batches (x, y, KeyedSampleWeight(sample_weight, example_key)), e.g. from "
            "ewtune_tf.data.poisson_batches(..., example_keys=True), with each key fixed per example "
            "independently of the other examples."
        )
    return records_lib.group_ids(tf.reshape(keys, [batch]), num_microbatches)
