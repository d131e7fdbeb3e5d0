"""Does `l0calib check` find conflicts planted in a CPS-sized target set, and how fast?

    python benchmarks/bench_diagnose.py --households 100000

Generates synthetic_survey(N, seed) with perturbation=0 (every target is a total of the same
hidden population, so the set is consistent up to rounding to whole numbers; a tolerance of
1e-5 per target absorbs that rounding) and checks that `l0calib check` finds it feasible.
Then it plants disagreements between target families, each moving one target:

- state total vs its age bands: pop_<s> moved 2-5% (the bands keep their values);
- a state age band vs its total: one pop_<s>_<band> moved 3-6%;
- more SNAP households than households: snap_hh_<s> set 3% above hh_<s>;
- national tenure vs the state household counts: tenure_owner moved +3%;
- a national age x sex cell vs the state populations: pop_F_30_39 moved -4%.

and runs `l0calib check --json` on the files in a fresh child process (its wall time,
including Python start-up and reading the Parquet files, and its peak RSS from VmHWM).
Recall: the share of planted targets that appear in some named conflict. Precision: the
share of named conflicts that contain a planted target (a conflict without one would be a
false alarm: the unperturbed set is feasible). Exact: for the state-level plantings, whether
the named conflict is exactly the state's total and its five bands (or snap_hh and hh).

    python benchmarks/bench_diagnose.py --prefit --households 100000 --records-kept 20000

The target check `reweight` runs before fitting, on bench_refit.py reweight's problem
(synthetic_survey(N, seed) with its default perturbation, 10 % of the targets held out as
`--holdout-fraction 0.1 --seed 0` chooses them, `target_records` = --records-kept): the library
call alone (the matrix built and scipy's LP solver imported before the clock starts), with
the conflict-search budget `check` uses (the default, which `reweight` now uses too) and
with the small one `reweight` used before (3 conflicts, 60 LP solves).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from l0calib import synthetic_survey

BANDS = ("0_17", "18_34", "35_54", "55_64", "65plus")

CHILD = """
import atexit, sys
def _peak():
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write(f"\\nPEAK_RSS_KB {hwm.split()[1]}\\n")
atexit.register(_peak)
sys.argv = ["l0calib", *sys.argv[1:]]
from l0calib_cli.main import run
run()
"""


def _plant(targets, rng: np.random.Generator) -> list[dict]:
    """Move one target per planted disagreement; return what was planted."""
    value = dict(zip(targets["name"], targets["value"], strict=True))
    states = [n[len("pop_") :] for n in targets["name"] if n.startswith("pop_") and len(n) == 6]
    chosen = rng.choice(states, size=8, replace=False)
    planted: list[dict] = []

    def move(name: str, factor: float, family: str, expected: list[str] | None) -> None:
        value[name] = round(value[name] * factor)
        planted.append({"family": family, "target": name, "factor": factor,
                        "expected": expected})  # fmt: skip

    for s in chosen[:4]:
        f = 1 + rng.choice([-1, 1]) * rng.uniform(0.02, 0.05)
        move(f"pop_{s}", f, "state total vs its age bands",
             [f"pop_{s}", *(f"pop_{s}_{b}" for b in BANDS)])  # fmt: skip
    for s in chosen[4:6]:
        band = rng.choice(BANDS)
        f = 1 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.06)
        move(f"pop_{s}_{band}", f, "state age band vs its total",
             [f"pop_{s}", *(f"pop_{s}_{b}" for b in BANDS)])  # fmt: skip
    for s in chosen[6:8]:
        value[f"snap_hh_{s}"] = value[f"hh_{s}"]
        move(f"snap_hh_{s}", 1.03, "SNAP households above households",
             [f"snap_hh_{s}", f"hh_{s}"])  # fmt: skip
    move("tenure_owner", 1.03, "national tenure vs state households", None)
    move("pop_F_30_39", 0.96, "national age x sex cell vs state populations", None)
    targets["value"] = [value[n] for n in targets["name"]]
    return planted


def _check(paths: dict[str, Path], threads: int) -> tuple[dict, float, float, float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    args = ["check", str(paths["households"]), str(paths["targets"]),
            "--persons", str(paths["persons"]), "--json"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          env=env)  # fmt: skip
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = next(
        int(line.split()[1]) / 1024
        for line in proc.stderr.splitlines()
        if line.startswith("PEAK_RSS_KB")
    )
    if proc.returncode not in (0, 3):
        raise SystemExit(f"check failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout), seconds, cpu, peak, proc.returncode


def prefit(households: int, keep: int, seed: int) -> None:
    """Time reweight's pre-fit target check with both conflict-search budgets."""
    # The LP solver and scipy.stats imported before the clock, as in a warm process.
    import scipy.optimize
    import scipy.stats

    del scipy

    from l0calib import build_estimate_matrix, diagnose_targets
    from l0calib.sharded import holdout_names

    survey = synthetic_survey(households, seed=seed)
    em = build_estimate_matrix(survey.households, survey.targets, survey.persons)
    held = holdout_names(em.names, None, 0.1, 0)
    rows = {}
    for label, budget in (
        ("check's budget (now both)", {}),
        ("reweight's former budget", {"max_conflicts": 3, "max_solves": 60}),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        d = diagnose_targets(em, exclude=held, target_records=keep, **budget)
        rows[label] = {"seconds": round(time.perf_counter() - wall, 2),
                       "cpu_seconds": round(time.process_time() - cpu, 2),
                       "conflicts": len(d.conflicts), "complete": d.conflicts_complete,
                       "lp_solves": d.lp_solves}  # fmt: skip
    print(json.dumps({"households": households, "keep": keep, "targets": em.n_targets,
                      "held_out": len(held), **rows, "load_average": os.getloadavg()},
                     indent=1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="Write the input files here and keep them.")
    parser.add_argument("--prefit", action="store_true",
                        help="time reweight's pre-fit target check instead")  # fmt: skip
    parser.add_argument("--records-kept", type=int, default=20_000,
                        help="with --prefit: target_records")  # fmt: skip
    args = parser.parse_args()
    if args.prefit:
        prefit(args.households, args.records_kept, args.seed)
        return

    survey = synthetic_survey(args.households, seed=args.seed, perturbation=0.0)
    targets = survey.targets.copy()
    targets["tolerance"] = 1e-5
    with tempfile.TemporaryDirectory() as tmp:
        base = survey.write(args.keep or Path(tmp) / "base")
        targets.to_csv(base["targets"], index=False)
        clean, clean_s, clean_cpu, clean_mb, clean_rc = _check(base, args.threads)
        planted = _plant(targets, np.random.default_rng(args.seed + 1))
        base["targets"] = base["targets"].with_name("targets_planted.csv")
        targets.to_csv(base["targets"], index=False)
        found, seconds, cpu, peak_mb, rc = _check(base, args.threads)

    conflicts = [set(c["targets"]) for c in found["conflicts"]]
    names = {p["target"] for p in planted}
    hit = [p for p in planted if any(p["target"] in c for c in conflicts)]
    exact = [p for p in planted if p["expected"] and set(p["expected"]) in conflicts]
    with_expected = [p for p in planted if p["expected"]]
    true_conflicts = [c for c in conflicts if c & names]
    moved = {c["name"] for c in found["changes"]}
    summary = {
        "households": args.households,
        "targets": found["n_targets"],
        "unperturbed": {"feasible": clean["feasible"], "exit": clean_rc,
                        "lp_solves": clean["lp_solves"],
                        "seconds": round(clean_s, 2), "cpu_seconds": round(clean_cpu, 2),
                        "peak_rss_mb": round(clean_mb)},
        "planted": len(planted),
        "conflicts_named": len(conflicts),
        "recall": len(hit) / len(planted),
        "precision": len(true_conflicts) / len(conflicts) if conflicts else float("nan"),
        "exact_state_level": f"{len(exact)}/{len(with_expected)}",
        "least_change_moves": sorted(moved),
        "planted_moved_by_least_change": len(moved & names),
        "conflicts_complete": found["conflicts_complete"],
        "lp_solves": found["lp_solves"],
        "exit": rc,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "diagnosis_seconds": round(found["seconds"], 2),
        "peak_rss_mb": round(peak_mb),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    for p in planted:
        where = [i + 1 for i, c in enumerate(conflicts) if p["target"] in c]
        print(f"- {p['family']}: {p['target']} x {p['factor']:.3f} -> conflicts {where}")
    for i, c in enumerate(found["conflicts"], start=1):
        print(f"{i}. {c['message']}")


if __name__ == "__main__":
    main()
