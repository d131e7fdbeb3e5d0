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


def test_import_l0calib_is_light_and_names_load_on_use() -> None:
    code = (
        "import sys, l0calib; light = 'torch' not in sys.modules; "
        "f = l0calib.calibrate; import l0calib.refit; "
        "print(light, 'torch' in sys.modules, callable(l0calib.refit), "
        "l0calib.refit.__module__, l0calib.calibrate.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True", "l0calib.calibrate", "l0calib.calibrate"]
