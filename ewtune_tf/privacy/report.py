"""The privacy report: one versioned schema, built only by ``PrivacyPlan.report``.

Every entry point writes it (``ewtune-train``'s ``privacy_report.json``, the
TFX Trainer's, the SavedModel asset ``assets/privacy_report.json``,
``ewtune_tf.training.privacy_report``), and every consumer reads it through
this module (the TFX ``PrivacyReportGen`` artifact and ``PrivacyGate``).
``FIELDS`` documents each top-level field; ``docs/privacy.md`` lists the same
fields (a test keeps the two in step). A change of meaning bumps
``SCHEMA_VERSION``.

``certified`` is true only when the headline ``epsilon`` is a proven upper
bound for what ran: the accountant certified it, the batches were
Poisson-sampled from secret randomness, the noise came from a secret seed,
and no batch could be truncated. Each failed condition is listed in
``uncertified_because`` (empty exactly when certified). Bounded Poisson
batches (``max_batch_size`` with ``overflow="error"``) abort the run with a
probability p instead of changing the mechanism; the report then adds
(1 + e^epsilon) * p to delta (``delta_batch_overflow``).

No TensorFlow import.
"""

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ewtune_tf.utils import checks

SCHEMA = "ewtune_tf.privacy_report"
SCHEMA_VERSION = 1

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_DICT = (dict, type(None))


@dataclasses.dataclass(frozen=True)
class Field:
    types: Tuple[type, ...]
    description: str


FIELDS: Dict[str, Field] = {
    "schema": Field((str,), f'always "{SCHEMA}".'),
    "schema_version": Field((int,), f"{SCHEMA_VERSION}; bumped when a field changes meaning."),
    "private": Field((bool,), "noise was added (noise_multiplier > 0); false for a non-private baseline."),
    "certified": Field((bool,), "epsilon is a proven upper bound for what ran (uncertified_because is empty)."),
    "uncertified_because": Field((list,), "why epsilon is not a proven bound for this run; empty when certified."),
    "epsilon": Field(
        _OPT_NUM,
        "the accountant's epsilon at delta_accountant after `steps` steps: the "
        "certified upper bound when `certified`; null when it cannot be computed (not private).",
    ),
    "epsilon_estimate": Field(_OPT_NUM, "the analytic Edgeworth/saddlepoint estimate: an approximation, not a bound."),
    "delta": Field(_OPT_NUM, "delta of the guarantee: delta_accountant + delta_batch_overflow."),
    "delta_accountant": Field(_OPT_NUM, "the delta at which the accountant computed epsilon (the plan's delta)."),
    "delta_batch_overflow": Field(
        _OPT_NUM, "(1 + e^epsilon) * P[a bounded Poisson batch overflows]; 0 for unbounded batches."
    ),
    "target_epsilon": Field(_OPT_NUM, "the epsilon sigma was chosen for (null when sigma was given)."),
    "noise_multiplier": Field(_OPT_NUM, "sigma: the noise on each step's clipped sum has std sigma * l2_norm_clip."),
    "noise_multiplier_rule": Field((str,), "how sigma was chosen: certified, rdp, estimate, edgeworth_paper or given."),
    "l2_norm_clip": Field(_OPT_NUM, "C: each record's gradient is clipped to L2 norm <= C (null: no clipping)."),
    "record": Field((str,), "the unit whose gradient is clipped to C: example or keyed_microbatch."),
    "sensitivity": Field(_NUM, "add/remove sensitivity of the clipped sum, in units of C (1 or 2)."),
    "accounted_noise_multiplier": Field(
        _OPT_NUM, "noise_multiplier / sensitivity: the sigma epsilon is computed with."
    ),
    "adjacency": Field((str,), "neighbouring datasets differ by adding or removing one example."),
    "sampling": Field((str,), "poisson (what the accountant assumes) or shuffle."),
    "sampling_probability": Field(_OPT_NUM, "q: each example is in a step's batch independently with probability q."),
    "num_examples": Field((int, type(None)), "N, the training set size (released: q = expected_batch_size / N)."),
    "expected_batch_size": Field(_OPT_NUM, "q * N; the noised sum is divided by it."),
    "steps": Field((int,), "private steps taken (noise releases), the count epsilon is computed for."),
    "planned_steps": Field((int, type(None)), "the steps planned (and calibrated for)."),
    "accountant": Field((dict,), "method, order, certify and the accountant's full result (bound, estimate, flags)."),
    "calibration": Field(_OPT_DICT, "the calibration result when sigma was calibrated, else null."),
    "sampler": Field(_OPT_DICT, "facts of the batches that ran: fixed_seed, max_batch_size, overflow, ..."),
    "mechanism": Field((dict,), "how clipping and noise were implemented (clipping, clip_groups, microbatches, ...)."),
    "released_without_privacy": Field(
        (list,),
        "what was computed from private training data and released without noise, by opt-in: name, where, description.",
    ),
    "epsilon_history": Field((list,), "epsilon after each epoch: epoch, steps, epsilon, epsilon_estimate."),
    "run": Field((dict,), "provenance, not part of the guarantee: task, model, versions, checkpointing, ..."),
}


