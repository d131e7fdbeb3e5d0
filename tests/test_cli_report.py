"""What the command line shows around a fit: phases on stderr, help that renders, the
report files' tolerance columns, and `select`'s option names."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from l0calib_cli.main import app

from .conftest import FIXTURES

runner = CliRunner(env={"COLUMNS": "200"})
TINY = FIXTURES / "tiny"
SURVEY = FIXTURES / "survey_5k"


def test_phases_one_line_each_without_a_terminal(tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"), "--persons",
        str(TINY / "persons.csv"), "--target-records", "4", "--epochs", "30",
        "-o", str(tmp_path / "o.csv"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    labels = [re.match(r"^([a-z ]+): \d+\.\d s", line) for line in lines]
    assert [m.group(1) for m in labels if m] == [
        "reading", "building the matrix", "training", "selecting and refitting", "writing",
    ]  # fmt: skip
    training = next(line for line in lines if line.startswith("training:"))
    # the gated error is named for what it is
    assert "error under the gates" in training
    assert "falls with the refit" in training


def test_quiet_prints_no_phase(tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"), "--persons",
        str(TINY / "persons.csv"), "--epochs", "10", "-o", str(tmp_path / "o.csv"), "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_within_tolerance_uses_the_tolerance_that_applies(tmp_path: Path) -> None:
    base = ["reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"), "--persons",
            str(TINY / "persons.csv"), "--epochs", "40", "--quiet", "--force"]  # fmt: skip
    runner.invoke(app, [*base, "-o", str(tmp_path / "a.csv")])
    a = pd.read_csv(tmp_path / "a_report" / "targets.csv").set_index("name")
    # no --tol: only employment_income_CA has a tolerance (its own 0.01)
    assert a["tolerance"].notna().sum() == 1
    assert a.loc["employment_income_CA", "tolerance"] == pytest.approx(0.01)
    assert a["within_tolerance"].isna().sum() == 5
    runner.invoke(app, [*base, "--tol", "0.05", "-o", str(tmp_path / "b.csv")])
    b = pd.read_csv(tmp_path / "b_report" / "targets.csv").set_index("name")
    assert (b["tolerance"] == 0.05).all()  # max(--tol, own)
    expected = b["rel_error"].abs() <= 0.05 + 1e-9
    assert (b["within_tolerance"] == expected).all()
    assert b.loc["employment_income_CA", "group"] == "state"
    assert pd.isna(b.loc["children", "group"])


def test_help_renders_defaults_and_flags() -> None:
    out = runner.invoke(app, ["reweight", "--help"]).output
    assert "Usage: l0calib reweight [OPTIONS] MICRODATA TARGETS" in out
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage
    assert "<MICRODATA stem>_reweighted.parquet" in out
    assert "<output stem>_report/" in out
    assert "<bool>" not in out
    assert "NAME=PATH" in out
    gate = runner.invoke(app, ["gate", "--help"]).output
    assert "0.666" not in gate
    assert "2/3" in gate
    assert "<bool>" not in runner.invoke(app, ["--help"]).output


def test_select_takes_target_records_and_the_old_name(tmp_path: Path) -> None:
    out = runner.invoke(app, ["select", "--help"]).output
    assert "--target-records" in out
    assert "--records " not in out  # the old name is hidden
    base = ["select", str(SURVEY / "households.parquet"), "--quiet"]
    new = runner.invoke(app, [*base, "--target-records", "50", "-o", str(tmp_path / "a.csv")])
    assert new.exit_code == 0, new.output
    old = runner.invoke(app, [*base, "--records", "50", "-o", str(tmp_path / "b.csv")])
    assert old.exit_code == 0, old.output
    assert "--records is deprecated; use --target-records" in old.stderr
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    both = runner.invoke(app, [*base, "--records", "5", "--target-records", "5"])
    assert both.exit_code == 2
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2
    assert "--target-records" in missing.output
