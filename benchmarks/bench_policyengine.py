"""The SparseCalibrationWeights drop-in against l0-python's class, on the same matrix.

    python benchmarks/bench_policyengine.py survey --households 100000 --epochs 100
    python benchmarks/bench_policyengine.py clones --records 2000000 --targets 5000 --epochs 20

Both run PolicyEngine's production settings: beta 0.35, init_keep_prob 0.999, jitters
0.05 (log_weight, first fit only) / 0.01 (log_alpha), lambda_l2 1e-12, lr 0.15, relative
loss, target groups normalised; lambda_l0 as given (--lambda-l0, default 1e-8). Each method
runs in its own child process so its peak RSS (VmHWM) is its own. Reported: seconds per
epoch (after a 2-epoch warm-up), peak RSS, records kept, mean abs relative error
(|M w - y| / y over targets).

survey: synthetic_survey(N) (~500 targets, households x targets).
clones: a problem shaped like PolicyEngine's: a base sample of 20,000 records cloned to
--records columns, each clone assigned to one of --targets / 4 areas, targets = area x 4
bands plus 50 national totals (each record in 2 targets: ~0.04% density at 5,000 targets).
Needs the `bench` extra (l0-python==0.6.2).

    python benchmarks/bench_policyengine.py replay --lambda-l0 1e-3 --chunks 5 --epochs 100

replays policyengine-us-data's chunked call sequence (fit_l0_weights: --chunks fits of
--epochs each, no target groups, the log_weight jitter zeroed after the first) on the
problem of tests/test_policyengine.py (400 base records x 25 clones = 10,000 records, 200
targets) with l0-python, l0calib (default: a new Adam per fit, as l0-python) and l0calib
with keep_optimizer=True, for --seeds seeds; reports records kept and mean abs relative
error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

SETTINGS = {"beta": 0.35, "init_keep_prob": 0.999, "log_weight_jitter_sd": 0.05,
            "log_alpha_jitter_sd": 0.01}  # fmt: skip


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024


def problem(kind: str, size: int, targets: int, seed: int = 0):
    import scipy.sparse as sp

    if kind == "survey":
        from l0calib import build_estimate_matrix, synthetic_survey

        s = synthetic_survey(size, seed=seed)
        em = build_estimate_matrix(s.households, s.targets, s.persons)
        labels = {g: i for i, g in enumerate(dict.fromkeys(em.groups))}
        return em.matrix, em.values, np.array([labels[g] for g in em.groups]), em.weights
    rng = np.random.default_rng(seed)
    base = 20_000
    n = size
    areas = (targets - 50) // 4
    band = np.tile(rng.integers(0, 4, base), n // base + 1)[:n]
    value = np.tile(rng.uniform(1, 3, base), n // base + 1)[:n]
    area = rng.integers(0, areas, n)
    national = rng.integers(0, 50, n)
    rows = np.concatenate([area * 4 + band, areas * 4 + national])
    cols = np.concatenate([np.arange(n), np.arange(n)])
    vals = np.concatenate([value, np.ones(n)])
    m = sp.csr_matrix((vals, (rows, cols)), shape=(areas * 4 + 50, n))
    w0 = np.full(n, 100.0)
    y = (m @ (w0 * rng.uniform(0.8, 1.2, n))) * rng.uniform(0.97, 1.03, m.shape[0])
    groups = np.concatenate([np.repeat(np.arange(areas), 4), np.full(50, areas)])
    return m, y, groups, w0


def run(which: str, kind: str, size: int, targets: int, epochs: int, lam: float) -> dict:
    import torch

    m, y, groups, w0 = problem(kind, size, targets)
    base = _hwm_mb()
    if which == "l0calib":
        from l0calib.policyengine import SparseCalibrationWeights
    else:
        from l0.calibration import SparseCalibrationWeights
    torch.manual_seed(0)
    model = SparseCalibrationWeights(m.shape[1], init_weights=w0, seed=0, **SETTINGS)
    fit = {"lambda_l0": lam, "lambda_l2": 1e-12, "lr": 0.15, "loss_type": "relative",
           "target_groups": groups}  # fmt: skip
    model.fit(m, y, epochs=2, **fit)  # warm-up (and the jitter)
    model.log_weight_jitter_sd = 0.0
    start = time.perf_counter()
    model.fit(m, y, epochs=epochs, **fit)
    per_epoch = (time.perf_counter() - start) / epochs
    w = model.get_weights(deterministic=True).detach().double().numpy()
    err = np.abs(m @ w - y) / np.abs(y)
    return {"method": which, "records": int(m.shape[1]), "targets": int(m.shape[0]),
            "nnz": int(m.nnz), "seconds_per_epoch": per_epoch, "peak_rss_mb": _hwm_mb(),
            "rss_after_problem_mb": base, "kept": int((w > 0).sum()),
            "mean_abs_rel_error": float(err.mean())}  # fmt: skip


def cloned_problem(base: int = 400, clones: int = 25, seed: int = 0) -> tuple:
    """The problem of tests/test_policyengine.py: clones of a base sample in 50 areas,
    targets = areas x 4 bands."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = base * clones
    band = np.tile(rng.integers(0, 4, base), clones)
    area = rng.integers(0, 50, n)
    value = np.tile(rng.uniform(1, 3, base), clones)
    m = sp.csr_matrix((value, (area * 4 + band, np.arange(n))), shape=(200, n))
    y = (m @ rng.uniform(50, 150, n)) * rng.uniform(0.95, 1.05, 200)
    return m, y, np.full(n, 100.0)


