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
2. Without ``physical_batch_size`` the whole batch is one chunk. With it, the
   batch is padded to a multiple of ``physical_batch_size`` and processed
   chunk by chunk in a ``tf.while_loop`` (static chunk shape, TPU-friendly);
   trailing chunks holding only weight-0 rows are skipped (they contribute
   exactly 0). Each chunk's clipped sum (from the clipping implementation in
   ``ewtune_tf.mechanism.clipping``) is accumulated in float32.
3. Once per logical step, the optimizer adds Gaussian noise to the
   accumulated sum, divides by the expected batch size, and applies the
   update; its ``dp_steps`` counts logical steps (= noise releases).

Distribution (``tf.distribute``): the step runs per replica on its shard;
each replica adds noise std ``sigma*C/sqrt(R)`` to its local clipped sum
(independent streams: process secret + global replica id), and Keras's
all-reduce SUM of the gradients yields std ``sigma*C`` once per step (see
``ewtune_tf.mechanism.noise``). ``MirroredStrategy`` works with ``fit``. For
``MultiWorkerMirroredStrategy`` Keras 3.15's ``fit`` fails before the first
step even for non-private models (``_maybe_symbolic_build`` eagerly reduces a
PerReplica batch); use a custom loop, ``strategy.run(model.train_step,
args=(batch,))`` inside a ``tf.function``, after ``optimizer.build``.

Mixed precision: the clipped sum and the noise are float32. Under
``mixed_float16`` Keras wraps the optimizer in a LossScaleOptimizer; the
private step uses the inner EWTune optimizer directly, i.e. without loss
scaling (float16 per-example gradients may underflow; prefer
``mixed_bfloat16``). Under ``jit_compile=True`` XLA drops in-graph asserts,
so the budget and state checks also run on the host before each step.

