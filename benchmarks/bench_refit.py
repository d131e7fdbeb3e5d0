"""Where users wait: the refit, all records without pruning, the main job, start-up.

    python benchmarks/bench_refit.py allrecords --households 100000 [--load] [--lbfgsb]
    python benchmarks/bench_refit.py reweight --households 100000 --keep 20000 [--load]
        [--checked]
    python benchmarks/bench_refit.py demo [--load]
    python benchmarks/bench_refit.py startup [--load]
    python benchmarks/bench_refit.py scaling --records 100000,1000000 --targets 2000
    python benchmarks/bench_refit.py threads --households 100000 --epochs 100 [--load]

allrecords: synthetic_survey(N, seed=0), 10% of the targets held out (seed 0), the problem
  built once and saved (as in bench_engine.py); then, each in a fresh child process,
  ``l0calib.calibrate(em, holdout=...)`` (every record, defaults) and microcalibrate
  (``Calibration(...).calibrate()``, the `bench` extra, on the same matrix as a dense
  records x targets DataFrame, its default settings except ``--mc-epochs``), with
  ``--lbfgsb`` also the previous refit (L-BFGS-B on the weights, 2,000 iterations).
  Seconds are the library call alone (the matrix is loaded before the clock starts).
reweight: the synthetic survey written to Parquet (households, persons, targets.csv), then
  ``l0calib reweight ... --target-records K --holdout-fraction 0.1`` timed end to end
  (process start to exit: reading, building the matrix, training, refit, writing outputs
  and the report). It runs with ``--quiet``, which skips the pre-fit target check (its
  findings are warnings); ``--checked`` runs without ``--quiet``, so the check runs too.
demo: ``make demo``'s command (5,000 -> 1,000 households from data/fixtures/survey_5k).
startup: ``l0calib --help`` and ``l0calib --version``, five runs each.
scaling: a random sparse problem (20 non-zeros per record, as bench_engine.py scaling),
  ``l0calib.refit`` of every record (default pull 1e-3), time and peak RSS in a child.
threads: training epoch time of calibrate(target_records=N/5) on the allrecords problem
  with 1 and with every core.
--load: a second CPU-bound process (``python -c "while True: pass"``) runs throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED = 0


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@contextlib.contextmanager
def _load(on: bool):
    """A second CPU-bound process while the block runs (``--load``)."""
    if not on:
        yield
        return
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spin.kill()
        spin.wait()


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "_run", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _engine_problem(households: int):
    sys.path.insert(0, str(HERE))
    from bench_engine import _problem

    return _problem(households)


def _errors(em, hold, w) -> dict:
    from l0calib.diagnostics import target_report

    rep = target_report(em, w, hold)
    fit = rep[~rep["holdout"]]["abs_rel_error"]
    return {"fit_mean": float(fit.mean()), "fit_max": float(fit.max())}


def run_child(method: str, households: int, extra: str) -> dict:
    em, hold = _engine_problem(households)
    warnings.simplefilter("ignore")
    if method == "l0calib":
        from l0calib import calibrate

        start, cpu = time.perf_counter(), time.process_time()
        res = calibrate(em, holdout=hold)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {
            "seconds": seconds, "cpu_seconds": cpu, **_errors(em, hold, res.weights),
            "refit_converged": res.info["refit_converged"],
            "refit_iterations": res.info["refit_iterations"],
            "refit_method": res.info["refit_method"], "threads": res.info["threads"],
            "peak_rss_mb": _hwm_mb(),
        }  # fmt: skip
    if method == "lbfgsb":
        import scipy.sparse as sp

        from l0calib.calibrate import _problem
        from l0calib.refit import _lbfgsb

        pb = _problem(em, None, None, hold, normalize_groups=True, loss="relative",
                      scale_floor=1.0)  # fmt: skip
        rows = np.flatnonzero(pb.fitted)
        start = time.perf_counter()
        bs = (sp.diags(1 / pb.scale[rows]) @ em.matrix[rows] @ sp.diags(pb.w0)).tocsr()
        n = em.n_records
        sol = _lbfgsb(bs, em.values[rows] / pb.scale[rows], pb.tol[rows], pb.coef[rows], 1e-6,
                      np.zeros(n), np.full(n, np.inf), 2000, None)  # fmt: skip
        seconds = time.perf_counter() - start
        return {"seconds": seconds, **_errors(em, hold, pb.w0 * sol.x),
                "converged": sol.success, "iterations": sol.nit}  # fmt: skip
    if method == "microcalibrate":
        import pandas as pd
        from microcalibrate import Calibration

        fitted = ~hold
        names = np.array([f"t{k}" for k in range(int(fitted.sum()))])
        dense = pd.DataFrame(em.matrix[fitted].T.toarray(), columns=names)
        start, cpu = time.perf_counter(), time.process_time()
        cal = Calibration(
            weights=em.weights.copy(), targets=em.values[fitted], target_names=names,
            estimate_matrix=dense, epochs=int(extra), device="cpu",
        )  # fmt: skip
        cal.calibrate()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        w = np.asarray(cal.weights, dtype=float)
        return {"seconds": seconds, "cpu_seconds": cpu, **_errors(em, hold, w),
                "epochs": int(extra), "peak_rss_mb": _hwm_mb()}  # fmt: skip
    if method == "scaling":
        import scipy.sparse as sp

        from l0calib import refit

        n, k = households, int(extra)
        rng = np.random.default_rng(SEED)
        per = 20
        rows = rng.integers(0, k, size=n * per)
        cols = np.repeat(np.arange(n), per)
        a = sp.csr_matrix((rng.uniform(0.5, 2, rows.size), (rows, cols)), shape=(k, n))
        del rows, cols
        w0 = rng.uniform(50, 150, n)
        t = a @ (w0 * rng.uniform(0.8, 1.2, n))
        # Reset the high-water mark to the current RSS, so the peak is the refit's own
        # (building the random problem peaks higher than it ends).
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_mb()
        start = time.perf_counter()
        res = refit(a, np.ones(n, dtype=bool), t, weights=w0)
        seconds = time.perf_counter() - start
        return {"records": n, "targets": k, "nnz": int(a.nnz), "seconds": seconds,
                "iterations": res.info["refit_iterations"],
                "converged": res.info["refit_converged"], "method": res.info["refit_method"],
                "fit_max": res.info["max_abs_rel_error"], "rss_before_mb": base,
                "peak_rss_mb": _hwm_mb()}  # fmt: skip
    if method == "threads":
        from l0calib import calibrate

        epochs, n_threads = (int(x) for x in extra.split(":"))
        stamps: list[float] = []
        calibrate(em, target_records=em.n_records // 5, holdout=hold, epochs=epochs,
                  refit=False, threads=n_threads,
                  callback=lambda p: stamps.append(time.perf_counter()))  # fmt: skip
        per_epoch = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        return {"threads": n_threads, "seconds_per_epoch": per_epoch}
    raise SystemExit(f"unknown method {method}")


def _save_problem(households: int) -> None:
    """Build and save the problem once for the children (an existing
    ``L0CALIB_BENCH_PROBLEM`` saved problem is reused)."""
    if not os.environ.get("L0CALIB_BENCH_PROBLEM"):
        tmp = tempfile.mkdtemp(prefix="l0calib-bench-")
        os.environ["L0CALIB_BENCH_PROBLEM"] = os.path.join(tmp, "problem")
    _engine_problem(households)


def allrecords(args: argparse.Namespace) -> None:
    _save_problem(args.households)
    rows = {}
    with _load(args.load):
        rows["l0calib"] = _child("l0calib", str(args.households), "")
        if not args.skip_microcalibrate:
            rows["microcalibrate"] = _child("microcalibrate", str(args.households),
                                            str(args.mc_epochs))  # fmt: skip
        if args.lbfgsb:
            rows["previous refit (L-BFGS-B)"] = _child("lbfgsb", str(args.households), "")
    print(json.dumps({"load": args.load, **rows}, indent=1))
    if "microcalibrate" in rows:
        ratio = rows["microcalibrate"]["seconds"] / rows["l0calib"]["seconds"]
        print(f"microcalibrate / l0calib time: {ratio:.1f}x")


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return time.perf_counter() - start


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cli() -> str:
    return str(Path(sys.executable).with_name("l0calib"))


def reweight(args: argparse.Namespace) -> None:
    from l0calib import synthetic_survey

    tmp = Path(tempfile.mkdtemp(prefix="l0calib-bench-"))
    try:
        paths = synthetic_survey(args.households, seed=SEED).write(tmp)
        cmd = [_cli(), "reweight", str(paths["households"]), str(paths["targets"]),
               "--persons", str(paths["persons"]), "--target-records", str(args.keep),
               "--holdout-fraction", "0.1", "-o", str(tmp / "out.parquet"), "--force",
               *([] if args.checked else ["--quiet"])]  # fmt: skip
        with _load(args.load):
            times, cpus = [], []
            for _ in range(args.runs):
                start, cpu = time.perf_counter(), _children_cpu()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                times.append(time.perf_counter() - start)
                cpus.append(_children_cpu() - cpu)
                if proc.returncode not in (0, 3):
                    raise SystemExit(proc.stderr)
        summary = json.loads((tmp / "out_report" / "summary.json").read_text())
        print(json.dumps({"load": args.load, "checked": args.checked, "seconds": times,
                          "cpu_seconds": cpus,
                          "exit": proc.returncode,
                          **{k: summary.get(k) for k in ("n_records_out", "mean_abs_rel_error",
                                                         "max_abs_rel_error", "converged",
                                                         "epochs_run")},
                          "fit_seconds": summary.get("seconds")},
                         indent=1))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo(args: argparse.Namespace) -> None:
    fx = ROOT / "data" / "fixtures" / "survey_5k"
    out = Path(tempfile.mkdtemp(prefix="l0calib-bench-"))
    cmd = [_cli(), "reweight", str(fx / "households.parquet"), str(fx / "targets.csv"),
           "--persons", str(fx / "persons.parquet"), "--target-records", "1000",
           "--holdout-fraction", "0.1", "-o", str(out / "households_1000.parquet"),
           "--force"]  # fmt: skip
    with _load(args.load):
        cpu = _children_cpu()
        times = [_timed(cmd) for _ in range(args.runs)]
        cpu = (_children_cpu() - cpu) / args.runs
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"load": args.load, "seconds": times, "cpu_seconds_per_run": cpu}))


def startup(args: argparse.Namespace) -> None:
    with _load(args.load):
        helps = [_timed([_cli(), "--help"]) for _ in range(5)]
        versions = [_timed([_cli(), "--version"]) for _ in range(5)]
    print(json.dumps({"load": args.load, "help_seconds": helps, "version_seconds": versions}))


def scaling(args: argparse.Namespace) -> None:
    for n in args.records:
        print(json.dumps(_child("scaling", str(n), str(args.targets))), flush=True)


def threads(args: argparse.Namespace) -> None:
    from l0calib.threads import available_cores

    _save_problem(args.households)
    with _load(args.load):
        for th in sorted({1, available_cores()}):
            r = _child("threads", str(args.households), f"{args.epochs}:{th}")
            print(json.dumps({"load": args.load, **r}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        print(json.dumps(run_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("allrecords")
    p.add_argument("--households", type=int, default=100_000)
    p.add_argument("--mc-epochs", type=int, default=500)
    p.add_argument("--skip-microcalibrate", action="store_true")
    p.add_argument("--lbfgsb", action="store_true")
    p = sub.add_parser("reweight")
    p.add_argument("--households", type=int, default=100_000)
    p.add_argument("--keep", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--checked", action="store_true",
                   help="without --quiet: the pre-fit target check runs too")  # fmt: skip
    p = sub.add_parser("demo")
    p.add_argument("--runs", type=int, default=1)
    sub.add_parser("startup")
    p = sub.add_parser("scaling")
    p.add_argument("--records", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100_000, 1_000_000])  # fmt: skip
    p.add_argument("--targets", type=int, default=2000)
    p = sub.add_parser("threads")
    p.add_argument("--households", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=100)
    for name, sp_ in sub.choices.items():
        if name != "scaling":
            sp_.add_argument("--load", action="store_true",
                             help="run a second CPU-bound process throughout")  # fmt: skip
    args = parser.parse_args()
    globals()[args.what](args)


if __name__ == "__main__":
    main()
