"""SavedModel export for TF Serving (raw-text and token-id signatures, the
privacy report as an asset). See ``ewtune_tf.export.saved_model``.

Loaders must ``import tensorflow_text`` before ``tf.saved_model.load``: the
in-graph KerasHub tokenizer uses TensorFlow Text ops.

Layer 6: may import layers 0-5.
"""

from ewtune_tf.export.saved_model import (
    PRIVACY_REPORT_ASSET,
    TOKEN_SIGNATURE,
    export_versioned,
    load_privacy_report,
    next_version,
    save_serving_model,
)

__all__ = [
    "PRIVACY_REPORT_ASSET",
    "TOKEN_SIGNATURE",
    "export_versioned",
    "load_privacy_report",
    "next_version",
    "save_serving_model",
]
