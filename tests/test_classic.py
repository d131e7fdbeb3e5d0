"""Classic exact calibration: parity with R's survey::calibrate, exact totals, clear errors.

The R weights in data/fixtures/r_survey/ were produced by make_r_fixtures.R there (run it
where R and the survey package are installed); R is not needed to run these tests.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from l0calib import CalibrationError, ParameterError, build_estimate_matrix, calibrate_exact

from .conftest import FIXTURES

R_DIR = FIXTURES / "r_survey"
CASES = [
    ("stype_api99", "linear", None),
    ("stype_api99", "raking", None),
    ("stype_api99", "logit", (0.7, 1.7)),
    ("stype_schwide_api99", "linear", None),
    ("stype_schwide_api99", "raking", None),
    ("stype_schwide_api99", "logit", (0.7, 1.7)),
]


@pytest.mark.parametrize("design", ["apistrat", "apiclus1"])
@pytest.mark.parametrize(("formula", "method", "bounds"), CASES)
def test_weights_equal_r_survey(design: str, formula: str, method: str, bounds) -> None:
    data = pd.read_csv(R_DIR / f"{design}.csv")
    r = pd.read_csv(R_DIR / f"r_weights_{design}.csv")
    targets = R_DIR / f"targets_{formula}.csv"
    em = build_estimate_matrix(data, targets, id_column="snum", weight_column="pw")
    res = calibrate_exact(em, method=method, bounds=bounds)
    expected = r.set_index("snum").loc[data["snum"], f"{formula}_{method}"].to_numpy()
    np.testing.assert_allclose(res.weights, expected, rtol=1e-6)
    # the totals are reproduced to 1e-10 relative
    assert res.report["abs_rel_error"].max() < 1e-10
    assert res.method == method
    if bounds is not None:
        g = res.weights / em.weights
        assert g.min() > bounds[0]
        assert g.max() < bounds[1]


def test_column_names_with_dots_work_in_targets() -> None:
    targets = pd.read_csv(R_DIR / "targets_stype_schwide_api99.csv")
    assert "`sch.wide` == 'Yes'" in targets["filter"].tolist()


def test_linear_is_the_greg_closed_form() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((300, 4))
    x[:, 0] = 1
    d = rng.uniform(1, 3, 300)
    t = x.T @ (d * rng.uniform(0.8, 1.2, 300))
    res = calibrate_exact(x.T, t, weights=d, method="linear")
    lam = np.linalg.solve((x * d[:, None]).T @ x, t - x.T @ d)
    np.testing.assert_allclose(res.weights, d * (1 + x @ lam), rtol=1e-12)
    assert res.info["iterations"] == 1


@pytest.mark.parametrize(("method", "bounds"), [("logit", (0.7, 1.7)), ("truncated", (0.8, 1.3))])
def test_bounded_methods_respect_bounds(method: str, bounds) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((500, 3))
    x[:, 0] = 1
    d = np.ones(500)
    t = x.T @ rng.uniform(0.9, 1.25, 500)
    res = calibrate_exact(x.T, t, weights=d, method=method, bounds=bounds)
    g = res.weights / d
    assert g.min() >= bounds[0] - 1e-12
    assert g.max() <= bounds[1] + 1e-12
    assert res.report["abs_rel_error"].max() < 1e-10
    assert res.diagnostics.ratio_min == pytest.approx(g.min())


def test_rank_deficient_targets_are_named() -> None:
    a = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(CalibrationError, match=re.escape(
        "1 target(s) are linear combinations of others, so exact calibration is "
        "rank-deficient: target_2 = combination of target_0, target_1"
    )):  # fmt: skip
        calibrate_exact(a, [2.0, 3.0, 5.0], weights=np.ones(4))
    # held out, the redundant target is fine
    res = calibrate_exact(a, [2.0, 3.0, 5.0], weights=np.ones(4), holdout=["target_2"])
    assert res.report["abs_rel_error"].max() < 1e-10


def test_infeasible_bounds_say_so() -> None:
    a = np.array([[1.0, 1.0]])
    with pytest.raises(CalibrationError, match="logit calibration did not converge"):
        calibrate_exact(a, [10.0], weights=np.ones(2), method="logit", bounds=(0.5, 2.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ipf"}, "method must be one of linear, raking, logit, truncated"),
        ({"method": "logit"}, "method 'logit' needs bounds=(L, U) with L < 1 < U"),
        ({"method": "logit", "bounds": (1.2, 2.0)}, "must satisfy 0 <= lower <= 1 <= upper"),
        ({"method": "logit", "bounds": (1.0, 2.0)}, "needs bounds with 0 <= lower < 1 < upper"),
        ({"method": "truncated", "bounds": (0.5, float("inf"))}, "upper finite, got (0.5, inf)"),
        ({"method": "raking", "bounds": (0.5, 2.0)}, "raking takes no bounds"),
        ({"method": "linear", "bounds": "x"}, "bounds must be a pair (lower, upper)"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"tol": -1.0}, "tol must be a finite number > 0"),
    ],
)
def test_parameter_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        calibrate_exact(np.ones((1, 3)), [3.0], weights=np.ones(3), **kwargs)
