"""The Trainer's ``custom_config``: the recipe's settings, validated before any I/O.

``custom_config`` keys are the TFX settings of ``ewtune_tf.recipe.FinetuneConfig``
(``ewtune_tf.recipe.config.tfx_keys()``: the same names, defaults, ranges and
help as ``ewtune-train``'s flags, minus the output locations the Trainer
decides), plus two keys that say where the Examples keep their data:
``text_feature`` (default ``sentence``) and ``label_feature`` (``label``).
Every error names the ``custom_config`` key and its allowed range. TFX hands
``run_fn`` a plain dict that travelled through ML Metadata as JSON, so the
same parse runs at DAG-build time (``trainers/tfx_pipeline.py``) and in
``run_fn``. No TensorFlow import.
"""

import dataclasses
from typing import Any, Mapping, Optional

from ewtune_tf.recipe.config import FinetuneConfig, tfx_keys
from ewtune_tf.utils import checks

# Keys of the Trainer adapter itself (not recipe settings) and their defaults.
ADAPTER_KEYS = {"text_feature": "sentence", "label_feature": "label"}


def custom_config_name(key: str) -> str:
    """How errors name a setting: ``custom_config['batch_size']``."""
    return f"custom_config[{key!r}]"


@dataclasses.dataclass(frozen=True)
class PrivateTrainerConfig:
    """A validated ``custom_config``.

    Attributes:
      finetune: the recipe settings (output locations are filled in by run_fn).
      text_feature: the Examples' text feature (one string per example).
      label_feature: the Examples' integer label feature.
    """

    finetune: FinetuneConfig
    text_feature: str = ADAPTER_KEYS["text_feature"]
    label_feature: str = ADAPTER_KEYS["label_feature"]


def allowed_keys() -> tuple:
    return tuple(tfx_keys()) + tuple(ADAPTER_KEYS)


def parse_custom_config(custom_config: Optional[Mapping[str, Any]]) -> PrivateTrainerConfig:
    """Validates a Trainer ``custom_config`` dict.

    Raises:
      ValueError: naming the offending ``custom_config`` key and its allowed
        range, for unknown keys, wrong types and out-of-range values.
    """
    config = dict(custom_config or {})
    unknown = sorted(set(config) - set(allowed_keys()))
    if unknown:
        raise ValueError(f"unknown custom_config key(s) {unknown}; allowed keys: {sorted(allowed_keys())}")
    adapter = {k: checks.check_text(custom_config_name(k), config.pop(k)) for k in ADAPTER_KEYS if k in config}
    return PrivateTrainerConfig(FinetuneConfig.from_mapping(config, custom_config_name, tfx_only=True), **adapter)