@dataclasses.dataclass(frozen=True)
class Release:
    """Something computed from private training data and released without noise."""

    name: str
    where: Tuple[str, ...]
    description: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "where": list(self.where), "description": self.description}


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What a report needs beyond the plan and the step count.

    Attributes:
      noise_seed_fixed: the noise came from a known seed (tests only).
      sampler: the sampler's facts (``PoissonBatches.report()``): q, fixed_seed,
        max_batch_size, overflow, overflow_probability_bound, overflow_count.
      mechanism: descriptive facts of the clipping and noise implementation.
      released_without_privacy: opted-in releases of un-noised statistics.
      epsilon_history: entries made by :func:`history_entry`.
      run: provenance (task, model, package versions, checkpointing, ...).
    """

    noise_seed_fixed: bool = False
    sampler: Optional[Mapping[str, Any]] = None
    mechanism: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    released_without_privacy: Sequence[Release] = ()
    epsilon_history: Sequence[Mapping[str, Any]] = ()
    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def build_report(plan, steps_taken: int, run: Optional[RunFacts] = None) -> Dict[str, Any]:
    """The report of ``plan`` after ``steps_taken`` steps (use ``plan.report``)."""
    run = RunFacts() if run is None else run
    checks.check_int("steps_taken", steps_taken, 0)
    check_sampler_matches(plan, run.sampler)
    reasons = uncertified_reasons(plan, run)
    result = _accountant_result(plan, steps_taken)
    if result is not None and not result.certified and plan.certify:
        reasons.append("the accountant could not certify epsilon; it is an estimate")
    if result is not None and not math.isfinite(result.epsilon):
        # Said as what holds (no finite bound), with the sigma that explains it:
        # the accountant's range (accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER) is the known cause.
        reasons.append(
            "no finite epsilon: the only bound is the trivial epsilon = inf (no meaningful guarantee); "
            f"accounted noise multiplier {plan.accounted_noise_multiplier:g}"
        )
    eps = _epsilon(plan, steps_taken, result)
    overflow = _overflow_delta(plan, run.sampler, steps_taken, eps)
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "private": plan.private,
        "certified": not reasons,
        "uncertified_because": reasons,
        "epsilon": eps,
        "epsilon_estimate": eps if result is None else _finite(result.estimate),
        "delta": None if plan.delta is None or overflow is None else plan.delta + overflow,
        "delta_accountant": plan.delta,
        "delta_batch_overflow": overflow,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "noise_multiplier_rule": plan.noise_multiplier_rule,
        "l2_norm_clip": plan.l2_norm_clip if math.isfinite(plan.l2_norm_clip) else None,
        "record": plan.record,
        "sensitivity": plan.sensitivity,
        "accounted_noise_multiplier": plan.accounted_noise_multiplier,
        "adjacency": "add_or_remove_one",
        "sampling": plan.sampling,
        "sampling_probability": plan.sampling_probability,
        "num_examples": plan.num_examples,
        "expected_batch_size": plan.expected_batch_size,
        "steps": int(steps_taken),
        "planned_steps": plan.steps,
        "accountant": {
            "method": plan.accountant,
            "order": plan.accountant_order,
            "certify": plan.certify,
            "result": None if result is None else _strict_json(result.to_dict()),
        },
        "calibration": None if plan.calibration is None else dict(plan.calibration),
        "sampler": None if run.sampler is None else dict(run.sampler),
        "mechanism": dict(run.mechanism),
        "released_without_privacy": [r.to_dict() for r in run.released_without_privacy],
        "epsilon_history": [dict(h) for h in run.epsilon_history],
        "run": dict(run.run),
    }
    validate_report(report)
    return report


def uncertified_reasons(plan, run: RunFacts) -> List[str]:
    """Every condition of the guarantee that this run breaks (see module docstring)."""
    reasons = []
    if not plan.private:
        reasons.append("not private: noise_multiplier is 0 (no noise); epsilon is infinite")
    if plan.sampling_probability is None or plan.delta is None:
        reasons.append("sampling_probability or delta unknown: epsilon cannot be computed")
    if not plan.certify:
        reasons.append("certify=False: epsilon is the accountant's estimate, not a proven bound")
    if plan.sampling != "poisson":
        reasons.append(
            "batches were shuffled fixed-size batches, not Poisson-sampled: epsilon is that of Poisson "
            "sampling with the same q, not a proven bound for shuffling"
        )
    if run.noise_seed_fixed:
        reasons.append("a fixed noise seed: the noise is reproducible from a known seed")
    sampler = run.sampler or {}
    if sampler.get("fixed_seed"):
        reasons.append(
            "a fixed sampling seed: batch membership is reproducible, and amplification by "
            "sampling assumes it is secret"
        )
    if sampler.get("max_batch_size") is not None and sampler.get("overflow") == "truncate":
        reasons.append(
            f"Poisson batches may be truncated to max_batch_size={sampler['max_batch_size']} "
            "(overflow='truncate'), a different mechanism from the one accounted for; use overflow='error'"
        )
    return reasons


def check_sampler_matches(plan, sampler: Optional[Mapping[str, Any]]) -> None:
    """ValueError unless the sampler ran at the plan's q."""
    q_data = None if sampler is None else sampler.get("sampling_probability")
    if q_data is None:
        return
    q = plan.sampling_probability
    if q is None or abs(q - q_data) > 1e-12 * max(1.0, q_data):
        raise ValueError(
            f"sampling_probability: the data are Poisson-sampled with q={q_data} but the "
            f"optimizer accounts for q={q}; give the optimizer sampling_probability={q_data} "
            "(or num_examples and batch_size matching the sampler)."
        )