def replay(lam: float, chunks: int, epochs: int, seeds: int) -> None:
    import torch
    from l0.calibration import SparseCalibrationWeights as Reference

    from l0calib.policyengine import SparseCalibrationWeights

    m, y, w0 = cloned_problem()
    fit = {"lambda_l0": lam, "lambda_l2": 1e-12, "lr": 0.15, "loss_type": "relative"}
    print("| method | kept (seed 0, 1, ...) | mean abs rel error | seconds |")
    print("|---|---|---|---|")
    for name, make in (
        ("l0-python", Reference),
        ("l0calib", SparseCalibrationWeights),
        ("l0calib keep_optimizer", lambda *a, **k: SparseCalibrationWeights(
            *a, keep_optimizer=True, **k)),
    ):  # fmt: skip
        kept, errors, start = [], [], time.perf_counter()
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = make(m.shape[1], init_weights=w0, seed=seed, **SETTINGS)
            for _ in range(chunks):
                model.fit(m, y, epochs=epochs, target_groups=None, **fit)
                model.log_weight_jitter_sd = 0.0
            w = model.get_weights(deterministic=True).detach().double().numpy()
            kept.append(f"{int((w > 0).sum()):,}")
            errors.append(f"{np.abs((m @ w - y) / y).mean():.3f}")
        print(f"| {name} | {' / '.join(kept)} | {' / '.join(errors)} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        which, kind, size, targets, epochs, lam = sys.argv[2:8]
        print(json.dumps(run(which, kind, int(size), int(targets), int(epochs), float(lam))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["survey", "clones", "replay"])
    p.add_argument("--households", type=int, default=100_000)
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--targets", type=int, default=5_000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lambda-l0", type=float, default=1e-8)
    p.add_argument("--only", choices=["l0calib", "l0python"])
    p.add_argument("--chunks", type=int, default=5, help="replay: fits per run")
    p.add_argument("--seeds", type=int, default=3, help="replay: seeds 0..N-1")
    a = p.parse_args()
    if a.kind == "replay":
        replay(a.lambda_l0, a.chunks, a.epochs, a.seeds)
        return
    size = a.households if a.kind == "survey" else a.records
    rows = []
    for which in ("l0calib", "l0python"):
        if a.only and which != a.only:
            continue
        out = subprocess.run(
            [sys.executable, __file__, "_run", which, a.kind, str(size), str(a.targets),
             str(a.epochs), str(a.lambda_l0)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode:
            print(f"{which} failed:\n{out.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(
        "\n| method | records x targets | nnz | s/epoch | peak RSS MB | kept | mean abs rel err |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['records']:,} x {r['targets']:,} | {r['nnz']:,} | "
              f"{r['seconds_per_epoch']:.4f} | {r['peak_rss_mb']:,.0f} | {r['kept']:,} | "
              f"{r['mean_abs_rel_error']:.4g} |")  # fmt: skip


if __name__ == "__main__":
    main()
