"""FeatureGate support recovery against scikit-learn's Lasso and orthogonal matching pursuit.

    python benchmarks/bench_feature_gate.py --seeds 5

A synthetic sparse regression, n=300 observations, p=500 features, 10 true features with
coefficients +-U(0.5, 2), noise sd 1 and 3 (--noise); two designs: independent N(0, 1)
features, and a harder correlated one (AR(1) across features, rho=0.7, so true features
have lookalike neighbours). Every method gets the same budget of 10 features where it takes one:
  - l0calib.FeatureGate(max_features=10)
  - Lasso at budget: the largest support of at most 10 features on the lasso path
  - OrthogonalMatchingPursuit(n_nonzero_coefs=10)
  - LassoCV (5-fold): its own choice of support size, for reference
Reported per design: true and false positives (means over seeds) and seconds per fit.
Needs scikit-learn (in the `dev` extra).
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import numpy as np


def make(seed: int, correlated: bool, noise: float, n: int = 300, p: int = 500, k: int = 10):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, p))
    if correlated:
        x = np.empty_like(z)
        x[:, 0] = z[:, 0]
        for j in range(1, p):
            x[:, j] = 0.7 * x[:, j - 1] + np.sqrt(1 - 0.7**2) * z[:, j]
    else:
        x = z
    true = np.sort(rng.choice(p, k, replace=False))
    beta = np.zeros(p)
    beta[true] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    return x, x @ beta + noise * rng.standard_normal(n), set(true.tolist())


def methods(budget: int):
    from sklearn.linear_model import LassoCV, OrthogonalMatchingPursuit, lasso_path

    from l0calib import FeatureGate

    def feature_gate(x, y, seed):
        return FeatureGate(x.shape[1], budget, seed=seed).fit(x, y).selected_

    def lasso_budget(x, y, seed):
        xs = (x - x.mean(0)) / x.std(0)
        _, coefs, _ = lasso_path(xs, y - y.mean(), n_alphas=300, eps=1e-3)
        sizes = (coefs != 0).sum(0)
        j = np.flatnonzero(sizes <= budget)[-1]
        return np.flatnonzero(coefs[:, j])

    def omp(x, y, seed):
        m = OrthogonalMatchingPursuit(n_nonzero_coefs=budget).fit(x, y)
        return np.flatnonzero(m.coef_)

    def lasso_cv(x, y, seed):
        return np.flatnonzero(LassoCV(cv=5, random_state=seed).fit(x, y).coef_)

    return {
        "l0calib FeatureGate": feature_gate,
        "Lasso at budget": lasso_budget,
        "OMP": omp,
        "LassoCV (own size)": lasso_cv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--noise", type=lambda s: [float(v) for v in s.split(",")],
                        default=[1.0, 3.0], help="noise standard deviations to run")  # fmt: skip
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # LassoCV's convergence chatter
    print("| design | noise sd | method | true positives | false positives | seconds |")
    print("|---|---|---|---|---|---|")
    for correlated, noise in itertools.product((False, True), args.noise):
        design = "AR(1) rho=0.7" if correlated else "independent"
        for name, fn in methods(args.budget).items():
            tp, fp, secs = [], [], []
            for seed in range(args.seeds):
                x, y, true = make(seed, correlated, noise)
                start = time.perf_counter()
                chosen = set(np.asarray(fn(x, y, seed)).tolist())
                secs.append(time.perf_counter() - start)
                tp.append(len(chosen & true))
                fp.append(len(chosen - true))
            print(f"| {design} | {noise:g} | {name} | {np.mean(tp):.1f} / 10 | {np.mean(fp):.1f} | "
                  f"{np.mean(secs):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
