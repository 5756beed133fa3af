"""The README's Python example runs (with a tiny model and fixture data).

The example is read from README.md itself, so the documentation cannot drift
from the API. Only sizes and data/model locations are swapped for test ones.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_compile_example():
    blocks = _readme_python_blocks()
    assert any("EWTuneAdam(" in b and "make_private(" in b for b in blocks)


def _run_example(marker: str, substitutions: dict, preset, epilogue: str) -> str:
    """Runs the README's Python block containing ``marker``, with test sizes
    and locations substituted, on a tiny preset; returns its stdout."""
    (example,) = [b for b in _readme_python_blocks() if marker in b]
    for old, new in substitutions.items():
        assert old in example, f"README example changed; update the test's substitution for {old}"
        example = example.replace(old, new)
    script = (
        "from ewtune_tf.nlp.models import save_tiny_bert_preset\n"
        f"save_tiny_bert_preset({str(preset)!r}, max_sequence_length=32)\n" + example + "\n" + epilogue
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


FIXTURE_GLUE = repr(str(ROOT / "tests" / "fixtures" / "glue"))


def test_readme_example_trains_privately(tmp_path):
    preset = tmp_path / "tiny_bert"
    substitutions = {
        '"../shared/data/glue"': FIXTURE_GLUE,
        'build_classifier("minilm"': f"build_classifier({str(preset)!r}",
        "sequence_length=64": "sequence_length=32",
        "batch, epochs = len(train), 2048, 3": "batch, epochs = len(train), 8, 1",
        "physical_batch_size=64": "physical_batch_size=4",
    }
    out = _run_example("EWTuneAdam(", substitutions, preset, "print('STEPS', int(clf.optimizer.dp_steps.numpy()))")
    assert int(re.search(r"STEPS (\d+)", out).group(1)) >= 1


def test_readme_recipe_example_runs(tmp_path):
    preset = tmp_path / "tiny_bert"
    substitutions = {
        '"../shared/data/glue"': FIXTURE_GLUE,
        'output_dir="runs/sst2",': f"output_dir={str(tmp_path / 'run')!r}, model={str(preset)!r}, batch_size=16, "
        "physical_batch_size=8, epochs=1, sequence_length=32, max_eval_examples=8,",
        'export_dir="saved_models",': f"export_dir={str(tmp_path / 'saved_models')!r},",
    }
    out = _run_example("finetune(config)", substitutions, preset, "print('CERTIFIED', result.report['certified'])")
    assert "CERTIFIED True" in out
