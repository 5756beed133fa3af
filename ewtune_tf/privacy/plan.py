"""PrivacyPlan: what a private training run does, and what it is accounted as.

One frozen record of everything the accountant's answer depends on, in the
spirit of jax_privacy's ``DPExecutionPlan``: the dataset size N, the expected
batch size B and the Poisson rate q = B / N, the planned number of logical
steps (from epochs by the one rule, :func:`ewtune_tf.accounting.steps_for_epochs`,
which is what the sampler runs), the noise multiplier sigma (given, or
calibrated to a target (epsilon, delta) by a named rule), the clip norm C and
the record whose influence C bounds, the accountant, and the sampling scheme.

Methods:
  ``steps_for(epochs)``  logical steps of ``epochs`` passes at this q.
  ``calibrate(rule)``    the plan with sigma chosen by ``rule`` (see NOISE_RULES).
  ``dp_event(steps)``    the ``dp_accounting`` event that is accounted.
  ``epsilon(steps)``     the accountant's EpsilonResult after ``steps`` steps.
  ``bounded_batch_size`` the smallest max_batch_size whose overflow adds at most a given delta.
  ``report(steps, run)`` the privacy report (``ewtune_tf.privacy.report``).

Pure Python + numpy/scipy/dp_accounting: TFX pipeline code, the privacy gate
and the accountant CLI import it without TensorFlow.
"""

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

from ewtune_tf import accounting
from ewtune_tf.accounting import _validation as accounting_validation
from ewtune_tf.utils import checks

