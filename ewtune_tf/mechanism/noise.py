"""Gaussian noise on the clipped sum, through TF Privacy's DPQuery.

The clipped per-record gradients are summed by a clipping implementation
(``ewtune_tf.mechanism.clipping``); that sum is fed to a
``GaussianSumQuery(l2_norm_clip=C, stddev=sigma * C)`` as one *preprocessed*
record and the query's ``get_noised_result`` adds the noise. Everything here
is float32, whatever the model's compute dtype.

Random streams. The noise must be unpredictable to an adversary, never
repeat, and replicas must draw independent noise. We therefore subclass
GaussianSumQuery only to choose the random stream:
``tf.random.stateless_normal`` with a seed folded from (a) a 63-bit secret
drawn from the OS entropy pool (``secrets``) each time a step is *traced*
(so every model / optimizer / worker / replica function has its own; it
lives only in that traced graph, never in configs or checkpoints), (b) the
private step count, (c) the global replica id, (d) a nonce from a stateful
random op, which advances on every execution and is not checkpointed -- so
steps re-run after restoring a checkpoint in the same process get fresh
noise -- and (e) the variable index. TensorFlow's global seed
(``keras.utils.set_random_seed``) can make (d) reproducible, but never (a).
A fixed ``noise_seed`` replaces (a) and drops (d), for reproducible tests
only -- noise derived from a known seed offers no privacy, and the optimizer
warns about it.

Distributed rule (``num_replicas = R``): each replica adds noise of std
``sigma * C / sqrt(R)`` to its *local* clipped sum; the all-reduce SUM that
Keras performs on gradients then carries noise of std exactly ``sigma * C``
(sum of R independent Gaussians), once per step, on the global clipped sum.
No replica's contribution is ever left un-noised in the result (if a
replica's streams were accidentally correlated the total std would only grow).

Normalization: the noised sum is divided by the *expected* number of records
per logical step (``q * N`` examples, or the M keyed microbatch records, each
normalised by the expected group size; ``ewtune_tf.mechanism.records``), a
data-independent constant, never by the realised batch size.
"""

import math
import secrets
from typing import Optional, Sequence

import tensorflow as tf

from ewtune_tf.mechanism import tf_privacy


def draw_secret() -> int:
    """A fresh 63-bit secret from the OS entropy pool."""
    return secrets.randbits(63)


def check_noise_multiplier(noise_multiplier) -> float:
    """Validates sigma: a finite float >= 0."""
    try:
        s = float(noise_multiplier)
    except (TypeError, ValueError):
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier!r}.") from None
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier!r}.")
    return s


def noise_stddev(l2_norm_clip: float, noise_multiplier: float, num_replicas: int = 1) -> float:
    """Per-replica noise std on the clipped sum: sigma * C / sqrt(R)."""
    if noise_multiplier == 0:
        return 0.0  # Also covers C = inf with sigma = 0 (0 * inf is NaN).
    if not math.isfinite(l2_norm_clip):
        raise ValueError("l2_norm_clip=inf with noise_multiplier > 0 gives infinite noise; use a finite l2_norm_clip.")
    return noise_multiplier * l2_norm_clip / math.sqrt(num_replicas)


class SeededGaussianSumQuery(tf_privacy.GaussianSumQuery):
    """GaussianSumQuery whose noise comes from an explicit stateless seed.

    ``seed`` is an int64 tensor of shape [2]; tensor ``i`` of the structure
    gets ``fold_in(seed, i)``. Clipping and the DP event are the parent's.
    """

    def __init__(self, l2_norm_clip, stddev, seed):
        super().__init__(l2_norm_clip, stddev)
        self._seed = seed

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        stddev = tf.cast(global_state.stddev, tf.float32)
        noised = []
        for i, v in enumerate(flat):
            seed_i = tf.random.experimental.stateless_fold_in(self._seed, i)
            z = tf.random.stateless_normal(tf.shape(v), seed=seed_i, dtype=tf.float32)
            noised.append(tf.cast(v, tf.float32) + stddev * z)
        result = tf.nest.pack_sequence_as(sample_state, noised)
        # Accounting is done by ewtune_tf.accounting from the optimizer's
        # privacy state (sigma, q, steps), not from DpEvents; a per-replica
        # query's event (sigma / sqrt(R)) would mislead, so we return none.
        from dp_accounting import dp_event

        event = dp_event.UnsupportedDpEvent()
        return result, global_state, event


def make_seed(step, replica_id, noise_seed: Optional[int] = None) -> tf.Tensor:
    """int64[2] stateless seed for one step's noise (see module docstring).

    Call it while tracing the step: with ``noise_seed=None`` every call draws
    a new secret and adds a stateful nonce op to the graph.
    """
    base = draw_secret() if noise_seed is None else int(noise_seed)
    seed = tf.constant([base & 0x7FFFFFFFFFFFFFFF, 0x5EED], dtype=tf.int64)
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(step, tf.int64))
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))
    if noise_seed is None:
        nonce = tf.random.uniform([], maxval=2**62, dtype=tf.int64)
        seed = tf.random.experimental.stateless_fold_in(seed, nonce)
    return seed


