"""diagnose_targets: feasibility, the least change, named conflicts, dependence, pruning risk.

Every problem here is built so its answer is known: targets computed from known weights
(feasible), or moved by a known amount in a known direction.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog
from scipy.special import comb

from l0calib import EstimateMatrix, ParameterError, diagnose_targets
from l0calib.diagnose import annotate_check
from l0calib.diagnostics import check_targets

BANDS = ("0_17", "18_64", "65plus")


def _states(seed: int = 0, per_state: int = 60, values: dict[str, float] | None = None):
    """Two states of households, persons counted by 3 age bands, plus household counts.

    Targets: pop_<s>, pop_<s>_<band> (3), hh_<s>, for s in A, B; values from known
    positive weights, then replaced by ``values``.
    """
    rng = np.random.default_rng(seed)  # fixed seed: the records are part of the problem
    rows, names, groups = [], [], []
    n = 2 * per_state
    state = np.repeat([0, 1], per_state)
    counts = rng.integers(0, 3, size=(n, 3)).astype(float)
    counts[np.arange(n), rng.integers(0, 3, n)] += 1  # everyone has at least one person
    for s, label in enumerate("AB"):
        inside = (state == s).astype(float)
        rows.append(inside * counts.sum(axis=1))
        names.append(f"pop_{label}")
        groups.append("persons_by_state")
        for b, band in enumerate(BANDS):
            rows.append(inside * counts[:, b])
            names.append(f"pop_{label}_{band}")
            groups.append("age_by_state")
        rows.append(inside)
        names.append(f"hh_{label}")
        groups.append("households_by_state")
    a = np.array(rows)
    w0 = rng.uniform(50, 150, n)
    truth = w0 * rng.uniform(0.7, 1.4, n)
    t = a @ truth
    for name, v in (values or {}).items():
        t[names.index(name)] = v
    em = EstimateMatrix.from_arrays(a, t, names=names, groups=groups, weights=w0)
    return em, t


def _lp_feasible(
    a: np.ndarray, t: np.ndarray, tol: np.ndarray, lo=0.0, hi=None, w0=None, scale=None
):
    """Independent check: is there w (or r = w / w0 in [lo, hi]) with |A w - t| <= tol s?
    (``s = max(|t|, 1)`` unless ``scale`` is given.)"""
    s = np.maximum(np.abs(t), 1.0) if scale is None else scale
    _m, n = a.shape
    aa = a if w0 is None else a * w0
    res = linprog(
        np.zeros(n),
        A_ub=np.vstack([aa, -aa]),
        b_ub=np.concatenate([t + tol * s, -(t - tol * s)]),
        bounds=[(lo, hi)] * n,
        method="highs",
    )
    return res.status == 0


def _min_relaxation(a, t, tol, lo=0.0, hi=None, w0=None) -> float:
    """The least sum of |t' - t| / max(|t|, 1), written independently: variables w (or
    ratios) and u >= |A w - t| - tol s, minimise sum(u / s), with dense inequalities."""
    s = np.maximum(np.abs(t), 1.0)
    m, n = a.shape
    aa = a if w0 is None else a * w0
    eye = np.eye(m)
    a_ub = np.block([[aa, -eye], [-aa, -eye]])
    b_ub = np.concatenate([t + tol * s, -(t - tol * s)])
    cost = np.concatenate([np.zeros(n), 1.0 / s])
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(lo, hi)] * n + [(0, None)] * m,
                  method="highs")  # fmt: skip
    assert res.status == 0
    return float(res.fun)


def test_consistent_targets_are_feasible() -> None:
    em, _ = _states()
    d = diagnose_targets(em)
    assert d.feasible
    assert d.total_rel_change == 0.0
    assert d.changes == ()
    assert d.conflicts == ()
    assert d.conflicts_complete
    # pop = sum of its bands: found as dependence, and the values agree
    assert {dep.target for dep in d.dependencies} == {"pop_A_65plus", "pop_B_65plus"}
    assert all(dep.agrees for dep in d.dependencies)
    assert json.loads(json.dumps(d.to_dict()))["feasible"] is True


def test_state_total_below_its_bands_is_exactly_that_conflict() -> None:
    em, t = _states()
    bands = [f"pop_A_{b}" for b in BANDS]
    low = 0.95 * t[em.names.index("pop_A")]
    em, t = _states(values={"pop_A": low})
    d = diagnose_targets(em)
    assert not d.feasible
    assert len(d.conflicts) == 1
    conflict = d.conflicts[0]
    assert set(conflict.targets) == {"pop_A", *bands}
    assert conflict.irreducible
    sum_bands = sum(t[em.names.index(b)] for b in bands)
    assert conflict.message.startswith(f"pop_A ({low:,.0f}) is below the sum of the 3 age_by_state")
    assert conflict.message.endswith("these 4 targets cannot all hold")
    # the proof: pop_A - sum(bands) >= 0 for any weights, the targets give < 0
    coef = dict(zip(conflict.targets, conflict.coefficients, strict=True))
    assert coef["pop_A"] == pytest.approx(-1.0)
    assert all(coef[b] == pytest.approx(1.0) for b in bands)
    assert conflict.lhs == pytest.approx(sum_bands - low)
    # the least change moves pop_A alone, up to the sum of its bands
    assert [c.name for c in d.changes] == ["pop_A"]
    assert d.changes[0].direction == "up"
    assert d.changes[0].required_value == pytest.approx(sum_bands, rel=1e-7)
    assert d.total_rel_change == pytest.approx((sum_bands - low) / low, rel=1e-6)
    # the dependence check says the same, with numbers
    dep = {x.target: x for x in d.dependencies}["pop_A_65plus"]
    assert not dep.agrees
    assert dep.implied_value == pytest.approx(t[em.names.index("pop_A_65plus")] - (sum_bands - low))


def test_each_reported_conflict_is_irreducible_by_brute_force() -> None:
    # Two contradictions at once: state A's total below its bands, state B's households
    # above... a national household total that is the sum of both states.
    em0, t0 = _states(seed=3)
    a = np.vstack([em0.matrix.toarray(), em0.matrix.toarray()[[4, 9]].sum(axis=0)])
    t = np.append(t0, t0[4] + t0[9])
    t[0] *= 0.9  # pop_A below its bands
    t[9] *= 1.1  # hh_B above what the national total leaves it
    names = [*em0.names, "hh_total"]
    em = EstimateMatrix.from_arrays(a, t, names=names, weights=em0.weights)
    d = diagnose_targets(em)
    assert not d.feasible
    found = {frozenset(c.targets) for c in d.conflicts}
    assert frozenset({"pop_A", "pop_A_0_17", "pop_A_18_64", "pop_A_65plus"}) in found
    assert frozenset({"hh_A", "hh_B", "hh_total"}) in found
    tol = np.zeros(len(t))
    for c in d.conflicts:
        idx = [names.index(x) for x in c.targets]
        assert not _lp_feasible(a[idx], t[idx], tol[idx])
        for drop in range(len(idx)):
            rest = idx[:drop] + idx[drop + 1 :]
            assert _lp_feasible(a[rest], t[rest], tol[rest]), (c.targets, drop)


def test_target_no_nonnegative_weights_reach_is_named_with_its_change() -> None:
    em, _t = _states(values={"hh_B": -40.0})
    d = diagnose_targets(em)
    assert not d.feasible
    single = [c for c in d.conflicts if c.targets == ("hh_B",)]
    assert len(single) == 1
    assert single[0].message == (
        "hh_B (-40) is below 0, the least that non-negative weights can give"
    )
    change = {c.name: c for c in d.changes}["hh_B"]
    assert change.direction == "up"
    assert change.required_value == pytest.approx(0.0, abs=1e-6)
    assert change.rel_change == pytest.approx(1.0)


def test_target_beyond_the_ratio_bounds_is_named_with_its_change() -> None:
    # Record 0 alone carries "income"; its ratio w / w0 is at most 2.
    a = np.array([[1.0, 1.0, 1.0, 1.0], [500.0, 0.0, 0.0, 0.0]])
    w0 = np.array([10.0, 10.0, 10.0, 10.0])
    em = EstimateMatrix.from_arrays(a, [40.0, 15_000.0], names=["hh", "income"], weights=w0)
    d = diagnose_targets(em, bounds=(0.5, 2.0))
    assert not d.feasible
    assert [c.targets for c in d.conflicts] == [("income",)]
    assert d.conflicts[0].message == (
        "income (15,000) is above 10,000, the most that weights within bounds [0.5, 2] on "
        "w / w0 can give"
    )
    assert [(c.name, c.direction) for c in d.changes] == [("income", "down")]
    assert d.changes[0].required_value == pytest.approx(10_000.0)
    assert d.total_rel_change == pytest.approx(5_000 / 15_000)
    assert diagnose_targets(em).feasible  # without bounds, any w >= 0: fine


def test_tolerance_is_honoured() -> None:
    em, t = _states()
    low = t[em.names.index("pop_A")] * 0.99
    em, _ = _states(values={"pop_A": low})
    assert not diagnose_targets(em).feasible
    assert diagnose_targets(em, tolerance=0.011).feasible
    d = diagnose_targets(em, tolerance=0.004)  # 1% gap, 4 targets with 0.4% each
    assert not d.feasible
    assert "within their tolerances" in d.conflicts[0].message


@pytest.mark.parametrize(("n_records", "bounds"), [(40, None), (40, (0.3, 3.0)), (2500, None)])
def test_least_change_matches_an_independent_lp(n_records: int, bounds) -> None:
    # Random sparse non-negative contributions and random (inconsistent) targets; 2500
    # records exercise the column generation, 40 the direct solve.
    # Five more targets are sums of some of the first ten, with values off by up to 20%.
    rng = np.random.default_rng(7)  # fixed seed
    base = sp.random(10, n_records, density=0.3, random_state=rng, format="csr") * 10
    base = base.toarray()
    base[:, rng.integers(0, n_records, 3)] *= -1  # a few negative contributions
    w0 = rng.uniform(1.0, 5.0, n_records)
    t_base = (base @ w0) * rng.uniform(0.5, 2.0, 10)
    pick = rng.random((5, 10)) < 0.4
    a = np.vstack([base, pick.astype(float) @ base])
    t = np.concatenate([t_base, (pick @ t_base) * rng.uniform(0.8, 1.2, 5)])
    m = len(t)
    tol = rng.choice([0.0, 0.01, 0.05], m)
    em = EstimateMatrix.from_arrays(a, t, weights=w0, tolerance=tol)
    d = diagnose_targets(em, bounds=bounds)
    lo, hi = bounds if bounds else (0.0, None)
    expected = _min_relaxation(a, t, tol, lo, hi, w0 if bounds else None)
    assert expected > 1e-3  # the random targets really are inconsistent
    assert d.total_rel_change == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # the moved targets are feasible, and every conflict is truly infeasible
    moved = t.copy()
    for c in d.changes:
        moved[em.names.index(c.name)] = c.required_value
    # (tolerances stay measured against the original values)
    scale = np.maximum(np.abs(t), 1.0)
    assert _lp_feasible(a, moved, tol + 1e-7, lo, hi, w0 if bounds else None, scale)
    for c in d.conflicts:
        idx = [em.names.index(x) for x in c.targets]
        assert not _lp_feasible(a[idx], t[idx], tol[idx], lo, hi, w0 if bounds else None)


def test_exclude_leaves_targets_out() -> None:
    em, _t = _states(values={"hh_B": -40.0})
    assert diagnose_targets(em, exclude=["hh_B"]).feasible
    with pytest.raises(Exception, match="unknown target name 'hh_C'"):
        diagnose_targets(em, exclude=["hh_C"])


def test_pruning_risk_uses_the_hypergeometric_miss_probability() -> None:
    n, k = 1000, 100
    a = np.zeros((2, n))
    a[0] = 1.0
    a[1, [10, 500, 900]] = 1.0  # a rare target: 3 supporting records
    em = EstimateMatrix.from_arrays(a, [1000.0, 3.0], names=["all", "rare"])
    d = diagnose_targets(em, target_records=k)
    assert [r.name for r in d.pruning_risks] == ["rare"]
    risk = d.pruning_risks[0]
    # P(a uniform draw of k of n misses all 3) = C(n-3, k) / C(n, k)
    exact = comb(n - 3, k, exact=True) / comb(n, k, exact=True)
    assert risk.p_short == pytest.approx(exact, rel=1e-9)
    assert risk.expected_kept == pytest.approx(0.3)
    assert "misses all 3 supporting records with probability 72.9%" in risk.reason
    assert diagnose_targets(em, target_records=990).pruning_risks == ()


def _sub_band(n: int, k: int, sub: float):
    """Diagnosis with K = k and bounds (0.5, 2) of "all" (n records, 1 each at w0 = 1,
    target n) and "sub" (the first 200 of them, target ``sub``)."""
    a = np.zeros((2, n))
    a[0] = 1.0
    a[1, :200] = 1.0
    em = EstimateMatrix.from_arrays(a, [float(n), sub], names=["all", "sub"], weights=np.ones(n))
    return diagnose_targets(em, target_records=k, bounds=(0.5, 2.0))


def test_pruning_risk_with_bounds_counts_the_records_needed() -> None:
    # 200 records support "sub" (each contributes 1 at w0 = 1); the target is 4x what they
    # give, so with ratios <= 2 on the inflated weight, a uniform draw must keep twice its
    # expected share of them.
    n, k = 1000, 100
    d = _sub_band(n, k, 800.0)
    risk = {r.name: r for r in d.pruning_risks}["sub"]
    assert risk.needed == 40  # 800 * 100 * 200 / (2 * 1000 * 200)
    from scipy.stats import hypergeom

    assert risk.p_short == pytest.approx(hypergeom.cdf(39, n, 200, k))
    assert risk.p_short > 0.99


def test_bad_arguments() -> None:
    em, _ = _states()
    with pytest.raises(ParameterError, match="bounds"):
        diagnose_targets(em, bounds=(2.0, 1.0))
    with pytest.raises(ParameterError, match="target_records"):
        diagnose_targets(em, target_records=0)
    with pytest.raises(ParameterError, match="tolerance"):
        diagnose_targets(em, tolerance=-1.0)
    with pytest.raises(ParameterError, match="weights"):
        diagnose_targets(em, weights=np.ones(3))


def test_check_table_annotation() -> None:
    em, _t = _states(values={"hh_B": -40.0})
    d = diagnose_targets(em, target_records=5)
    table = annotate_check(check_targets(em, dependencies=d.dependent_names()), d)
    row = table.set_index("name").loc["hh_B"]
    assert "must move up 100.00%" in row["flags"]
    assert "in conflict 1" in row["flags"]
    assert row["required_value"] == pytest.approx(0.0, abs=1e-6)
    assert "its values agree" in table.set_index("name").loc["pop_A_65plus", "flags"]


def test_all_conflicts_of_a_small_problem_contain_a_moved_target() -> None:
    # Property over seeds: every named conflict is infeasible and dropping any member
    # makes it feasible (checked by an independent LP).
    for seed in range(3):
        rng = np.random.default_rng(seed)  # fixed seeds
        a = (rng.random((6, 30)) < 0.4) * rng.uniform(1, 3, (6, 30))
        t = a @ rng.uniform(1, 2, 30) * rng.uniform(0.5, 1.5, 6)
        em = EstimateMatrix.from_arrays(a, t)
        d = diagnose_targets(em)
        tol = np.zeros(6)
        for c in d.conflicts:
            idx = [em.names.index(x) for x in c.targets]
            assert not _lp_feasible(a[idx], t[idx], tol[idx])
            for sub in itertools.combinations(idx, len(idx) - 1):
                assert _lp_feasible(a[list(sub)], t[list(sub)], tol[list(sub)])


def test_pruning_risk_with_bounds_flags_overshoot() -> None:
    # "sub" asks for a quarter of what its 200 records give; at ratio >= 0.5 on the
    # inflated weight, more than 10 kept supporting records overshoot it (20 expected).
    n, k = 1000, 100
    d = _sub_band(n, k, 50.0)
    risk = {r.name: r for r in d.pruning_risks}["sub"]
    assert risk.allowed == pytest.approx(10.0)  # 50 * 100 * 200 / (0.5 * 1000 * 200)
    from scipy.stats import hypergeom

    assert risk.p_over == pytest.approx(hypergeom.sf(10, n, 200, k))
    assert "overshoot it at the lower ratio bound" in risk.reason
    assert "all" not in {r.name for r in d.pruning_risks}


def test_bounds_with_target_records_are_read_on_the_inflated_weight() -> None:
    # 4 records of w0 = 10; record 0 alone carries "income" (500 each). Bounds (0.5, 2) on
    # w / (w0 n / K): with K = n they are bounds on w / w0; with K = 2 of 4 the inflated
    # weight is 20, a kept record may weigh up to 40, and a dropped one 0.
    a = np.array([[1.0, 1.0, 1.0, 1.0], [500.0, 0.0, 0.0, 0.0]])
    w0 = np.full(4, 10.0)

    def diagnose(hh: float, income: float, k: int | None):
        em = EstimateMatrix.from_arrays(a, [hh, income], names=["hh", "income"], weights=w0)
        return diagnose_targets(em, bounds=(0.5, 2.0), target_records=k)

    # At most 2 x 10 x 500 = 10,000 on w / w0 (K = n reads the same), 20,000 with K = 2.
    assert not diagnose(40.0, 15_000.0, None).feasible
    assert not diagnose(40.0, 15_000.0, 4).feasible
    assert diagnose(40.0, 15_000.0, 2).feasible
    d = diagnose(40.0, 25_000.0, 2)
    assert not d.feasible
    assert d.changes[0].required_value == pytest.approx(20_000.0)
    assert d.conflicts[0].message == (
        "income (25,000) is above 20,000, the most that weights of at most 2 x the inflated "
        "initial weight (w0 x 4 / 2) can give"
    )
    # The lower bound holds every record when all are kept (at least 0.5 x 40 = 20
    # households), but dropped records weigh 0 when K < n.
    assert not diagnose(12.0, 5_000.0, None).feasible
    assert not diagnose(12.0, 5_000.0, 4).feasible
    assert diagnose(12.0, 5_000.0, 2).feasible
    # The shared rule: 0 <= lower <= 1 <= upper, upper may be inf.
    em = EstimateMatrix.from_arrays(a[1:], [1e9], names=["income"], weights=w0)
    assert not diagnose_targets(em, bounds=(0.5, 2.0), target_records=2).feasible
    assert diagnose_targets(em, bounds=(0.5, float("inf")), target_records=2).feasible
    with pytest.raises(ParameterError, match=r"0 <= lower <= 1 <= upper"):
        diagnose_targets(em, bounds=(0.2, 0.8))
