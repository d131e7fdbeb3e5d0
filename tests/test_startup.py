"""Start-up: `l0calib --help` and `--version` answer without importing torch, pandas or
scipy (lazy imports in l0calib/__init__.py and cli/main.py). Checked by what is imported,
not by timing."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "scipy", "numpy", "pyarrow")

CODE = """
import sys
from l0calib_cli import run
sys.argv = ["l0calib", *{args!r}]
try:
    run()
except SystemExit:
    pass
print("HEAVY", [m for m in {heavy!r} if m in sys.modules])
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["reweight", "--help"]])
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(args=args, heavy=HEAVY)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "l0calib" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_import_l0calib_is_light() -> None:
    # A fresh interpreter: importing the package (and the solver's submodule, which shares
    # its name with the public function) loads no torch and leaves `refit` unbound.
    code = (
        "import sys, l0calib, l0calib.refit; "
        "print('torch' in sys.modules, type(vars(l0calib).get('refit')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "NoneType"]


def test_public_names_are_the_functions_not_the_submodules() -> None:
    import importlib

    import l0calib

    importlib.import_module("l0calib.refit")
    importlib.import_module("l0calib.calibrate")
    assert callable(l0calib.refit)
    assert l0calib.refit.__module__ == "l0calib.calibrate"
    assert l0calib.calibrate.__module__ == "l0calib.calibrate"
