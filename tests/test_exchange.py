"""Exchange rounds (l0calib.exchange): swaps at constant count that lower the refit objective."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from l0calib import calibrate
from l0calib.calibrate import _problem, _solve_ratios
from l0calib.coverage import Coverage, coverage_needs
from l0calib.exceptions import ParameterError
from l0calib.exchange import exchange

from .test_coverage import BALANCED, _rare_band


def _survey(seed: int = 0, n: int = 800, rare: int = 6):
    """Records with a state (10 states), a size and an income, and targets: households and
    persons by state, income by state, plus a rare band of ``rare`` records whose target is
    twice its design-weighted total."""
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 10, n)
    size = 1 + rng.poisson(1.5, n)
    income = rng.lognormal(10, 0.8, n)
    band = np.zeros(n, dtype=bool)
    band[rng.choice(n, rare, replace=False)] = True
    rows = []
    for s in range(10):
        ind = (state == s).astype(float)
        rows += [ind, ind * size, ind * income]
    rows.append(band.astype(float))
    a = sp.csr_matrix(np.vstack(rows))
    w0 = rng.uniform(50, 150, n)
    t = (a @ w0) * rng.normal(1.0, 0.03, a.shape[0])
    t[-1] = 2.0 * (a[-1] @ w0)[0]
    return a, t, w0, band


def _solve_for(pb, lam, lower, upper):
    base = pb.w0

    def solve(mask, prev):
        i = np.flatnonzero(mask)
        dual = None if prev is None else prev.dual
        r, sol = _solve_ratios(pb, i, base[i], lam, lower=lower[i], max_iter=500,
                               upper=upper[i], dual=dual)  # fmt: skip
        return i, r, sol

    return solve


def _setup(seed: int = 0, k: int = 150, lam: float = 1e-3):
    a, t, w0, band = _survey(seed)
    n = a.shape[1]
    pb = _problem(a, t, w0 * n / k, None, normalize_groups=True, loss="relative",
                  scale_floor=1.0)  # fmt: skip
    lower, upper = np.full(n, 1e-4), np.full(n, np.inf)
    solve = _solve_for(pb, lam, lower, upper)
    # A random start that holds none of the rare band: its target is lost (-100 %).
    kept = np.zeros(n, dtype=bool)
    kept[np.random.default_rng(seed).choice(np.flatnonzero(~band), k, replace=False)] = True
    kw = dict(matrix=pb.em.matrix, values=pb.em.values, scale=pb.scale, tol=pb.tol,
              coef=pb.coef, base=pb.w0, lambda_l2=lam, lower=lower, upper=upper)  # fmt: skip
    return pb, solve, kept, kw, band


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exchange_lowers_the_objective_at_constant_count(seed: int) -> None:
    _, solve, kept, kw, band = _setup(seed)
    start = solve(kept, None)
    res = exchange(solve, kept, start, **kw)
    assert res.kept.sum() == kept.sum()
    assert res.swaps > 0
    assert (res.kept & band).any()  # the lost target got supporters back
    assert res.objective < res.objective_before == pytest.approx(start[2].objective)
    # The reported objective is the refit of the returned set.
    assert solve(res.kept, None)[2].objective == pytest.approx(res.objective, rel=1e-9)
    assert np.array_equal(np.flatnonzero(res.kept), res.idx)
    # Deterministic.
    again = exchange(solve, kept, solve(kept, None), **kw)
    assert np.array_equal(again.kept, res.kept)
    assert np.array_equal(again.ratios, res.ratios)


def test_fixed_records_stay_and_needed_records_stay() -> None:
    pb, solve, kept, kw, band = _setup(0)
    kept[band] = False
    kept[np.flatnonzero(band)[:2]] = True  # two of the rare band's six
    kept[np.flatnonzero(kept & ~band)[:2]] = False  # count unchanged
    fixed = np.zeros_like(kept)
    fixed[np.flatnonzero(kept)[:40]] = True
    cover = Coverage(pb.em.matrix, coverage_needs(pb.em.support(), pb.fitted, 2))
    res = exchange(solve, kept, solve(kept, None), fixed=fixed, coverage=cover, **kw)
    assert res.kept[fixed].all()
    assert (res.kept & band).sum() >= 2
    assert res.kept.sum() == kept.sum()


def test_bounds_hold_for_records_that_join() -> None:
    pb, _, kept, kw, _ = _setup(1)
    n = kept.size
    lower, upper = np.full(n, 0.5), np.full(n, 1.5)
    solve = _solve_for(pb, kw["lambda_l2"], lower, upper)
    kw.update(lower=lower, upper=upper)
    res = exchange(solve, kept, solve(kept, None), **kw)
    assert res.swaps > 0
    assert (res.ratios >= 0.5 - 1e-12).all()
    assert (res.ratios <= 1.5 + 1e-12).all()


def test_zero_rounds_change_nothing() -> None:
    _, solve, kept, kw, _ = _setup(0)
    start = solve(kept, None)
    res = exchange(solve, kept, start, rounds=0, **kw)
    assert np.array_equal(res.kept, kept)
    assert res.swaps == res.rounds == 0


def test_calibrate_exchanges_after_the_refit() -> None:
    # The case of tests/test_coverage.py: without coverage the top-K step loses a 13-record
    # band; the exchange rounds bring supporters back and lower the refit's objective.
    a, t, w0, band = _rare_band(1)
    opts = {"target_records": 200, "coverage": 0, **BALANCED}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = calibrate(a, t, weights=w0, exchange_rounds=0, **opts)
        on = calibrate(a, t, weights=w0, **opts)
        again = calibrate(a, t, weights=w0, **opts)
    assert (off.weights[band] == 0).all()
    assert on.info["exchange_swaps"] > 0
    assert (on.weights[band] > 0).any()
    assert on.info["missed_targets"] == []
    assert off.info["exchange_swaps"] == off.info["exchange_rounds"] == 0
    assert np.count_nonzero(on.weights) == np.count_nonzero(off.weights) == 200
    # The rounds lowered the objective they judge sets by (the refit's at a strong pull),
    # and the refit at its own pull is no worse than without them (else they are undone).
    assert on.info["exchange_objective"] < on.info["exchange_objective_before"]
    assert on.info["refit_objective"] <= off.info["refit_objective"] * (1 + 1e-12)
    assert np.array_equal(on.weights, again.weights)  # deterministic
    keep = np.zeros(a.shape[1], dtype=bool)
    keep[:30] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = calibrate(a, t, weights=w0, always_keep=keep, **opts)
    assert (fixed.weights[keep] > 0).all()


def test_exchange_after_a_balanced_selection_too() -> None:
    a, t, w0, _ = _survey(0, n=4000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = calibrate(a, t, weights=w0, target_records=1000, epochs=60, seed=0)
    assert res.info["selection"] == "balanced"
    assert res.info["exchange_rounds"] >= 1
    assert res.info["exchange_objective"] <= res.info["exchange_objective_before"]
    assert np.count_nonzero(res.weights) == 1000


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exchange_never_leaves_a_worse_refit(seed: int) -> None:
    a, t, w0, _ = _survey(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = calibrate(a, t, weights=w0, target_records=150, epochs=100, seed=seed,
                        exchange_rounds=0)  # fmt: skip
        on = calibrate(a, t, weights=w0, target_records=150, epochs=100, seed=seed)
    assert on.info["refit_objective"] <= off.info["refit_objective"] * (1 + 1e-12)
    if on.info["exchange_reverted"]:
        assert np.array_equal(on.weights, off.weights)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_exchange_rounds_must_be_a_count(bad) -> None:
    a, t, w0, _ = _survey(0)
    with pytest.raises(ParameterError, match="exchange_rounds"):
        calibrate(a, t, weights=w0, target_records=150, exchange_rounds=bad)
