"""finetune() from Python on the fixture data: the recipe without the command line."""

import json
import pathlib
import re

import numpy as np
import pytest

from ewtune_tf.privacy import certified_epsilon
from ewtune_tf.recipe import FinetuneConfig, TextExamples, finetune, optimization

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "glue"


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    from ewtune_tf.nlp import models

    return models.save_tiny_bert_preset(str(tmp_path_factory.mktemp("tiny_bert")))


def _texts(split):
    from ewtune_tf.nlp import load_glue

    data = load_glue("sst2", split, glue_dir=str(FIXTURES))
    return TextExamples(data.texts, data.labels, ("sentence",), ("negative", "positive"), source="fixture")


def _config(tmp_path, preset, **changes) -> FinetuneConfig:
    """A tiny run on the fixture data: B = 16 of 64 examples, writing under ``tmp_path``."""
    sizes = dict(model=preset, batch_size=16, physical_batch_size=8, sequence_length=32)
    return FinetuneConfig(**sizes, output_dir=str(tmp_path / "run"), **changes)


def test_finetune_from_python_on_given_data(tmp_path, tiny_preset):
    config = _config(tmp_path, tiny_preset, epochs=1, export_dir=str(tmp_path / "saved_models"))
    result = finetune(config, _texts("train"), {"dev": _texts("dev")})
    assert result.steps == 4 and result.plan.steps == 4 and 0 <= result.dev_accuracy <= 1
    assert result.report["certified"] and certified_epsilon(result.report)[0] == result.epsilon <= 8.0
    assert result.report["run"]["data_source"] == "fixture"
    assert json.loads((tmp_path / "run" / "privacy_report.json").read_text()) == json.loads(json.dumps(result.report))
    assert pathlib.Path(result.export_path, "assets", "privacy_report.json").is_file()
    probabilities = np.asarray(result.classifier(result.classifier.preprocessor(["a good film"]), training=False))
    assert probabilities.shape == (1, 2)


def test_head_clip_groups_match_only_the_head(tiny_preset):
    from ewtune_tf.nlp import models

    classifier = models.build_classifier(tiny_preset, num_classes=2, sequence_length=16, lora_rank=2)
    ((pattern, share),) = optimization.head_clip_groups(classifier, 0.3)
    head = {v.path for v in classifier.output_dense.trainable_variables}
    matched = {v.path for v in classifier.trainable_variables if re.search(pattern, v.path)}
    assert matched == head and share == 0.3
    assert len(classifier.trainable_variables) > len(head)  # LoRA weights form the other group
    assert optimization.head_clip_groups(classifier, None) is None


def test_a_given_sigma_below_the_accountants_range_trains_with_the_trivial_bound(tmp_path, tiny_preset, capsys):
    # A near-noise-free diagnostic run (sigma 1e-6 once asked the accountant for an
    # 18 TiB grid at the first progress line): the plan says what the sigma is worth
    # before the first update, and the run reports the trivial bound epsilon = inf.
    config = _config(tmp_path, tiny_preset, max_steps=2, noise_multiplier=1e-6, no_export=True)
    result = finetune(config, _texts("train"), {"dev": _texts("dev")})
    out = capsys.readouterr().out
    plan_line = next(line for line in out.splitlines() if "sigma 1e-06 over 2 steps" in line)
    assert "certified epsilon <= inf" in plan_line and "no meaningful guarantee" in plan_line
    assert out.index(plan_line) < out.index("[train]")
    assert result.steps == 2 and result.epsilon == float("inf")
    text = (tmp_path / "run" / "privacy_report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"privacy_report.json is not strict JSON: {c}"))
    assert report["private"] and not report["certified"] and report["epsilon"] is None
    assert any("trivial epsilon = inf" in why for why in report["uncertified_because"])
    assert certified_epsilon(report)[0] is None
