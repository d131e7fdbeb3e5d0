"""What keeping CSV codes and text costs: `read_table` and `write_frame(source=...)`.

`read_table` scans a CSV file once for code columns (a leading zero, 16+ digits) before
pandas reads it; `write_frame(..., source=csv)` reads the input's text again to give every
column not computed by l0calib back as it was. Both against plain pandas, best of 3.

    python benchmarks/bench_io.py --rows 500000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import l0calib.io as io


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.rows
    frame = pd.DataFrame({f"x{i}": rng.normal(size=n).round(4) for i in range(8)})
    frame.insert(0, "household_id", np.arange(n))
    frame["fips"] = [f"{v:02d}" for v in rng.integers(1, 57, n)]
    frame["household_weight"] = rng.uniform(1, 100, n).round(3)
    d = Path(tempfile.mkdtemp())
    path = d / "h.csv"
    frame.to_csv(path, index=False)

    def ours() -> None:
        io._CODES.clear()  # the scan is remembered per file version: time it every time
        io.read_table(path)

    read_pandas = best(lambda: pd.read_csv(path, encoding="utf-8-sig", low_memory=False))
    read_ours = best(ours)
    kept = io.read_table(path).iloc[::2].copy()
    write_pandas = best(lambda: kept.to_csv(d / "a.csv", index=False))
    write_ours = best(lambda: io.write_frame(kept, d / "b.csv", like=d / "b.csv", source=path,
                                             computed={"household_weight"}))  # fmt: skip
    size = path.stat().st_size / 1e6
    print(f"| {n:,} rows, 11 columns, {size:.0f} MB | {read_pandas:.2f} s | {read_ours:.2f} s "
          f"| {write_pandas:.2f} s | {write_ours:.2f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
