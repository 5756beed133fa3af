"""The TensorFlow-free modules import no TensorFlow, not even indirectly.

``import ewtune_tf.accounting`` (and the ``ewtune-accountant`` CLI), the
privacy plan and report, the helpers, the recipe's config and the TFX config
and gate are imported by TFX pipeline definitions, the privacy gate and
accounting-only users; they must stay cheap. (tests/test_layering.py checks
their direct imports; this checks what actually gets loaded.)
"""

import os
import subprocess
import sys

TF_FREE = (
    "ewtune_tf.accounting",
    "ewtune_tf.accounting.cli",
    "ewtune_tf.accounting.paper",
    "ewtune_tf.privacy",
    "ewtune_tf.utils.checks",
    "ewtune_tf.utils.files",
    "ewtune_tf.utils.versions",
    "ewtune_tf.recipe.config",
    "ewtune_tf.tfx.config",
    "ewtune_tf.tfx.gate",
)

_CODE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub', 'tensorflow_privacy', 'torch'))
print(','.join(bad))
"""


def test_no_tensorflow_import():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", _CODE, *TF_FREE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
        cwd=root,
    )
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
