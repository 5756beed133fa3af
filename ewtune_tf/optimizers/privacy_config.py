"""Validated privacy hyperparameters of an EWTune optimizer.

One immutable record of everything that determines the mechanism and its
accounting: the clip norm C, the noise multiplier sigma (given, or calibrated
from a target epsilon by the Edgeworth accountant), the sampling probability
q, delta, the expected logical batch size, microbatching, the clipping
implementation and the accountant options. Every bad value raises ValueError
naming the parameter and its allowed range, before anything is built.
"""

import dataclasses
import math
import numbers
import re
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import noise as noise_lib
from ewtune_tf.mechanism import records as records_lib

SAMPLING_MODES = ("poisson", "shuffle")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_positive_int(name: str, value, *, upper: Optional[int] = None) -> int:
    if not _is_int(value) or value < 1 or (upper is not None and value > upper):
        rng = f"[1, {upper}]" if upper is not None else ">= 1"
        raise ValueError(f"{name} must be an integer {rng}; got {value!r}.")
    return int(value)


def _check_float(name: str, value, lo: float, hi: float, *, lo_open=True, hi_open=True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or isinstance(value, bool):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}; got {value!r}.")
    return v


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Resolved privacy configuration (see module docstring).

    Attributes:
      l2_norm_clip: C, per-record global L2 clip norm, in (0, inf].
      noise_multiplier: sigma; noise std on the clipped sum is sigma * C.
        The accountant sees ``accounted_noise_multiplier`` = sigma / the
        record's sensitivity (see ``record`` and ``sensitivity``).
      sampling_probability: q in (0, 1], or None when unknown (then epsilon
        cannot be computed and PrivacyBudget refuses to run).
      delta: target delta in (0, 1), or None.
      expected_batch_size: expected examples per logical step (q * N); the
        noised sum is divided by it. None: the static physical batch size is
        used at trace time.
      num_examples, epochs, target_epsilon: as given (None if not).
      num_microbatches: None (per-example records, sensitivity C) or M, the
        number of keyed record groups per logical batch (sensitivity 2C; see
        ``ewtune_tf.mechanism.records``).
      clipping: clipping implementation name.
      accountant_method, accountant_order, certify: accountant options.
      sampling: "poisson" (what the accountant assumes) or "shuffle".
      noise_seed: None (secure OS entropy) or a fixed int (tests only).
      noise_multiplier_source: "given" or "calibrated".
      target_unclipped_quantile: None (fixed clip) or, for adaptive clipping
        (Andrew et al. 2021), the target fraction of unclipped records in
        (0, 1); l2_norm_clip is then the initial clip.
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

    l2_norm_clip: float
    noise_multiplier: float
    sampling_probability: Optional[float] = None
    delta: Optional[float] = None
    expected_batch_size: Optional[float] = None
    num_examples: Optional[int] = None
    epochs: Optional[float] = None
    target_epsilon: Optional[float] = None
    num_microbatches: Optional[int] = None
    clipping: str = "ghost"
    accountant_method: str = "tilted"
    accountant_order: int = 2
    certify: bool = True
    sampling: str = "poisson"
    noise_seed: Optional[int] = None
    noise_multiplier_source: str = "given"
    target_unclipped_quantile: Optional[float] = None
    clip_learning_rate: float = 0.2
    clipped_count_stddev: Optional[float] = None
    clip_groups: Optional[Tuple[Tuple[str, float], ...]] = None

    @property
    def adaptive_clipping(self) -> bool:
        return self.target_unclipped_quantile is not None

    @property
    def record(self) -> str:
        """The record clipped to C: "example" or "keyed_microbatch"."""
        return records_lib.record_definition(self.num_microbatches)

    @property
    def sensitivity(self) -> float:
        """Add/remove sensitivity of the clipped sum, in units of C (1 or 2)."""
        return records_lib.record_sensitivity(self.num_microbatches)

    @property
    def accounted_noise_multiplier(self) -> float:
        """The accountant's sigma: noise_multiplier / sensitivity."""
        return records_lib.accounted_noise_multiplier(self.noise_multiplier, self.num_microbatches)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


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
        share = _check_float("clip_groups share", share, 0.0, 1.0, hi_open=False)
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


