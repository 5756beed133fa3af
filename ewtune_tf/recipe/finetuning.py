"""``finetune(config, train, dev)``: the whole private fine-tuning recipe, from Python.

One run:

1. Checks the settings against this machine, loads the data (the config's
   GLUE task unless ``train``/``dev`` are given), plans the privacy
   (``FinetuneConfig.privacy_plan``: q = B/N, the steps of the epochs,
   sigma calibrated to a certified epsilon) and decides fresh start or resume
   -- all before anything is written.
2. Builds the ``tf.distribute`` strategy and this process's place in it
   (``ewtune_tf.recipe.cluster``: every worker trains, the chief writes), the
   classifier (``ewtune_tf.nlp.build_classifier``: MiniLM-L6 with LoRA by
   default), tokenizes, and compiles ``EWTuneAdam`` running the plan;
   ``make_private`` makes its train step private.
3. Trains the planned steps epoch by epoch in the recipe's own loop
   (``ewtune_tf.recipe.loop``: ``fit``'s epoch loop, which also runs under
   ``MultiWorkerMirroredStrategy``). Each step is one global Poisson sample,
   drawn alike on every worker from a seed the chief shares, each replica
   taking its shard (``ewtune_tf.data.global_poisson``); each shard is sorted
   by length and cut to its longest row per physical chunk (a permutation of
   the sampled rows changes nothing in the mechanism). ``PrivacyBudget``,
   checkpoints (``ewtune_tf.recipe.checkpoint``), progress and TensorBoard
   (``ewtune_tf.recipe.monitoring``) run as callbacks.
4. On the chief: evaluates on the dev split(s), writes the privacy report
   (``PrivacyPlan.report``: the certified epsilon of the steps actually
   taken), metrics and the privacy plot, and exports a SavedModel with the
   report as an asset.

Nothing computed from the private training data leaves the process without
noise unless ``report_train_metrics`` asks for it (then the report lists it).
"""

import dataclasses
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from ewtune_tf import accounting
from ewtune_tf.privacy import PrivacyPlan, Release, RunFacts
from ewtune_tf.recipe import checkpoint as ckpt_lib
from ewtune_tf.recipe import cluster as cluster_lib
from ewtune_tf.recipe import compute, monitoring
from ewtune_tf.recipe import optimization as opt_lib
from ewtune_tf.recipe.config import FinetuneConfig
from ewtune_tf.recipe.data import TextExamples, resolve_data
from ewtune_tf.recipe.settings import ConfigError, escape
from ewtune_tf.utils.files import atomic_write_json, read_json
from ewtune_tf.utils.versions import package_versions

PRIVACY_REPORT = "privacy_report.json"
METRICS = "metrics.json"
EPSILON_HISTORY = "epsilon_history.json"
# Epoch-end log keys that carry privacy numbers, not statistics of the data.
_PRIVACY_LOGS = ("epsilon", "epsilon_estimate", "epsilon_certified", "dp_steps")


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced.

    Attributes:
      config, plan: what ran.
      report: the privacy report (``ewtune_tf.privacy`` schema).
      metrics: what ``metrics.json`` holds (dev accuracy, timing, ...).
      classifier: the trained KerasHub classifier, preprocessor attached.
      export_path: the exported SavedModel, or None.
    """

    config: FinetuneConfig
    plan: PrivacyPlan
    report: Dict[str, Any]
    metrics: Dict[str, Any]
    classifier: Any
    export_path: Optional[str]

    @property
    def steps(self) -> int:
        return int(self.report["steps"])

    @property
    def epsilon(self) -> float:
        """The report's epsilon; inf for a non-private run."""
        return math.inf if self.report["epsilon"] is None else float(self.report["epsilon"])

    @property
    def dev_accuracy(self) -> Optional[float]:
        return self.metrics["dev_accuracy"]

    def summary(self) -> Dict[str, Any]:
        """The headline numbers (``ewtune-train`` prints them as its last line)."""
        return {
            "dev_accuracy": self.dev_accuracy,
            "epsilon": self.epsilon,
            "delta": self.report["delta"],
            "certified": self.report["certified"],
            "private": self.report["private"],
            "noise_multiplier": self.plan.noise_multiplier,
            "steps": self.steps,
            "export_path": self.export_path,
        }