def add_gaussian_noise(
    clipped_sum: Sequence[tf.Tensor],
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    seed: tf.Tensor,
    num_replicas: int = 1,
) -> list:
    """Adds N(0, (sigma*C)^2 / R) to each tensor of the local clipped sum.

    Goes through the DPQuery protocol: the sum is accumulated as one
    preprocessed record into an empty sample state, then noised.
    """
    stddev = noise_stddev(float(l2_norm_clip), float(noise_multiplier), num_replicas)
    clip_for_query = float(l2_norm_clip) if math.isfinite(l2_norm_clip) else 3.0e38
    query = SeededGaussianSumQuery(clip_for_query, stddev, seed)
    template = [tf.cast(g, tf.float32) for g in clipped_sum]
    global_state = query.initial_global_state()
    sample_state = query.initial_sample_state(template)
    sample_state = query.accumulate_preprocessed_record(sample_state, template)
    result, _, _ = query.get_noised_result(sample_state, global_state)
    return list(result)


def normalize(noised_sum: Sequence[tf.Tensor], expected_records: float) -> list:
    """Divides by the expected number of records per logical step (a constant)."""
    if not (expected_records > 0 and math.isfinite(expected_records)):
        raise ValueError(f"expected batch size must be a finite number > 0; got {expected_records!r}.")
    inv = tf.constant(1.0 / expected_records, tf.float32)
    return [g * inv for g in noised_sum]


# ---------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021) through QuantileAdaptiveClipSumQuery.
#
# Each step releases two Gaussian queries on the same Poisson batch: the
# clipped sum (noise multiplier sigma_sum) and the count of records whose
# norm is <= the current clip, centered by -1/2 per record (sensitivity 1/2,
# noise std clipped_count_stddev = sigma_b, i.e. noise multiplier 2 sigma_b).
# Together they are one Gaussian mechanism with
#     sigma_eff = (sigma_sum^-2 + (2 sigma_b)^-2)^(-1/2),
# so we take the accountant's sigma as sigma_eff and solve for sigma_sum:
# the epsilon reported for sigma stays exactly right.


def adaptive_sum_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """sigma_sum such that the sum + count queries compose to sigma."""
    s, b = float(noise_multiplier), float(clipped_count_stddev)
    if s == 0:
        return 0.0
    if not 2 * b > s:
        raise ValueError(
            f"clipped_count_stddev must be > noise_multiplier / 2 = {s / 2:.4g} for adaptive "
            f"clipping (the count query would use more than the whole budget); got {b}."
        )
    return (s**-2 - (2 * b) ** -2) ** -0.5


class SeededQuantileAdaptiveClipSumQuery(tf_privacy.QuantileAdaptiveClipSumQuery):
    """QuantileAdaptiveClipSumQuery with both Gaussian noises from stateless
    seeds (see module docstring: noise must not follow TF's global seed)."""

    def __init__(self, *args, seed, **kwargs):
        """``QuantileAdaptiveClipSumQuery``'s arguments (``initial_l2_norm_clip,
        noise_multiplier, target_unclipped_quantile, learning_rate,
        clipped_count_stddev, expected_num_records``), geometric updates, and
        the stateless ``seed``."""
        super().__init__(*args, geometric_update=True, **kwargs)
        try:
            below = self._quantile_estimator_query._below_estimate_query
            old = below._numerator
            below._numerator = SeededGaussianSumQuery(
                old._l2_norm_clip, old._stddev, tf.random.experimental.stateless_fold_in(seed, 1)
            )
            old_sum = self._sum_query
            self._sum_query = SeededGaussianSumQuery(
                old_sum._l2_norm_clip, old_sum._stddev, tf.random.experimental.stateless_fold_in(seed, 0)
            )
        except AttributeError as e:  # pragma: no cover - other TF Privacy versions
            raise ValueError(
                "adaptive clipping needs tensorflow-privacy 0.9.x (QuantileAdaptiveClipSumQuery "
                f"internals changed: {e})."
            ) from e


def add_gaussian_noise_adaptive(
    clipped_sum: Sequence[tf.Tensor],
    centered_unclipped_count: tf.Tensor,
    *,
    l2_norm_clip: tf.Tensor,
    noise_multiplier: float,
    clipped_count_stddev: float,
    target_unclipped_quantile: float,
    learning_rate: float,
    expected_records: float,
    seed: tf.Tensor,
):
    """Noised sum and the next clip norm (single replica).

    ``centered_unclipped_count`` is sum over real records of
    (1[norm <= clip] - 1/2). Returns (noised_sum list, new_clip tensor).
    """
    sigma_sum = adaptive_sum_noise_multiplier(noise_multiplier, clipped_count_stddev)
    query = SeededQuantileAdaptiveClipSumQuery(
        tf.cast(l2_norm_clip, tf.float32),
        sigma_sum,
        target_unclipped_quantile,
        learning_rate,
        clipped_count_stddev,
        expected_records,
        seed=seed,
    )
    template = [tf.cast(g, tf.float32) for g in clipped_sum]
    global_state = query.initial_global_state()
    sample_state = query.initial_sample_state(template)
    record = query._SampleState(template, tf.cast(centered_unclipped_count, tf.float32))
    sample_state = query.accumulate_preprocessed_record(sample_state, record)
    result, new_state, _ = query.get_noised_result(sample_state, global_state)
    return list(result), new_state.sum_state.l2_norm_clip
