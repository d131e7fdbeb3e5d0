"""Exchange rounds: swap kept records for better ones, judged by the refit's own objective.

With ``target_records=K`` the engine keeps the ``K`` records its training ranked highest
and refits their weights (:mod:`l0calib.refit`). The refit's minimum ``F(S)`` depends on
the set ``S``: a target whose few supporters were not kept can only be met by moving the
kept ones far, which the L2 pull makes expensive. An exchange round improves ``S`` with
the count fixed:

- for every record ``j`` outside ``S``, the change in ``F`` if it joins at its best ratio
  ``rho`` while the others keep theirs, bounded above by the quadratic model
  ``rho p_j + rho^2 h_j + (lambda/K) (rho - 1)^2``;
- for every kept record ``i`` (ratio ``r_i``), the change if it leaves, bounded above by
  ``-r_i p_i + r_i^2 h_i - (lambda/K) (r_i - 1)^2``;

where, with ``e`` the scaled errors at the current solution, ``b_j = S^{-1} A[:, j]
base_j`` a record's column, ``g_k = c_k d/de max(|e_k| - tol_k, 0)^2`` the fit gradient,
``p_j = g . b_j`` and ``h_j = sum_k c_k b_kj^2``. (The fit term has curvature at most
``2 c_k``, so both are upper bounds on the change with the other ratios held; the re-solve
can only do better.) The best joiners are paired with the cheapest leavers while a pair's
sum is negative, ``batch`` pairs at a time; the set is re-solved and the exchange kept
only if ``F`` fell, otherwise the batch is halved (at most ``max_tries`` solves a round).
Rounds stop when no pair helps, when a round gains less than ``min_gain`` of ``F``, or
after ``rounds`` rounds.

The engine judges sets with a strong pull (``l0calib.calibrate.EXCHANGE_PULL``, 0.3, where
its refit uses 3e-4 to 1e-3): a set whose inflated initial weights need little moving to
meet the targets, a balanced sample in the survey-sampling sense, and then refits the
chosen set at its own pull. Judged at the refit's pull, the exchanges chased the fit and
cost holdout accuracy after a balanced selection; judged at 0.3 they raised the effective
sample size at the same fitted and holdout error.

Records the caller fixes never leave, nor does a record a target needs for coverage
(:class:`l0calib.coverage.Coverage`); per-record ratio bounds hold for joiners too. Every
choice is a stable sort, so the result is deterministic. Measured in docs/benchmarks.md
("Pruning you can trust").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["ExchangeResult", "exchange"]


@dataclass(frozen=True)
class ExchangeResult:
    """The set after the exchange rounds and the solve that belongs to it.

    ``kept``: boolean mask, shape (n_records,). ``idx``: the kept records' indices (as
    the solve returned them) and ``ratios`` their weight ratios to ``base``. ``solution``:
    whatever the solve returned for that set. ``objective_before`` / ``objective``: ``F``
    before and after. ``swaps``: records exchanged (pairs); ``rounds``: rounds run.
    """

    kept: np.ndarray
    idx: np.ndarray
    ratios: np.ndarray
    solution: Any
    objective_before: float
    objective: float
    swaps: int
    rounds: int


Solve = Callable[[np.ndarray, Any], tuple[np.ndarray, np.ndarray, Any]]


def exchange(
    solve: Solve,
    kept: np.ndarray,
    start: tuple[np.ndarray, np.ndarray, Any],
    *,
    matrix: sp.spmatrix,
    values: np.ndarray,
    scale: np.ndarray,
    tol: np.ndarray,
    coef: np.ndarray,
    base: np.ndarray,
    lambda_l2: float,
    lower: np.ndarray,
    upper: np.ndarray,
    fixed: np.ndarray | None = None,
    coverage: Any = None,
    rounds: int = 10,
    batch: int | None = None,
    min_gain: float = 1e-3,
    max_tries: int = 4,
) -> ExchangeResult:
    """Improve the kept set by exchanges at constant count (see the module docstring).

    Parameters
    ----------
    solve : callable ``(kept mask, warm start) -> (idx, ratios, solution)``
        Refits a set: ``solution.objective`` is ``F``, ``solution.dual`` a warm start for
        the next call.
    kept : bool array, shape (n_records,)
        The set to start from; ``start`` is ``solve``'s answer for it.
    matrix : sparse, shape (n_fitted, n_records)
        The fitted targets' rows of the estimate matrix; ``values``, ``scale``, ``tol``,
        ``coef`` (shape (n_fitted,)) their targets, error divisors, tolerance bands (in
        scaled units) and loss weights.
    base : array, shape (n_records,)
        Every record's anchor weight (ratio 1); ``lower`` / ``upper`` (shape (n_records,))
        bound its ratio.
    lambda_l2 : float
        The refit's pull (``F`` holds ``lambda_l2 / K * sum (r - 1)^2``).
    fixed : bool array, optional
        Records that must stay.
    coverage : Coverage, optional
        A leaver must be :meth:`~l0calib.coverage.Coverage.removable`.
    rounds, batch, min_gain, max_tries
        At most ``rounds`` rounds; the first tries ``batch`` pairs (default ``K // 50``,
        at least 1); stop once a round lowers ``F`` by less than ``min_gain`` of it, or
        finds no lower ``F`` in ``max_tries`` solves.
    """
    kept = kept.copy()
    n = kept.size
    k = int(kept.sum())
    lam_k = lambda_l2 / max(k, 1)
    a = sp.csr_matrix(matrix)
    inv = 1.0 / scale
    at = sp.csr_matrix(a.T)
    # h_j = sum_k c_k (A_kj base_j / s_k)^2
    h = base**2 * (at.power(2) @ (coef * inv**2))
    idx, r, sol = start
    f0 = float(sol.objective)
    f = f0
    size = max(1, k // 50) if batch is None else max(1, int(batch))
    swaps, done = 0, 0
    for _ in range(rounds):
        done += 1
        w = np.zeros(n)
        w[idx] = base[idx] * r
        e = (a @ w - values) * inv
        over = np.sign(e) * np.maximum(np.abs(e) - tol, 0.0)
        p = base * (at @ (2.0 * coef * over * inv))
        # Joining at the best ratio within the record's bounds.
        rho = np.clip((2.0 * lam_k - p) / (2.0 * (h + lam_k)), lower, upper)
        join = rho * p + rho**2 * h + lam_k * (rho - 1.0) ** 2
        ratio = np.zeros(n)
        ratio[idx] = r
        leave = -ratio * p + ratio**2 * h - lam_k * (ratio - 1.0) ** 2
        outside = np.flatnonzero(~kept)
        joiners = outside[np.argsort(join[outside], kind="stable")]
        joiners = joiners[join[joiners] < 0]
        inside = idx if fixed is None else idx[~fixed[idx]]
        leavers = inside[np.argsort(leave[inside], kind="stable")]
        m = min(joiners.size, leavers.size, size)
        if coverage is not None and m:
            # Only records no target needs, judged one after another in this order (the
            # first few times the batch: a round uses at most ``size`` of them).
            head = leavers[: 4 * m + 16]
            leavers = head[coverage.removable(kept, head)]
            m = min(m, leavers.size)
        gains = join[joiners[:m]] + leave[leavers[:m]]
        m = int(np.argmax(gains >= 0)) if (gains >= 0).any() else m
        accepted, tries = False, 0
        while m > 0 and tries < max_tries:
            tries += 1
            take = min(m, size)
            trial = kept.copy()
            trial[joiners[:take]] = True
            trial[leavers[:take]] = False
            t_idx, t_r, t_sol = solve(trial, sol)
            if float(t_sol.objective) < f:
                kept, idx, r, sol = trial, t_idx, t_r, t_sol
                gain = f - float(t_sol.objective)
                f = float(t_sol.objective)
                swaps += take
                accepted = True
                break
            if take == 1:
                break
            size = max(1, take // 2)
        if not accepted or gain < min_gain * f:
            break
    return ExchangeResult(
        kept=kept, idx=idx, ratios=r, solution=sol, objective_before=f0, objective=f,
        swaps=swaps, rounds=done,
    )  # fmt: skip