@dataclasses.dataclass
class _Run:
    """State shared by the stages of one run."""

    config: FinetuneConfig
    train: TextExamples
    devs: Dict[str, TextExamples]
    num_classes: int
    label_names: tuple
    plan: PrivacyPlan
    resume_state: Optional[Dict[str, Any]]
    t_start: float
    static_rows: Optional[int] = None  # rows of every padded Poisson batch (static shapes), or None
    objects: Dict[str, Any] = dataclasses.field(default_factory=dict)
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def start_step(self) -> int:
        return 0 if self.resume_state is None else int(self.resume_state["step"])

    @property
    def cluster(self) -> "cluster_lib.Cluster":
        return self.objects["cluster"]

    def path(self, name: str) -> str:
        """Where this process writes ``name``: under ``output_dir`` on the chief,
        under a scratch directory on the other workers."""
        return os.path.join(self.cluster.write_dir, name)


def _log(msg: str) -> None:
    print(msg, flush=True)


def finetune(config: FinetuneConfig, train=None, dev=None) -> FinetuneResult:
    """Runs the recipe (see the module docstring) and returns its result.

    Args:
      config: the settings (``FinetuneConfig()`` is the main job).
      train: training data (``TextExamples``, a ``GlueSplit`` or
        ``(texts, labels)``); None loads the config's GLUE task.
      dev: evaluation data (one, or a mapping split name -> data), or None.

    Raises:
      ConfigError: a setting is out of range or inconsistent with the data or
        an existing checkpoint (raised before anything is written).
      BatchOverflowError: under static shapes, a Poisson batch exceeded the
        static row count (an event the report's delta accounts for); rerun
        to resume.
    """
    run = _prepare(config, train, dev, time.perf_counter())
    try:
        _build(run)
        with cluster_lib.worker_loss(run.objects.get("cluster"), config.output_dir):
            with compute.overflow_as_error(run.static_rows, config.delta - run.plan.delta):
                _train(run)
        return _finish(run)
    finally:
        if "cluster" in run.objects:
            run.cluster.close()


def _prepare(config: FinetuneConfig, train, dev, t_start: float) -> _Run:
    """Validation, data, the privacy plan and the resume decision; writes nothing."""
    from ewtune_tf.nlp import glue as glue_lib

    config.check_environment()
    train, devs = resolve_data(config, train, dev)
    task = glue_lib.get_task(config.task)
    label_names = train.label_names or task.label_names
    num_classes = config.num_classes or len(label_names)
    if len(label_names) != num_classes:
        label_names = tuple(str(i) for i in range(num_classes))
    for name, data in [("train", train), *devs.items()]:
        if len(data) and (data.labels.min() < 0 or data.labels.max() >= num_classes):
            # Which labels, or how many, is not said: they are private data.
            raise ConfigError(
                f"{{num_classes}} is {num_classes}, but some {name} labels are outside [0, {num_classes}).",
                "num_classes",
            )
    _log(
        f"[data] {len(train)} train examples from {train.source}; "
        + ", ".join(f"{s}: {len(d)}" for s, d in devs.items())
    )
    plan = config.privacy_plan(len(train))
    if plan.private:
        _log(
            f"[privacy] q={plan.sampling_probability:.5g} (B={config.batch_size}, N={len(train)}), steps={plan.steps}, "
            f"sigma={plan.noise_multiplier:.4g} ({plan.noise_multiplier_rule}); delta={plan.delta:g}"
            + (f", target epsilon {plan.target_epsilon:g}" if plan.target_epsilon is not None else "")
        )
        if plan.target_epsilon is None:
            # A given sigma: say what it is worth before the first update.
            eps = plan.epsilon()
            _log(
                f"[privacy] sigma {plan.noise_multiplier:.4g} over {plan.steps} steps: certified epsilon <= "
                f"{eps.epsilon:.4g} at delta {plan.delta:g}"
                + (
                    f" (the trivial bound: accounted sigma below {accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER:g}, "
                    "no meaningful guarantee)"
                    if accounting.BELOW_RANGE_FLAG in eps.flags
                    else ""
                )
            )
    else:
        _log("[privacy] no_dp: NON-PRIVATE baseline (no clipping, no noise); no epsilon.")
    state = ckpt_lib.decide_resume(config, plan)
    rows = config.static_batch_rows(plan)
    if config.static_shapes:
        _log(
            f"[shapes] static: {f'Poisson batches padded to {rows} rows' if rows else 'fixed-size batches'} "
            f"x {config.sequence_length} tokens (no dynamic padding)"
            + (f"; a larger batch aborts the run (adds <= {config.delta - plan.delta:.3g} to delta)" if rows else "")
        )
    return _Run(config, train, devs, num_classes, tuple(label_names), plan, state, t_start, rows)


