"""The privacy report of a model trained with an EWTune optimizer.

``privacy_report(optimizer_or_model, data=None)`` is the report of the
``ewtune_tf.privacy`` schema (``docs/privacy.md``), built by the optimizer's
``PrivacyPlan.report`` for the private steps taken so far (``dp_steps``),
with the run's facts: whether the noise seed was fixed, the sampler's facts
when the ``PoissonBatches`` are given (its q must be the optimizer's; fixed
seed, bounded or truncated batches), and how clipping ran. ``certified`` is
true only when the epsilon is a proven bound for what ran.
"""

from typing import Any, Dict, Optional

from ewtune_tf.optimizers import dp_optimizer
from ewtune_tf.privacy import RunFacts


def ewtune_optimizer_of(optimizer_or_model):
    """The EWTune optimizer of a model (or the optimizer itself); ValueError otherwise."""
    opt = dp_optimizer.unwrap_optimizer(getattr(optimizer_or_model, "optimizer", optimizer_or_model))
    if not isinstance(opt, dp_optimizer.EWTuneOptimizerMixin):
        raise ValueError(f"optimizer_or_model: not an EWTune optimizer or a model compiled with one: {opt!r}.")
    return opt


def mechanism_facts(config) -> Dict[str, Any]:
    """How an optimizer's clipping and noise run (the report's ``mechanism``)."""
    return {
        "clipping": config.clipping,
        "clip_groups": None if config.clip_groups is None else [list(g) for g in config.clip_groups],
        "num_microbatches": config.num_microbatches,
        "adaptive_clipping": config.adaptive_clipping,
        "noise_seed": "secret (OS entropy)" if config.noise_seed is None else "FIXED (tests only)",
    }


def privacy_report(optimizer_or_model, data=None, *, delta: Optional[float] = None, **run) -> Dict[str, Any]:
    """Builds the report (eager; calls the accountant once).

    Args:
      optimizer_or_model: an EWTune optimizer or a model compiled with one.
      data: the ``PoissonBatches`` trained on (optional; its sampler facts
        are reported and its q checked).
      delta: report at this delta instead of the optimizer's.
      **run: more ``RunFacts`` (``released_without_privacy``,
        ``epsilon_history``, ``run`` provenance).
    """
    opt = ewtune_optimizer_of(optimizer_or_model)
    config = opt.privacy_config
    plan = config.plan if delta is None else config.plan.replace(delta=delta)
    facts = RunFacts(
        noise_seed_fixed=config.noise_seed is not None,
        sampler=None if data is None or not hasattr(data, "report") else data.report(),
        mechanism=mechanism_facts(config),
        **run,
    )
    return plan.report(int(opt.dp_steps.numpy()), facts)
