"""The SparseCalibrationWeights drop-in and prune_entities."""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from l0calib import DataError, ParameterError
from l0calib.policyengine import SparseCalibrationWeights, prune_entities

PRODUCTION = {"init_keep_prob": 0.999, "log_weight_jitter_sd": 0.05, "log_alpha_jitter_sd": 0.01}
FIT = {"lambda_l0": 1e-8, "lambda_l2": 1e-12, "lr": 0.15, "loss_type": "relative"}


def cloned_problem(base: int = 400, clones: int = 25, seed: int = 0) -> tuple:
    """A problem shaped like PolicyEngine's: clones of a base sample, each clone placed in
    one of 50 areas, targets = areas x 4 bands (records far outnumber targets, each record
    in one target: 0.5% density)."""
    rng = np.random.default_rng(seed)
    n = base * clones
    band = np.tile(rng.integers(0, 4, base), clones)
    area = rng.integers(0, 50, n)
    value = np.tile(rng.uniform(1, 3, base), clones)
    rows = area * 4 + band
    m = sp.csr_matrix((value, (rows, np.arange(n))), shape=(200, n))
    true_w = rng.uniform(50, 150, n)
    y = (m @ true_w) * rng.uniform(0.95, 1.05, 200)
    groups = np.repeat(np.arange(50), 4)
    return m, y, groups, np.full(n, 100.0)


def _pipeline(m, y, groups, w0, chunks: int, epochs: int, *, save: bool, beta: float):
    model = SparseCalibrationWeights(m.shape[1], beta=beta, init_weights=w0, seed=7, **PRODUCTION)
    for _ in range(chunks):
        model.fit(m, y, epochs=epochs, target_groups=groups, **FIT)
        model.log_weight_jitter_sd = 0.0  # as the pipeline does after the first chunk
        if save:
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            buf.seek(0)
            model = SparseCalibrationWeights(
                m.shape[1], beta=beta, init_weights=w0, seed=7, **PRODUCTION
            )
            model.log_weight_jitter_sd = 0.0
            model.load_state_dict(torch.load(buf, weights_only=True))
    return model


@pytest.mark.parametrize("beta", [0.35, 0.65])
def test_chunks_equal_one_fit_and_save_load_changes_nothing(beta: float) -> None:
    m, y, groups, w0 = cloned_problem()
    one = _pipeline(m, y, groups, w0, 1, 60, save=False, beta=beta)
    chunked = _pipeline(m, y, groups, w0, 3, 20, save=False, beta=beta)
    resumed = _pipeline(m, y, groups, w0, 3, 20, save=True, beta=beta)
    w = one.get_weights(deterministic=True)
    assert torch.equal(w, chunked.get_weights(deterministic=True))
    assert torch.equal(w, resumed.get_weights(deterministic=True))
    assert int(resumed.epochs_done) == 60
    # The fit improved on the initial weights.
    start = np.abs((m @ w0 - y) / (y + 1)).mean()
    assert np.abs((one.predict(m).numpy() - y) / (y + 1)).mean() < start / 2


def test_predict_uses_the_matrix_it_is_given() -> None:
    m, y, _groups, w0 = cloned_problem(base=50, clones=4)
    model = SparseCalibrationWeights(m.shape[1], init_weights=w0, seed=0)
    model.fit(m, y, epochs=5)
    other = m.copy()
    other.data = other.data * 2  # same shape, same number of non-zeros
    w = model.get_weights(deterministic=True).detach().double().numpy()
    assert np.allclose(model.predict(m).numpy(), m @ w, rtol=1e-5)
    assert np.allclose(model.predict(other).numpy(), other @ w, rtol=1e-5)


def test_reference_loss_formulas() -> None:
    # Without gates the first epoch's loss is the reference's loss at the initial weights.
    m, y, groups, w0 = cloned_problem(base=50, clones=4)
    g = 1.0 / np.bincount(groups)[groups]
    for loss_type, expected in (
        ("relative", (g * ((y - m @ w0) / (y + 1)) ** 2).sum()),
        ("mse", (g * (y - m @ w0) ** 2).sum()),
    ):
        model = SparseCalibrationWeights(m.shape[1], init_weights=w0, use_gates=False, seed=0)
        model.fit(m, y, epochs=1, lr=1e-9, loss_type=loss_type, target_groups=groups)
        assert model.result_.history["fit_loss"].iloc[0] == pytest.approx(expected, rel=1e-4)


def test_target_records_gives_exactly_k_and_refits() -> None:
    m, y, groups, w0 = cloned_problem()
    model = SparseCalibrationWeights(m.shape[1], init_weights=w0, seed=1, **PRODUCTION)
    model.fit(m, y, epochs=150, target_groups=groups, target_records=1000, **FIT)
    active = model.get_active_weights()
    assert active["count"] == 1000
    err = np.abs((model.predict(m).numpy() - y) / y)
    assert err.mean() < 0.01
    assert model.result_.info["mean_abs_rel_error"] == pytest.approx(err.mean(), rel=1e-3)