def _make_strategy(name: str):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # No TPU here.
        raise ConfigError(
            f"{{strategy}} tpu needs a reachable TPU ({type(e).__name__}: {escape(e)}).", "strategy"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _build_classifier(run: _Run):
    from ewtune_tf.nlp import models

    c = run.config
    try:
        return models.build_classifier(
            c.model,
            num_classes=run.num_classes,
            sequence_length=c.sequence_length,
            lora_rank=c.lora_rank,
            trainable_layers=c.trainable_layers,
            dropout=c.dropout,
            pooling=c.pooling,
        )
    except ValueError as e:
        error = ConfigError.from_library(str(e), tuple(c.to_dict()))
        if error is None:
            raise
        raise error from None


def _build(run: _Run) -> None:
    """The classifier (under the config's dtype policy), the tokens and the compiled (private) training model."""
    import keras

    from ewtune_tf.nlp import models

    c, o = run.config, run.objects
    keras.utils.set_random_seed(c.seed)
    o["strategy"] = strategy = _make_strategy(c.strategy)
    o["cluster"] = cluster_lib.Cluster.of(strategy, c.output_dir)
    _log(f"[cluster] {c.strategy}: {run.cluster.describe()}")
    compute.check_replicas(run.static_rows, strategy.num_replicas_in_sync)
    with compute.precision_policy(c.precision), strategy.scope():
        o["classifier"] = classifier = _build_classifier(run)
    params = models.count_parameters(classifier)
    run.facts.update(trainable_parameters=params["trainable"], total_parameters=params["total"])
    _log(
        f"[model] {c.model} ({type(classifier).__name__}): {params['trainable']:,} trainable / "
        f"{params['total']:,} parameters (lora_rank={c.lora_rank}, trainable_layers={c.trainable_layers}, "
        f"precision={c.precision}, jit_compile={c.jit_compile})"
    )
    t0 = time.perf_counter()
    o["train_tokens"] = models.tokenize(classifier.preprocessor, run.train.texts)
    o["dev_tokens"] = {s: models.tokenize(classifier.preprocessor, d.texts) for s, d in run.devs.items()}
    _log(
        f"[tokens] {len(run.train)} train and {sum(map(len, run.devs.values()))} dev examples in "
        f"{time.perf_counter() - t0:.1f}s"
    )  # No statistics of the training texts: they are private.
    with compute.precision_policy(c.precision), strategy.scope():
        _compile(run)
    o["counter"] = ckpt_lib.StepCounter(o["optimizer"], run.plan.private, opt_lib.accumulation_steps(c))


def _compile(run: _Run) -> None:
    """The training model (dynamic padding, or the full width under static
    shapes), compiled with the optimizer that runs the plan, made private."""
    import keras

    from ewtune_tf.nlp import models
    from ewtune_tf.training import make_private

    c, o = run.config, run.objects
    o["model"] = model = models.dynamic_padding_model(o["classifier"], trim=not c.static_shapes)
    o["optimizer"] = optimizer = opt_lib.make_optimizer(c, run.plan, o["classifier"], run.plan.steps)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")] if c.report_train_metrics else None
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        jit_compile=compute.model_jit_compile(c),
    )
    if run.plan.private:
        make_private(model, physical_batch_size=c.physical_batch_size, report_train_metrics=c.report_train_metrics)


def _batches(run: _Run):
    """``(epoch, first, stop) -> (dataset, steps)``: this process's input for the
    logical steps ``first .. stop - 1`` of ``epoch`` (one element per replica per
    step) and the number of loop steps it feeds."""
    import tensorflow as tf

    features = {k: tf.constant(v) for k, v in run.objects["train_tokens"].items()}
    base_ds = tf.data.Dataset.from_tensor_slices((features, tf.constant(run.train.labels)))
    return _private_batches(run, base_ds) if run.plan.private else _baseline_batches(run, base_ds)


