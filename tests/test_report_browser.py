"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package).

The fixture run's page is opened from disk and watched over the DevTools protocol
(tests/browser.py): it must make no network request, log nothing to the console, throw
nothing, draw every plot with a non-zero size, filter its table, and stay small. A page
with a deliberate console error and a remote image checks that the watching works.

Skipped, saying why, only where Chromium is not installed (``.ci/run`` installs it). Set
``L0CALIB_REPORT_SCREENSHOT=path.png`` to keep the screenshot (docs/report.png is one).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import l0calib
from l0calib.report import write_report
from l0calib_cli.main import app

from .browser import CHROMIUM, open_page
from .conftest import FIXTURES

SURVEY = FIXTURES / "survey_5k"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium; .ci/run "
    "installs it when it can)",
)
runner = CliRunner()
# Every plot a reweight report of the fixture run draws (with a holdout).
REWEIGHT_PLOTS = (
    "fit-fitted", "fit-holdout", "fit-groups", "weight-ratios", "kept-shares", "training",
)  # fmt: skip
PLOTS_JS = """Array.from(document.querySelectorAll('figure.plot')).map(function (f) {
  var svg = f.querySelector('svg'), box = svg ? svg.getBoundingClientRect() : null;
  return {id: f.id, width: box ? box.width : 0, height: box ? box.height : 0,
          marks: svg ? svg.querySelectorAll('path, use').length : 0};
})"""
FILTER_JS = """(function () {
  var box = document.getElementById('filter');
  box.value = 'holdout';
  box.dispatchEvent(new Event('input'));
  var rows = Array.from(document.querySelectorAll('#targets tbody tr'));
  var shown = rows.filter(function (r) { return r.style.display !== 'none'; }).length;
  return {rows: rows.length, shown: shown,
          counter: Number(document.getElementById('shown').textContent)};
})()"""
EXTERNAL_JS = """Array.from(document.querySelectorAll('[src], link[href]')).length"""


@pytest.fixture(scope="module")
def fixture_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Report directories of reweight, calibrate and select on the survey_5k fixture."""
    root = tmp_path_factory.mktemp("reports")
    data = [str(SURVEY / "households.parquet")]
    common = ["--persons", str(SURVEY / "persons.parquet"), "--force", "--quiet"]
    commands = {
        "reweight": ["reweight", *data, str(SURVEY / "targets.csv"), "--target-records",
                     "1000", "--holdout-fraction", "0.1", "--epochs", "120", "--tol", "0.01"],
        "calibrate": ["calibrate", *data, str(SURVEY / "targets.csv"), "--holdout",
                      "pop_M_80plus,agi_gt_500000,tenure_other"],
        "select": ["select", *data, "--target-records", "1000", "--targets",
                   str(SURVEY / "targets.csv"), "--random-fraction", "0.5", "--epochs", "80",
                   "--stratify", "state"],
    }  # fmt: skip
    out = {}
    for name, args in commands.items():
        result = runner.invoke(app, [*args, *common, "-o", str(root / f"{name}.parquet")])
        assert result.exit_code in (0, 3), result.output
        out[name] = root / f"{name}_report"
    return out


@pytest.mark.slow
@needs_chromium
def test_fixture_report_in_chromium(fixture_reports: dict[str, Path], tmp_path: Path) -> None:
    page = fixture_reports["reweight"] / "report.html"
    run = open_page(page, tmp_path / "profile", evaluate={
        "plots": PLOTS_JS, "filter": FILTER_JS, "external": EXTERNAL_JS})  # fmt: skip
    assert run.requests == []  # no network request (nor any other file)
    assert run.console == []  # no console message, no uncaught exception
    assert run.values["external"] == 0  # nothing to load: no src=, no stylesheet link
    plots = {p["id"]: p for p in run.values["plots"]}
    assert sorted(plots) == sorted(REWEIGHT_PLOTS)
    for plot in plots.values():
        assert plot["width"] > 300, plot
        assert plot["height"] > 100, plot
        assert plot["marks"] > 20, plot  # drawn: lines, bars, bands, markers
    table = run.values["filter"]
    assert table["rows"] == 236  # every target of the fixture
    holdout = len(pd.read_csv(page.parent / "targets.csv").query("holdout"))
    assert table["shown"] == table["counter"] == holdout > 0
    from PIL import Image

    image = Image.open(io.BytesIO(run.screenshot))
    assert image.size == (1200, 1500)
    assert np.asarray(image.convert("L")).std() > 10  # not a blank page
    keep = os.environ.get("L0CALIB_REPORT_SCREENSHOT")
    if keep:
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(keep, optimize=True)


@needs_chromium
def test_browser_watch_sees_errors_and_requests(tmp_path: Path) -> None:
    """The watching is not vacuous: a console error, an exception and a remote image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><img src="http://example.invalid/a.png">'
        '<script>console.error("boom"); missingFunction();</script></body></html>'
    )
    run = open_page(bad, tmp_path / "profile")
    assert run.requests == ["http://example.invalid/a.png"]
    assert any("boom" in line for line in run.console)
    assert any("missingFunction" in line for line in run.console)


@pytest.mark.slow
def test_same_report_from_every_command(fixture_reports: dict[str, Path]) -> None:
    """reweight, calibrate and select write the same report; `l0calib report` redraws it
    byte for byte from the directory's files."""
    for name, d in fixture_reports.items():
        files = ["history.csv", "report.html", "summary.json", "targets.csv",
                 "weight_ratios.csv"]  # fmt: skip
        assert sorted(p.name for p in d.iterdir()) == [".l0calib-report.json", *files], name
        # the manifest lists them, so a later run may replace them
        assert json.loads((d / ".l0calib-report.json").read_text())["files"] == files
        page = (d / "report.html").read_text()
        for section in ("Fit by target", "Weights", "Training path", "Every target"):
            assert f"<h2>{section}</h2>" in page, (name, section)
        assert 'id="fit-fitted"' in page, name
        assert 'id="weight-ratios"' in page, name
        before = (d / "report.html").read_bytes()
        (d / "report.html").unlink()
        result = runner.invoke(app, ["report", str(d)])
        assert result.exit_code == 0, result.output
        assert (d / "report.html").read_bytes() == before, name
    select_page = (fixture_reports["select"] / "report.html").read_text()
    assert 'id="selection-split"' in select_page
    assert 'id="strata"' in select_page


def test_report_command_needs_a_report_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a report directory" in result.output
    assert not (tmp_path / "report.html").exists()


def test_report_is_small_at_500_targets(tmp_path: Path) -> None:
    """500 targets in 25 groups, 4,000 records (seed 0): the page stays under 2 MB."""
    rng = np.random.default_rng(0)
    n, k = 4000, 500
    a = sp.random(k, n, density=0.05, random_state=rng, format="csr")
    a.data[:] = 1.0
    w0 = rng.uniform(50, 150, n)
    t = a @ w0 * rng.uniform(0.95, 1.05, k)
    em = l0calib.EstimateMatrix.from_arrays(
        a, t, weights=w0, groups=[f"group_{i % 25}" for i in range(k)]
    )
    res = l0calib.calibrate(em, target_records=2000, epochs=40, holdout=list(em.names[:50]))
    d = write_report(res, tmp_path / "r", n_targets=k, matrix=em)
    size = (d / "report.html").stat().st_size
    assert size < 2 * 1024 * 1024, size
    page = (d / "report.html").read_text()
    assert page.count("<tr") >= k
