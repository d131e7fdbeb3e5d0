"""What the command line shows around a fit: phases on stderr, help that renders, the
report files' tolerance columns, and `select`'s option names."""

from __future__ import annotations

import itertools
import json
import re
import webbrowser
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


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("open")
    result = runner.invoke(app, [
        "reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"), "--persons",
        str(TINY / "persons.csv"), "--epochs", "5", "-o", str(d / "o.csv"), "--quiet",
    ])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    return d / "o_report"


def _browser(monkeypatch: pytest.MonkeyPatch, answer: bool | Exception) -> list[str]:
    asked: list[str] = []

    def fake_open(url: str, *args: object, **kwargs: object) -> bool:
        asked.append(url)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(webbrowser, "open", fake_open)
    return asked


def test_report_open_says_what_it_opened(
    tiny_report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _browser(monkeypatch, True)
    result = runner.invoke(app, ["report", str(tiny_report), "--open"])
    assert result.exit_code == 0, result.output
    uri = (tiny_report / "report.html").resolve().as_uri()
    assert asked == [uri]
    assert f"opened {uri} in the web browser" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("answer", [False, webbrowser.Error("could not locate runnable browser")])
def test_report_open_without_a_browser_says_where_the_page_is(
    tiny_report: Path, monkeypatch: pytest.MonkeyPatch, answer: bool | Exception
) -> None:
    """A server without a display: no browser starts (webbrowser.open answers False, or
    raises). The page was written, so exit 0, and the message says where it is."""
    _browser(monkeypatch, answer)
    result = runner.invoke(app, ["report", str(tiny_report), "--open"])
    assert result.exit_code == 0, result.output
    page = (tiny_report / "report.html").resolve()
    assert result.stderr == (
        f"Warning: could not open a web browser here; the report is at {page}\n"
    )
    assert "opened" not in result.stdout


def _description(help_text: str) -> list[list[str]]:
    """The paragraphs of a command's description in its rendered help: the lines between
    the usage line and the first panel, split at blank lines."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:end]:
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", ["reweight", "check", "calibrate", "select", "report"])
def test_help_paragraphs_wrap_to_the_terminal(command: str, width: int) -> None:
    """Docstrings are hard-wrapped in the source; the help joins each paragraph's lines so
    the terminal wraps them once: every line but a paragraph's last is as full as the
    next word allows (a line ending early, the rest of a source line on the next, is the
    ragged help this pins against)."""
    out = CliRunner(env={"COLUMNS": str(width)}).invoke(app, [command, "--help"]).output
    paragraphs = _description(out)
    assert len(paragraphs) >= 2, out  # the summary and at least one paragraph
    for paragraph in paragraphs:
        for line, following in itertools.pairwise(paragraph):
            next_word = following.split()[0]
            assert len(line) + 1 + len(next_word) > width - 2, (line, following)


def test_help_keeps_list_items_and_paragraph_breaks() -> None:
    from l0calib_cli.main import _paragraphs

    doc = """Summary line that
    goes on.

    A paragraph wrapped
    in the source:

    - an item that
      continues
    - another item
    1. a numbered one
    """
    assert _paragraphs(doc) == (
        "Summary line that goes on.\n\nA paragraph wrapped in the source:\n\n"
        "- an item that continues\n- another item\n1. a numbered one"
    )


def test_the_page_counts_the_records_exchanged(tmp_path: Path, tiny_report: Path) -> None:
    out = tmp_path / "o.csv"
    result = runner.invoke(app, [
        "reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"), "--persons",
        str(TINY / "persons.csv"), "--epochs", "20", "--target-records", "3", "--max-error",
        "100", "-o", str(out), "--quiet",
    ])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    summary = json.loads((tmp_path / "o_report" / "summary.json").read_text())
    assert isinstance(summary["exchange_swaps"], int)
    assert isinstance(summary["refit_at_floor"], int)
    page = (tmp_path / "o_report" / "report.html").read_text()
    row = "records exchanged after the refit (exchange rounds)</th><td>"
    assert f"{row}{summary['exchange_swaps']:,}</td>" in page
    # Without --target-records there is no exchange, and no such row.
    assert "records exchanged" not in (tiny_report / "report.html").read_text()
