"""ewtune_tf/__init__.py: `import ewtune_tf` stays cheap (no TensorFlow, no warnings, quick)."""

import subprocess
import sys
import time

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: this test process may already have imported TF.
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_ewtune_tf_loads_no_tensorflow_and_warns_nothing():
    code = (
        "import sys, ewtune_tf\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'keras_hub', 'tensorflow_privacy')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(ewtune_tf.__version__)\n"
    )
    start = time.perf_counter()
    result = _run(code)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout.strip()
    # Generous: the point is "no TensorFlow import" (which alone takes ~5-10 s).
    assert elapsed < 5.0


def test_lazy_exports_are_listed_and_unknown_names_raise():
    import ewtune_tf

    for name in ("EWTuneAdam", "EdgeworthAccountant", "make_private", "PrivacyBudget"):
        assert name in ewtune_tf.__all__
        assert name in dir(ewtune_tf)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ewtune_tf.nope  # noqa: B018
