"""Poisson-sampled logical batches from a finite ``tf.data`` dataset.

At every step each of the N examples is included independently with
probability q, so the batch size is Binomial(N, q) -- the sampling the
accountant assumes. Elements are ``(x, y, sample_weight)``; an input
``sample_weight`` is kept, otherwise it is 1 for real rows. With
``example_keys=True`` the sample-weight slot is a
``KeyedSampleWeight(sample_weight, example_key)``: a key drawn once per
example, independently of the data, that keyed microbatch records
(``num_microbatches``, see ``ewtune_tf.mechanism.records``) group by.

Exactly q: the inclusion test compares a uniform random binary fraction with
q's exact binary expansion, word by word (32-bit words; a float64 q has a
finite expansion: two words for q >= 2**-11, three for q >= 2**-43), so each
example is included with probability exactly q. (A float32 uniform compared with q
includes with probability ceil(q * 2**23) / 2**23 >= q: 19 % more than
q = 3e-7, an under-reported epsilon.)

Static shapes (XLA/TPU): with ``max_batch_size`` set (an int, or "auto"),
every batch is padded with zero rows of weight 0 to exactly
``max_batch_size`` rows; the private step gives weight-0 rows a loss and a
gradient of exactly 0 and skips trailing all-padding chunks. A Poisson batch
larger than ``max_batch_size`` is an *overflow*:

* ``overflow="error"`` (default): the pipeline raises InvalidArgumentError
  for that step, before the batch reaches the model. Nothing is released,
  so the mechanism is unchanged; "auto" chooses the smallest size whose
  overflow probability over the whole run is <= ``overflow_tolerance``
  (Binomial tail, union bound over steps), reported as
  ``overflow_probability_bound``. That probability should be counted into
  delta (it is tiny by construction: 1e-9 by default).
* ``overflow="truncate"``: keep a uniformly random subset of
  ``max_batch_size`` of the sampled rows and count the event in
  ``overflow_count``. Truncation *changes the mechanism* (adding one example
  can evict another, so the add/remove sensitivity is no longer C); the
  epsilon reported assumes no truncation. Avoid unless overflow_count stays 0.

Secrecy: Poisson subsampling amplifies privacy only if the batch membership
is unknown to the adversary. With ``seed=None`` (default) the sampling seed
is drawn from the OS entropy pool (``secrets``), not from TensorFlow's
global seed (which ``keras.utils.set_random_seed`` makes public). A fixed
``seed`` is for tests; a warning says so. Each pass over the dataset
(``fit`` epoch) draws fresh batches.

The dataset is materialized in memory once (features must have a fixed shape
per example: pad/tokenize first), so that each step can gather its subset.
"""

import dataclasses
import fractions
import math
import secrets
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

# The one epochs -> steps rule lives with the accountant; the sampler runs it.
from ewtune_tf.accounting.calibration import steps_per_epoch
from ewtune_tf.mechanism import records as records_lib
from ewtune_tf.privacy import report as report_lib

OVERFLOW_MODES = ("error", "truncate")


def auto_max_batch_size(
    num_examples: int, sampling_probability: float, total_steps: int, overflow_tolerance: float = 1e-9
) -> int:
    """Smallest M with total_steps * P[Binomial(N, q) > M] <= overflow_tolerance."""
    return report_lib.smallest_max_batch_size(num_examples, sampling_probability, total_steps, overflow_tolerance)


def overflow_probability_bound(
    num_examples: int, sampling_probability: float, total_steps: int, max_batch_size: int
) -> float:
    """Union bound on P[some step's Poisson batch exceeds max_batch_size]."""
    return report_lib.overflow_probability(num_examples, sampling_probability, total_steps, max_batch_size)


def _materialize(dataset: tf.data.Dataset):
    card = int(dataset.cardinality().numpy())
    if card == tf.data.INFINITE_CARDINALITY:
        raise ValueError("dataset: Poisson sampling needs a finite dataset; got an infinite one.")
    if card == tf.data.UNKNOWN_CARDINALITY:
        card = int(dataset.reduce(0, lambda c, _: c + 1).numpy())
    if card < 1:
        raise ValueError("dataset: Poisson sampling needs at least one example; got 0.")
    spec = dataset.element_spec
    for s in tf.nest.flatten(spec):
        if not isinstance(s, tf.TensorSpec) or not s.shape.is_fully_defined():
            raise ValueError(
                "dataset: every feature must be a dense tensor with a fixed shape per "
                f"example (pad or tokenize to a fixed length first); got {s}."
            )
    tensors = dataset.batch(card).get_single_element()
    return card, tensors


