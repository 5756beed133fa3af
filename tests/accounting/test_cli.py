"""Tests for ewtune_tf/accounting/cli.py (`ewtune-accountant`)."""

import json
import os
import subprocess
import sys

import pytest

from ewtune_tf.accounting import cli

SST2 = ["--sampling-probability", str(2000 / 67349), "--noise-multiplier", "0.7865", "--steps", "660"]


def _json(capsys, argv):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_epsilon_json(capsys):
    d = _json(capsys, ["epsilon", *SST2, "--delta", "1e-5", "--json"])
    assert d["certified"] is True and d["epsilon"] >= 8.2893
    assert {"method", "seconds"} <= set(d)


def test_epsilon_no_certify_edgeworth(capsys):
    d = _json(
        capsys, ["epsilon", *SST2, "--delta", "1e-5", "--method", "edgeworth", "--order", "1", "--no-certify", "--json"]
    )
    assert d["certified"] is False
    assert d["epsilon"] == pytest.approx(7.992899, abs=1e-5)


def test_delta_json(capsys):
    d = _json(capsys, ["delta", *SST2, "--epsilon", "8", "--json"])
    assert 1e-5 < d["delta"] < 1e-4 and d["certified"] is True


def test_calibrate_paper_json(capsys):
    d = _json(
        capsys,
        [
            "calibrate",
            "--target-epsilon",
            "8",
            "--delta",
            "1e-5",
            "--sampling-probability",
            str(2000 / 67349),
            "--steps",
            "660",
            "--paper",
            "--json",
        ],
    )
    assert d["noise_multiplier"] == 0.7865 and d["certified"] is False
    assert d["epsilon"] < 8


def test_human_table(capsys):
    assert cli.main(["epsilon", *SST2, "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    for word in ("edgeworth order 1", "edgeworth order 3", "tilted", "RDP", "PLD"):
        assert word in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (
            ["epsilon", "--sampling-probability", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
            "--sampling-probability",
        ),
        (
            [
                "epsilon",
                "--sampling-probability",
                "0.1",
                "--noise-multiplier",
                "-1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            ["epsilon", "--sampling-probability", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
            "--steps",
        ),
        (
            ["epsilon", "--sampling-probability", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"],
            "--delta",
        ),
        (
            ["delta", "--sampling-probability", "0.1", "--noise-multiplier", "1", "--steps", "10", "--epsilon", "-1"],
            "--epsilon",
        ),
        (["calibrate", "--target-epsilon", "8", "--delta", "1e-5", "--steps", "10"], "--sampling-probability"),
    ],
)
def test_bad_input_exits_2(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_module_entry_point_subprocess():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ewtune_tf.accounting.cli",
            "epsilon",
            *SST2,
            "--delta",
            "1e-5",
            "--no-certify",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    d = json.loads(out.stdout)
    assert d["epsilon"] == pytest.approx(8.2893, rel=1e-3)
