"""A privacy report: what was trained, under which guarantee, and how much.

``privacy_report(optimizer_or_model, data=None)`` returns a JSON-serializable
dict with the mechanism (C, sigma, the record definition and its
sensitivity, the accountant's sigma, clipping implementation),
the sampling (q, expected batch, "poisson" or "shuffle" and, with a
``PoissonBatches``, its padding/overflow facts), the private step count, and
epsilon at delta from the accountant: the certified upper bound
(``epsilon``, with ``certified: true``) and the point estimate
(``epsilon_estimate``). Caveats that weaken or qualify the number are listed
in ``notes`` (shuffled batches, truncated Poisson batches, sigma = 0, a fixed
noise seed).
"""

import math
from typing import Any, Dict, Optional

from ewtune_tf.optimizers import dp_optimizer


def privacy_report(optimizer_or_model, data=None, *, delta: Optional[float] = None) -> Dict[str, Any]:
    """Builds the report (eager; calls the accountant once)."""
    opt = getattr(optimizer_or_model, "optimizer", optimizer_or_model)
    opt = dp_optimizer.unwrap_optimizer(opt)
    if not isinstance(opt, dp_optimizer.EWTuneOptimizerMixin):
        raise ValueError(f"optimizer_or_model: not an EWTune optimizer or a model compiled with one: {opt!r}.")
    cfg = opt.privacy_config
    state = opt.privacy_state()
    delta = cfg.delta if delta is None else delta
    notes = []
    report: Dict[str, Any] = {
        "guarantee": "example-level (add/remove one example) (epsilon, delta)-DP of all model "
        "updates, assuming Poisson sampling with probability q",
        "mechanism": _mechanism(cfg),
        "sampling": {
            "mode": cfg.sampling,
            "sampling_probability": cfg.sampling_probability,
            "expected_batch_size": cfg.expected_batch_size,
            "num_examples": cfg.num_examples,
        },
        "steps": state["steps"],
        "delta": delta,
        "accountant": {"method": cfg.accountant_method, "order": cfg.accountant_order, "certify": cfg.certify},
        "target_epsilon": cfg.target_epsilon,
    }
    if data is not None and hasattr(data, "report"):
        from ewtune_tf.training.budget import check_data_matches

        check_data_matches(opt, data)
        report["sampling"]["data"] = data.report()
        if data.overflow == "truncate" and (report["sampling"]["data"]["overflow_count"] or 0) > 0:
            notes.append(
                "Some Poisson batches were truncated to max_batch_size: the mechanism "
                "differed from the one accounted for."
            )
        if data.overflow == "error" and data.max_batch_size is not None:
            notes.append(
                f"Overflow (a batch above max_batch_size aborts training) has probability "
                f"<= {data.overflow_probability_bound:.3g}; add it to delta."
            )
    if cfg.sampling != "poisson":
        notes.append(
            "Batches were shuffled, not Poisson-sampled; epsilon is that of Poisson "
            "sampling with the same q, not a proven bound for shuffling."
        )
    if cfg.noise_seed is not None:
        notes.append("A fixed noise_seed was used: the noise is reproducible and offers no privacy.")
    eps = est = None
    certified = False
    if cfg.noise_multiplier == 0 and state["steps"] > 0:
        eps = est = math.inf
        notes.append("noise_multiplier = 0: no differential privacy.")
    elif state["steps"] == 0:
        eps = est = 0.0
        certified = True
    elif cfg.sampling_probability is not None and delta is not None:
        from ewtune_tf import accounting

        res = accounting.compute_epsilon(
            sampling_probability=cfg.sampling_probability,
            noise_multiplier=cfg.accounted_noise_multiplier,
            steps=state["steps"],
            delta=delta,
            method=cfg.accountant_method,
            order=cfg.accountant_order,
            certify=cfg.certify,
        )
        eps, est, certified = float(res.epsilon), float(res.estimate), bool(res.certified)
        if not certified:
            notes.append("epsilon is an estimate, not a certified upper bound (certify=False).")
    else:
        notes.append("sampling_probability or delta unknown: epsilon not computed.")
    report.update(epsilon=eps, epsilon_estimate=est, certified=certified, notes=notes)
    return report


def _mechanism(cfg) -> Dict[str, Any]:
    """The mechanism's facts; the accountant's sigma is noise_multiplier / sensitivity."""
    return {
        "l2_norm_clip": cfg.l2_norm_clip,
        "noise_multiplier": cfg.noise_multiplier,
        "noise_multiplier_source": cfg.noise_multiplier_source,
        "record": cfg.record,  # "example" or "keyed_microbatch"
        "sensitivity": cfg.sensitivity,  # in units of l2_norm_clip
        "accounted_noise_multiplier": cfg.accounted_noise_multiplier,
        "num_microbatches": cfg.num_microbatches,
        "clipping": cfg.clipping,
    }