SAMPLING_SCHEMES = ("poisson", "shuffle")
ACCOUNTANTS = accounting_validation.METHODS
ACCOUNTANT_ORDERS = accounting_validation.ORDERS
# The unit whose gradient is clipped to C -> the add/remove sensitivity of the
# clipped sum in units of C. An example: adding or removing it adds or removes
# one vector of norm <= C. A keyed microbatch (a group of examples keyed
# independently of each other; ewtune_tf/mechanism/records.py forms them):
# one example changes one record from one vector of norm <= C to another.
RECORDS: Dict[str, float] = {"example": 1.0, "keyed_microbatch": 2.0}
# How sigma was chosen -> (is the certified epsilon of the plan <= target by
# construction?, what the rule does). The report names the rule; its epsilon
# is always the certified epsilon of the sigma that ran, whatever chose it.
NOISE_RULES: Dict[str, tuple] = {
    "certified": (
        True,
        "smallest sigma whose certified epsilon (Edgeworth/saddlepoint, checked against "
        "dp_accounting's pessimistic PLD bound) is <= the target",
    ),
    "rdp": (True, "smallest sigma whose dp_accounting RDP epsilon (a looser upper bound) is <= the target"),
    "estimate": (False, "smallest sigma whose analytic estimate (not a bound; certify=False) is <= the target"),
    "edgeworth_paper": (False, "the EW-Tune paper's order-1 Edgeworth point estimate (not a bound)"),
    "given": (False, "given by the caller"),
}
CALIBRATION_RULES = tuple(r for r in NOISE_RULES if r != "given")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """A validated DP-SGD plan (see the module docstring).

    Attributes:
      sampling_probability: q in (0, 1], the Poisson rate; None when unknown
        (epsilon cannot be computed then).
      l2_norm_clip: C in (0, inf]: each record's clipped gradient has L2 norm <= C.
      noise_multiplier: sigma >= 0 (the noise on the clipped sum has std
        sigma * C); None until calibrated. 0 means not private.
      steps: planned logical steps (noise releases), >= 1, or None.
      num_examples: N, the training set size, or None.
      expected_batch_size: B = q * N (examples), or None.
      target_epsilon: the epsilon sigma was chosen for (> 0), or None.
      delta: the delta of the guarantee, in (0, 1), or None.
      accountant, accountant_order, certify: accountant options
        (``ewtune_tf.accounting.compute_epsilon``).
      sampling: "poisson" (what the accountant assumes) or "shuffle".
      noise_multiplier_rule: how sigma was chosen, a key of NOISE_RULES.
      record: the unit whose gradient is clipped to C, a key of RECORDS
        ("example", or "keyed_microbatch" with sensitivity 2C).
      calibration: the CalibrationResult (as a dict) when sigma was calibrated.
    """

    sampling_probability: Optional[float]
    l2_norm_clip: float
    noise_multiplier: Optional[float] = None
    steps: Optional[int] = None
    num_examples: Optional[int] = None
    expected_batch_size: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    accountant: str = "tilted"
    accountant_order: int = 2
    certify: bool = True
    sampling: str = "poisson"
    noise_multiplier_rule: str = "given"
    record: str = "example"
    calibration: Optional[Mapping[str, Any]] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _validate_plan(self)

    # ------------------------------------------------------------ derived
    @property
    def private(self) -> bool:
        """True when noise is added (sigma > 0)."""
        return self.noise_multiplier is not None and self.noise_multiplier > 0

    @property
    def sensitivity(self) -> float:
        """Add/remove sensitivity of the clipped sum, in units of C (1 or 2)."""
        return RECORDS[self.record]

    @property
    def accounted_noise_multiplier(self) -> Optional[float]:
        """sigma as the accountant sees it: the noise std sigma*C over the
        sensitivity (C per example, 2C per keyed microbatch)."""
        return None if self.noise_multiplier is None else self.noise_multiplier / self.sensitivity

    @property
    def bounds_target(self) -> bool:
        """True when sigma's rule guarantees certified epsilon <= target_epsilon."""
        return self.target_epsilon is not None and self.certify and NOISE_RULES[self.noise_multiplier_rule][0]

    def steps_for(self, epochs: float) -> int:
        """Logical steps of ``epochs`` passes: ceil(epochs * floor(1 / q))."""
        if self.sampling_probability is None:
            raise ValueError("sampling_probability: unknown; cannot turn epochs into steps.")
        return accounting.steps_for_epochs(self.sampling_probability, epochs)

    def replace(self, **changes) -> "PrivacyPlan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The plan's fields as JSON values (calibration included)."""
        d = dataclasses.asdict(self)
        d["calibration"] = None if self.calibration is None else dict(self.calibration)
        return d

    # --------------------------------------------------------- accounting
    def calibrate(self, rule: str = "certified") -> "PrivacyPlan":
        """The plan with sigma chosen by ``rule`` for (target_epsilon, delta)
        at (q, steps). Raises ValueError if a needed value is missing or the
        target cannot be met."""
        from ewtune_tf.privacy import calibration

        checks.check_choice("rule", rule, CALIBRATION_RULES)
        missing = [k for k in ("target_epsilon", "delta", "sampling_probability", "steps") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"calibrate: the plan needs {', '.join(missing)} to calibrate the noise multiplier.")
        accounted, result = calibration.noise_multiplier_for(self, rule)
        # The accountant's sigma times the sensitivity: the noise std (in units
        # of C) that gives a Gaussian mechanism with that multiplier.
        return self.replace(
            noise_multiplier=accounted * self.sensitivity, noise_multiplier_rule=rule, calibration=result
        )

    def dp_event(self, steps: Optional[int] = None):
        """``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``:
        what the accountant composes (also for ``sampling="shuffle"``, which it
        does not describe exactly: see the report's ``uncertified_because``)."""
        from dp_accounting import dp_event

        steps = self._accounted_steps(steps)
        gaussian = dp_event.GaussianDpEvent(self.accounted_noise_multiplier)
        return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(self.sampling_probability, gaussian), steps)

    def epsilon(self, steps: Optional[int] = None) -> accounting.EpsilonResult:
        """Epsilon at ``delta`` after ``steps`` (default: the planned steps), >= 1."""
        steps = self._accounted_steps(steps)
        if self.delta is None:
            raise ValueError("delta: unknown; give the plan a delta in (0, 1) to compute epsilon.")
        return accounting.compute_epsilon(
            sampling_probability=self.sampling_probability,
            noise_multiplier=self.accounted_noise_multiplier,
            steps=steps,
            delta=self.delta,
            method=self.accountant,
            order=self.accountant_order,
            certify=self.certify,
        )

    def max_steps_within(self, target_epsilon: float, start: int, planned: Optional[int] = None) -> int:
        """Largest s >= start whose epsilon is <= target (epsilon grows with s);
        ``start`` when even one more step would exceed it. With ``planned``
        feasible, returns it after one accountant call."""
        eps = lambda s: 0.0 if s <= 0 else float(self.epsilon(s).epsilon)
        hi = planned if planned and planned > start else start + 1
        if eps(hi) <= target_epsilon:
            if planned and hi == planned:
                return hi
            lo = hi
            while True:  # exponential search for an infeasible upper end
                hi *= 2
                if hi > 10**9:
                    return lo
                if eps(hi) > target_epsilon:
                    break
                lo = hi
        else:
            lo = start  # zero further steps is always within budget
        while hi - lo > 1:  # invariant: lo within budget (or start), hi not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
        return lo

    def bounded_batch_size(self, delta_budget: float, multiple: int = 1) -> int:
        """The smallest ``max_batch_size`` (a multiple of ``multiple``, or N) for
        which Poisson batches bounded by it (an overflow aborts the run) add at
        most ``delta_budget`` to delta over the planned steps: the report's
        ``delta_batch_overflow``, (1 + e^epsilon) * P[overflow], at this plan's
        certified epsilon."""
        if self.num_examples is None:
            raise ValueError("num_examples: unknown; bounded batch sizes need the dataset size N.")
        from ewtune_tf.privacy import report

        eps = float(self.epsilon().epsilon)
        q, n = self.sampling_probability, self.num_examples
        return report.bounded_batch_size(n, q, self.steps, eps, delta_budget, multiple)

    def report(self, steps_taken: int, run=None) -> Dict[str, Any]:
        """The privacy report after ``steps_taken`` noise releases; ``run`` is a
        :class:`ewtune_tf.privacy.report.RunFacts` (seeds, sampler facts,
        releases, history, provenance)."""
        from ewtune_tf.privacy import report

        return report.build_report(self, steps_taken, run)

    def _accounted_steps(self, steps: Optional[int]) -> int:
        steps = self.steps if steps is None else steps
        checks.check_int("steps", steps, 1)
        if self.sampling_probability is None:
            raise ValueError(
                "sampling_probability: unknown; give sampling_probability in (0, 1] "
                "(or num_examples and batch_size) so epsilon can be computed."
            )
        if not self.private:
            raise ValueError("noise_multiplier: 0 (or unset) gives no differential privacy; epsilon is infinite.")
        return int(steps)


