"""Regression check on the shipped fixture: the pinned figures must not get worse.

Runs `l0calib reweight` as data/fixtures/regression/regenerate.py does and compares the
report's figures with data/fixtures/regression/expected.json. The record count must match
exactly; errors may not grow by more than 10% (+1e-6, for float differences across
machines and library versions), and the effective sample size may not shrink by more than
10%. When a change is meant to move them, rerun the script and commit expected.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .conftest import FIXTURES

REGRESSION = FIXTURES / "regression"


def _load_script():
    spec = importlib.util.spec_from_file_location("regenerate", REGRESSION / "regenerate.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_pinned_figures_hold(tmp_path: Path) -> None:
    expected = json.loads((REGRESSION / "expected.json").read_text())
    got = _load_script().run(tmp_path)
    assert got["n_records_out"] == expected["n_records_out"] == 1000
    for key in ("mean_abs_rel_error", "max_abs_rel_error", "holdout_mean_abs_rel_error"):
        assert got[key] <= expected[key] * 1.10 + 1e-6, (key, got[key], expected[key])
    assert got["effective_sample_size"] >= expected["effective_sample_size"] * 0.90
