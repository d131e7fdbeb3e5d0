"""Classic calibration side by side: l0calib vs R survey::calibrate vs samplics.

    python benchmarks/bench_classic.py --households 100000

Problem: synthetic_survey(N, seed=0) without the state x age targets (236 targets), minus
the targets that are linear combinations of earlier ones (l0calib.diagnostics.
dependent_targets finds them: a state's persons total is implied by the others and the
national age x sex cells, and so on), so an exact solution exists. All N households are
calibrated with raking and with linear (GREG). R runs in a child process (Rscript
benchmarks/bench_classic.R) on the same matrix, weights and totals, exported as CSV;
samplics (linear only: it has no raking) gets the dense records x targets array it needs.
Times are best of 3 and exclude reading the data; R's include its model-matrix step.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from l0calib import build_estimate_matrix, calibrate_exact, synthetic_survey
from l0calib.diagnostics import dependent_targets

HERE = Path(__file__).resolve().parent


def best_of(fn, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=100_000)
    parser.add_argument("--r-maxit", type=int, default=100, help="survey::calibrate's maxit")
    args = parser.parse_args()

    s = synthetic_survey(args.households, seed=0, state_age_targets=False)
    em = build_estimate_matrix(s.households, s.targets, s.persons)
    deps = dependent_targets(em)
    em = em.select_targets(np.array([n not in deps for n in em.names]))
    print(
        f"{em.n_records:,} households, {em.n_targets} independent targets "
        f"({len(deps)} dependent dropped: {', '.join(deps)}), {em.matrix.nnz:,} non-zeros"
    )

    results = {}
    for method in ("raking", "linear"):
        best, times, res = best_of(lambda m=method: calibrate_exact(em, method=m))
        results[method] = res.weights
        print(
            f"l0calib {method:7s}: best {best:.3f} s of {[round(t, 3) for t in times]}, "
            f"{res.info['iterations']} iterations, max rel error "
            f"{res.report['abs_rel_error'].max():.2e}"
        )

    if shutil.which("Rscript"):
        with tempfile.TemporaryDirectory() as d:
            coo = em.matrix.tocoo()
            pd.DataFrame({"target": coo.row + 1, "record": coo.col + 1, "value": coo.data}).to_csv(
                Path(d) / "triplets.csv", index=False
            )
            pd.DataFrame({"w": em.weights}).to_csv(Path(d) / "weights.csv", index=False)
            pd.DataFrame({"value": em.values}).to_csv(Path(d) / "targets.csv", index=False)
            env = {**os.environ, "R_MAXIT": str(args.r_maxit)}
            out = subprocess.run(
                ["Rscript", str(HERE / "bench_classic.R"), d],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            if out.returncode != 0:
                print("R failed:", out.stderr[-2000:])
            for line in out.stdout.splitlines():
                m = re.match(r"R (\w+) (.*)", line)
                if not m:
                    continue
                method, times = m.group(1), [float(x) for x in m.group(2).split()]
                w_r = pd.read_csv(Path(d) / f"r_{method}_weights.csv")["w"].to_numpy()
                diff = np.max(np.abs(results[method] - w_r) / np.abs(w_r))
                tot = np.max(np.abs(em.estimates(w_r) / em.values - 1))
                print(
                    f"R survey {method:7s}: best {min(times):.3f} s of {times}; max rel "
                    f"weight difference to l0calib {diff:.2e}; R's max rel total error "
                    f"{tot:.2e}"
                )
    else:
        print("R survey: Rscript not found (apt-get install -y r-base-core r-cran-survey)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from samplics.weighting import SampleWeight
    except ImportError:
        print("samplics: not installed (pip install samplics)")
        return
    x = em.matrix.T.toarray()
    control = {f"x{k}": v for k, v in enumerate(em.values)}
    try:
        best, times, w_s = best_of(lambda: SampleWeight().calibrate(em.weights, x, control))
    except MemoryError as exc:  # samplics forms an n x n matrix internally
        print(f"samplics linear: out of memory ({exc})")
        return
    diff = np.max(np.abs(results["linear"] - w_s) / np.abs(w_s))
    tot = np.max(np.abs(em.estimates(w_s) / em.values - 1))
    print(
        f"samplics linear: best {best:.3f} s of {[round(t, 3) for t in times]}; max rel weight "
        f"difference to l0calib {diff:.2e}; its max rel total error {tot:.2e}"
    )


if __name__ == "__main__":
    main()
