"""`l0calib check` and the target check `reweight` runs before fitting give the same findings.

Both run one diagnosis (same conflict search, same budget) and read `--bounds` the same way:
on final / inflated initial weight ``w0 * n / K`` when `--target-records K` is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from l0calib_cli.main import app

runner = CliRunner(env={"COLUMNS": "250"})
REGIONS = 30


def _flat(text: str) -> str:
    return " ".join(text.split())


def _three_conflicts(tmp_path: Path) -> tuple[Path, Path]:
    """300 households; three families of targets (household count by region, persons by
    kind, income by zone: 30 parts each) and their totals, all computed from one weight
    vector, then each total moved 5 %: three conflicts of about 31 targets each, which
    share no target. Proving one irreducible takes at least as many LP solves as it has
    targets, so naming all three takes about 110 solves."""
    rng = np.random.default_rng(0)  # fixed seed: the records are part of the problem
    n = 300
    hh = pd.DataFrame({
        "household_id": np.arange(1, n + 1), "household_weight": rng.uniform(50, 150, n),
        "region": rng.integers(0, REGIONS, n), "kind": rng.integers(0, REGIONS, n),
        "zone": rng.integers(0, REGIONS, n), "size": rng.integers(1, 5, n),
        "income": rng.uniform(0, 1e5, n).round(),
    })  # fmt: skip
    truth = hh["household_weight"] * rng.uniform(0.8, 1.2, n)
    rows = []
    for total, column, variable, factor in (("hh", "region", "", 1.05),
                                            ("pop", "kind", "size", 0.95),
                                            ("inc", "zone", "income", 1.05)):  # fmt: skip
        x = hh[variable] if variable else pd.Series(1.0, index=hh.index)
        rows.append((f"{total}_total", float((x * truth).sum()) * factor, variable, "", total))
        for p in range(REGIONS):
            inside = hh[column] == p
            rows.append((f"{total}_{column}_{p}", float((x * truth)[inside].sum()), variable,
                         f"{column} == {p}", f"{total}_by_{column}"))  # fmt: skip
    targets = pd.DataFrame(rows, columns=["name", "value", "variable", "filter", "group"])
    data, tpath = tmp_path / "households.csv", tmp_path / "targets.csv"
    hh.to_csv(data, index=False)
    targets.to_csv(tpath, index=False)
    return data, tpath


def test_reweight_names_the_conflicts_check_names(tmp_path: Path) -> None:
    data, targets = _three_conflicts(tmp_path)
    checked = runner.invoke(app, ["check", str(data), str(targets), "--json"])
    assert checked.exit_code == 3, checked.output
    found = json.loads(checked.stdout)
    assert found["conflicts_complete"]
    conflicts = found["conflicts"]
    # The three planted conflicts, each a total with its parts.
    assert len(conflicts) == 3
    totals = sorted(next(n for n in c["targets"] if n.endswith("_total")) for c in conflicts)
    assert totals == ["hh_total", "inc_total", "pop_total"]

    result = runner.invoke(app, ["reweight", str(data), str(targets), "--epochs", "5",
                                 "-o", str(tmp_path / "out.csv")])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    said = _flat(result.output)
    for c in conflicts:
        assert f"Warning: {_flat(c['message'])}" in said
    assert "(not shown to be the smallest such set)" not in said
    assert "the conflict search stopped early" not in said
    assert said.count("cannot all hold") == 3


def _bounded(tmp_path: Path, income: float) -> tuple[Path, Path]:
    """40 households of initial weight 10; 4 of them have income 100 (initial estimate
    4,000). Keeping 20 (n / K = 2) with bounds (0.5, 2) on the inflated weight 20, the
    income target can reach at most 4 x 100 x 10 x 2 x 2 = 16,000; read on w / w0 instead,
    only 8,000."""
    n = 40
    hh = pd.DataFrame({"household_id": np.arange(1, n + 1), "household_weight": 10.0,
                       "income": np.where(np.arange(n) < 4, 100.0, 0.0)})  # fmt: skip
    targets = pd.DataFrame({"name": ["households", "income"], "value": [400.0, income],
                            "variable": ["", "income"]})  # fmt: skip
    data, tpath = tmp_path / "households.csv", tmp_path / f"targets_{income:g}.csv"
    hh.to_csv(data, index=False)
    targets.to_csv(tpath, index=False)
    return data, tpath


@pytest.mark.parametrize(("income", "reachable"), [(12_000.0, True), (40_000.0, False)])
def test_check_reads_bounds_as_reweight_does(tmp_path: Path, income: float, reachable: bool):
    data, targets = _bounded(tmp_path, income)
    options = ["--bounds", "0.5,2", "--target-records", "20"]
    checked = runner.invoke(app, ["check", str(data), str(targets), *options, "--json"])
    found = json.loads(checked.stdout)
    assert found["feasible"] is reachable
    assert checked.exit_code == (0 if reachable else 3)
    out = tmp_path / "out.csv"
    result = runner.invoke(app, ["reweight", str(data), str(targets), *options,
                                 "--epochs", "300", "-o", str(out)])  # fmt: skip
    summary = json.loads((tmp_path / "out_report" / "summary.json").read_text())
    kept = pd.read_csv(out)
    assert len(kept) == 20
    # Every kept weight within the bounds on the inflated initial weight 10 x 40 / 20.
    ratio = kept["household_weight"] / 20.0
    assert ratio.between(0.5 - 1e-6, 2 + 1e-6).all()
    if reachable:
        assert result.exit_code == 0, result.output
        assert summary["max_abs_rel_error"] < 0.01
        assert not summary["missed_targets"]
    else:
        assert result.exit_code == 3, result.output
        assert summary["missed_targets"] == ["income"]
        (conflict,) = found["conflicts"]
        assert conflict["targets"] == ["income"]
        assert "income (40,000) is above 16,000" in conflict["message"]
        assert "2 x the inflated initial weight (w0 x 40 / 20)" in conflict["message"]
        # The fit gets as close as check's least change says it can.
        assert summary["max_abs_rel_error"] == pytest.approx(found["total_rel_change"], abs=0.01)
        # and reweight's own pre-fit check says the same before fitting
        assert f"Warning: {conflict['message']}" in _flat(result.output)
