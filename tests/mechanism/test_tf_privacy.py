"""The TF Privacy shim imports under TF >= 2.16 and exposes the DPQuery pieces."""

import subprocess
import sys


def test_shim_imports_dp_queries_without_tensorflow_estimator():
    code = (
        "import sys\n"
        "from ewtune_tf.mechanism import tf_privacy\n"
        "assert sys.skip_tf_privacy_import is True\n"
        "assert 'tensorflow_estimator' not in sys.modules\n"
        "q = tf_privacy.GaussianSumQuery(l2_norm_clip=1.0, stddev=0.5)\n"
        "assert isinstance(q, tf_privacy.DPQuery)\n"
        "assert issubclass(tf_privacy.QuantileAdaptiveClipSumQuery, tf_privacy.DPQuery)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