Training metrics (loss, compiled metrics) are computed on the private batch
and are *not* covered by the DP guarantee; pass ``report_train_metrics=False``
to log none.
"""

import dataclasses
import types
from typing import Optional

import keras
import tensorflow as tf

from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import per_example
from ewtune_tf.optimizers import dp_optimizer
from ewtune_tf.optimizers import privacy_config as privacy_config_lib
from ewtune_tf.training.per_example_loss import make_per_example_loss


@dataclasses.dataclass(frozen=True)
class PrivateStepOptions:
    """Options of the private train step (None = take the optimizer's)."""

    physical_batch_size: Optional[int] = None
    clipping: Optional[str] = None
    num_microbatches: Optional[int] = None
    report_train_metrics: bool = True


def _check_layers(model) -> None:
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise ValueError(
                f"model: layer {layer.name!r} is a trainable BatchNormalization. Batch "
                "statistics mix examples, so per-example clipping does not bound one "
                "example's influence. Set layer.trainable = False (inference-mode "
                "BN) or use LayerNormalization/GroupNormalization."
            )


def make_private(
    model: keras.Model,
    *,
    physical_batch_size: Optional[int] = None,
    clipping: Optional[str] = None,
    num_microbatches: Optional[int] = None,
    report_train_metrics: bool = True,
) -> keras.Model:
    """Makes ``model.fit`` / ``train_on_batch`` take DP steps; returns model.

    Args:
      model: a Keras 3 model, compiled (now or later) with an EWTune optimizer
        and a loss.
      physical_batch_size: process each logical batch in chunks of this many
        rows (gradient accumulation; noise is added once per logical batch).
        None: one chunk. Must be >= 1.
      clipping: clipping implementation name (overrides the optimizer's).
      num_microbatches: records per chunk (overrides the optimizer's); must
        divide the chunk size.
      report_train_metrics: also update loss/metrics on the private batch.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; got {type(model).__name__}.")
    if physical_batch_size is not None and (
        isinstance(physical_batch_size, bool) or not isinstance(physical_batch_size, int) or physical_batch_size < 1
    ):
        raise ValueError(f"physical_batch_size must be None or an integer >= 1; got {physical_batch_size!r}.")
    if clipping is not None:
        clipping_lib.get_clipping_impl(clipping)  # ValueError if unknown.
    per_example.check_num_microbatches(num_microbatches, physical_batch_size)
    if not isinstance(report_train_metrics, bool):
        raise ValueError(f"report_train_metrics must be a bool; got {report_train_metrics!r}.")
    _check_layers(model)
    model._ewtune_private = PrivateStepOptions(
        physical_batch_size=physical_batch_size,
        clipping=clipping,
        num_microbatches=num_microbatches,
        report_train_metrics=report_train_metrics,
    )
    model.train_step = types.MethodType(private_train_step, model)
    model.make_train_function = types.MethodType(_guarded_make_train_function, model)
    # Force a retrace with the private step if fit() already ran.
    model.train_function = None
    return model


def _guarded_make_train_function(self, force=False):
    """Keras's make_train_function, plus a host-side guard under XLA.

    XLA compiles ``tf.debugging`` asserts away, so with ``jit_compile=True``
    the in-graph checks of the private step (restored state matches the
    configuration, budget cap, finite gradients) do not run. The budget and
    configuration checks are then done on the host before every step.
    """
    type(self).make_train_function(self, force=force)
    fn = self.train_function
    if fn is not None and self.jit_compile and not getattr(fn, "_ewtune_host_guard", False):
        opt = _resolve_optimizer(self)

        def guarded(iterator):
            opt.check_privacy_state()
            # One call runs up to steps_per_execution private steps.
            opt.check_budget(int(getattr(self, "steps_per_execution", 1) or 1))
            return fn(iterator)

        guarded._ewtune_host_guard = True
        self.train_function = guarded
    return self.train_function


def is_private(model) -> bool:
    return getattr(model, "_ewtune_private", None) is not None


def _first_leaf(x):
    for t in tf.nest.flatten(x):
        if t is not None:
            return t
    raise ValueError("x: the batch has no input tensors.")


def _resolve_optimizer(model):
    opt = dp_optimizer.unwrap_optimizer(model.optimizer)
    if not isinstance(opt, dp_optimizer.EWTuneOptimizerMixin):
        raise ValueError(
            "optimizer: make_private needs the model compiled with an EWTune "
            "optimizer (ewtune_tf.EWTuneAdam/EWTuneSGD/EWTuneAdamW or "
            f"make_ewtune_optimizer(...)); got {type(opt).__name__}."
        )
    return opt


def _update_metrics(model, y, y_pred, per_ex_loss, sample_weight):
    """Updates the loss tracker and compiled metrics (non-private stats)."""
    tracker = getattr(model, "_loss_tracker", None)
    active = tf.cast(sample_weight != 0, tf.float32)
    n = tf.reduce_sum(active)
    if tracker is not None:
        tracker.update_state(tf.reduce_sum(per_ex_loss) / tf.maximum(n, 1.0), sample_weight=n)
    cm = getattr(model, "_compile_metrics", None)
    if cm is not None:
        cm.update_state(y, y_pred, sample_weight)


def private_train_step(self, data):
    """The DP replacement of ``Model.train_step`` (bound by make_private)."""
    opts: PrivateStepOptions = self._ewtune_private
    opt = _resolve_optimizer(self)
    cfg = opt.privacy_config
    clipping = opts.clipping or cfg.clipping
    nmb = opts.num_microbatches if opts.num_microbatches is not None else cfg.num_microbatches
    l2_norm_clip = opt.current_l2_norm_clip()  # a tensor under adaptive clipping
    adaptive = cfg.adaptive_clipping
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = list(self.trainable_variables)
    if not variables:
        raise ValueError("model: no trainable variables; nothing to train privately.")
    if not opt.built:
        opt.build(variables)
    # Group-wise clipping: resolved at trace time, when the variables are known
    # (ValueError before the first update if a group is unusable).
    groups = privacy_config_lib.resolve_clip_groups(cfg.clip_groups, [getattr(v, "path", v.name) for v in variables])
    per_example_loss = make_per_example_loss(self)
    leaf = _first_leaf(x)
    static_b = leaf.shape[0]
    if static_b is None and isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
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

    def forward(xc, yc, wc, report):
        # Metrics are updated on the first forward pass only (a two-pass
        # clipping implementation calls loss_fn twice).
        pending = [report]

        def loss_fn():
            y_pred = self(xc, training=True) if self._call_has_training_arg else self(xc)
            if self.losses:
                raise ValueError(
                    "model: the model has regularization/auxiliary losses "
                    f"({len(self.losses)}); the private step clips only the compiled "
                    "per-example loss. Remove layer regularizers (use AdamW weight "
                    "decay instead)."
                )
            losses = per_example_loss(yc, y_pred, wc)
            if pending[0]:
                pending[0] = False
                _update_metrics(self, yc, y_pred, losses, wc)
            return losses

        return loss_fn

    p = opts.physical_batch_size
    if p is None:
        per_example.check_num_microbatches(nmb, static_b)
        result = clipping_lib.clipped_gradient_sum(
            clipping,
            self,
            forward(x, y, sample_weight, opts.report_train_metrics),
            variables,
            l2_norm_clip,
            nmb,
            groups=groups,
        )
        grad_sum = result.grad_sum
        count = _centered_unclipped_count(result.norms, sample_weight, nmb, l2_norm_clip) if adaptive else None
        chunk_size = static_b
    else:
        per_example.check_num_microbatches(nmb, p)
        grad_sum, count = _chunked_clipped_sum(
            self,
            forward,
            x,
            y,
            sample_weight,
            variables,
            clipping,
            l2_norm_clip,
            nmb,
            p,
            opts.report_train_metrics,
            groups,
        )
        count = count if adaptive else None
        chunk_size = p
    opt.apply_private_gradients(grad_sum, variables, physical_batch_size=chunk_size, centered_unclipped_count=count)
    if opts.report_train_metrics:
        return self.get_metrics_result()
    return {}


def _centered_unclipped_count(norms, sample_weight, nmb, l2_norm_clip):
    """sum over real records of (1[norm <= clip] - 1/2) (adaptive clipping).

    A record is real if any of its examples has a nonzero weight; padding
    records (norm 0) must not count as unclipped.
    """
    real = tf.reshape(sample_weight, [-1]) != 0.0
    if nmb is not None:
        real = tf.reduce_any(tf.reshape(real, [nmb, -1]), axis=1)
    below = tf.cast(norms <= tf.cast(l2_norm_clip, tf.float32), tf.float32) - 0.5
    return tf.reduce_sum(tf.where(real, below, tf.zeros_like(below)))


def _pad_rows(t, pad):
    if t is None:
        return None
    t = tf.convert_to_tensor(t)
    paddings = [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)
    return tf.pad(t, paddings)


def _chunked_clipped_sum(model, forward, x, y, w, variables, clipping, l2_norm_clip, nmb, p, report, groups=None):
    """Accumulates clipped sums (and the adaptive-clipping count) over
    physical chunks of ``p`` rows."""
    batch = tf.shape(w)[0]
    pad = (-batch) % p
    xs = tf.nest.map_structure(lambda t: _pad_rows(t, pad), x)
    ys = tf.nest.map_structure(lambda t: _pad_rows(t, pad), y)
    ws = _pad_rows(w, pad)
    # Trailing chunks with only weight-0 rows contribute exactly 0: skip them.
    nonzero = tf.cast(tf.where(ws != 0.0)[:, 0], tf.int32)
    last = tf.reduce_max(tf.concat([nonzero, tf.constant([-1], tf.int32)], 0))
    num_chunks = (last + 1 + p - 1) // p

    def chunk(t, i):
        if t is None:
            return None
        rest = t.shape[1:]
        r = tf.reshape(t, tf.concat([[-1, p], tf.shape(t)[1:]], 0))
        c = tf.gather(r, i)
        c.set_shape([p] + list(rest))
        return c

    zeros = [tf.zeros(v.shape, tf.float32) for v in variables]

    def body(i, acc, count):
        xc = tf.nest.map_structure(lambda t: chunk(t, i), xs)
        yc = tf.nest.map_structure(lambda t: chunk(t, i), ys)
        wc = chunk(ws, i)
        res = clipping_lib.clipped_gradient_sum(
            clipping,
            model,
            forward(xc, yc, wc, report),
            variables,
            l2_norm_clip,
            nmb,
            groups=groups,
        )
        count = count + _centered_unclipped_count(res.norms, wc, nmb, l2_norm_clip)
        return i + 1, [a + g for a, g in zip(acc, res.grad_sum)], count

    # One chunk at a time: overlapping iterations (the default allows 10) gain
    # nothing once each chunk's ops use every core, but hold several chunks'
    # activations at once (+0.5 GB, peak 1.25x the non-private step's, for
    # MiniLM full fine-tuning; benchmarks/train_step.py --workload main_job).
    _, acc, count = tf.while_loop(
        lambda i, *_: i < num_chunks, body, (tf.constant(0), zeros, tf.constant(0.0)), parallel_iterations=1
    )
    return list(acc), count