def _accountant_result(plan, steps: int):
    if steps == 0 or not plan.private or plan.sampling_probability is None or plan.delta is None:
        return None
    return plan.epsilon(steps)


def _finite(value: float) -> Optional[float]:
    """``value``, or None (JSON null) where it is infinite: a report is strict JSON."""
    return float(value) if math.isfinite(value) else None


def _strict_json(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``fields`` with infinite numbers as None (e.g. the trivial bound epsilon = inf)."""
    return {k: _finite(v) if isinstance(v, float) else v for k, v in fields.items()}


def _epsilon(plan, steps: int, result) -> Optional[float]:
    if result is not None:
        return _finite(result.epsilon)
    if steps == 0 and plan.private:
        return 0.0  # nothing released yet
    return None


def overflow_probability(num_examples: int, sampling_probability: float, steps: int, max_batch_size: int) -> float:
    """Union bound on P[some step's Poisson batch over ``num_examples`` exceeds ``max_batch_size``]."""
    from scipy import stats

    p = float(stats.binom.sf(max_batch_size, num_examples, sampling_probability))
    return min(1.0, p * max(1, int(steps)))


def smallest_max_batch_size(num_examples: int, sampling_probability: float, steps: int, tolerance: float) -> int:
    """Smallest M in [1, num_examples] with ``overflow_probability(num_examples, q, steps, M) <= tolerance``
    (``num_examples`` when none is)."""
    from scipy import stats

    n, q = int(num_examples), float(sampling_probability)
    per_step = float(tolerance) / max(1, int(steps))
    m = int(stats.binom.isf(per_step, n, q))
    while m < n and overflow_probability(n, q, steps, m) > tolerance:
        m += 1
    return min(max(m, 1), n)


def overflow_delta(
    num_examples: int, sampling_probability: float, steps: int, max_batch_size: int, epsilon: float
) -> float:
    """(1 + e^epsilon) * p, p the overflow probability of ``steps`` batches bounded by
    ``max_batch_size`` on the dataset's neighbour with one more example (N + 1).

    Coupling: the bounded run (an overflow aborts it) and the unbounded one
    differ only when a batch overflows, for the dataset and its neighbour, so
    (epsilon, delta) becomes (epsilon, delta + (1 + e^epsilon) p)."""
    p = overflow_probability(int(num_examples) + 1, float(sampling_probability), steps, int(max_batch_size))
    return min(1.0, (1.0 + math.exp(min(float(epsilon), 700.0))) * p)


def bounded_batch_size(
    num_examples: int, sampling_probability: float, steps: int, epsilon: float, delta_budget: float, multiple: int = 1
) -> int:
    """The smallest ``max_batch_size`` that is a multiple of ``multiple`` (or N)
    whose :func:`overflow_delta` after ``steps`` steps at ``epsilon`` is <= ``delta_budget``.

    Rounding up to a multiple only lowers the overflow probability."""
    checks.check_real("delta_budget", delta_budget, 0.0, 1.0)
    checks.check_int("multiple", multiple, 1)
    n = int(num_examples)
    tolerance = delta_budget / (1.0 + math.exp(min(float(epsilon), 700.0)))
    m = smallest_max_batch_size(n + 1, sampling_probability, steps, tolerance)
    return min(n, -(-m // multiple) * multiple)


def _overflow_delta(plan, sampler, steps: int, eps: Optional[float]) -> Optional[float]:
    """:func:`overflow_delta` of the bounded batches that ran (0 for unbounded ones)."""
    m = None if sampler is None else sampler.get("max_batch_size")
    if m is None or steps == 0:
        return 0.0
    if eps is None:
        return None
    return overflow_delta(int(sampler["num_examples"]), float(sampler["sampling_probability"]), steps, int(m), eps)


def history_entry(epoch: int, steps: int, result) -> Dict[str, Any]:
    """One ``epsilon_history`` entry (``result``: an EpsilonResult, or None before any step)."""
    eps = 0.0 if result is None else _finite(result.epsilon)
    est = 0.0 if result is None else _finite(result.estimate)
    return {"epoch": int(epoch), "steps": int(steps), "epsilon": eps, "epsilon_estimate": est}


def report_problems(report: Any) -> List[str]:
    """What makes ``report`` not a valid report of this schema (empty if valid)."""
    if not isinstance(report, Mapping):
        return [f"a privacy report is a JSON object; got {type(report).__name__}"]
    if report.get("schema") != SCHEMA or report.get("schema_version") != SCHEMA_VERSION:
        return [
            f"not a {SCHEMA} report of schema_version {SCHEMA_VERSION} (schema={report.get('schema')!r}, "
            f"schema_version={report.get('schema_version')!r})"
        ]
    problems = [f"missing field {k!r}" for k in FIELDS if k not in report]
    problems += [f"unknown field {k!r}" for k in report if k not in FIELDS]
    for key, field in FIELDS.items():
        value = report.get(key)
        if key in report and (
            not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types)
        ):
            problems.append(f"field {key!r} has type {type(value).__name__}")
    if not problems and report["certified"] != (not report["uncertified_because"]):
        problems.append("certified must be true exactly when uncertified_because is empty")
    if not problems and report["certified"]:
        eps = report["epsilon"]
        if eps is None or not math.isfinite(eps) or eps < 0:
            problems.append(f"a certified report needs a finite epsilon >= 0; got {eps!r}")
    return problems


def validate_report(report: Any) -> None:
    """ValueError listing every problem of ``report`` (see :func:`report_problems`)."""
    problems = report_problems(report)
    if problems:
        raise ValueError("invalid privacy report: " + "; ".join(problems) + ".")


def certified_epsilon(report: Any) -> Tuple[Optional[float], str]:
    """(epsilon, "") for a valid, certified report; (None, why not) otherwise."""
    problems = report_problems(report)
    if problems:
        return None, "; ".join(problems)
    if not report["certified"]:
        return None, "not certified: " + "; ".join(report["uncertified_because"])
    return float(report["epsilon"]), ""
