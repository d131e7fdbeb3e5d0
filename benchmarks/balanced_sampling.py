"""The cube method for balanced sampling, for benchmarks only (not part of l0calib).

Deville & Tille (2004), "Efficient balanced sampling: the cube method", Biometrika 91:893.
A random sample of records with inclusion probabilities ``pi`` whose Horvitz-Thompson
totals of the balancing variables ``z`` equal (as nearly as the landing allows) their full
totals: ``sum_{i in s} z_i / pi_i ~= sum_i z_i``. The flight phase moves ``pi`` inside the
cube [0, 1]^N along directions that keep every balancing total fixed, ``q + 1`` undecided
records at a time (``q`` balancing variables, the first being ``pi`` itself so the size is
fixed), until at most ``q`` records are undecided; the landing phase drops balancing
variables from the last one back and continues, so the sample size stays exact and the
last variables are the ones balanced least well. Each step is a martingale move, so
``E[1{i in s}] = pi_i`` for every record.

Pure numpy, one small linear solve per step: about 12 s for 5,000 records and 220
balancing variables on one core, far too slow for 100,000 records and 440 variables
without stratification (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np


def cube_sample(z: np.ndarray, pi: np.ndarray, seed: int, eps: float = 1e-10) -> np.ndarray:
    """Boolean mask of a balanced sample.

    z : shape (N, p), the balancing variables (columns in order of importance: the landing
    gives up the last ones first). pi : shape (N,), inclusion probabilities in [0, 1]
    summing to an integer (the sample size). ``seed`` makes the sample reproducible.
    """
    rng = np.random.default_rng(seed)
    pi = np.asarray(pi, dtype=float).copy()
    pi[pi <= eps], pi[pi >= 1 - eps] = 0.0, 1.0
    safe = np.where(pi > 0, pi, 1.0)[:, None]
    a = np.concatenate([np.ones((pi.size, 1)), np.asarray(z, dtype=float) / safe], axis=1)
    n_var = a.shape[1]
    pool = iter(np.flatnonzero((pi > 0) & (pi < 1)).tolist())
    active: list[int] = []
    while True:
        while len(active) < n_var + 1:
            nxt = next(pool, None)
            if nxt is None:
                break
            active.append(nxt)
        if not active:
            break
        n_var = min(n_var, len(active) - 1)  # landing: give up the last variables
        idx = np.array(active)
        if n_var == 0:
            pi[idx[0]] = float(rng.random() < pi[idx[0]])
            active = active[1:]
            continue
        b = a[idx, :n_var].T  # n_var x (n_var + 1)
        try:
            u = np.append(np.linalg.solve(b[:, :n_var], -b[:, n_var]), 1.0)
        except np.linalg.LinAlgError:
            u = np.linalg.svd(b)[2][-1]
        if not np.isfinite(u).all():
            u = np.linalg.svd(b)[2][-1]
        p = pi[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.min(np.where(u > 0, (1 - p) / u, np.where(u < 0, -p / u, np.inf)))
            down = np.min(np.where(u > 0, p / u, np.where(u < 0, (p - 1) / u, np.inf)))
        p = p + up * u if rng.random() < down / (up + down) else p - down * u
        p[np.abs(p) < eps], p[np.abs(p - 1) < eps] = 0.0, 1.0
        pi[idx] = np.clip(p, 0.0, 1.0)
        active = [i for i, x in zip(active, p.tolist(), strict=True) if eps < x < 1 - eps]
    return pi > 0.5