def _private_batches(run: _Run, base_ds):
    """Each step one global Poisson sample at the plan's q, every replica its shard."""
    from ewtune_tf.data.global_poisson import GlobalPoissonSampler, shared_seed
    from ewtune_tf.nlp.models import sort_by_length

    c, cluster = run.config, run.cluster
    sampler = GlobalPoissonSampler(
        base_ds,
        run.plan.sampling_probability,
        seed=shared_seed(cluster.strategy, c.sampling_seed),  # A collective: the chief's secret draw.
        num_replicas=cluster.num_replicas,
        replica_ids=cluster.replica_ids,
        seeded=c.sampling_seed is not None,
        total_steps=run.plan.steps,
        # Static shapes: every shard padded to ceil(M / R) rows; a larger draw
        # aborts the run (overflow="error"), which the report adds to delta.
        max_batch_size=run.static_rows,
    )
    run.facts["sampler"] = sampler.report()
    return lambda epoch, first, stop: (sampler.batches(first, stop).map(sort_by_length), stop - first)


def _baseline_batches(run: _Run, base_ds):
    """``no_dp``: fixed-size shuffled logical batches of B, sorted by length and
    cut into the private path's physical chunks (Keras accumulates them), so
    padding costs the same; each loop step is one chunk, split over the replicas."""
    import tensorflow as tf

    from ewtune_tf import accounting
    from ewtune_tf.nlp.models import sort_by_length
    from ewtune_tf.recipe.loop import split_rows

    c, cluster = run.config, run.cluster
    accumulate = opt_lib.accumulation_steps(c)
    chunk = c.batch_size // accumulate
    per_epoch = accounting.steps_per_epoch(run.plan.sampling_probability)

    def batches(epoch: int, first: int, stop: int):
        ds = (
            base_ds.shuffle(len(run.train), seed=c.seed + epoch, reshuffle_each_iteration=False)
            .repeat()
            .batch(chunk * accumulate, drop_remainder=True)
            .map(lambda x, y: sort_by_length(x, y, tf.ones_like(y, tf.float32))[:2])
            .unbatch()
            .batch(chunk, drop_remainder=True)
            .skip((first - epoch * per_epoch) * accumulate)
        )
        return split_rows(ds, cluster.num_replicas, cluster.replica_ids), (stop - first) * accumulate

    return batches


def _callbacks(run: _Run) -> List[Any]:
    """PrivacyBudget, the checkpointer, TensorBoard and progress, in that order
    (the checkpointer and the logger see the budget's epoch-end epsilon)."""
    from ewtune_tf.training import PrivacyBudget

    c, o, plan = run.config, run.objects, run.plan
    counter, budget = o["counter"], None
    if plan.private:
        budget = PrivacyBudget(
            plan.target_epsilon if plan.bounds_target else None,
            delta=plan.delta,
            history_path=run.path(EPSILON_HISTORY),
            log_dir=run.path(os.path.join("tensorboard", "privacy")),
        )
    o["budget"] = budget
    sidecar = {"plan": ckpt_lib.plan_record(plan), "settings": c.resume_settings()}
    ckpt_dir = ckpt_lib.checkpoint_dir(run.cluster.write_dir)
    o["checkpointer"] = ckpt_lib.make_checkpointer(
        o["model"], o["optimizer"], ckpt_dir, c.checkpoint_every, counter, budget, sidecar
    )
    released = None if c.report_train_metrics else _PRIVACY_LOGS
    return [cb for cb in (budget, o["checkpointer"]) if cb is not None] + [
        monitoring.scalar_logger(run.path("tensorboard"), counter, released),
        monitoring.progress_callback(plan, counter, plan.steps, show_logs=c.report_train_metrics),
    ]


def _start(run: _Run) -> None:
    """Fresh start, or restore the checkpoint named by the sidecar. Every worker
    restores the chief's checkpoint from ``output_dir``; each cleans up only
    where it writes (the chief: ``output_dir``)."""
    o, c = run.objects, run.config
    ckpt_dir, history = ckpt_lib.checkpoint_dir(run.cluster.write_dir), run.path(EPSILON_HISTORY)
    if run.resume_state is None:
        removed = ckpt_lib.start_fresh(ckpt_dir, history)
        if removed:
            _log(f"[checkpoint] removed {len(removed)} unrecorded checkpoint file(s) from {ckpt_dir}")
        return
    removed = ckpt_lib.remove_checkpoints_after(ckpt_dir, run.start_step)
    if removed:
        _log(
            f"[checkpoint] removed {len(removed)} checkpoint file(s) newer than the recorded step "
            f"{run.start_step} (written just before a kill; never released)"
        )
    read_dir = ckpt_lib.checkpoint_dir(c.output_dir)
    with o["strategy"].scope():  # Restoring builds the optimizer's slots: mirrored variables.
        path = ckpt_lib.restore(
            o["checkpointer"], read_dir, run.resume_state, o["counter"], o["model"], o["budget"], history
        )
    _log(
        f"[checkpoint] resumed from {path}: logical step {run.start_step} of {run.plan.steps} "
        f"({len(run.resume_state.get('epsilon_history', []))} epsilon history entries)"
    )


