"""SampleGate, HybridGate, FeatureGate and pps_sample: exact counts, learning, edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from l0calib import (
    FeatureGate,
    HardConcrete,
    HybridGate,
    ParameterError,
    SampleGate,
    build_estimate_matrix,
    calibrate,
    pps_sample,
    refit,
    synthetic_survey,
)


@pytest.fixture(scope="module")
def survey() -> tuple:
    """The 5,000-household synthetic survey, its matrix and a fixed 10% holdout."""
    s = synthetic_survey(5000, seed=1)
    em = build_estimate_matrix(s.households, s.targets, s.persons)
    rng = np.random.default_rng(0)
    hold = np.zeros(em.n_targets, dtype=bool)
    hold[rng.choice(em.n_targets, em.n_targets // 10, replace=False)] = True
    return em, hold


# ---------------------------------------------------------------------------- pps_sample
def test_pps_sample_exact_sorted_and_seeded() -> None:
    w = np.arange(1.0, 101.0)
    idx, dw = pps_sample(w, 30, seed=3)
    assert idx.size == 30
    assert np.all(np.diff(idx) > 0)
    assert dw.sum() == pytest.approx(w.sum())
    again, _ = pps_sample(w, 30, seed=3)
    other, _ = pps_sample(w, 30, seed=4)
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx, other)


@pytest.mark.parametrize("k", [0, 1, 10])
def test_pps_sample_edge_counts(k: int) -> None:
    idx, dw = pps_sample(np.ones(10), k)
    assert idx.size == k == dw.size


def test_pps_sample_prefers_heavy_records() -> None:
    # Fixed seeds: inclusion frequency of weight-10 records vs weight-1 records in draws of 5.
    w = np.array([10.0] * 5 + [1.0] * 95)
    hits = np.zeros(100)
    for seed in range(400):
        hits[pps_sample(w, 5, seed=seed)[0]] += 1
    heavy, light = hits[:5].mean() / 400, hits[5:].mean() / 400
    # Exactly proportional would be 10x; without replacement it is a bit less.
    assert 6 < heavy / light < 11


def test_pps_sample_skips_zero_weights_until_needed() -> None:
    w = np.array([0.0, 1.0, 0.0, 2.0])
    assert pps_sample(w, 2)[0].tolist() == [1, 3]
    assert pps_sample(w, 4)[0].tolist() == [0, 1, 2, 3]


def test_pps_sample_strata_share_by_weight() -> None:
    strata = np.array(["a"] * 50 + ["b"] * 50)
    w = np.array([3.0] * 50 + [1.0] * 50)
    idx, dw = pps_sample(w, 20, seed=1, strata=strata)
    in_a = (idx < 50).sum()
    assert in_a == 15  # 20 * 150 / 200
    assert dw[idx < 50].sum() == pytest.approx(150.0)
    assert dw[idx >= 50].sum() == pytest.approx(50.0)


def test_pps_sample_strata_capped_by_size() -> None:
    strata = np.array([0] * 2 + [1] * 98)
    w = np.array([100.0] * 2 + [1.0] * 98)
    idx, _ = pps_sample(w, 10, strata=strata)
    assert idx.size == 10
    assert set(idx[:2]) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0, -1.0], "k": 1}, "finite and >= 0"),
        ({"weights": [1.0, 1.0], "k": 3}, "between 0 and 2"),
        ({"weights": [1.0, 1.0], "k": 1, "strata": [1]}, "one per record"),
        ({"weights": [1.0, 1.0], "k": 1, "strata": [1, None]}, "missing label at record 1"),
    ],
)
def test_pps_sample_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        pps_sample(**kwargs)


# ---------------------------------------------------------------------------- SampleGate
@pytest.mark.parametrize("k", [0, 1, 7, 50])
def test_untrained_sample_gate_selects_exactly_k(k: int) -> None:
    gate = SampleGate(n_samples=50, target_samples=k)
    data = torch.arange(100.0).reshape(50, 2)
    selected, idx = gate.select_samples(data)
    assert isinstance(selected, torch.Tensor)
    assert isinstance(idx, torch.Tensor)
    assert selected.shape == (k, 2)
    assert len(set(idx.tolist())) == k
    assert torch.equal(selected, data[idx])


def test_untrained_selection_is_seeded() -> None:
    a = SampleGate(100, 10, seed=1).select_samples(np.arange(100))[1]
    b = SampleGate(100, 10, seed=1).select_samples(np.arange(100))[1]
    c = SampleGate(100, 10, seed=2).select_samples(np.arange(100))[1]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dataframe_rows_keep_their_labels() -> None:
    df = pd.DataFrame({"x": range(20)}, index=[f"r{i}" for i in range(20)])
    sel, idx = SampleGate(20, 5).select_samples(df)
    assert isinstance(sel, pd.DataFrame)
    assert list(sel.index) == [f"r{i}" for i in idx]


def test_untrained_weighted_selection_inflates_weights() -> None:
    gate = SampleGate(10, 5)
    _, w, idx = gate.select_weighted_samples(np.arange(10), np.full(10, 3.0))
    assert w.tolist() == [6.0] * 5
    assert len(idx) == 5


def test_sample_gate_errors() -> None:
    with pytest.raises(ParameterError, match="target_samples must be an integer between 0 and 10"):
        SampleGate(10, 11)
    gate = SampleGate(10, 5)
    with pytest.raises(ParameterError, match="data has 9 samples"):
        gate.select_samples(np.arange(9))
    with pytest.raises(ParameterError, match="give weights, or call fit"):
        gate.select_weighted_samples(np.arange(10))
    with pytest.raises(ParameterError, match="nothing to fit"):
        SampleGate(4, 0).fit(np.eye(2, 4), [1.0, 1.0])
    with pytest.raises(ParameterError, match="the matrix has 4 records, the gate was made for 5"):
        SampleGate(5, 2).fit(np.ones((2, 4)), [1.0, 1.0])


def test_fitted_sample_gate_keeps_exactly_k_with_calibrated_weights(survey: tuple) -> None:
    em, hold = survey
    gate = SampleGate(em.n_records, 500, seed=0).fit(em, holdout=hold, epochs=200)
    data = pd.DataFrame({"id": np.arange(em.n_records)})
    sel, w, idx = gate.select_weighted_samples(data)
    assert len(sel) == 500 == len(idx)
    assert np.all(w > 0)
    assert np.array_equal(np.flatnonzero(gate.weights_), idx)
    assert np.allclose(em.estimates(gate.weights_), gate.result_.report["estimate"])
    # The learned keep-probabilities were loaded into the gates, and the kept records are
    # the likeliest but for those the coverage step, the refit's swaps and the exchange
    # rounds replaced (each counted in info).
    p = gate.keep_probability()
    assert np.allclose(p, gate.result_.keep_probability, atol=1e-5)
    info = gate.result_.info
    replaced = (
        info.get("coverage_exchanged", 0) + info["refit_swaps"] + info.get("exchange_swaps", 0)
    )
    assert (~np.isin(idx, np.argsort(-p)[:500])).sum() <= replaced


def test_sample_gate_of_every_record_calibrates_all() -> None:
    A = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    gate = SampleGate(3, 3).fit(A, [6.0, 4.0], weights=np.ones(3), epochs=100)
    assert gate.indices_.tolist() == [0, 1, 2]
    assert np.allclose(A @ gate.weights_, [6.0, 4.0], rtol=1e-5)


@pytest.mark.slow  # statistical
def test_fitted_gate_beats_random_selection(survey: tuple) -> None:
    """Fixed seeds: the gate's 1,000 of 5,000 records, recalibrated, fit and predict the
    holdout better than each of three probability-proportional draws, refitted the same way."""
    em, hold = survey
    gate = SampleGate(em.n_records, 1000).fit(em, holdout=hold)
    fit_err = gate.result_.info["mean_abs_rel_error"]
    hold_err = gate.result_.info["holdout_mean_abs_rel_error"]
    for seed in range(3):
        idx, dw = pps_sample(em.weights, 1000, seed=seed)
        start = np.zeros(em.n_records)
        start[idx] = dw
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = refit(em, idx, weights=start, holdout=hold)
        assert fit_err < r.info["mean_abs_rel_error"]
        assert hold_err < r.info["holdout_mean_abs_rel_error"]


# ---------------------------------------------------------------------------- HybridGate
@pytest.mark.parametrize(
    ("l0", "rand", "target", "n_l0", "n_random"),
    [
        (0.25, 0.75, 1000, 250, 750),
        (0.1, 0.3, 1000, 250, 750),  # fractions below 1 give the split
        (1.0, 0.0, 7, 7, 0),
        (0.0, 1.0, 7, 0, 7),
        (0.5, 0.5, 0, 0, 0),
        (0.33, 0.67, 10000, 3300, 6700),
    ],
)
def test_hybrid_counts_add_up(
    l0: float, rand: float, target: int, n_l0: int, n_random: int
) -> None:
    h = HybridGate(n_items=10000, l0_fraction=l0, random_fraction=rand, target_items=target)
    assert (h.n_l0, h.n_random) == (n_l0, n_random)
    _, idx, types = h.select(np.zeros((10000, 1)))
    assert len(idx) == target == len(set(idx.tolist()))
    assert int((types == "l0").sum()) == n_l0
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize(
    ("l0", "rand", "message"),
    [
        (0.7, 0.7, "at most 1"),
        (-0.1, 0.5, "l0_fraction must be between 0 and 1"),
        (0.0, 0.0, "both 0"),
        (float("nan"), 0.5, "finite number"),
    ],
)
def test_hybrid_invalid_fractions(l0: float, rand: float, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        HybridGate(100, l0, rand, 10)


def test_hybrid_default_target_and_random_seed() -> None:
    h = HybridGate(n_items=50)
    assert h.target_items == 10
    a = h.select(np.arange(50), random_seed=1)[1]
    b = h.select(np.arange(50), random_seed=2)[1]
    assert not np.array_equal(a, b)


def test_fitted_hybrid_keeps_its_random_part(survey: tuple) -> None:
    em, hold = survey
    h = HybridGate(em.n_records, 0.5, 0.5, target_items=600, seed=5)
    h.fit(em, holdout=hold, epochs=200)
    rand_idx, _ = pps_sample(em.weights, 300, seed=5)
    assert np.array_equal(h.indices_[h.types_ == "random"], rand_idx)
    assert len(h.indices_) == 600
    assert np.count_nonzero(h.weights_) == 600
    _, idx, types = h.select(np.arange(em.n_records))
    assert np.array_equal(idx, h.indices_)
    assert np.array_equal(types, h.types_)
    with pytest.raises(ParameterError, match="fixed by fit"):
        h.select(np.arange(em.n_records), random_seed=3)


def test_hybrid_all_random_refits_and_stratifies(survey: tuple) -> None:
    em, hold = survey
    strata = np.arange(em.n_records) % 4
    h = HybridGate(em.n_records, 0.0, 1.0, target_items=400).fit(em, holdout=hold, strata=strata)
    assert (h.types_ == "random").all()
    assert len(h.indices_) == 400
    assert h.result_.method == "refit"


# ---------------------------------------------------------------------------- always_keep
def test_always_keep_records_survive_and_count(survey: tuple) -> None:
    em, hold = survey
    must = np.arange(0, em.n_records, 50)  # 100 records
    res = calibrate(em, holdout=hold, target_records=300, always_keep=must, epochs=150)
    assert res.kept.sum() == 300
    assert res.kept[must].all()
    assert np.all(res.keep_probability[must] == 1.0)
    with pytest.raises(ParameterError, match="more than target_records"):
        calibrate(em, target_records=50, always_keep=must)


@pytest.mark.parametrize("n", [1000, 50_000])  # numpy float64 below 16,384 gates, else torch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shift_to_expected_hits_the_goal(n: int, dtype: torch.dtype) -> None:
    g = HardConcrete(n, seed=0, init_std=1.0, dtype=dtype)
    for goal in (0.123 * n, 0.5, n - 0.5):  # also near either end of the range
        g.shift_to_expected(goal)
        total = float(g.get_active_prob().detach().double().sum())
        assert total == pytest.approx(goal, rel=1e-6, abs=1e-6)
    g = HardConcrete(n, seed=1, init_std=30.0, dtype=dtype)  # logits over +-100: safeguarded
    g.shift_to_expected(0.3 * n)
    assert float(g.get_active_prob().detach().double().sum()) == pytest.approx(0.3 * n, rel=1e-6)
    mask = torch.arange(n) < 0.4 * n
    g.shift_to_expected(0.01 * n, mask)
    assert float(g.get_active_prob().detach()[mask].double().sum()) == pytest.approx(
        0.01 * n, rel=1e-6
    )
    with pytest.raises(ParameterError, match="goal must be in"):
        g.shift_to_expected(n + 1.0)


def test_small_shift_through_numpy_equals_the_torch_path() -> None:
    # Few gates without a mask take numpy end to end (a view of log_alpha); the masked call
    # below with every gate selected takes the general path with torch's sub_.
    for dtype in (torch.float32, torch.float64):
        a = HardConcrete(700, 2, seed=3, init_std=2.0, dtype=dtype)
        b = HardConcrete(700, 2, seed=3, init_std=2.0, dtype=dtype)
        for goal in (100.0, 1000.0, 1399.0):
            assert a.shift_to_expected(goal) == b.shift_to_expected(
                goal, torch.ones(700, 2, dtype=torch.bool)
            )
            assert torch.equal(a.log_alpha, b.log_alpha)
    # The write through numpy still counts as an in-place change for autograd.
    g = HardConcrete(50, seed=0)
    p = (g.log_alpha**2).sum()  # saves log_alpha for its backward
    g.shift_to_expected(10.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        p.backward()


# ---------------------------------------------------------------------------- FeatureGate
def _sparse_regression(seed: int, n: int = 300, p: int = 500, k: int = 10) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    true = np.sort(rng.choice(p, k, replace=False))
    beta = np.zeros(p)
    beta[true] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    return x, x @ beta + rng.standard_normal(n), true, beta


@pytest.mark.slow  # statistical
def test_feature_gate_recovers_a_sparse_support() -> None:
    x, y, true, beta = _sparse_regression(0)
    gate = FeatureGate(n_features=500, max_features=10).fit(x, y)
    assert set(gate.selected_) == set(true)
    assert np.abs(gate.coef_ - beta).max() < 0.3
    assert np.count_nonzero(gate.coef_) == 10
    resid = y - gate.predict(x)
    assert resid.std() < 1.2  # noise sd is 1


@pytest.mark.slow  # statistical
def test_feature_gate_classification() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 40))
    y = np.where(x[:, 3] - 2 * x[:, 17] + 0.3 * rng.standard_normal(400) > 0, "yes", "no")
    gate = FeatureGate(40, 2).fit(x, y, task="classification", epochs=400)
    assert set(gate.selected_) == {3, 17}
    assert gate.coef_.shape == (2, 40)
    assert list(gate.classes_) == ["no", "yes"]
    assert (gate.predict(x) == y).mean() > 0.9


def test_feature_selection_types_and_names() -> None:
    x, y, true, _ = _sparse_regression(2, n=200, p=30, k=3)
    df = pd.DataFrame(x, columns=[f"f{j}" for j in range(30)])
    gate = FeatureGate(30, 3).fit(df, y, epochs=300)
    sel, idx = gate.select_features(df)
    assert isinstance(sel, pd.DataFrame)
    assert list(sel.columns) == [f"f{j}" for j in idx]
    _, names = gate.select_features_with_names(df)
    assert names == [f"f{j}" for j in true]
    t_sel, t_idx = gate.select_features(torch.as_tensor(x))
    assert t_sel.shape == (200, 3)
    assert isinstance(t_idx, torch.Tensor)
    imp = gate.get_feature_importance()
    assert imp.shape == (30,)
    assert float(imp[true].min()) > float(np.delete(imp.numpy(), true).max())


def test_untrained_feature_gate_and_errors() -> None:
    gate = FeatureGate(n_features=100, max_features=5)
    sel, idx = gate.select_features(np.zeros((3, 100)))
    assert sel.shape == (3, 5)
    assert len(set(idx.tolist())) == 5
    with pytest.raises(ParameterError, match="at most n_features"):
        FeatureGate(5, 6)
    with pytest.raises(ParameterError, match="call fit"):
        gate.predict(np.zeros((1, 100)))
    with pytest.raises(ParameterError, match=r"X must have shape \(n_obs, 100\)"):
        gate.fit(np.zeros((3, 99)), np.zeros(3))
    with pytest.raises(ParameterError, match="task must be"):
        gate.fit(np.zeros((3, 100)), np.zeros(3), task="ranking")
    with pytest.raises(ParameterError, match="at least two classes"):
        gate.fit(np.zeros((3, 100)), np.zeros(3), task="classification")