def resolve_privacy_config(
    *,
    l2_norm_clip,
    noise_multiplier=None,
    target_epsilon=None,
    target_delta=None,
    num_examples=None,
    batch_size=None,
    epochs=None,
    sampling_probability=None,
    num_microbatches=None,
    clipping="ghost",
    accountant_method="tilted",
    accountant_order=2,
    certify=True,
    sampling="poisson",
    noise_seed=None,
    noise_multiplier_source=None,
    target_unclipped_quantile=None,
    clip_learning_rate=0.2,
    clipped_count_stddev=None,
    clip_groups=None,
) -> PrivacyConfig:
    """Validates the optimizer's privacy arguments and calibrates sigma.

    Exactly one of ``noise_multiplier`` or ``target_epsilon`` must be given
    (``noise_multiplier_source="calibrated"`` marks a sigma that was
    calibrated earlier and is being restored from a config: it is reused, not
    recalibrated).
    """
    c = clipping_lib.check_l2_norm_clip(l2_norm_clip)
    num_microbatches = records_lib.check_num_microbatches(num_microbatches)
    if not isinstance(clipping, str) or clipping not in clipping_lib.available_clipping_impls():
        raise ValueError(f"clipping must be one of {clipping_lib.available_clipping_impls()}; got {clipping!r}.")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}; got {sampling!r}.")
    if not isinstance(certify, bool):
        raise ValueError(f"certify must be True or False; got {certify!r}.")
    if noise_seed is not None and not _is_int(noise_seed):
        raise ValueError(f"noise_seed must be None or an integer; got {noise_seed!r}.")
    if noise_multiplier_source not in (None, "given", "calibrated"):
        raise ValueError(
            f"noise_multiplier_source must be None, 'given' or 'calibrated'; got {noise_multiplier_source!r}."
        )

    n = _check_positive_int("num_examples", num_examples) if num_examples is not None else None
    if batch_size is not None:
        b = _check_float("batch_size", batch_size, 0.0, float(n) if n else math.inf, lo_open=True, hi_open=n is None)
    else:
        b = None
    e = _check_float("epochs", epochs, 0.0, math.inf) if epochs is not None else None
    d = _check_float("target_delta", target_delta, 0.0, 1.0) if target_delta is not None else None
    if d is not None and n is not None and d >= 1.0 / n:
        warnings.warn(
            f"target_delta={d} >= 1/num_examples={1.0 / n:.3g}: such a delta allows "
            "releasing individual records; choose delta << 1/num_examples.",
            stacklevel=3,
        )
    q = None
    if sampling_probability is not None:
        q = _check_float("sampling_probability", sampling_probability, 0.0, 1.0, hi_open=False)
    elif n is not None and b is not None:
        q = b / n
    if q is not None and n is not None and b is None:
        b = q * n
    _check_microbatching(num_microbatches, clipping, b)

    calibrated = noise_multiplier_source == "calibrated"
    if target_epsilon is not None and noise_multiplier is not None and not calibrated:
        raise ValueError(
            "Give either noise_multiplier, or target_epsilon (+ target_delta, "
            "num_examples, batch_size, epochs) to calibrate it; not both."
        )
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError(
            "noise_multiplier (>= 0) or target_epsilon (> 0, with target_delta, "
            "num_examples, batch_size and epochs) is required."
        )
    eps = None
    if target_epsilon is not None:
        eps = _check_float("target_epsilon", target_epsilon, 0.0, math.inf)
        missing = [k for k, v in dict(target_delta=d, num_examples=n, batch_size=b, epochs=e).items() if v is None]
        if missing:
            raise ValueError(
                f"target_epsilon={eps} needs {', '.join(missing)} to calibrate the "
                "noise multiplier (target_delta in (0, 1), num_examples >= 1, "
                "batch_size in (0, num_examples], epochs > 0)."
            )
    if noise_multiplier is not None:
        sigma = noise_lib.check_noise_multiplier(noise_multiplier)
        source = "calibrated" if calibrated else "given"
    else:
        from ewtune_tf import accounting

        result = accounting.calibrate_noise_multiplier(
            eps,
            d,
            num_examples=n,
            batch_size=int(round(b)) if float(b).is_integer() else b,
            epochs=e,
            method=accountant_method,
            order=accountant_order,
            certify=certify,
        )
        # The accountant's sigma, times the sensitivity: the noise std that
        # gives a Gaussian mechanism with that multiplier.
        sigma = float(result.noise_multiplier) * records_lib.record_sensitivity(num_microbatches)
        q = float(result.sampling_probability)
        source = "calibrated"
    if sigma > 0 and not math.isfinite(c):
        raise ValueError("l2_norm_clip must be finite when noise_multiplier > 0; got inf.")
    if sigma == 0:
        warnings.warn("noise_multiplier=0: training is NOT differentially private.", stacklevel=3)
    if sampling == "shuffle":
        warnings.warn(
            "sampling='shuffle': the accountant assumes Poisson sampling; the "
            "reported epsilon is that of Poisson sampling with the same q, which "
            "is not a proven bound for shuffled fixed-size batches. Use "
            "ewtune_tf.data.poisson_batches for a matching guarantee.",
            stacklevel=3,
        )
    if noise_seed is not None:
        warnings.warn(
            "noise_seed is set: the DP noise is reproducible from a known seed and "
            "offers NO privacy. Use only for tests.",
            stacklevel=3,
        )
    groups = check_clip_group_spec(clip_groups)
    if groups is not None and target_unclipped_quantile is not None:
        raise ValueError(
            "clip_groups (group-wise clipping) cannot be combined with "
            "target_unclipped_quantile (adaptive clipping); use one of them."
        )
    tq = cc = None
    lr = _check_float("clip_learning_rate", clip_learning_rate, 0.0, math.inf)
    if target_unclipped_quantile is not None:
        tq = _check_float("target_unclipped_quantile", target_unclipped_quantile, 0.0, 1.0)
        if not math.isfinite(c):
            raise ValueError("l2_norm_clip (the initial clip of adaptive clipping) must be finite; got inf.")
        if clipped_count_stddev is None:
            if b is None:
                raise ValueError(
                    "clipped_count_stddev (> 0, records) is required for adaptive clipping "
                    "when batch_size (the expected batch size) is unknown."
                )
            clipped_count_stddev = b / 20.0
        cc = _check_float("clipped_count_stddev", clipped_count_stddev, 0.0, math.inf)
        noise_lib.adaptive_sum_noise_multiplier(sigma, cc)  # ValueError if too small
    elif clipped_count_stddev is not None:
        raise ValueError("clipped_count_stddev is only used with target_unclipped_quantile (adaptive clipping).")
    return PrivacyConfig(
        clip_groups=groups,
        target_unclipped_quantile=tq,
        clip_learning_rate=lr,
        clipped_count_stddev=cc,
        l2_norm_clip=c,
        noise_multiplier=sigma,
        sampling_probability=q,
        delta=d,
        expected_batch_size=b,
        num_examples=n,
        epochs=e,
        target_epsilon=eps,
        num_microbatches=num_microbatches,
        clipping=clipping,
        accountant_method=accountant_method,
        accountant_order=accountant_order,
        certify=certify,
        sampling=sampling,
        noise_seed=None if noise_seed is None else int(noise_seed),
        noise_multiplier_source=source,
    )


def _check_microbatching(num_microbatches: Optional[int], clipping: str, expected_batch_size: Optional[float]) -> None:
    """Keyed microbatch records need an expected batch size and a clipping
    implementation that accumulates record gradients over chunks."""
    if num_microbatches is None:
        return
    if expected_batch_size is None:
        raise ValueError(
            f"num_microbatches={num_microbatches} needs batch_size (the expected logical batch size, > 0): "
            "a record's loss is its examples' loss sum over the expected group size batch_size / num_microbatches."
        )
    if clipping not in clipping_lib.keyed_record_impls():
        raise ValueError(
            f"num_microbatches={num_microbatches} with clipping={clipping!r}: keyed record groups are accumulated "
            "over the physical chunks of a logical batch before they are clipped, which ghost norms cannot do; "
            f"use clipping in {list(clipping_lib.keyed_record_impls())}, or num_microbatches=None."
        )
