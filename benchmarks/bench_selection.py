"""Does the learned selection earn its keep? l0calib's K records against PPS draws + refit.

    python benchmarks/bench_selection.py --households 5000 --keep 1000 --splits 4 --seeds 3 \\
        --draws 5 --variants default,balanced,aux

The problem is ``synthetic_survey(N, seed=0, rare_targets=True, disagreement=0.02)``:
the CPS-like targets plus rare-support ones (a top capital-gains band held by ~15
households whose targets are ~2x its design-weighted total, a small benefit program,
persons 65+ in the three smallest states) and two second-source national totals that
disagree with the state targets by 2 %. For each holdout split (10 % of the targets, seed =
split number):

- random: ``--draws`` samples of K records drawn with probability proportional to the
  initial weight (draw d uses numpy seed 1000 + d), started at their Horvitz-Thompson
  weight ``sum(w0) / K`` and refitted by ``l0calib.refit(keep_all=True)`` with the pull the
  engine's refit uses at that size (``--refit-l2``, default the engine's: 1e-3 for a free
  selection);
- each variant of l0calib, ``--seeds`` seeds each:
  - ``default``: ``calibrate(target_records=K)``;
  - ``balanced``: ``lambda_l2=10`` (the balanced selection);
  - ``aux``: auxiliary balance totals as low-weight soft targets: every numeric household
    column (household size, AGI, capital income, SNAP, capital gains, housing aid), and the
    household count, by state (the strata the targets use), valued at the full sample's
    design-weighted totals, importance ``--aux-importance`` each, in a group of their own;
  - ``cube``: not l0calib: a balanced sample by the cube method (Deville & Tille 2004;
    ``benchmarks/balanced_sampling.py``) on the fitted targets, probability proportional
    to the initial weight, the coverage exchange, and the random draws' refit from the
    Horvitz-Thompson weights (slow: 5,000 records only);
  - ``cv``: the training pull (1e-3 or 10) chosen per split by an inner holdout of 20 %
    of the fitted targets (one seed each), then rerun with every fitted target.

Figures per run: fitted mean and max abs relative error, holdout mean, Kish effective
sample size / K, fitted targets at -100 % (estimate 0). Paired by split: each l0calib run's
holdout (and fitted) error minus the mean of the random draws on the same split, with its
standard error over the runs. One thread per run.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

SEED = 0


def build_problem(
    households: int, seed: int = SEED, perturbation: float = 0.02, disagreement: float = 0.02
):
    from l0calib import build_estimate_matrix, synthetic_survey

    s = synthetic_survey(households, seed=seed, rare_targets=True, perturbation=perturbation,
                         disagreement=disagreement)  # fmt: skip
    em = build_estimate_matrix(s.households, s.targets, s.persons)
    return s, em


def fixture_problem():
    """The shipped fixture data/fixtures/survey_5k (236 targets, none rare)."""
    from pathlib import Path

    import pandas as pd

    from l0calib import build_estimate_matrix

    d = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "survey_5k"
    hh, pp = pd.read_parquet(d / "households.parquet"), pd.read_parquet(d / "persons.parquet")
    return None, build_estimate_matrix(hh, pd.read_csv(d / "targets.csv"), pp)


def aux_problem(s, em, importance: float):
    """``em`` plus balance totals: numeric household columns (and a count) by state."""
    import scipy.sparse as sp

    from l0calib import EstimateMatrix

    hh = s.households
    w0 = em.weights
    cols = ["household_size", "agi", "capital_income", "snap", "capital_gains", "housing_aid"]
    states = hh["state"].to_numpy()
    rows, names = [], []
    for st in np.unique(states):
        ind = (states == st).astype(float)
        rows.append(ind)
        names.append(f"aux_count_{st}")
        for c in cols:
            v = ind * hh[c].to_numpy(dtype=float)
            if np.any(v != 0):
                rows.append(v)
                names.append(f"aux_{c}_{st}")
    a = sp.csr_matrix(np.vstack(rows))
    values = a @ w0
    n_aux = len(names)
    return EstimateMatrix(
        matrix=sp.vstack([em.matrix, a], format="csr"),
        names=tuple(em.names) + tuple(names),
        values=np.concatenate([em.values, values]),
        groups=np.concatenate([np.asarray(em.groups, dtype=object),
                               np.array(["aux_balance"] * n_aux, dtype=object)]),
        importance=np.concatenate([em.importance, np.full(n_aux, importance)]),
        tolerance=np.concatenate([em.tolerance, np.zeros(n_aux)]),
        weights=w0,
    )  # fmt: skip


def figures(em, hold, w, keep) -> dict:
    from l0calib.diagnostics import effective_sample_size, target_report

    rep = target_report(em, w, hold)
    fit, ho = rep[~rep["holdout"]], rep[rep["holdout"]]
    lost = int(((fit["estimate"] == 0) & (fit["target"] != 0)).sum())
    return {
        "kept": int(np.count_nonzero(w)),
        "fit_mean": float(fit["abs_rel_error"].mean()),
        "fit_max": float(fit["abs_rel_error"].max()),
        "holdout_mean": float(ho["abs_rel_error"].mean()),
        "ess_over_k": effective_sample_size(w) / keep,
        "lost": lost,
        "worst": str(fit.loc[fit["abs_rel_error"].idxmax(), "name"]),
    }


def random_refit(em, hold, keep, draw, refit_l2):
    from l0calib import refit

    w0 = em.weights
    idx = np.random.default_rng(1000 + draw).choice(
        em.n_records, size=keep, replace=False, p=w0 / w0.sum()
    )
    start = w0.copy()
    start[idx] = w0.sum() / keep
    return refit(em, idx, weights=start, holdout=hold, lambda_l2=refit_l2, keep_all=True,
                 max_error=None).weights  # fmt: skip


def cube_refit(em, hold, keep, seed, refit_l2):
    """A cube-method balanced sample (benchmarks/balanced_sampling.py) on the fitted targets,
    inclusion probability proportional to the initial weight, then the coverage exchange
    and the same refit as the random draws, from the Horvitz-Thompson weights."""
    from balanced_sampling import cube_sample

    from l0calib import refit
    from l0calib.coverage import COVERAGE_RECORDS, Coverage, coverage_needs

    w0 = em.weights
    pi = np.minimum(keep * w0 / w0.sum(), 1.0)
    for _ in range(20):  # capped at 1, the rest rescaled to sum to keep
        pi = np.minimum(pi * keep / pi.sum(), 1.0)
    rows = np.flatnonzero(~hold)
    x = em.matrix[rows].toarray().T * w0[:, None]
    x /= np.maximum(np.abs(x.sum(axis=0)), 1e-12)
    # The landing gives up the last columns first: the best-supported targets.
    x = x[:, np.argsort(-(x != 0).sum(axis=0), kind="stable")[::-1]]
    kept = cube_sample(x, pi, seed)
    if kept.sum() != keep:  # rounding of pi's sum: trim or fill at random
        raise RuntimeError(f"cube kept {kept.sum()} of {keep}")
    cover = Coverage(em.matrix, coverage_needs(em.support(), ~hold, COVERAGE_RECORDS))
    order = np.random.default_rng(seed).permutation(em.n_records)
    order = order[np.argsort(~kept[order], kind="stable")]
    kept, _ = cover.cover(kept, order)
    start = np.where(kept, w0 / np.maximum(pi, 1e-300), w0)
    return refit(em, kept, weights=start, holdout=hold, lambda_l2=refit_l2, keep_all=True,
                 max_error=None).weights  # fmt: skip


def engine(em, hold, keep, seed, epochs, **kw):
    from l0calib import calibrate

    return calibrate(em, target_records=keep, holdout=hold, seed=seed, epochs=epochs,
                     max_error=None, **kw)  # fmt: skip


def choose_pull(em, hold, keep, epochs, split) -> float:
    """Training pull by an inner holdout of 20 % of the fitted targets."""
    rng = np.random.default_rng(10_000 + split)
    inner = hold | ((rng.random(em.n_targets) < 0.2) & ~hold)
    scores = {}
    for pull in (1e-3, 10.0):
        r = engine(em, inner, keep, 0, epochs, lambda_l2=pull)
        rep = r.report
        scores[pull] = float(rep.loc[inner & ~hold, "abs_rel_error"].mean())
    return min(scores, key=scores.get)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--households", type=int, default=5000)
    p.add_argument("--survey-seed", type=int, default=SEED,
                   help="seed of synthetic_survey (the data; default 0)")  # fmt: skip
    p.add_argument(
        "--perturbation",
        type=float,
        default=0.02,
        help="relative noise on each target (0: targets consistent with each other)",
    )
    p.add_argument(
        "--disagreement",
        type=float,
        default=0.02,
        help="second-source national totals off by this much (0: none)",
    )
    p.add_argument(
        "--fixture",
        action="store_true",
        help="use data/fixtures/survey_5k instead of synthetic_survey",
    )
    p.add_argument("--floor", action="store_true",
                   help="also refit every record with pull 1e-9: the least-squares floor of "
                   "the engine's loss, below which no selection's refit can go")  # fmt: skip
    p.add_argument("--keep", type=int, default=1000)
    p.add_argument("--splits", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--epochs", type=int, default=600)
    p.add_argument("--variants", default="default,balanced,aux")
    p.add_argument("--aux-importance", type=float, default=0.1)
    p.add_argument("--refit-l2", type=float, default=None)
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("--table-from", nargs="+", default=None,
                   help="only print the table of runs saved by --json (several files merge; "
                   "the random runs of the first are used)")  # fmt: skip
    args = p.parse_args()
    if args.table_from:
        runs: dict[str, list[dict]] = {}
        for path in args.table_from:
            with open(path) as fh:
                for name, rs in json.load(fh).items():
                    if name not in runs:
                        runs[name] = rs
        table(runs, args)
        return

    import torch

    from l0calib.calibrate import _default_refit_l2, _selection_mode

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.fixture:
        s, em = fixture_problem()
    else:
        s, em = build_problem(
            args.households, args.survey_seed, args.perturbation, args.disagreement
        )
    k, n = args.keep, em.n_records
    variants = [v for v in args.variants.split(",") if v]
    aux = aux_problem(s, em, args.aux_importance) if any("aux" in v for v in variants) else None
    runs: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for split in range(args.splits):
        hold = np.random.default_rng(split).random(em.n_targets) < 0.1
        _, _, refit_l2 = _selection_mode(k, n, int((~hold).sum()), None, None)
        pull = args.refit_l2 if args.refit_l2 is not None else (
            refit_l2 if refit_l2 is not None else _default_refit_l2(k, n))  # fmt: skip
        if args.floor:
            from l0calib import refit

            r = refit(em, np.ones(n, dtype=bool), holdout=hold, lambda_l2=1e-9, max_error=None)
            f = figures(em, hold, r.weights, k)
            runs.setdefault("all records, pull 1e-9 (floor)", []).append({"split": split, **f})
        for d in range(args.draws):
            f = figures(em, hold, random_refit(em, hold, k, d, pull), k)
            runs.setdefault("random + refit", []).append({"split": split, **f})
        for v in variants:
            chosen = choose_pull(em, hold, k, args.epochs, split) if v == "cv" else None
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                extra = {}
                # Options after "+", any number: bLO:HI (bounds), rX (refit pull), lX
                # (training pull), xN (exchange rounds); e.g. aux+b0.3:3, default+l0.03+x0.
                v_base, *opts = v.split("+")
                for opt in opts:
                    if opt.startswith("l"):
                        extra["lambda_l2"] = float(opt[1:])
                    elif opt.startswith("b"):
                        lo, hi = (float(x) for x in opt[1:].split(":"))
                        extra["bounds"] = (lo, hi)
                    elif opt.startswith("r"):
                        extra["refit_l2"] = float(opt[1:])
                    elif opt.startswith("x"):
                        extra["exchange_rounds"] = int(opt[1:])
                    else:
                        raise SystemExit(f"unknown option {opt!r} in variant {v}")
                if v_base == "cube":
                    w = cube_refit(em, hold, k, seed, extra.get("refit_l2", pull))
                    f = figures(em, hold, w, k)
                    f.update(split=split, seed=seed, seconds=time.perf_counter() - t0)
                    runs.setdefault(f"cube + refit{'+' + '+'.join(opts) if opts else ''}",
                                    []).append(f)  # fmt: skip
                    print(v, json.dumps(f), flush=True)
                    continue
                if v_base == "default":
                    r = engine(em, hold, k, seed, args.epochs, **extra)
                elif v == "balanced":
                    r = engine(em, hold, k, seed, args.epochs, lambda_l2=10.0, refit_l2=pull)
                elif v_base == "aux":
                    hold_aux = np.concatenate([hold, np.zeros(aux.n_targets - em.n_targets, bool)])
                    r = engine(aux, hold_aux, k, seed, args.epochs, **extra)
                elif v == "cv":
                    r = engine(em, hold, k, seed, args.epochs, lambda_l2=chosen, refit_l2=pull)
                else:
                    raise SystemExit(f"unknown variant {v}")
                f = figures(em, hold, r.weights, k)
                f.update(split=split, seed=seed, seconds=time.perf_counter() - t0,
                         selection=r.info.get("selection"),
                         exchanged=r.info.get("coverage_exchanged"),
                         exchange_swaps=r.info.get("exchange_swaps"),
                         exchange_reverted=r.info.get("exchange_reverted"))  # fmt: skip
                if chosen is not None:
                    f["pull"] = chosen
                runs.setdefault(f"l0calib {v}", []).append(f)
                print(v, json.dumps(f), flush=True)
        print(f"split {split} done, {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)
    table(runs, args)


def table(runs: dict[str, list[dict]], args) -> None:
    rnd = runs["random + refit"]
    by_split = {
        sp: {c: np.mean([r[c] for r in rnd if r["split"] == sp]) for c in ("holdout_mean",
                                                                        "fit_mean")}
        for sp in {r["split"] for r in rnd}
    }  # fmt: skip
    print(f"\n{args.households:,} -> {args.keep:,} (survey seed {args.survey_seed}); "
          f"{args.splits} splits x {args.seeds} seeds; "
          f"random: {args.draws} PPS draws per split")  # fmt: skip
    print("| method | runs | fitted mean | fitted max (worst run) | holdout mean | holdout "
          "minus random (paired, +- s.e.) | fitted mean / random's | Kish ESS / K (min) "
          "| fitted targets at -100 % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        ho = np.array([r["holdout_mean"] - by_split[r["split"]]["holdout_mean"] for r in rs])
        ratio = np.mean([r["fit_mean"] / by_split[r["split"]]["fit_mean"] for r in rs])
        se = ho.std(ddof=1) / np.sqrt(ho.size) if ho.size > 1 else float("nan")
        print(
            f"| {name} | {len(rs)} | {np.mean([r['fit_mean'] for r in rs]):.5f} "
            f"| {np.max([r['fit_max'] for r in rs]):.4f} "
            f"| {np.mean([r['holdout_mean'] for r in rs]):.4f} | {ho.mean():+.4f} +- {se:.4f} "
            f"| {ratio:.2f} | {np.mean([r['ess_over_k'] for r in rs]):.3f} "
            f"({np.min([r['ess_over_k'] for r in rs]):.3f}) "
            f"| {sum(r['lost'] for r in rs)} |"
        )


if __name__ == "__main__":
    main()
