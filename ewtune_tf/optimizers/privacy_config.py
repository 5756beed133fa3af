"""An EWTune optimizer's privacy: the PrivacyPlan it runs, and how the mechanism runs it.

:class:`PrivacyConfig` is one immutable record: the optimizer's
:class:`ewtune_tf.privacy.PrivacyPlan` (C, sigma given or calibrated, q,
delta, planned steps, the record and its sensitivity, the accountant,
sampling) plus the mechanism options that do not change the accounting: the
clipping implementation, keyed microbatching (which sets the plan's record),
a test-only noise seed, adaptive and group-wise clipping. An optimizer takes
a plan (``plan=``) or the plan's keyword arguments
(``ewtune_tf.privacy.PLAN_ARGUMENTS``), plus the mechanism options
(:data:`MECHANISM_ARGUMENTS`): the argument list exists once, in those two
signatures. Every bad value raises ValueError naming the parameter and its
allowed range, before anything is built.
"""

import dataclasses
import math
import re
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import noise as noise_lib
from ewtune_tf.mechanism import records as records_lib
from ewtune_tf.privacy import PLAN_ARGUMENTS, PrivacyPlan, plan_from_arguments, plan_to_arguments
from ewtune_tf.utils import checks


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Resolved privacy configuration of an EWTune optimizer (see module docstring).

    Attributes:
      plan: the PrivacyPlan (every accounting fact: C, sigma, q, delta,
        expected batch size, steps, record, accountant, sampling).
      num_microbatches: None (per-example records, sensitivity C) or M, the
        number of keyed record groups per logical batch (sensitivity 2C; see
        ``ewtune_tf.mechanism.records``). Sets ``plan.record``.
      clipping: clipping implementation name.
      noise_seed: None (secure OS entropy) or a fixed int (tests only; the
        report is then not certified).
      target_unclipped_quantile: None (fixed clip) or, for adaptive clipping
        (Andrew et al. 2021), the target fraction of unclipped records in
        (0, 1); ``plan.l2_norm_clip`` is then the initial clip.
      clip_learning_rate: geometric learning rate of the adaptive clip (> 0).
      clipped_count_stddev: noise std of the adaptive clipping count, in
        records (> noise_multiplier / 2); default expected_batch_size / 20.
      clip_groups: None (one global clip norm C) or group-wise clipping:
        ``((pattern, share), ...)``. A trainable variable belongs to the
        first group whose regex ``pattern`` matches (``re.search``) its
        ``path``; variables matching none form a last, implicit group with
        the remaining share ``1 - sum(shares)``. Group g is clipped to
        ``C * sqrt(share_g)``, so each record's total norm stays <= C and
        the noise and accounting are unchanged (see
        ``ewtune_tf.mechanism.clipping``).
    """

    plan: PrivacyPlan
    num_microbatches: Optional[int] = None
    clipping: str = "ghost"
    noise_seed: Optional[int] = None
    target_unclipped_quantile: Optional[float] = None
    clip_learning_rate: float = 0.2
    clipped_count_stddev: Optional[float] = None
    clip_groups: Optional[Tuple[Tuple[str, float], ...]] = None

    @property
    def adaptive_clipping(self) -> bool:
        return self.target_unclipped_quantile is not None

    def to_arguments(self) -> Dict[str, Any]:
        """The optimizer keyword arguments that rebuild this config without recalibrating."""
        out = plan_to_arguments(self.plan)
        for name in MECHANISM_ARGUMENTS:
            out[name] = getattr(self, name)
        if self.clip_groups is not None:
            out["clip_groups"] = [list(g) for g in self.clip_groups]
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plan"] = self.plan.to_dict()
        return d


# The mechanism options, read off the dataclass (``plan`` aside).
MECHANISM_ARGUMENTS = tuple(f.name for f in dataclasses.fields(PrivacyConfig) if f.name != "plan")
# Every privacy keyword argument of an EWTune optimizer.
PRIVACY_ARGUMENTS = PLAN_ARGUMENTS + MECHANISM_ARGUMENTS


def check_clip_group_spec(clip_groups) -> Optional[Tuple[Tuple[str, float], ...]]:
    """Validates ``clip_groups`` (see :class:`PrivacyConfig`); None passes."""
    if clip_groups is None:
        return None
    msg = (
        "clip_groups must be None or a non-empty sequence of (pattern, share) pairs: "
        "pattern a regular expression over variable paths, share in (0, 1], "
        "shares summing to <= 1"
    )
    if isinstance(clip_groups, (str, bytes)) or not isinstance(clip_groups, Sequence) or not clip_groups:
        raise ValueError(f"{msg}; got {clip_groups!r}.")
    out = []
    for item in clip_groups:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"{msg}; got the entry {item!r}.")
        pattern, share = item
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{msg}; got the pattern {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"clip_groups: pattern {pattern!r} is not a valid regular expression ({e}).") from None
        share = checks.check_real("clip_groups share", share, 0.0, 1.0, high_open=False)
        out.append((pattern, share))
    total = sum(s for _, s in out)
    if total > 1.0 + 1e-9:
        raise ValueError(f"{msg}; the shares sum to {total!r}.")
    return tuple(out)


def resolve_clip_groups(
    clip_groups: Optional[Tuple[Tuple[str, float], ...]], variable_paths: Sequence[str]
) -> Optional[clipping_lib.ClipGroups]:
    """Assigns variables to the groups of ``clip_groups`` (ValueError if unusable).

    Every group must own at least one variable, and the remaining share must
    be positive exactly when some variable matches no pattern: a group with
    no variable would waste its share of the clip budget, and variables
    without a share could not be clipped.
    """
    if clip_groups is None:
        return None
    shares = [s for _, s in clip_groups]
    rest = 1.0 - sum(shares)
    if rest <= 1e-9:
        rest = 0.0
    compiled = [re.compile(p) for p, _ in clip_groups]
    assignment = []
    for path in variable_paths:
        idx = next((i for i, rx in enumerate(compiled) if rx.search(path)), len(compiled))
        assignment.append(idx)
    for i, (pattern, _) in enumerate(clip_groups):
        if i not in assignment:
            raise ValueError(
                f"clip_groups: pattern {pattern!r} matches no trainable variable "
                f"(paths: {list(variable_paths)[:8]}{' ...' if len(variable_paths) > 8 else ''})."
            )
    unmatched = [p for p, a in zip(variable_paths, assignment) if a == len(compiled)]
    if unmatched and rest == 0.0:
        raise ValueError(
            f"clip_groups: the shares sum to 1 but {len(unmatched)} trainable variable(s) match "
            f"no pattern (e.g. {unmatched[0]!r}); lower a share to leave them a budget."
        )
    if not unmatched and rest > 0.0:
        raise ValueError(
            f"clip_groups: every trainable variable matches a pattern, so the remaining share "
            f"{rest:.6g} of the clip budget would be unused; make the shares sum to 1."
        )
    if unmatched:
        shares.append(rest)
    total = sum(shares)  # exactly 1 up to round-off; renormalize for the check.
    return clipping_lib.ClipGroups(tuple(assignment), tuple(s / total for s in shares))


def resolve_privacy_config(plan: Optional[PrivacyPlan] = None, **arguments) -> PrivacyConfig:
    """Validates an optimizer's privacy arguments and calibrates sigma.

    ``plan``: a ready PrivacyPlan; otherwise the plan's keyword arguments
    (``PLAN_ARGUMENTS``: ``l2_norm_clip``, and ``noise_multiplier`` or
    ``target_epsilon`` with ``target_delta``, ``num_examples``,
    ``batch_size``, ``epochs``; ...) build it. The other arguments are the
    mechanism options (``MECHANISM_ARGUMENTS``).
    """
    unknown = sorted(set(arguments) - set(PRIVACY_ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown privacy argument(s) {unknown}; allowed: {sorted(PRIVACY_ARGUMENTS)}.")
    mechanism = {k: arguments.pop(k) for k in MECHANISM_ARGUMENTS if k in arguments}
    m = records_lib.check_num_microbatches(mechanism.get("num_microbatches"))
    record = records_lib.record_definition(m)
    _check_keyed_clipping(m, mechanism.get("clipping", "ghost"))  # Before any (slow) calibration.
    if plan is None:
        if "l2_norm_clip" not in arguments:
            raise ValueError("l2_norm_clip (the per-record clip norm C, > 0) is required.")
        plan = plan_from_arguments(**{"record": record, **arguments})
    elif arguments:
        raise ValueError(f"give a plan or its arguments, not both; got plan= and {sorted(arguments)}.")
    elif not isinstance(plan, PrivacyPlan):
        raise ValueError(f"plan must be an ewtune_tf.privacy.PrivacyPlan; got {type(plan).__name__}.")
    if plan.record != record:
        raise ValueError(
            f"num_microbatches={m!r} forms {record!r} records but the plan accounts for {plan.record!r} records; "
            "the record sets the sensitivity, so they must agree."
        )
    return _mechanism_config(plan, m, **{k: v for k, v in mechanism.items() if k != "num_microbatches"})


def _mechanism_config(
    plan: PrivacyPlan,
    num_microbatches: Optional[int],
    clipping: str = "ghost",
    noise_seed: Optional[int] = None,
    target_unclipped_quantile: Optional[float] = None,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: Optional[float] = None,
    clip_groups=None,
) -> PrivacyConfig:
    """Validates the mechanism options for ``plan``."""
    if not isinstance(clipping, str) or clipping not in clipping_lib.available_clipping_impls():
        raise ValueError(f"clipping must be one of {clipping_lib.available_clipping_impls()}; got {clipping!r}.")
    if noise_seed is not None:
        checks.check_int("noise_seed", noise_seed, optional=True)
        warnings.warn(
            "noise_seed is set: the DP noise is reproducible from a known seed and "
            "offers NO privacy. Use only for tests.",
            stacklevel=4,
        )
    _check_microbatching(num_microbatches, clipping, plan.expected_batch_size)
    groups = check_clip_group_spec(clip_groups)
    if groups is not None and target_unclipped_quantile is not None:
        raise ValueError(
            "clip_groups (group-wise clipping) cannot be combined with "
            "target_unclipped_quantile (adaptive clipping); use one of them."
        )
    lr = checks.check_real("clip_learning_rate", clip_learning_rate, 0.0)
    tq = checks.check_real("target_unclipped_quantile", target_unclipped_quantile, 0.0, 1.0, optional=True)
    if tq is not None:
        if not math.isfinite(plan.l2_norm_clip):
            raise ValueError("l2_norm_clip (the initial clip of adaptive clipping) must be finite; got inf.")
        if clipped_count_stddev is None:
            if plan.expected_batch_size is None:
                raise ValueError(
                    "clipped_count_stddev (> 0, records) is required for adaptive clipping "
                    "when batch_size (the expected batch size) is unknown."
                )
            clipped_count_stddev = plan.expected_batch_size / 20.0
        clipped_count_stddev = checks.check_real("clipped_count_stddev", clipped_count_stddev, 0.0)
        noise_lib.adaptive_sum_noise_multiplier(plan.noise_multiplier, clipped_count_stddev)  # ValueError if too small
    elif clipped_count_stddev is not None:
        raise ValueError("clipped_count_stddev is only used with target_unclipped_quantile (adaptive clipping).")
    return PrivacyConfig(
        plan=plan,
        num_microbatches=num_microbatches,
        clipping=clipping,
        noise_seed=None if noise_seed is None else int(noise_seed),
        target_unclipped_quantile=tq,
        clip_learning_rate=lr,
        clipped_count_stddev=clipped_count_stddev,
        clip_groups=groups,
    )


def _check_keyed_clipping(num_microbatches: Optional[int], clipping: str) -> None:
    """Keyed microbatch records need a clipping implementation that accumulates
    record gradients over the physical chunks of a logical batch."""
    if num_microbatches is not None and clipping not in clipping_lib.keyed_record_impls():
        raise ValueError(
            f"num_microbatches={num_microbatches} with clipping={clipping!r}: keyed record groups are accumulated "
            "over the physical chunks of a logical batch before they are clipped, which ghost norms cannot do; "
            f"use clipping in {list(clipping_lib.keyed_record_impls())}, or num_microbatches=None."
        )


def _check_microbatching(num_microbatches: Optional[int], clipping: str, expected_batch_size: Optional[float]) -> None:
    """Keyed microbatch records also need an expected batch size (record losses are normalised by it)."""
    if num_microbatches is None:
        return
    _check_keyed_clipping(num_microbatches, clipping)
    if expected_batch_size is None:
        raise ValueError(
            f"num_microbatches={num_microbatches} needs batch_size (the expected logical batch size, > 0): "
            "a record's loss is its examples' loss sum over the expected group size batch_size / num_microbatches."
        )
