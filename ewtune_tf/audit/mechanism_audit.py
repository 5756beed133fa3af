"""Empirical privacy audits of ewtune_tf's own DP-SGD step.

What is audited is the library's real code path, not a re-implementation:

1. **Clipping**: ``ewtune_tf.mechanism.clipping.clipped_gradient_sum`` (the
   per-example clipping implementation the optimizers use, "vectorized" by
   default) on a tiny Keras linear model ``f(x) = w · x`` whose per-example
   loss is ``f(x)``, so an example's gradient is ``x`` itself. A *canary* is
   an example ``x = canary_norm · C · u`` far outside the clip ball: a correct
   implementation clips it to exactly ``C · u``.
2. **Noise, normalization, update**: an ``EWTuneSGD`` optimizer
   (learning rate 1, expected batch size 1) applies the clipped sum through
   ``apply_private_gradients``, which adds the DPQuery Gaussian noise
   (``ewtune_tf.mechanism.noise``) and takes the SGD step. The released
   output is the parameter update.

Many independent runs are vectorized: the optimizer's variable holds one row
per run and the noise is i.i.d. per coordinate, so one call releases all
runs at once with exactly the per-run distribution of one private step.

Mechanism variants are produced by *configuration*, never by editing library
code; each keeps the claim of the correct configuration (σ, C):

* ``correct``: clip at C, noise σ·C.
* ``no_noise``: the noise stage runs with ``noise_multiplier=0``.
* ``no_clipping``: the clipping stage runs with ``l2_norm_clip=inf`` while the
  noise stays σ·C (the classic bug: the canary's huge gradient passes through).
* ``microbatch``: the correct mechanism on keyed microbatch records
  (``num_microbatches``, sensitivity 2C; ``ewtune_tf.mechanism.records``).
  Its claim is ε at the accounted multiplier σ / 2, and D holds an *anchor*
  in the canary's record, pointing away from the canary, so that adding the
  canary moves that record by the full 2C. Every variant takes
  ``num_microbatches`` (``no_noise`` with microbatches is still caught).

Two audits:

* :func:`audit_mechanism` -- many runs on neighbouring datasets D (background
  examples) and D' = D + canary; a threshold on the update's projection onto
  the canary direction is chosen on a calibration split and evaluated on the
  rest; Clopper–Pearson turns its error rates into an ε lower bound
  (:mod:`ewtune_tf.audit.bounds`). Claim: ε of one Gaussian step (q = 1).
* :func:`one_run_audit` -- Steinke, Nasr & Jagielski (2023): m canaries,
  each included with probability 1/2, one training run of ``steps`` full-batch
  steps; guess "in" for the k highest scores and "out" for the k lowest.
  Claim: ε of ``steps`` Gaussian steps with q = 1.
"""

import dataclasses
import math
import time
import warnings
from typing import List, Optional

import keras
import numpy as np
import tensorflow as tf

from ewtune_tf.audit import bounds, claims
from ewtune_tf.mechanism import clipping as clipping_lib
from ewtune_tf.mechanism import records as records_lib
from ewtune_tf.optimizers import EWTuneSGD

MECHANISMS = ("correct", "no_noise", "no_clipping", "microbatch")
MICROBATCHES = 4  # keyed record groups of the "microbatch" variant


@dataclasses.dataclass(frozen=True)
class MechanismVariant:
    """What the two stages of the step are actually configured with."""

    name: str
    clipping_l2_norm_clip: float  # C given to the clipping stage
    noise_multiplier: float  # σ given to the noise stage
    noise_l2_norm_clip: float  # C given to the noise stage (std = σ·C)
    num_microbatches: Optional[int] = None  # keyed records (sensitivity 2C)


def make_variant(
    name: str, *, l2_norm_clip: float, noise_multiplier: float, num_microbatches: Optional[int] = None
) -> MechanismVariant:
    """The correct mechanism or one of the deliberately broken ones."""
    if name == "microbatch":
        return MechanismVariant(name, l2_norm_clip, noise_multiplier, l2_norm_clip, num_microbatches or MICROBATCHES)
    if name == "correct":
        return MechanismVariant(name, l2_norm_clip, noise_multiplier, l2_norm_clip, num_microbatches)
    if name == "no_noise":
        return MechanismVariant(name, l2_norm_clip, 0.0, l2_norm_clip, num_microbatches)
    if name == "no_clipping":
        return MechanismVariant(name, math.inf, noise_multiplier, l2_norm_clip, num_microbatches)
    raise ValueError(f"mechanism must be one of {MECHANISMS}; got {name!r}.")


