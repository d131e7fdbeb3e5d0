"""Sharded calibration at PolicyEngine's size: 5,000,000 records x 20,000 targets on CPU.

    python benchmarks/bench_distributed.py --records 5000000 --targets 20000 --nproc 2
    python benchmarks/bench_distributed.py --records 5000000 --targets 20000 --nproc 1
    python benchmarks/bench_distributed.py ... --target-records 1000000 --epochs 100 --refit

The problem is generated shard by shard (no process ever holds all of it): record i is a
clone of base record i mod 20,000 and contributes to --per-record distinct targets chosen by
a hash of (i, j), with values from its base record; initial weights 100, targets = A @ w*
for w* = 100 * U(0.8, 1.2) keyed by record, times U(0.97, 1.03) per target (the partial
totals are all-reduced once). About 0.1% density at 20 targets per record of 20,000.

Reported per run: seconds per training epoch (mean of epochs 3..), peak RSS per process
(VmHWM), non-zeros, bytes moved per epoch by the two sparse passes (A w and A^T g over the
float32 values and int32 column indices), the memory-bandwidth floor (those bytes over the
machine's copy bandwidth: every core copying at once, summed, since the ranks stream their
shares at the same time), and with --target-records the whole run (training, exact top-K,
refit). Also reported: the ratio to the floor at one core's copy bandwidth, the measure
used before 2026-11-25's correction (each core of this machine gets nearly the whole
single-core bandwidth while the other copies too, so that floor was about 2x too high).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time

import numpy as np


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024


def _uniform(seed: int, stream: int, idx: np.ndarray) -> np.ndarray:
    import torch

    from l0calib.noise import counter_uniform

    return counter_uniform(seed, stream, torch.from_numpy(idx)).numpy()


def shard(start: int, stop: int, targets: int, per: int, base: int = 20_000):
    """This block's columns of A (CSR, targets x block), w0 and w* (by global index)."""
    import scipy.sparse as sp

    idx = np.arange(start, stop, dtype=np.int64)
    n = idx.size
    base_value = 0.5 + _uniform(11, 0, np.arange(base, dtype=np.int64)) * 2.5
    rows = np.empty((n, per), dtype=np.int64)
    for j in range(per):
        # Distinct targets per record: a different residue class for each j.
        span = targets // per
        h = (_uniform(12, j, idx) * span).astype(np.int64)
        rows[:, j] = j * span + h
    vals = np.repeat(base_value[idx % base], per).astype(np.float64)
    cols = np.repeat(np.arange(n), per)
    a = sp.csr_matrix((vals, (rows.ravel(), cols)), shape=(targets, n))
    w0 = np.full(n, 100.0)
    w_star = 100.0 * (0.8 + 0.4 * _uniform(13, 0, idx))
    return a, w0, w_star


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    from l0calib import EstimateMatrix
    from l0calib.distributed import calibrate_shard, shard_bounds

    torch.set_num_threads(max(1, 2 // world))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))  # fmt: skip
    start, stop = shard_bounds(args.records, rank, world)
    a, w0, w_star = shard(start, stop, args.targets, args.per_record)
    partial = torch.tensor(a @ w_star)
    dist.all_reduce(partial)
    noise = 0.97 + 0.06 * _uniform(14, 0, np.arange(args.targets, dtype=np.int64))
    t = partial.numpy() * noise
    em = EstimateMatrix(
        matrix=a, names=tuple(f"t{k}" for k in range(args.targets)), values=t,
        groups=np.array([None] * args.targets, dtype=object),
        importance=np.ones(args.targets), tolerance=np.zeros(args.targets), weights=w0,
    )  # fmt: skip
    stamps: list[float] = []
    begin = time.perf_counter()
    res = calibrate_shard(
        em, offset=start, n_total=args.records, target_records=args.target_records,
        epochs=args.epochs, refit=args.refit, seed=0, patience=10**9,
        callback=lambda p: stamps.append(time.perf_counter()),
    )  # fmt: skip
    total = time.perf_counter() - begin
    per_epoch = (stamps[-1] - stamps[2]) / (len(stamps) - 3)
    stats = torch.tensor([_hwm_mb(), float(a.nnz)], dtype=torch.float64)
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        nnz = int(sum(float(g[1]) for g in gathered))
        with open(out, "w") as f:
            json.dump({
                "nproc": world, "records": args.records, "targets": args.targets, "nnz": nnz,
                "seconds_per_epoch": per_epoch, "seconds_total": total,
                "peak_rss_mb_per_process": [float(g[0]) for g in gathered],
                "kept": int(res.diagnostics.n_kept),
                "mean_abs_rel_error": res.info["mean_abs_rel_error"],
                "epochs": res.n_iter,
            }, f)  # fmt: skip
    dist.destroy_process_group()


def _copy_rate(barrier=None) -> float:
    """Bytes per second (read + write) of one core copying 400 MB, 5 times."""
    big = np.ones(50_000_000)
    dst = np.zeros_like(big)
    np.copyto(dst, big)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, big)
    return 5 * 2 * big.nbytes / (time.perf_counter() - t0)


def copy_bandwidth(cores: int) -> float:
    """The machine's copy bandwidth with ``cores`` cores copying at once (summed): the
    bandwidth the ranks share while they stream their non-zeros."""
    if cores == 1:
        return _copy_rate()
    import multiprocessing as mproc

    ctx = mproc.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(cores)
        with ctx.Pool(cores) as pool:
            return float(sum(pool.map(_copy_rate, [barrier] * cores)))


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=5_000_000)
    p.add_argument("--targets", type=int, default=20_000)
    p.add_argument("--per-record", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--target-records", type=int, default=None)
    p.add_argument("--refit", action="store_true")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(worker, args=(args.nproc, port, args, out), nprocs=args.nproc)
    with open(out) as f:
        r = json.load(f)
    cores = os.cpu_count() or 1  # the workers use every core (threads = cores // nproc)
    bw, bw_one = copy_bandwidth(cores), copy_bandwidth(1)
    moved = 2 * r["nnz"] * 8  # float32 value + int32 index, two passes
    r.update({"bytes_per_epoch": moved, "cores": cores,
              "copy_bandwidth_gb_s": bw / 1e9, "floor_seconds_per_epoch": moved / bw,
              "ratio_to_floor": r["seconds_per_epoch"] / (moved / bw),
              "one_core_copy_bandwidth_gb_s": bw_one / 1e9,
              "ratio_to_one_core_floor": r["seconds_per_epoch"] / (moved / bw_one)})  # fmt: skip
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