def _split(element):
    if isinstance(element, tuple):
        if len(element) == 2:
            return element[0], element[1], None
        if len(element) == 3:
            return element
        if len(element) == 1:
            return element[0], None, None
    return element, None, None


_WORD_BITS = 32


def inclusion_thresholds(sampling_probability: float) -> Tuple[int, ...]:
    """q's binary expansion in 32-bit words: ``q = sum_j T_j 2**(-32 (j+1))``.

    Exact: a float64 q in (0, 1) is a dyadic rational. ``q = 1`` (include
    every example) has no such expansion and is refused here.
    """
    frac = fractions.Fraction(float(sampling_probability))
    if not 0 < frac < 1:
        raise ValueError(f"sampling_probability must be in (0, 1) here; got {sampling_probability!r}.")
    bits = frac.denominator.bit_length() - 1  # the denominator is 2**bits
    words = max(1, -(-bits // _WORD_BITS))
    scaled = int(frac * 2 ** (_WORD_BITS * words))  # an integer, exactly
    mask = 2**_WORD_BITS - 1
    return tuple((scaled >> (_WORD_BITS * (words - 1 - j))) & mask for j in range(words))


def below_thresholds(words: tf.Tensor, thresholds: Tuple[int, ...]) -> tf.Tensor:
    """Lexicographic ``words[:, i] < thresholds`` for each column i.

    ``words`` is ``[len(thresholds), n]`` of integers in [0, 2**32): the
    leading binary digits of a uniform number U in [0, 1) per example. U < q
    iff at the first word where they differ, U's is smaller; when all words
    equal, U >= q (q's expansion has ended, U's has not).
    """
    t = tf.constant(thresholds, tf.int64)[:, None]
    words = tf.cast(words, tf.int64)
    prefix_equal = tf.math.cumprod(tf.cast(tf.equal(words, t), tf.int32), axis=0, exclusive=True)
    return tf.reduce_any(tf.logical_and(words < t, prefix_equal > 0), axis=0)


def inclusion_mask(sampling_probability: float, n: int, seed: tf.Tensor) -> tf.Tensor:
    """[n] bool, each True with probability exactly q (stateless in ``seed``)."""
    if sampling_probability >= 1.0:
        return tf.ones([n], tf.bool)
    thresholds = inclusion_thresholds(sampling_probability)
    words = tf.random.stateless_uniform([len(thresholds), n], seed=seed, minval=None, maxval=None, dtype=tf.uint32)
    return below_thresholds(words, thresholds)


@dataclasses.dataclass
class PoissonBatches:
    """A Poisson-sampled dataset and the facts its privacy report needs."""

    dataset: tf.data.Dataset
    num_examples: int
    sampling_probability: float
    steps_per_epoch: int
    max_batch_size: Optional[int]
    overflow: str
    overflow_probability_bound: float
    overflow_count: Optional[tf.Variable]
    seeded: bool
    example_keys: bool = False

    def report(self) -> Dict[str, Any]:
        return {
            "sampling": "poisson",
            "num_examples": self.num_examples,
            "sampling_probability": self.sampling_probability,
            "expected_batch_size": self.sampling_probability * self.num_examples,
            "steps_per_epoch": self.steps_per_epoch,
            "max_batch_size": self.max_batch_size,
            "overflow": self.overflow,
            "overflow_probability_bound": self.overflow_probability_bound,
            "overflow_count": None if self.overflow_count is None else int(self.overflow_count.numpy()),
            "fixed_seed": self.seeded,
            "example_keys": self.example_keys,
        }


class _Sampler:
    """``(step, rnd) -> (x, y, w)`` of one Poisson batch (a tf.data map fn)."""

    def __init__(self, tensors, n: int, q: float, max_batch_size: Optional[int], overflow: str, keys):
        self.x, self.y, w = _split(tensors)
        self.w = tf.ones([n], tf.float32) if w is None else tf.cast(w, tf.float32)
        self.n, self.q, self.m, self.overflow, self.keys = n, q, max_batch_size, overflow, keys
        truncating = max_batch_size is not None and overflow == "truncate"
        self.counter = tf.Variable(0, dtype=tf.int64, trainable=False) if truncating else None

    def _indices(self, seed):
        idx = tf.cast(tf.where(inclusion_mask(self.q, self.n, seed))[:, 0], tf.int32)
        if self.m is None:
            return idx
        m, count = self.m, tf.size(idx)
        if self.overflow == "error":
            tf.debugging.assert_less_equal(
                count,
                m,
                message=f"Poisson batch overflow: a sampled batch exceeds max_batch_size={m}; "
                "raise max_batch_size (or use 'auto').",
            )
            return idx
        over = count > m
        self.counter.assign_add(tf.cast(over, tf.int64))
        perm = tf.random.experimental.stateless_shuffle(idx, seed=tf.random.experimental.stateless_fold_in(seed, 1))
        return tf.cond(over, lambda: tf.sort(perm[:m]), lambda: idx)

    def __call__(self, step, rnd):
        idx = self._indices(tf.stack([rnd, tf.cast(step, tf.int64)]))
        k = tf.size(idx)

        def take(t):
            g = tf.gather(t, idx)
            if self.m is None:
                return g
            g = tf.pad(g, [[0, self.m - k]] + [[0, 0]] * (t.shape.rank - 1))
            g.set_shape([self.m] + t.shape[1:].as_list())
            return g

        x, w = tf.nest.map_structure(take, self.x), take(self.w)
        if self.keys is not None:
            w = records_lib.KeyedSampleWeight(w, take(self.keys))
        if self.y is None:
            return x, w  # unsupervised: (x, sample_weight) is ambiguous; Keras reads w as y
        return x, tf.nest.map_structure(take, self.y), w


def poisson_batches(
    dataset: tf.data.Dataset,
    sampling_probability: Optional[float] = None,
    *,
    expected_batch_size: Optional[float] = None,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    max_batch_size: Union[None, int, str] = None,
    overflow: str = "error",
    overflow_tolerance: float = 1e-9,
    seed: Optional[int] = None,
    example_keys: bool = False,
) -> PoissonBatches:
    """Turns a finite dataset into Poisson-sampled logical batches.

    Args:
      dataset: finite dataset of ``x``, ``(x, y)`` or ``(x, y, w)`` examples.
      sampling_probability: q in (0, 1]; or give ``expected_batch_size``
        (q = expected_batch_size / N).
      steps: logical steps per pass (fit epoch); default floor(1 / q)
        (``ewtune_tf.accounting.steps_per_epoch``).
      epochs: planned passes (only used for the overflow bound; default 1).
      max_batch_size: None (variable-size batches, no padding), an int in
        [1, N], or "auto" (see module docstring).
      overflow: "error" or "truncate" (see module docstring).
      overflow_tolerance: in (0, 1); target overflow probability for "auto".
      seed: None (secret OS entropy; use this for real training) or an int.
      example_keys: also yield a random per-example key (drawn once, int64),
        as ``KeyedSampleWeight(sample_weight, example_key)``; needed by
        keyed microbatch records (``num_microbatches`` on the optimizer).
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"dataset must be a tf.data.Dataset; got {type(dataset).__name__}.")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}; got {overflow!r}.")
    if not (isinstance(overflow_tolerance, float) and 0 < overflow_tolerance < 1):
        raise ValueError(f"overflow_tolerance must be a float in (0, 1); got {overflow_tolerance!r}.")
    if not isinstance(example_keys, bool):
        raise ValueError(f"example_keys must be True or False; got {example_keys!r}.")
    n, tensors = _materialize(dataset)
    q = _resolve_q(n, sampling_probability, expected_batch_size)
    steps, total_steps = _resolve_steps(q, steps, epochs)
    max_batch_size = _resolve_max_batch_size(max_batch_size, n, q, total_steps, overflow_tolerance)
    bound = 0.0 if max_batch_size is None else overflow_probability_bound(n, q, total_steps, max_batch_size)
    base_seed = _base_seed(seed)
    if example_keys and _split(tensors)[1] is None:
        raise ValueError("example_keys=True needs (x, y) or (x, y, w) examples (labels); got x only.")
    # Keys need no secrecy (any key fixed per example bounds the sensitivity);
    # they are drawn from the same seed for reproducible tests.
    keys = np.random.default_rng(base_seed).integers(0, 2**62, size=n, dtype=np.int64) if example_keys else None
    sampler = _Sampler(tensors, n, q, max_batch_size, overflow, None if keys is None else tf.constant(keys))
    rnd = tf.data.Dataset.random(seed=base_seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((tf.data.Dataset.range(steps), rnd)).map(sampler).prefetch(2)
    return PoissonBatches(
        dataset=ds,
        num_examples=n,
        sampling_probability=q,
        steps_per_epoch=steps,
        max_batch_size=max_batch_size,
        overflow=overflow,
        overflow_probability_bound=bound,
        overflow_count=sampler.counter,
        seeded=seed is not None,
        example_keys=example_keys,
    )


def _resolve_q(n: int, sampling_probability, expected_batch_size) -> float:
    if (sampling_probability is None) == (expected_batch_size is None):
        raise ValueError("Give exactly one of sampling_probability in (0, 1] or expected_batch_size in (0, N].")
    if expected_batch_size is not None:
        if not (isinstance(expected_batch_size, (int, float)) and 0 < expected_batch_size <= n):
            raise ValueError(
                f"expected_batch_size must be in (0, {n}] (the dataset size); got {expected_batch_size!r}."
            )
        sampling_probability = float(expected_batch_size) / n
    q = sampling_probability
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0 < q <= 1):
        raise ValueError(f"sampling_probability must be in (0, 1]; got {q!r}.")
    return float(q)


def _resolve_steps(q: float, steps, epochs) -> Tuple[int, int]:
    """(steps per pass, planned total steps)."""
    if steps is None:
        steps = steps_per_epoch(q)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}.")
    if epochs is None:
        epochs = 1
    if not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ValueError(f"epochs must be > 0; got {epochs!r}.")
    return steps, int(math.ceil(steps * epochs))


def _resolve_max_batch_size(max_batch_size, n: int, q: float, total_steps: int, tolerance: float) -> Optional[int]:
    if max_batch_size == "auto":
        return auto_max_batch_size(n, q, total_steps, tolerance)
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= n
    ):
        raise ValueError(f"max_batch_size must be None, 'auto' or an integer in [1, {n}]; got {max_batch_size!r}.")
    return max_batch_size


def _base_seed(seed: Optional[int]) -> int:
    if seed is None:
        return secrets.randbits(62)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be None or an integer; got {seed!r}.")
    warnings.warn(
        "poisson_batches(seed=...): batch membership is reproducible from a known "
        "seed; privacy amplification by sampling assumes it is secret. Tests only.",
        stacklevel=3,
    )
    return seed


def shuffled_batches(
    dataset: tf.data.Dataset, batch_size: int, *, seed: Optional[int] = None, drop_remainder: bool = True
) -> tf.data.Dataset:
    """Shuffled fixed-size batches (NOT what the accountant assumes).

    Construct the optimizer with ``sampling="shuffle"`` so the privacy state
    and report record it; the epsilon reported is that of Poisson sampling
    with q = batch_size / N, which is not a proven bound for shuffling.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    warnings.warn(
        "shuffled_batches: the accountant assumes Poisson sampling; epsilon for "
        "shuffled fixed-size batches is reported under that assumption. Pass "
        "sampling='shuffle' to the optimizer so it is recorded.",
        stacklevel=2,
    )
    card = int(dataset.cardinality().numpy())
    buffer = card if card > 0 else 10000
    ds = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)

    def add_weight(*e):
        x, y, w = _split(e if len(e) > 1 else e[0])
        w = tf.ones([], tf.float32) if w is None else tf.cast(w, tf.float32)
        return (x, y, w) if y is not None else (x, w)

    return ds.map(add_weight).batch(batch_size, drop_remainder=drop_remainder)
