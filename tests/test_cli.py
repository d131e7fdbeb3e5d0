"""The command line: help, version, exit codes and error messages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import l0calib
from l0calib_cli.main import app

from .conftest import ROOT

runner = CliRunner()


def _commands() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"l0calib {l0calib.__version__}"


def test_help_lists_commands_and_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in _commands():
        assert name in result.output
    assert "Exit codes" in result.output


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_and_is_documented(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    assert f"## `l0calib {command}`" in cli_doc
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    for param in click_command.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert f"`{opt}`" in cli_doc, f"{opt} of {command} missing from docs/cli.md"


def test_gate_runs_and_reports_expected_count() -> None:
    result = runner.invoke(app, ["gate", "--n", "2000", "--init-mean", "0.3", "--draws", "50"])
    assert result.exit_code == 0, result.output
    expected = re.search(r"E\[#z != 0\]\s*│\s*([\d,.]+)", result.output)
    sampled = re.search(r"sampled non-zero gates \(mean\)\s*│\s*([\d,.]+)", result.output)
    assert expected
    assert sampled
    e = float(expected.group(1).replace(",", ""))
    s = float(sampled.group(1).replace(",", ""))
    # per-draw count sd <= sqrt(2000/4) = 22.4; mean of 50 draws: sd 3.2, 5 sd tolerance
    assert abs(e - s) < 16


def test_library_error_becomes_error_line_and_exit_1() -> None:
    result = runner.invoke(app, ["gate", "--init-mean", "2"])
    assert result.exit_code == 1
    assert "Error: init_mean must be strictly between 0 and 1, got 2.0" in result.stderr
    assert "Traceback" not in result.output


def test_usage_error_exit_2() -> None:
    result = runner.invoke(app, ["gate", "--draws", "0"])
    assert result.exit_code == 2
    assert "--draws" in result.stderr
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_module_and_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "l0calib", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"l0calib {l0calib.__version__}"
    script = shutil.which("l0calib", path=str(ROOT / ".venv" / "bin")) or shutil.which("l0calib")
    if script is None:
        pytest.skip("the l0calib console script is not installed in this environment")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


def test_cli_is_not_a_bare_top_level_package(tmp_path: Path) -> None:
    """The CLI installs as ``l0calib_cli``; a bare ``cli`` package of ours must not be
    importable. Asked from a fresh interpreter in another directory, so neither the test
    runner's path nor the name of the folder the repository was cloned into (git's default
    is ``l0calib``) changes the answer."""
    probe = (
        "import importlib.util as u; s = u.find_spec('cli'); c = u.find_spec('l0calib_cli'); "
        "print(s.origin if s else ''); print(c.origin)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.splitlines()  # fmt: skip
    ours = (ROOT / "cli" / "__init__.py").resolve()
    assert out[0] == "" or Path(out[0]).resolve() != ours
    assert out[1]  # the namespaced package is importable