def _validate_plan(p: PrivacyPlan) -> None:
    """ValueError naming the first out-of-range or inconsistent field."""
    checks.check_real("sampling_probability", p.sampling_probability, 0.0, 1.0, high_open=False, optional=True)
    if not (checks.is_real(p.l2_norm_clip) and p.l2_norm_clip > 0) or math.isnan(p.l2_norm_clip):
        checks.fail("l2_norm_clip", "in (0, inf]", p.l2_norm_clip)
    checks.check_real("noise_multiplier", p.noise_multiplier, 0.0, low_open=False, optional=True)
    if p.private and math.isinf(p.l2_norm_clip):
        raise ValueError("l2_norm_clip must be finite when noise_multiplier > 0; got inf.")
    checks.check_int("steps", p.steps, 1, optional=True)
    checks.check_int("num_examples", p.num_examples, 1, optional=True)
    n = math.inf if p.num_examples is None else p.num_examples
    checks.check_real("batch_size", p.expected_batch_size, 0.0, n, high_open=False, optional=True)
    checks.check_real("target_epsilon", p.target_epsilon, 0.0, optional=True)
    checks.check_real("target_delta", p.delta, 0.0, 1.0, optional=True)
    checks.check_choice("accountant_method", p.accountant, ACCOUNTANTS)
    checks.check_choice("accountant_order", p.accountant_order, ACCOUNTANT_ORDERS)
    checks.check_bool("certify", p.certify)
    checks.check_choice("sampling", p.sampling, SAMPLING_SCHEMES)
    checks.check_choice("noise_multiplier_rule", p.noise_multiplier_rule, tuple(NOISE_RULES))
    checks.check_choice("record", p.record, tuple(RECORDS))
    q, b = p.sampling_probability, p.expected_batch_size
    if q is not None and b is not None and p.num_examples is not None:
        if abs(q - b / p.num_examples) > 1e-9 * q:
            raise ValueError(
                f"sampling_probability={q!r} disagrees with batch_size / num_examples = {b!r} / "
                f"{p.num_examples} = {b / p.num_examples!r}; the sampler and the accountant must use one q. "
                "Give sampling_probability or (batch_size, num_examples), or consistent values."
            )