def _check_workers_agree(run: _Run) -> None:
    """Every worker starts from the chief's step, plan, settings and data (a collective)."""
    run.cluster.check_agreement(
        {
            "the logical step to start from": run.objects["counter"].logical(),
            "the privacy plan": ckpt_lib.plan_record(run.plan),
            "the model and training settings": run.config.resume_settings(),
            "the training data": run.train.digest(),
        }
    )


def _train(run: _Run) -> None:
    """Trains the remaining planned steps, epoch by epoch (a fresh Poisson pass each)."""
    from ewtune_tf import accounting
    from ewtune_tf.recipe.loop import EpochLoop

    c, o, plan = run.config, run.objects, run.plan
    os.makedirs(run.cluster.write_dir, exist_ok=True)
    loop = EpochLoop(o["model"], _callbacks(run))
    _start(run)
    _check_workers_agree(run)
    batches = _batches(run)
    per_epoch = accounting.steps_per_epoch(plan.sampling_probability)
    _log(
        f"[train] {plan.steps} logical steps ({per_epoch} per epoch), B={c.batch_size}, physical chunks of "
        f"{c.physical_batch_size}, clipping={c.clipping if plan.private else 'none (no_dp)'}"
        + (f"; resuming at step {run.start_step}" if run.start_step else "")
    )
    t0 = time.perf_counter()
    for epoch in range(run.start_step // per_epoch, math.ceil(plan.steps / per_epoch)):
        first, stop = max(run.start_step, epoch * per_epoch), min((epoch + 1) * per_epoch, plan.steps)
        if first >= stop:
            continue  # Resumed at the end of this epoch.
        loop.run_epoch(epoch, *batches(epoch, first, stop))
        if o["counter"].logical() < stop:
            _log(f"[train] stopped at logical step {o['counter'].logical()} (privacy budget cap)")
            break
    if c.ema_momentum is not None:
        # The average is for evaluation and export only: it replaces the iterate after the last step.
        o["optimizer"].finalize_variable_values(o["model"].trainable_weights)
    run.facts.update(
        train_seconds=time.perf_counter() - t0,
        first_step_seconds=loop.first_step_seconds,
        train_history=dict(loop.history.history),
    )


def _releases(config: FinetuneConfig) -> tuple:
    """What leaves the process un-noised by opt-in (``report_train_metrics``)."""
    if not config.report_train_metrics:
        return ()
    where = ("progress output", "metrics.json train_history", "TensorBoard epoch/*", "checkpoint metric state")
    return (
        Release("train_loss", where, "mean cross-entropy of the private batches, without noise"),
        Release("train_accuracy", where, "accuracy on the private batches, without noise"),
    )


def _report(run: _Run, steps: int) -> Dict[str, Any]:
    """The privacy report of the steps taken (``PrivacyPlan.report``)."""
    from ewtune_tf.training.report import mechanism_facts

    c, o, private = run.config, run.objects, run.plan.private
    budget = o.get("budget")
    mechanism = mechanism_facts(o["optimizer"].privacy_config) if private else {}
    mechanism.update(physical_batch_size=c.physical_batch_size, clip_group_norms=opt_lib.clip_groups_report(c))
    facts = RunFacts(
        noise_seed_fixed=private and o["optimizer"].privacy_config.noise_seed is not None,
        sampler=run.facts.get("sampler") if private else None,
        mechanism=mechanism,
        released_without_privacy=_releases(c),
        epsilon_history=list(budget.history) if budget is not None else [],
        run=_provenance(run),
    )
    return run.plan.report(steps, facts)


def _provenance(run: _Run) -> Dict[str, Any]:
    c = run.config
    return {
        "label": "differentially private (DP-SGD/Adam)" if run.plan.private else "NON-PRIVATE BASELINE (no_dp)",
        "task": c.task,
        "model": c.model,
        "classifier": type(run.objects["classifier"]).__name__,
        "data_source": run.train.source,
        "settings": c.to_dict(),
        "checkpointing": {
            "directory": ckpt_lib.checkpoint_dir(c.output_dir),
            "every_logical_steps": c.checkpoint_every,
            "resumed_from_step": run.start_step,
        },
        "package_versions": package_versions(),
    }


def _export(run: _Run, report: Dict[str, Any]) -> Optional[str]:
    c = run.config
    if c.no_export:
        return None
    from ewtune_tf.export import export_versioned

    if run.plan.bounds_target and report["epsilon"] > run.plan.target_epsilon * (1 + 1e-9):
        # PrivacyBudget stops before this can happen; a model over its target is never exported.
        raise RuntimeError(f"epsilon {report['epsilon']} exceeds the target {run.plan.target_epsilon}; not exported.")
    name = f"glue_{c.task}" + ("" if run.plan.private else "_nodp")
    return export_versioned(
        run.objects["classifier"],
        c.export_dir,
        name,
        text_keys=run.train.text_keys,
        label_names=run.label_names,
        privacy_report=report,
    )


def _metrics(run: _Run, steps: int, dev_accuracy: Mapping[str, float], export_path: Optional[str]) -> Dict[str, Any]:
    c, o, f = run.config, run.objects, run.facts
    return {
        "task": c.task,
        "private": run.plan.private,
        "dev_accuracy": next(iter(dev_accuracy.values()), None),
        "dev_accuracy_by_split": dict(dev_accuracy),
        # Statistics of the private batches: only by opt-in (listed in the privacy report).
        "train_history": f["train_history"] if c.report_train_metrics else None,
        "resumed_from_step": run.start_step,
        "steps": steps,
        "train_seconds": f["train_seconds"],
        "seconds_per_step": f["train_seconds"] / max(1, steps - run.start_step),
        # The first step includes tracing (and compiling) the step function.
        "first_step_seconds": f["first_step_seconds"],
        "seconds_per_step_after_first": _after_first(f, steps - run.start_step),
        "workers": run.cluster.num_workers,
        "replicas": run.cluster.num_replicas,
        # Updates the optimizer applied (what the learning-rate schedule counts).
        "optimizer_updates": int(o["optimizer"].iterations.numpy()),
        "final_learning_rate": opt_lib.current_learning_rate(o["optimizer"]),
        "total_seconds": time.perf_counter() - run.t_start,
        "classifier": type(o["classifier"]).__name__,  # What pooling "auto" resolved to.
        "trainable_parameters": f["trainable_parameters"],
        "total_parameters": f["total_parameters"],
        "config": c.to_dict(),
        "export_path": export_path,
    }


def _after_first(facts: Dict[str, Any], taken: int) -> Optional[float]:
    if taken < 2 or facts["first_step_seconds"] is None:
        return None
    return (facts["train_seconds"] - facts["first_step_seconds"]) / (taken - 1)


def _finish(run: _Run) -> FinetuneResult:
    """Evaluation, the privacy report for the steps taken, plot, export, metrics
    (the chief; another worker returns its report and metrics and writes nothing)."""
    from ewtune_tf.nlp import models

    o = run.objects
    steps = o["counter"].logical()
    report = _report(run, steps)
    if not run.cluster.chief:
        return FinetuneResult(run.config, run.plan, report, _metrics(run, steps, {}, None), o["classifier"], None)
    dev = {s: models.accuracy(o["classifier"], o["dev_tokens"][s], d.labels) for s, d in run.devs.items()}
    if run.plan.private and steps and report["epsilon"] is not None:  # null: no finite epsilon to plot
        monitoring.privacy_plot(run.path("privacy.png"), run.plan, steps)
    atomic_write_json(run.path(PRIVACY_REPORT), report)
    export_path = _export(run, report)
    metrics = _metrics(run, steps, dev, export_path)
    atomic_write_json(run.path(METRICS), metrics)
    return FinetuneResult(run.config, run.plan, report, metrics, o["classifier"], export_path)


def read_report(output_dir: str) -> Dict[str, Any]:
    """The privacy report a run wrote to ``output_dir``."""
    return read_json(os.path.join(output_dir, PRIVACY_REPORT))