def _claim(variant: MechanismVariant, noise_multiplier: float, delta: float, steps: int = 1) -> claims.Claim:
    """The certified ε the configuration claims: at the accounted σ / sensitivity."""
    sigma = records_lib.accounted_noise_multiplier(noise_multiplier, variant.num_microbatches)
    return claims.claimed_epsilon(noise_multiplier=sigma, delta=delta, steps=steps)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit; ``empirical_epsilon_lower`` holds w.p. >= confidence."""

    audit: str  # "mechanism" or "one_run"
    mechanism: str
    empirical_epsilon_lower: float
    certified_epsilon: float
    certified_method: str
    exact_epsilon: Optional[float]
    delta: float
    confidence: float
    trials: int  # runs per neighbouring dataset (mechanism) or canaries (one-run)
    noise_multiplier: float  # the claimed σ
    l2_norm_clip: float  # the claimed C
    steps: int
    details: dict
    seconds: float

    @property
    def violation(self) -> bool:
        """True iff the audit proves the claim false (at its confidence)."""
        return self.empirical_epsilon_lower > self.certified_epsilon

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["violation"] = self.violation
        return d


# ---------------------------------------------------------------------------
# The two stages of the real private step.


def _linear_model(dim: int) -> keras.Model:
    model = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    return model


def clipped_gradient_sum(
    examples: np.ndarray,
    l2_norm_clip: float,
    *,
    clipping: str = "vectorized",
    chunk_size: int = 256,
    keys: Optional[np.ndarray] = None,
    num_microbatches: Optional[int] = None,
    expected_batch_size: Optional[float] = None,
) -> np.ndarray:
    """Sum of clipped record gradients of ``w · x`` over ``examples``.

    Per-example records: runs ``ewtune_tf.mechanism.clipping.clipped_gradient_sum``
    on physical chunks (sums accumulate across chunks, as in a logical batch).
    Keyed records (``num_microbatches``, with one key per example and the
    expected batch size that normalises a record): all rows at once. Returns
    a float64 vector of length ``dim``.
    """
    examples = np.asarray(examples, dtype=np.float32)
    model = _linear_model(examples.shape[1])
    records, size = None, chunk_size
    if num_microbatches is not None:
        records = records_lib.microbatch_records(tf.constant(keys), num_microbatches, expected_batch_size)
        size = max(1, examples.shape[0])
    total = np.zeros(examples.shape[1], dtype=np.float64)
    for start in range(0, examples.shape[0], size):
        xb = tf.constant(examples[start : start + size])

        def per_example_loss(xb=xb):
            return model(xb, training=True)[:, 0]

        result = clipping_lib.clipped_gradient_sum(
            clipping, model, per_example_loss, model.trainable_variables, l2_norm_clip, records
        )
        total += np.asarray(result.grad_sum[0], dtype=np.float64).reshape(-1)
    return total


def private_release(
    clipped_sums: np.ndarray, variant: MechanismVariant, steps: int = 1, expected_batch_size: float = 1.0
) -> np.ndarray:
    """Runs ``steps`` private SGD steps of EWTuneSGD (lr 1) from zero weights.

    ``clipped_sums`` is [runs, dim]: row r is the clipped sum of run r (the
    same at every step: full-batch training). Returns the negated final
    weights, i.e. the sum of the noised, normalized gradients of each run
    (per-example records: divisor ``expected_batch_size``, 1 by default, so
    the update is the noised sum itself; keyed records: divisor M).
    """
    sums = tf.constant(np.asarray(clipped_sums, dtype=np.float32))
    with warnings.catch_warnings():
        # no_noise is the deliberately broken variant; its "not private"
        # warning is the point, not news.
        warnings.simplefilter("ignore")
        optimizer = EWTuneSGD(
            learning_rate=1.0,
            l2_norm_clip=variant.noise_l2_norm_clip,
            noise_multiplier=variant.noise_multiplier,
            batch_size=float(expected_batch_size),
            num_microbatches=variant.num_microbatches,
            clipping="vectorized" if variant.num_microbatches else "ghost",
        )
    weights = keras.Variable(np.zeros(sums.shape, np.float32), dtype="float32", name="audit_runs")
    for _ in range(int(steps)):
        optimizer.apply_private_gradients([sums], [weights], physical_batch_size=None)
    return -np.asarray(weights.numpy(), dtype=np.float64)


# ---------------------------------------------------------------------------
# Audit 1: many runs on a fixed pair of neighbouring datasets.


def audit_mechanism(
    mechanism: str = "correct",
    *,
    noise_multiplier: float = 2.0,
    l2_norm_clip: float = 1.0,
    delta: float = 1e-5,
    trials: int = 20000,
    confidence: float = 0.95,
    calibration_fraction: float = 0.25,
    dim: int = 8,
    num_background: int = 4,
    canary_norm: float = 100.0,
    clipping: str = "vectorized",
    num_microbatches: Optional[int] = None,
    seed: int = 0,
) -> AuditResult:
    """Distinguishes D from D' = D + canary over ``trials`` runs of each.

    Args:
      mechanism: one of :data:`MECHANISMS`.
      noise_multiplier, l2_norm_clip: the claimed configuration (σ, C).
      delta: δ of the claim.
      trials: runs per dataset; the reachable lower bound grows like
        log(trials) (about log(trials / 4.7) when the test never errs).
      calibration_fraction: share of runs used only to pick the threshold.
      dim, num_background: size of the linear model and of D.
      canary_norm: canary gradient norm, in units of C (>> 1).
      num_microbatches: keyed records for any variant ("microbatch": 4).
    """
    if int(trials) != trials or trials < 20:
        raise ValueError(f"trials must be an integer >= 20; got {trials!r}.")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1); got {calibration_fraction!r}.")
    if not canary_norm > 1.0:
        raise ValueError(f"canary_norm must be > 1 (in units of l2_norm_clip); got {canary_norm!r}.")
    start = time.perf_counter()
    variant = make_variant(
        mechanism, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, num_microbatches=num_microbatches
    )
    claim = _claim(variant, noise_multiplier, delta)
    pair = _neighbouring_sums(variant, np.random.default_rng(seed), dim, num_background, canary_norm, clipping)
    trials = int(trials)
    released = private_release(
        np.vstack([np.tile(pair.sum_d, (trials, 1)), np.tile(pair.sum_d1, (trials, 1))]),
        variant,
        expected_batch_size=pair.expected_batch_size,
    )
    test = _threshold_test(released @ pair.direction, trials, calibration_fraction, delta, confidence)
    return AuditResult(
        audit="mechanism",
        mechanism=mechanism,
        empirical_epsilon_lower=test.pop("epsilon_lower"),
        certified_epsilon=claim.certified_epsilon,
        certified_method=claim.method,
        exact_epsilon=claim.exact_epsilon,
        delta=delta,
        confidence=confidence,
        trials=trials,
        noise_multiplier=noise_multiplier,
        l2_norm_clip=l2_norm_clip,
        steps=1,
        details={
            **test,
            "canary_norm_over_clip": canary_norm,
            "clipped_canary_contribution": float((pair.sum_d1 - pair.sum_d) @ pair.direction),
            "accountant_below_exact": claim.accountant_below_exact,
            "clipping": clipping,
            "num_microbatches": variant.num_microbatches,
            "sensitivity": records_lib.record_sensitivity(variant.num_microbatches),
        },
        seconds=time.perf_counter() - start,
    )


@dataclasses.dataclass(frozen=True)
class _Pair:
    sum_d: np.ndarray  # clipped sum on D
    sum_d1: np.ndarray  # clipped sum on D' = D + canary
    direction: np.ndarray  # unit canary direction
    expected_batch_size: float


def _neighbouring_sums(variant, rng, dim, num_background, canary_norm, clipping) -> _Pair:
    """Clipped sums of D (background inside the clip ball) and D + canary.

    With keyed records the canary has key 0 and D holds an anchor with key
    M (the canary's record) whose record is clipped to ``-C u``: adding the
    canary moves that record from ``-C u`` to ``+C u``, the full 2C.
    """
    c = variant.clipping_l2_norm_clip
    background = rng.normal(size=(num_background, dim))
    background *= 0.5 / np.linalg.norm(background, axis=1, keepdims=True)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    m = variant.num_microbatches
    canary = canary_norm * variant.noise_l2_norm_clip * direction
    if m is None:
        background = background * variant.noise_l2_norm_clip
        sum_d = clipped_gradient_sum(background, c, clipping=clipping)
        sum_d1 = clipped_gradient_sum(np.vstack([background, canary]), c, clipping=clipping)
        return _Pair(sum_d, sum_d1, direction, 1.0)
    b = float(num_background + 2)  # background, anchor, canary: B = |D'|
    scale = variant.noise_l2_norm_clip * b / m  # a record is its sum over B / M
    anchor = -2.0 * scale * direction
    d = np.vstack([background * scale, anchor])
    # Background records avoid the canary's record (key 0 mod M) when M > 1.
    keys = [1 + i % (m - 1) if m > 1 else 0 for i in range(num_background)] + [m]
    kw = dict(clipping="vectorized", num_microbatches=m, expected_batch_size=b)
    sum_d = clipped_gradient_sum(d, c, keys=np.array(keys), **kw)
    sum_d1 = clipped_gradient_sum(np.vstack([d, canary * b / m]), c, keys=np.array(keys + [0]), **kw)
    return _Pair(sum_d, sum_d1, direction, b)


def _threshold_test(scores, trials, calibration_fraction, delta, confidence) -> dict:
    """Threshold chosen on a calibration split, error rates bounded on the rest."""
    neg, pos = scores[:trials], scores[trials:]
    # Each dataset's runs are i.i.d.; split them into calibration and evaluation.
    n_cal = max(1, int(round(calibration_fraction * trials)))
    threshold = bounds.best_threshold(neg[:n_cal], pos[:n_cal], delta)
    neg_eval, pos_eval = neg[n_cal:], pos[n_cal:]
    fp = int(np.sum(neg_eval > threshold))
    fn = int(np.sum(pos_eval <= threshold))
    rb = bounds.epsilon_lower_bound_from_rates(fp, neg_eval.size, fn, pos_eval.size, delta, confidence)
    return {
        "epsilon_lower": rb.epsilon_lower,
        "threshold": threshold,
        "evaluation_runs_per_dataset": int(neg_eval.size),
        "fpr": rb.fpr,
        "fnr": rb.fnr,
        "fpr_upper": rb.fpr_upper,
        "fnr_upper": rb.fnr_upper,
    }


# ---------------------------------------------------------------------------
# Audit 2: one training run with many canaries (Steinke, Nasr, Jagielski 2023).


def one_run_audit(
    mechanism: str = "correct",
    *,
    noise_multiplier: float = 2.0,
    l2_norm_clip: float = 1.0,
    delta: float = 1e-5,
    num_canaries: int = 1000,
    num_guesses: int = 200,
    steps: int = 1,
    confidence: float = 0.95,
    canary_norm: float = 100.0,
    clipping: str = "vectorized",
    num_microbatches: Optional[int] = None,
    seed: int = 0,
) -> AuditResult:
    """One full-batch training run; canary i's gradient is ``canary_norm·C·e_i``.

    ``num_guesses`` (even) is fixed in advance: the auditor guesses "in" for
    the ``num_guesses / 2`` highest scores and "out" for as many lowest, so
    the guess set never depends on the inclusion bits (ties are broken by a
    random order drawn before scoring).
    """
    m, r = int(num_canaries), int(num_guesses)
    if m < 2 or m != num_canaries:
        raise ValueError(f"num_canaries must be an integer >= 2; got {num_canaries!r}.")
    if r != num_guesses or r < 2 or r % 2 or r > m:
        raise ValueError(f"num_guesses must be an even integer in [2, num_canaries]; got {num_guesses!r}.")
    start = time.perf_counter()
    variant = make_variant(
        mechanism, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, num_microbatches=num_microbatches
    )
    claim = _claim(variant, noise_multiplier, delta, steps)
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    tie_break = rng.permutation(m)  # drawn before any score exists

    examples = canary_norm * l2_norm_clip * np.eye(m)[included]
    # Keyed records: canary i has key i; a record is its sum over B / M, B = m / 2.
    keyed = dict(keys=np.flatnonzero(included), num_microbatches=variant.num_microbatches, expected_batch_size=m / 2)
    if not examples.shape[0]:
        sums = np.zeros(m)
    elif variant.num_microbatches is None:
        sums = clipped_gradient_sum(examples, variant.clipping_l2_norm_clip, clipping=clipping)
    else:
        sums = clipped_gradient_sum(examples, variant.clipping_l2_norm_clip, clipping="vectorized", **keyed)
    scores = private_release(sums[None, :], variant, steps=steps, expected_batch_size=m / 2)[0]

    # Sort by score, ties by the pre-drawn random order (lexsort: last key first).
    order = np.lexsort((tie_break, scores))
    guess_out, guess_in = order[: r // 2], order[-(r // 2) :]
    correct = int(np.sum(included[guess_in]) + np.sum(~included[guess_out]))
    eps_lower = bounds.one_run_epsilon_lower_bound(m, r, correct, delta, confidence)
    return AuditResult(
        audit="one_run",
        mechanism=mechanism,
        empirical_epsilon_lower=eps_lower,
        certified_epsilon=claim.certified_epsilon,
        certified_method=claim.method,
        exact_epsilon=claim.exact_epsilon,
        delta=delta,
        confidence=confidence,
        trials=m,
        noise_multiplier=noise_multiplier,
        l2_norm_clip=l2_norm_clip,
        steps=int(steps),
        details={
            "num_canaries": m,
            "num_included": int(included.sum()),
            "num_guesses": r,
            "num_correct": correct,
            "canary_norm_over_clip": canary_norm,
            "accountant_below_exact": claim.accountant_below_exact,
            "clipping": clipping,
        },
        seconds=time.perf_counter() - start,
    )


def audit_all(audit: str = "mechanism", mechanisms=MECHANISMS, **kwargs) -> List[AuditResult]:
    """Runs ``audit_mechanism`` or ``one_run_audit`` for each mechanism."""
    fn = {"mechanism": audit_mechanism, "one_run": one_run_audit}.get(audit)
    if fn is None:
        raise ValueError(f"audit must be 'mechanism' or 'one_run'; got {audit!r}.")
    return [fn(name, **kwargs) for name in mechanisms]