def test_verbose_goes_through_logging(caplog: pytest.LogCaptureFixture, capsys) -> None:
    m, y, _, w0 = cloned_problem(base=50, clones=4)
    model = SparseCalibrationWeights(m.shape[1], init_weights=w0, seed=0)
    with caplog.at_level(logging.INFO, logger="l0calib.policyengine"):
        model.fit(m, y, epochs=20, verbose=True, verbose_freq=10, loss_type="relative")
    assert sum("epoch" in r.message for r in caplog.records) == 2
    assert capsys.readouterr().out == ""


def test_reference_checkpoint_loads() -> None:
    model = SparseCalibrationWeights(5, seed=0)
    state = {"log_weight": torch.full((5,), 2.0), "log_alpha": torch.full((5,), 3.0)}
    model.load_state_dict(state)
    assert torch.allclose(model.log_alpha, torch.full((5,), 3.0))
    assert torch.allclose(torch.exp(model.log_weight), torch.full((5,), np.e**2))


def test_drop_in_errors() -> None:
    with pytest.raises(ParameterError, match="gamma = -s, zeta = 1 \\+ s"):
        SparseCalibrationWeights(5, gamma=-0.2, zeta=1.1)
    with pytest.raises(ParameterError, match=r"init_weights array must have shape \(5,\)"):
        SparseCalibrationWeights(5, init_weights=np.ones(4))
    model = SparseCalibrationWeights(5)
    with pytest.raises(ParameterError, match=r"M must have shape \(n_targets, 5\)"):
        model.fit(sp.csr_matrix(np.ones((2, 4))), np.ones(2))
    with pytest.raises(ParameterError, match="group_multipliers requires target_groups"):
        model.fit(sp.csr_matrix(np.ones((2, 5))), np.ones(2), group_multipliers={0: 2.0})
    with pytest.raises(ParameterError, match="target_records must be between 1 and 5"):
        model.fit(sp.csr_matrix(np.ones((2, 5))), np.ones(2), target_records=6)


def test_against_the_reference_package() -> None:
    """Where l0-python is installed (bench extra): the same pipeline on both; l0calib's
    final error is no worse at a comparable number of kept records."""
    ref = pytest.importorskip("l0.calibration")
    m, y, groups, w0 = cloned_problem()
    torch.manual_seed(0)
    theirs = ref.SparseCalibrationWeights(m.shape[1], beta=0.35, init_weights=w0, seed=7,
                                          **PRODUCTION)  # fmt: skip
    ours = SparseCalibrationWeights(m.shape[1], beta=0.35, init_weights=w0, seed=7, **PRODUCTION)
    for model in (theirs, ours):
        for _ in range(3):
            model.fit(m, y, epochs=40, target_groups=groups, **FIT)
            model.log_weight_jitter_sd = 0.0
    errors, kept = [], []
    for model in (theirs, ours):
        w = model.get_weights(deterministic=True).detach().double().numpy()
        errors.append(np.abs((m @ w - y) / y).mean())
        kept.append(int((w > 0).sum()))
    assert abs(kept[0] - kept[1]) <= 0.02 * m.shape[1]
    assert errors[1] <= errors[0] * 1.05


# ---------------------------------------------------------------------------- entities
def _entities() -> dict[str, pd.DataFrame]:
    return {
        "household": pd.DataFrame({"household_id": [1, 2, 3]}),
        "person": pd.DataFrame({"person_id": range(6), "person_household_id": [1, 1, 2, 3, 3, 3]}),
        "tax_unit": pd.DataFrame(
            {"tax_unit_id": [10, 20, 30, 31], "tax_unit_household_id": [1, 2, 3, 3]}
        ),
    }


def test_prune_entities_drops_rows_of_dropped_households() -> None:
    out = prune_entities(_entities(), [1, 3])
    assert out["household"]["household_id"].tolist() == [1, 3]
    assert out["person"]["person_id"].tolist() == [0, 1, 3, 4, 5]
    assert out["tax_unit"]["tax_unit_id"].tolist() == [10, 30, 31]


def test_prune_entities_errors() -> None:
    bad = _entities()
    bad["person"].loc[2, "person_household_id"] = 9
    with pytest.raises(DataError, match="person table row 2: person_household_id=9 is not a"):
        prune_entities(bad, [1])
    split = _entities()
    split["tax_unit"].loc[3, "tax_unit_id"] = 30  # tax unit 30 now in households 3 and 3
    split["tax_unit"].loc[2, "tax_unit_household_id"] = 2
    with pytest.raises(DataError, match="tax_unit_id=30 belongs to 2 households"):
        prune_entities(split, [1])
    with pytest.raises(
        DataError, match="spm_unit table: link column 'spm_unit_household_id' is missing"
    ):
        prune_entities({"spm_unit": pd.DataFrame({"x": [1]})}, [1])
    out = prune_entities({"spm_unit": pd.DataFrame({"hh": [1, 2]})}, [2], links={"spm_unit": "hh"})
    assert out["spm_unit"]["hh"].tolist() == [2]
