"""Sharded calibration on torch.distributed (gloo, 2 processes): same answer as one process."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from l0calib import ParameterError, build_estimate_matrix, calibrate, synthetic_survey
from l0calib.distributed import calibrate_shard, shard_bounds

OPTIONS = {"epochs": 120, "dtype": "float64", "seed": 1}


def _problem():
    s = synthetic_survey(2000, seed=3)
    em = build_estimate_matrix(s.households, s.targets, s.persons)
    hold = np.zeros(em.n_targets, dtype=bool)
    hold[::10] = True
    return em, hold


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )


class _Stop(Exception):
    pass


def _worker(rank: int, world: int, port: int, out: str, mode: str, k: int | None) -> None:
    warnings.simplefilter("ignore")
    _init(rank, world, port)
    try:
        em, hold = _problem()
        a, b = shard_bounds(em.n_records, rank, world)
        shard = em.select_records(a, b)
        common = dict(offset=a, n_total=em.n_records, target_records=k, holdout=hold, **OPTIONS)
        if mode == "resume":
            ckpt = Path(out) / "ckpt"

            def stop(p):  # an interruption after the checkpoint of epoch 60
                if p.epoch == 75:
                    raise _Stop

            with contextlib.suppress(_Stop):
                calibrate_shard(shard, checkpoint_dir=ckpt, checkpoint_every=30, callback=stop,
                                **common)  # fmt: skip
            res = calibrate_shard(shard, checkpoint_dir=ckpt, checkpoint_every=30, resume=True,
                                  **common)  # fmt: skip
        elif mode == "die":

            def die(p):
                if rank == 1 and p.epoch == 5:
                    raise RuntimeError("rank 1 lost")

            res = calibrate_shard(shard, callback=die, **common)
        else:
            res = calibrate_shard(shard, **common)
        np.save(Path(out) / f"w{rank}.npy", res.weights)
        if rank == 0:
            np.save(Path(out) / "est.npy", res.report["estimate"].to_numpy())
            np.save(Path(out) / "hist.npy", res.history["loss"].to_numpy())
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, mode: str, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mp.spawn(_worker, args=(2, _port(), str(tmp_path), mode, k), nprocs=2)
    w = np.concatenate([np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w1.npy")])
    return w, np.load(tmp_path / "est.npy"), np.load(tmp_path / "hist.npy")


@pytest.mark.slow  # two processes under torch.distributed
@pytest.mark.parametrize("k", [300, None])
def test_two_ranks_equal_one_process(tmp_path: Path, k: int | None) -> None:
    em, hold = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Sharded runs make no exchange rounds (l0calib.exchange); the single process
        # is asked for none either.
        single = calibrate(em, target_records=k, holdout=hold, exchange_rounds=0, **OPTIONS)
    w, est, hist = _run(tmp_path, "plain", k)
    assert np.array_equal(w > 0, single.kept)
    kept = single.kept
    assert np.allclose(w[kept], single.weights[kept], rtol=1e-6, atol=0)
    assert np.allclose(est, single.report["estimate"], rtol=1e-9)
    assert np.allclose(hist, single.history["loss"], rtol=1e-9)
    if k is not None:
        assert int((w > 0).sum()) == k
        # The coverage exchange and the guarded swaps ran, and agree across ranks.
        assert single.info["coverage_exchanged"] > 0
        assert single.info["refit_swaps_refused_for_coverage"] > 0
        assert single.info["coverage_short"] == []


@pytest.mark.slow  # two processes under torch.distributed
def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    w_full, est_full, hist_full = _run(tmp_path / "a", "plain", 300)
    w_res, est_res, hist_res = _run(tmp_path / "b", "resume", 300)
    assert np.array_equal(est_full, est_res)
    assert np.array_equal(w_full, w_res)
    assert np.array_equal(hist_full, hist_res)
    assert (tmp_path / "b" / "ckpt" / "rank1.pt").exists()


@pytest.mark.slow  # two processes under torch.distributed
def test_a_dying_rank_fails_the_run(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="rank 1 lost"):
        _run(tmp_path, "die", 300)
    assert not (tmp_path / "w0.npy").exists()


def test_shard_bounds_and_errors() -> None:
    assert [shard_bounds(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    assert shard_bounds(1, 1, 2) == (1, 1)
    with pytest.raises(ParameterError, match="rank must be in"):
        shard_bounds(5, 2, 2)
    em, _ = _problem()
    with pytest.raises(ParameterError, match=r"initialised torch\.distributed process group"):
        calibrate_shard(em, offset=0, n_total=em.n_records)
