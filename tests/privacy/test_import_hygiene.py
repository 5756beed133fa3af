"""The privacy plan/report, the recipe's config and the TFX config and gate import no TensorFlow.

TFX pipeline definitions and the privacy gate import them; they must stay cheap.
"""

import os
import subprocess
import sys

_CODE = """
import sys
import ewtune_tf.privacy, ewtune_tf.utils.checks, ewtune_tf.utils.files, ewtune_tf.utils.versions
for name in ("ewtune_tf.recipe.config", "ewtune_tf.tfx.config", "ewtune_tf.tfx.gate"):
    try:
        __import__(name)
    except ModuleNotFoundError as e:
        if not name.startswith(e.name):
            raise
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub', 'tensorflow_privacy'))
print(','.join(bad))
"""


def test_no_tensorflow_import():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=120, check=True, cwd=root
    )
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
