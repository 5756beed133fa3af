"""The privacy report schema: built by PrivacyPlan.report, certified only when certified."""

import json
import math
import pathlib
import re

import pytest

from ewtune_tf.privacy import FIELDS, PrivacyPlan, Release, RunFacts, certified_epsilon, report_problems
from ewtune_tf.privacy.report import history_entry

ROOT = pathlib.Path(__file__).resolve().parents[2]
Q, SIGMA, DELTA = 0.25, 1.0, 1e-3


def _plan(**changes):
    plan = PrivacyPlan(Q, 1.0, noise_multiplier=SIGMA, steps=8, num_examples=64, expected_batch_size=16, delta=DELTA)
    return plan.replace(**changes)


def _sampler(**changes):
    facts = {"sampling_probability": Q, "num_examples": 64, "max_batch_size": None, "overflow": "error"}
    facts["fixed_seed"] = False
    return {**facts, **changes}


def test_a_plain_poisson_run_is_certified_and_strict_json():
    report = _plan().report(8, RunFacts(sampler=_sampler()))
    assert report["certified"] is True and report["uncertified_because"] == []
    assert report["epsilon"] == pytest.approx(_plan().epsilon(8).epsilon)
    assert report["epsilon_estimate"] > 0 and report["delta"] == DELTA and report["delta_batch_overflow"] == 0.0
    assert report["steps"] == 8 and report["planned_steps"] == 8 and report["noise_multiplier_rule"] == "given"
    assert report["released_without_privacy"] == []
    json.dumps(report, allow_nan=False)  # strict JSON: no Infinity/NaN anywhere
    assert certified_epsilon(report) == (report["epsilon"], "")


@pytest.mark.parametrize(
    "plan_changes,facts,reason",
    [
        (dict(sampling="shuffle"), {}, "shuffled fixed-size batches"),
        ({}, dict(noise_seed_fixed=True), "fixed noise seed"),
        ({}, dict(sampler=_sampler(fixed_seed=True)), "fixed sampling seed"),
        ({}, dict(sampler=_sampler(max_batch_size=20, overflow="truncate")), "truncated"),
        (dict(certify=False), {}, "certify=False"),
    ],
)
def test_certified_means_certified(plan_changes, facts, reason):
    """Issue 13.7: shuffling, fixed seeds and truncated batches are not certified."""
    report = _plan(**plan_changes).report(8, RunFacts(**facts))
    assert report["certified"] is False
    assert any(reason in r for r in report["uncertified_because"]), report["uncertified_because"]
    eps, why = certified_epsilon(report)
    assert eps is None and reason in why


def test_bounded_batches_add_the_overflow_probability_to_delta():
    report = _plan().report(8, RunFacts(sampler=_sampler(max_batch_size=36, overflow="error")))
    extra = report["delta_batch_overflow"]
    assert report["certified"] and 0 < extra < 1e-4
    assert report["delta"] == pytest.approx(DELTA + extra)
    # (1 + e^eps) times the union bound, for the neighbour with one more record.
    from scipy import stats

    p = 8 * stats.binom.sf(36, 65, Q)
    assert extra == pytest.approx((1 + math.exp(report["epsilon"])) * p)


def test_non_private_and_untrained_reports():
    report = _plan(noise_multiplier=0.0).report(3)
    assert report["private"] is False and report["certified"] is False and report["epsilon"] is None
    assert "not private" in report["uncertified_because"][0]
    fresh = _plan().report(0)
    assert fresh["certified"] and fresh["epsilon"] == 0.0


def test_sampler_at_another_q_is_refused():
    with pytest.raises(ValueError, match="sampling_probability"):
        _plan().report(8, RunFacts(sampler=_sampler(sampling_probability=0.125)))


def test_releases_history_and_provenance_are_carried():
    release = Release("train_loss", ("metrics.json",), "mean loss on the private batches")
    history = (history_entry(0, 4, _plan().epsilon(4)),)
    report = _plan().report(8, RunFacts(released_without_privacy=(release,), epsilon_history=history, run={"t": 1}))
    assert report["released_without_privacy"] == [release.to_dict()]
    assert report["epsilon_history"][0]["steps"] == 4 and report["run"] == {"t": 1}


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda r: r.pop("epsilon"), "missing field 'epsilon'"),
        (lambda r: r.update(extra=1), "unknown field 'extra'"),
        (lambda r: r.update(certified="yes"), "'certified' has type str"),
        (lambda r: r.update(schema_version=0), "schema_version 1"),
        (lambda r: r.update(uncertified_because=["x"]), "certified must be true exactly when"),
        (lambda r: r.update(epsilon=None), "finite epsilon"),
    ],
)
def test_invalid_reports_are_not_certified(mutate, needle):
    report = _plan().report(8)
    mutate(report)
    assert any(needle in p for p in report_problems(report)), report_problems(report)
    assert certified_epsilon(report)[0] is None


def test_every_field_is_documented_in_docs_privacy_md():
    """The schema is documented field by field; the table and FIELDS agree."""
    text = (ROOT / "docs" / "privacy.md").read_text()
    section = text[text.index("## The privacy report") :]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M))
    assert documented == set(FIELDS), (set(FIELDS) - documented, documented - set(FIELDS))
