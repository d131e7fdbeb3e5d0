"""Thread choice (l0calib/threads.py): by problem size, capped at the cores, restored after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import l0calib.threads as threads_mod
from l0calib import ParameterError, calibrate, refit
from l0calib.threads import available_cores, choose_threads, limit_threads


def test_small_problems_use_one_thread_large_ones_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert choose_threads(100_000, 1_000_000) == 1
    monkeypatch.setattr(threads_mod, "LARGE_RECORDS", 1000)
    assert choose_threads(100_000, 1_000_000) == available_cores()
    monkeypatch.setattr(threads_mod, "LARGE_RECORDS", 10**9)
    monkeypatch.setattr(threads_mod, "LARGE_NONZEROS", 1000)
    assert choose_threads(100_000, 1_000_000) == available_cores()


def test_requested_threads_are_capped_at_the_cores() -> None:
    assert choose_threads(10, 10, requested=1) == 1
    assert choose_threads(10, 10, requested=10_000) == available_cores()
    with pytest.raises(ParameterError, match="threads must be a positive integer"):
        choose_threads(10, 10, requested=0)


def test_limit_threads_restores_the_previous_setting() -> None:
    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fits_report_and_restore_their_thread_count() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (3, 50))
    w0 = np.ones(50)
    t = a @ (w0 * rng.uniform(0.8, 1.2, 50))
    before = torch.get_num_threads()
    res = calibrate(a, t, weights=w0, target_records=20, epochs=20, threads=1)
    assert res.info["threads"] == 1
    assert torch.get_num_threads() == before
    assert refit(a, np.arange(50), t, weights=w0, threads=1).info["threads"] == 1
    with pytest.raises(ParameterError, match="threads"):
        calibrate(a, t, weights=w0, threads=0)
