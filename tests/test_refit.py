"""The refit solver (l0calib/refit.py): the same optimum as a plain L-BFGS-B on the primal,
bounds honoured, soft (inconsistent) targets, tolerance bands, a tiny pull, honest
convergence reports, and the engine's use of it.

Problems are small, random (fixed seeds) and float64; L-BFGS-B is run to a far tighter
stopping rule and more iterations than the engine ever uses, so it is a reference answer.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp

from l0calib import ConvergenceWarning, calibrate, refit
from l0calib.calibrate import _problem, _solve_ratios

solver = importlib.import_module("l0calib.refit")  # `l0calib.refit` is the public function


def random_problem(seed: int, *, k: int = 12, m: int = 150, noise: float = 0.0):
    """B (k x m, a population row first), targets hit by known ratios (plus relative
    noise: inconsistent targets), relative scales and loss weights summing to 1."""
    rng = np.random.default_rng(seed)
    b = sp.random(k - 1, m, density=0.3, random_state=rng, format="csr")
    b.data = rng.uniform(0.5, 3.0, b.nnz)
    b = sp.vstack([sp.csr_matrix(np.ones((1, m))), b]).tocsr()
    ratio = rng.uniform(0.6, 1.6, m)
    t = (b @ ratio) * (1.0 + rng.normal(0.0, noise, k))
    c = rng.uniform(0.2, 1.0, k)
    return b, t, np.maximum(np.abs(t), 1.0), c / c.sum()


def objective(b, t, s, tol, c, lam, r):
    e = (b @ r - t) / s
    x = np.maximum(np.abs(e) - tol, 0.0)
    return float(c @ (x * x)) + lam * float(np.mean((r - 1.0) ** 2))


def reference(b, t, s, tol, c, lam, lo, hi):
    """The primal by L-BFGS-B, to a tight stopping rule."""
    m = b.shape[1]
    bs = sp.diags(1 / s) @ b

    def fun(r):
        e = (b @ r - t) / s
        x = np.maximum(np.abs(e) - tol, 0.0)
        g = bs.T @ (2 * c * np.sign(e) * x) + 2 * lam / m * (r - 1.0)
        return objective(b, t, s, tol, c, lam, r), g

    lo, hi = np.broadcast_to(lo, (m,)), np.broadcast_to(hi, (m,))
    res = scipy.optimize.minimize(
        fun, np.clip(np.ones(m), lo, hi), jac=True, method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(lo, hi),
        options={"maxiter": 50_000, "maxcor": 50, "ftol": 1e-16, "gtol": 1e-14},
    )  # fmt: skip
    return res.x


CASES = [
    # lambda, lower, upper, noise, tolerance
    (1e-3, 0.0, np.inf, 0.0, 0.0),
    (1e-1, 1e-4, np.inf, 0.05, 0.0),
    (1.0, 0.5, 2.0, 0.05, 0.0),
    (1e-2, 0.8, 1.3, 0.0, 0.0),  # tight bounds: many records at them
    (1e-2, 0.0, np.inf, 0.05, 0.01),  # tolerance bands
    (1e-1, 0.5, 1.5, 0.1, 0.02),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("lam", "lo", "hi", "noise", "band"), CASES)
def test_same_optimum_as_lbfgsb(seed, lam, lo, hi, noise, band) -> None:
    b, t, s, c = random_problem(seed, noise=noise)
    tol = np.full(t.size, band)
    sol = solver.solve_ratios(b, t, s, tol, c, lam, lower=lo, upper=hi)
    assert sol.success, sol.message
    assert sol.method == "newton"
    ref = reference(b, t, s, tol, c, lam, lo, hi)
    f_new = objective(b, t, s, tol, c, lam, sol.x)
    f_ref = objective(b, t, s, tol, c, lam, ref)
    assert f_new == pytest.approx(sol.objective, rel=1e-12)
    assert f_new <= f_ref * (1 + 1e-10)  # never worse than the reference ...
    assert f_new >= f_ref * (1 - 1e-6)  # ... which is itself near the optimum
    # Strongly convex (lambda > 0): the minimiser is unique.
    np.testing.assert_allclose(sol.x, ref, atol=1e-4)
    assert abs(sol.gap) <= 1e-10 * sol.objective


def test_bounds_per_record_are_honoured_and_optimal() -> None:
    b, t, s, c = random_problem(3, noise=0.05)
    m = b.shape[1]
    rng = np.random.default_rng(3)
    lo = rng.uniform(0.0, 0.9, m)
    hi = lo + rng.uniform(0.05, 1.0, m)
    sol = solver.solve_ratios(b, t, s, np.zeros(t.size), c, 1e-2, lower=lo, upper=hi)
    assert sol.success
    assert (sol.x >= lo).all()
    assert (sol.x <= hi).all()
    at_lo, at_hi = sol.x == lo, sol.x == hi
    assert at_lo.any()
    assert at_hi.any()
    # KKT: the gradient is 0 on free records, >= 0 at the lower and <= 0 at the upper.
    e = (b @ sol.x - t) / s
    g = (sp.diags(1 / s) @ b).T @ (2 * c * e) + 2e-2 / m * (sol.x - 1)
    scale = np.abs(g).max()
    free = ~(at_lo | at_hi)
    assert np.abs(g[free]).max() <= 1e-7 * scale
    assert (g[at_lo] >= -1e-7 * scale).all()
    assert (g[at_hi] <= 1e-7 * scale).all()
    ref = reference(b, t, s, np.zeros(t.size), c, 1e-2, lo, hi)
    np.testing.assert_allclose(sol.x, ref, atol=1e-5)


def test_inconsistent_targets_give_the_weighted_compromise() -> None:
    # Two rows ask for the same total (10 records at ratio 1 give 10) with targets 8 and
    # 12 and equal scales: the fit is minimised at the c-weighted mean of the targets.
    b = sp.csr_matrix(np.ones((2, 10)))
    t, s, c = np.array([8.0, 12.0]), np.array([10.0, 10.0]), np.array([0.25, 0.75])
    sol = solver.solve_ratios(b, t, s, np.zeros(2), c, 1e-9)
    assert sol.success
    assert b[0] @ sol.x == pytest.approx(0.25 * 8 + 0.75 * 12, rel=1e-6)


def test_infeasible_targets_end_at_the_bounds() -> None:
    # Non-negative weights cannot make a total negative: every ratio goes to its lower
    # bound, and the solver says it converged (this is the optimum, not a failure).
    b = sp.csr_matrix(np.ones((1, 5)))
    sol = solver.solve_ratios(b, [-3.0], [3.0], [0.0], [1.0], 1e-3, lower=0.1)
    assert sol.success
    np.testing.assert_allclose(sol.x, 0.1)


def test_tiny_pull_fits_a_consistent_problem_exactly() -> None:
    b, t, s, c = random_problem(4, k=20, m=400)
    sol = solver.solve_ratios(b, t, s, np.zeros(t.size), c, 1e-10, lower=0.0)
    assert sol.success
    assert np.abs((b @ sol.x - t) / s).max() < 1e-9
    assert sol.nit <= 20


def test_tolerance_band_is_respected_not_overfitted() -> None:
    # Inside its band a target costs nothing, so the pull keeps the ratios at 1 when the
    # start already lies within every band.
    b, t, s, c = random_problem(5)
    r1 = np.ones(b.shape[1])
    rel = np.abs(b @ r1 - t) / s
    sol = solver.solve_ratios(b, t, s, rel + 1e-3, c, 1e-3)
    assert sol.success
    np.testing.assert_allclose(sol.x, 1.0, atol=1e-12)


def test_iteration_cap_is_reported_not_hidden() -> None:
    b, t, s, c = random_problem(6, noise=0.05)
    sol = solver.solve_ratios(b, t, s, np.zeros(t.size), c, 1e-6, lower=0.9, max_iter=1)
    assert not sol.success
    assert "iteration cap (max_iter=1)" in sol.message
    assert sol.nit == 1


def test_warm_start_from_the_dual_needs_no_iteration() -> None:
    b, t, s, c = random_problem(7, noise=0.05)
    tol = np.zeros(t.size)
    first = solver.solve_ratios(b, t, s, tol, c, 1e-3, lower=0.2)
    again = solver.solve_ratios(b, t, s, tol, c, 1e-3, lower=0.2, dual=first.dual)
    assert again.success
    assert again.nit == 0
    np.testing.assert_array_equal(again.x, first.x)


def test_no_pull_falls_back_to_lbfgsb() -> None:
    b, t, s, c = random_problem(8)
    sol = solver.solve_ratios(b, t, s, np.zeros(t.size), c, 0.0)
    assert sol.method == "lbfgsb"
    assert sol.objective < 1e-12


def test_matrix_free_path_matches_the_dense_one(monkeypatch: pytest.MonkeyPatch) -> None:
    b, t, s, c = random_problem(9, k=30, m=300, noise=0.05)
    tol = np.full(t.size, 0.005)
    dense = solver.solve_ratios(b, t, s, tol, c, 1e-2, lower=0.3, upper=3.0)
    monkeypatch.setattr(solver, "DENSE_MAX_TARGETS", 0)
    free = solver.solve_ratios(b, t, s, tol, c, 1e-2, lower=0.3, upper=3.0)
    assert dense.success
    assert free.success
    np.testing.assert_allclose(free.x, dense.x, atol=1e-7)


def test_rows_with_zero_weight_do_not_count() -> None:
    b, t, s, c = random_problem(10, noise=0.1)
    c = c.copy()
    c[3] = 0.0
    tol = np.zeros(t.size)
    keep = np.flatnonzero(c > 0)
    full = solver.solve_ratios(b, t, s, tol, c, 1e-2)
    part = solver.solve_ratios(b[keep], t[keep], s[keep], tol[keep], c[keep], 1e-2)
    np.testing.assert_allclose(full.x, part.x, atol=1e-12)
    assert full.dual[3] == 0.0


# ---------------------------------------------------------------- the engine's entry point
def test_engine_entry_point_with_bound_arrays() -> None:
    b, t, _, _ = random_problem(11, noise=0.02)
    m = b.shape[1]
    pb = _problem(b, t, np.ones(m), None, normalize_groups=True, loss="relative",
                  scale_floor=1.0)  # fmt: skip
    idx = np.arange(0, m, 2)
    lo, hi = np.full(idx.size, 0.5), np.full(idx.size, 1.5)
    hi[:5] = 0.6
    r, res = _solve_ratios(pb, idx, np.full(idx.size, 2.0), 1e-3, lower=lo, max_iter=100,
                           start=None, upper=hi)  # fmt: skip
    assert res.success
    assert res.nit >= 1
    assert (r >= lo).all()
    assert (r <= hi).all()
    assert res.dual.shape == (pb.em.n_targets,)


def test_calibrate_without_pruning_solves_directly() -> None:
    b, t, _, _ = random_problem(12, k=15, m=400)
    w0 = np.full(400, 1.0)
    seen = []
    res = calibrate(b, t, weights=w0, callback=seen.append)
    assert res.converged
    assert res.n_iter == 0
    assert len(res.history) == 0
    assert res.info["refit_method"] == "newton"
    assert res.info["max_abs_rel_error"] < 1e-4
    assert [p.phase for p in seen] == ["refit"]
    same = refit(b, np.ones(400, dtype=bool), t, weights=w0, lambda_l2=1e-6)
    np.testing.assert_allclose(res.weights, same.weights, rtol=1e-12)


def test_engine_warns_when_the_refit_stops_at_its_cap() -> None:
    b, t, _, _ = random_problem(13, noise=0.5)  # records reach 0: needs several steps
    m = b.shape[1]
    keep = np.ones(m, dtype=bool)
    assert refit(b, keep, t, weights=np.ones(m), lambda_l2=1e-6).info["refit_iterations"] > 1
    with pytest.warns(ConvergenceWarning, match="iteration cap"):
        res = refit(b, keep, t, weights=np.ones(m), max_iter=1, lambda_l2=1e-6)
    assert not res.converged
    assert res.info["refit_converged"] is False
    # ... also when a tolerance is given and happens to be met.
    with pytest.warns(ConvergenceWarning, match="iteration cap"):
        res = refit(b, keep, t, weights=np.ones(m), max_iter=1, lambda_l2=1e-6, tol=10.0)
    assert not res.converged


def test_converged_refit_does_not_warn() -> None:
    b, t, _, _ = random_problem(14, noise=0.05)
    m = b.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = refit(b, np.ones(m, dtype=bool), t, weights=np.ones(m))
    assert res.converged
    assert res.info["refit_method"] == "newton"


def test_summary_reports_the_refit() -> None:
    from l0calib.report import summary

    b, t, _, _ = random_problem(13, noise=0.5)
    m = b.shape[1]
    with pytest.warns(ConvergenceWarning):
        res = refit(b, np.ones(m, dtype=bool), t, weights=np.ones(m), max_iter=1, lambda_l2=1e-6)
    out = summary(res, n_targets=b.shape[0])
    assert out["converged"] is False
    assert out["refit_converged"] is False
    assert out["refit_iterations"] == 1
    assert "iteration cap" in out["refit_message"]
