"""Time and memory to build the estimate matrix for a CPS-sized synthetic survey.

    python benchmarks/bench_estimate_matrix.py --households 100000

Generates synthetic_survey(N, seed=0) (about 2.55 persons per household, 491 targets at
N >= 20,000) and writes it to Parquet in a temporary directory. Then, in a fresh child
process each (so earlier work does not pollute the figures), it times
build_estimate_matrix reading those files, and reports the child's peak RSS beside the
peak RSS of a child that only imports l0calib and reads the same tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from l0calib import synthetic_survey

CHILD = """
import json, sys, time
from l0calib import build_estimate_matrix, read_table
h, t, p, build = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
start = time.perf_counter()
if build:
    em = build_estimate_matrix(h, t, p)
    info = {"nnz": em.matrix.nnz, "targets": em.n_targets, "records": em.n_records,
            "nnz_mb": (em.matrix.data.nbytes + em.matrix.indices.nbytes) / 2**20}
else:
    frames = [read_table(h), read_table(p)]
    info = {}
info["seconds"] = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
info["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(info))
"""


def _child(paths: dict[str, Path], build: bool) -> dict:
    args = [str(paths["households"]), str(paths["targets"]), str(paths["persons"])]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args, "1" if build else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    survey = synthetic_survey(args.households, seed=0)
    n_persons = len(survey.persons)
    with tempfile.TemporaryDirectory() as d:
        paths = survey.write(Path(d))
        del survey
        runs = [_child(paths, build=True) for _ in range(args.repeats)]
        base = _child(paths, build=False)
    best = min(runs, key=lambda r: r["seconds"])
    print(
        f"households: {best['records']:,}  persons: {n_persons:,}  targets: {best['targets']}  "
        f"non-zeros: {best['nnz']:,}"
    )
    times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    print(
        f"build_estimate_matrix from Parquet, best of {args.repeats}: {best['seconds']:.2f} s "
        f"(all: {times}); reading the two tables alone: {base['seconds']:.2f} s"
    )
    print(
        f"peak RSS: {best['peak_rss_mb']:.0f} MB building vs {base['peak_rss_mb']:.0f} MB "
        f"importing and reading only; matrix non-zeros: {best['nnz_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
