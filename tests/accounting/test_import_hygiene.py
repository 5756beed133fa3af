"""`import ewtune_tf.accounting` (and its CLI) must not import TensorFlow."""

import os
import subprocess
import sys

_CODE = """
import sys
import ewtune_tf.accounting
import ewtune_tf.accounting.cli
import ewtune_tf.accounting.paper
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in ('tensorflow', 'keras', 'tensorflow_privacy', 'torch'))
print(','.join(bad))
"""


def test_no_tensorflow_import():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=120, check=True, cwd=root
    )
    assert out.stdout.strip() == "", f"accounting imported: {out.stdout.strip()}"
