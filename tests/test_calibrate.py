"""The calibration engine: exact counts, exact fits, determinism, errors, outputs.

Problems are small and synthetic with known answers (targets computed from known weights).
Every run uses a fixed seed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from l0calib import (
    CalibrationResult,
    ConvergenceWarning,
    ParameterError,
    TargetError,
    build_estimate_matrix,
    calibrate,
    refit,
)
from l0calib.calibrate import HISTORY_COLUMNS, LOG_COLUMNS, Progress

from .conftest import FIXTURES


def consistent_problem(n_targets: int = 12, n: int = 300, seed: int = 0):
    """A sparse non-negative A, initial weights, and targets hit exactly by known weights."""
    rng = np.random.default_rng(seed)
    a = sp.random(n_targets, n, density=0.3, random_state=rng, format="csr")
    a.data = rng.uniform(0.5, 2.0, a.nnz)
    a = sp.vstack([sp.csr_matrix(np.ones((1, n))), a]).tocsr()  # a population count
    w0 = rng.uniform(50, 150, n)
    w_true = w0 * rng.uniform(0.7, 1.4, n)
    return a, a @ w_true, w0


@pytest.fixture(scope="module")
def survey_em():
    d = FIXTURES / "survey_5k"
    return build_estimate_matrix(d / "households.parquet", d / "targets.csv", d / "persons.parquet")


# ---------------------------------------------------------------- fits and counts
def test_consistent_problem_fitted_without_pruning() -> None:
    a, t, w0 = consistent_problem()
    res = calibrate(a, t, weights=w0, epochs=200)
    assert isinstance(res, CalibrationResult)
    assert res.kept.all()
    assert res.report["abs_rel_error"].max() < 1e-6
    assert res.converged
    assert (res.weights > 0).all()
    assert res.info["target_records"] is None


@pytest.mark.parametrize("k", [1, 5, 150, 299, 300])
def test_exact_record_count(k: int) -> None:
    a, t, w0 = consistent_problem()
    res = calibrate(a, t, weights=w0, target_records=k, epochs=150, seed=1)
    assert int((res.weights != 0).sum()) == k
    assert res.kept.sum() == k
    assert res.diagnostics.n_kept == k
    assert (res.weights >= 0).all()


def test_exact_count_on_survey_with_fewer_records_than_targets(survey_em) -> None:
    k = 100  # fewer records than the 236 targets
    res = calibrate(survey_em, target_records=k, epochs=100, seed=0)
    assert int(np.count_nonzero(res.weights)) == k
    assert len(res.history) <= 100


def test_pruned_fit_beats_the_initial_weights(survey_em) -> None:
    res = calibrate(survey_em, target_records=1000, epochs=300, seed=0)
    initial = np.abs(survey_em.estimates(survey_em.weights) / survey_em.values - 1).mean()
    assert res.info["mean_abs_rel_error"] < initial / 10
    # the refit never makes the fit worse than the trained, pruned weights
    assert res.info["mean_abs_rel_error"] <= res.info["mean_abs_rel_error_before_refit"]


def test_same_seed_same_weights_other_seed_differs(survey_em) -> None:
    kw = {"target_records": 500, "epochs": 60}
    a = calibrate(survey_em, seed=3, **kw)
    b = calibrate(survey_em, seed=3, **kw)
    c = calibrate(survey_em, seed=4, **kw)
    np.testing.assert_array_equal(a.weights, b.weights)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert not np.array_equal(a.kept, c.kept)


def test_lambda_l0_without_target_records_prunes_and_zero_does_not() -> None:
    a, t, w0 = consistent_problem(n=400)
    none = calibrate(a, t, weights=w0, lambda_l0=0.0, epochs=50)
    assert none.kept.all()
    pruned = calibrate(a, t, weights=w0, lambda_l0=0.5, epochs=300)
    assert 0 < pruned.diagnostics.n_kept < 400
    assert pruned.history["lambda_l0"].eq(0.5).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtypes(dtype: str) -> None:
    a, t, w0 = consistent_problem()
    res = calibrate(a, t, weights=w0, target_records=100, epochs=50, dtype=dtype)
    assert res.info["dtype"] == dtype
    assert res.kept.sum() == 100


def test_squared_loss_and_tolerance_hinge() -> None:
    a, t, w0 = consistent_problem()
    res = calibrate(a, t, weights=w0, epochs=100, loss="squared")
    assert res.report["abs_rel_error"].max() < 1e-6
    # a target inside its tolerance costs nothing: with only it, nothing moves
    one = np.array([[1.0, 1.0]])
    from l0calib import EstimateMatrix

    em = EstimateMatrix.from_arrays(one, [2.1], tolerance=[0.1], weights=[1.0, 1.0])
    res = calibrate(em, epochs=30)
    assert res.report["within_tolerance"].all()
    np.testing.assert_allclose(res.weights, [1.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------------- holdout, report, history
def test_holdout_is_reported_but_not_fitted() -> None:
    a, t, w0 = consistent_problem()
    t = t.copy()
    t[3] *= 1.5  # an inconsistent target, held out: must not pull the fit
    res = calibrate(a, t, weights=w0, epochs=200, holdout=["target_3"])
    fitted = res.report[~res.report["holdout"]]
    assert fitted["abs_rel_error"].max() < 1e-6
    assert res.report.loc[3, "holdout"]
    assert res.report.loc[3, "abs_rel_error"] > 0.05
    assert list(res.report.columns) == [
        "name", "target", "estimate", "error", "rel_error", "abs_rel_error",
        "within_tolerance", "holdout",
    ]  # fmt: skip
    assert res.holdout_errors().index.tolist() == ["target_3"]
    assert res.info["holdout_mean_abs_rel_error"] == pytest.approx(
        res.report.loc[3, "abs_rel_error"]
    )


def test_zero_support_target_allowed_in_holdout_only() -> None:
    a = sp.csr_matrix(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(TargetError, match=re.escape(
        "1 fitted target(s) have no record contributing (all-zero rows): target_1"
    )):  # fmt: skip
        calibrate(a, [3.0, 1.0], weights=np.ones(3))
    res = calibrate(a, [3.0, 1.0], weights=np.ones(3), holdout=[False, True], epochs=20)
    assert res.report.loc[1, "estimate"] == 0


def test_history_and_diagnostics() -> None:
    a, t, w0 = consistent_problem()
    res = calibrate(a, t, weights=w0, target_records=100, epochs=80, patience=1000)
    assert list(res.history.columns) == list(HISTORY_COLUMNS)
    assert len(res.history) == 80
    assert res.history["survivor_goal"].iloc[-1] == 100
    assert res.history["expected_survivors"].iloc[-1] == pytest.approx(100, rel=1e-5)
    d = res.diagnostics
    w = res.weights[res.weights > 0]
    assert d.effective_sample_size == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert d.design_effect == pytest.approx(100 / d.effective_sample_size)
    assert d.ratio_min <= d.ratio_quartiles[1] <= d.ratio_max


def test_callback_sees_progress_and_can_stop() -> None:
    a, t, w0 = consistent_problem()
    seen: list[Progress] = []

    def cb(p: Progress) -> bool:
        seen.append(p)
        return p.epoch < 7

    res = calibrate(a, t, weights=w0, target_records=50, epochs=100, callback=cb)
    assert [p.epoch for p in seen] == [*range(1, 8), 7]
    assert res.n_iter == 7
    assert res.kept.sum() == 50  # selection and refit still run
    assert [p.phase for p in seen] == ["train"] * 7 + ["select"]  # then selection and refit
    assert seen[0].goal is not None


def test_log_file_in_microcalibrate_format(tmp_path: Path) -> None:
    a, t, w0 = consistent_problem(n_targets=3)
    path = tmp_path / "log.csv"
    calibrate(
        a, t, weights=w0, epochs=25, log_path=path, log_every=10, patience=1000,
        refit_anchor="trained",  # without gates, an "initial" anchor skips training
    )  # fmt: skip
    log = pd.read_csv(path)
    assert list(log.columns) == list(LOG_COLUMNS)
    assert sorted(log["epoch"].unique().tolist()) == [1, 10, 20, 26]  # 26: after the refit
    assert len(log) == 4 * 4
    last = log[log["epoch"] == 26]
    assert last["rel_abs_error"].max() < 1e-6
    assert not list(tmp_path.glob("*.partial"))


def test_no_log_file_after_a_failure(tmp_path: Path) -> None:
    a, t, w0 = consistent_problem()
    path = tmp_path / "log.csv"

    def boom(p: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(a, t, weights=w0, epochs=10, log_path=path, callback=boom)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_miss_warns_and_sets_converged_false() -> None:
    a = np.array([[1.0, 1.0], [1.0, 1.0]])
    with pytest.warns(ConvergenceWarning, match="outside the requested tolerance 0.001"):
        res = calibrate(a, [2.0, 4.0], weights=np.ones(2), epochs=20, tol=1e-3)
    assert not res.converged


def test_refit_function_on_a_random_subset() -> None:
    a, t, w0 = consistent_problem(n=400)
    keep = np.random.default_rng(0).choice(400, size=200, replace=False)
    res = refit(a, keep, t, weights=w0 * 2, lambda_l2=1e-6)  # a near-exact fit is possible
    assert res.method == "refit"
    assert set(np.flatnonzero(res.kept)) <= set(keep)
    assert res.report["abs_rel_error"].max() < 1e-4


# ---------------------------------------------------------------- errors
A3 = np.array([[1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": np.ones(2)}, "weights has length 2, but the matrix has 3 records"),
        ({"weights": [1.0, -1.0, 1.0]}, "weights must be >= 0; 1 are negative"),
        ({"weights": [1.0, np.nan, 1.0]}, "weights must be finite; 1 are NaN or infinite"),
        ({"weights": [0.0, 0.0, 0.0]}, "weights are all zero"),
        (
            {"target_records": 4},
            "target_records must be between 1 and the number of records (3), got 4",
        ),
        ({"target_records": 0}, "target_records must be between 1 and the number of records"),
        ({"target_records": 2.5}, "target_records must be an integer"),
        ({"target_records": 2, "lambda_l0": 0.1}, "lambda_l0 is steered automatically"),
        ({"lambda_l0": -1.0}, "lambda_l0 must be a finite number >= 0"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"loss": "l1"}, "loss must be 'relative' or 'squared'"),
        ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'auto'"),
        ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
        ({"holdout": ["nope"]}, "unknown target name 'nope'"),
        ({"holdout": [True]}, "every target is in the holdout"),
        ({"init_keep": 1.0}, "init_keep must be strictly between 0 and 1"),
        ({"scale_floor": 0.0}, "scale_floor must be > 0"),
    ],
)
def test_errors(kwargs: dict, message: str) -> None:
    kwargs = {"weights": np.ones(3), **kwargs}
    with pytest.raises((ParameterError, TargetError), match=re.escape(message)):
        calibrate(A3, [3.0], **kwargs)


def test_matrix_errors() -> None:
    with pytest.raises(ParameterError, match=re.escape("matrix has 1 non-finite (NaN or inf)")):
        calibrate(np.array([[1.0, np.nan]]), [1.0], weights=np.ones(2))
    with pytest.raises(ParameterError, match="targets has length 2, expected 1"):
        calibrate(A3, [1.0, 2.0], weights=np.ones(3))
    with pytest.raises(ParameterError, match=r"weights .* are required"):
        calibrate(A3, [1.0])


def test_cuda_request_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ParameterError, match="no CUDA device"):
        calibrate(A3, [3.0], weights=np.ones(3), device="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    a, t, w0 = consistent_problem()
    cpu = calibrate(a, t, weights=w0, target_records=100, epochs=50, dtype="float64")
    gpu = calibrate(a, t, weights=w0, target_records=100, epochs=50, dtype="float64", device="cuda")
    np.testing.assert_array_equal(cpu.kept, gpu.kept)
    np.testing.assert_allclose(cpu.weights, gpu.weights, rtol=1e-6)


def test_no_warnings_on_a_normal_run() -> None:
    a, t, w0 = consistent_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(a, t, weights=w0, target_records=100, epochs=30)


def test_default_selection_follows_records_per_target() -> None:
    # 13 fitted targets: from 20 x 13 = 260 kept records the default selection is balanced.
    a, t, w0 = consistent_problem()
    runs = {k: calibrate(a, t, weights=w0, target_records=k, epochs=80, seed=0) for k in (259, 260)}
    assert runs[259].info["selection"] == "free"
    assert runs[259].info["lambda_l2"] == 1e-3
    assert runs[260].info["selection"] == "balanced"
    assert runs[260].info["lambda_l2"] == 10.0
    given = calibrate(a, t, weights=w0, target_records=260, lambda_l2=0.5, epochs=20)
    assert given.info["selection"] == "given"
    assert given.info["lambda_l2"] == 0.5
    assert calibrate(a, t, weights=w0, epochs=20).info["selection"] == "free"


def test_fused_gated_records_match_autograd_of_the_formula() -> None:
    # The engine's per-record terms have a hand-written gradient; compare value and
    # gradient in float64 with autograd through HardConcrete's own formulas.
    import torch

    from l0calib.calibrate import _GatedRecords
    from l0calib.hardconcrete import HardConcrete

    n = 300
    g = torch.Generator().manual_seed(0)
    gates = HardConcrete(n, temperature=0.4, init_mean=0.6, seed=1, dtype=torch.float64)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 3)
    u = (torch.randn(n, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    w0 = torch.rand(n, generator=g, dtype=torch.float64) * 50 + 1
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[::7] = True
    coef = torch.randn(n, 3, generator=g, dtype=torch.float64)  # a stand-in for the loss

    def loss(w, l2, expected):
        return ((w @ coef) ** 2).sum() * 1e-4 + 0.7 * l2 + 0.3 * expected

    noise = gates.next_noise()
    w, l2, expected = _GatedRecords.apply(u, gates.log_alpha, noise.clone(), w0, 1.7, gates, fixed)
    got = torch.autograd.grad(loss(w, l2, expected), [u, gates.log_alpha])

    la = gates.log_alpha
    s = torch.sigmoid((noise + la) / gates.temperature)
    z = (gates.gamma + (gates.zeta - gates.gamma) * s).clamp(0, 1)
    z = torch.where(fixed, torch.ones_like(z), z)
    p = torch.where(fixed, torch.ones_like(z), gates.get_active_prob())
    r = torch.exp(u)
    want_terms = (1.7 * w0 * r * z, (p * (r - 1) ** 2).sum(), p.sum())
    want = torch.autograd.grad(loss(*want_terms), [u, la])
    for a, b in zip((w, l2, expected), want_terms, strict=True):
        assert torch.allclose(a, b, rtol=1e-12)
    assert 0 < int(((z > 0) & (z < 1)).sum()) < n  # some gates clamped, some not
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.all(got[1][fixed] == 0)
