"""The one place that imports TensorFlow Privacy.

TensorFlow Privacy 0.9.0's top-level ``__init__`` imports ``tensorflow_estimator``
(and its Keras-2-only optimizers), which fails under TensorFlow >= 2.16. The
package honours ``sys.skip_tf_privacy_import``: when it is set, the top-level
import is skipped and submodules can be imported directly. We set it here, once,
and re-export only the DPQuery pieces this project uses, so that no other module
needs to know about the workaround.
"""

import sys

# Must be set before the first `import tensorflow_privacy...` anywhere in the
# process; importing this module first is how the rest of the package does it.
sys.skip_tf_privacy_import = True

from tensorflow_privacy.privacy.dp_query import (  # noqa: E402
    dp_query,
    gaussian_query,
    quantile_adaptive_clip_sum_query,
)

DPQuery = dp_query.DPQuery
SumAggregationDPQuery = dp_query.SumAggregationDPQuery
GaussianSumQuery = gaussian_query.GaussianSumQuery
QuantileAdaptiveClipSumQuery = quantile_adaptive_clip_sum_query.QuantileAdaptiveClipSumQuery

__all__ = [
    "DPQuery",
    "SumAggregationDPQuery",
    "GaussianSumQuery",
    "QuantileAdaptiveClipSumQuery",
]
