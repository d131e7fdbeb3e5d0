"""Classic exact calibration: linear (GREG), raking, logit and truncated linear, with bounds.

The calibration estimators of Deville & Sarndal (1992), "Calibration estimators in survey
sampling", JASA 87(418). Final weights are ``w_i = w0_i * F(x_i' lambda)`` with ``x_i``
record i's column of the estimate matrix and ``lambda`` the Lagrange multipliers, chosen
so that every fitted target is met exactly: ``sum_i w_i x_i = t``. ``F`` is the calibration
function of the method:

============  =====================================================  ==================
method        F(u)                                                   g = w / w0
============  =====================================================  ==================
linear        1 + u                                                  any real
raking        exp(u)                                                 > 0
logit         (L(U-1) + U(1-L)e^{Au}) / ((U-1) + (1-L)e^{Au}),       L < g < U
              A = (U-L) / ((1-L)(U-1))
truncated     min(U, max(L, 1 + u))                                  L <= g <= U
============  =====================================================  ==================

The multipliers are found by Newton's method on ``sum_i w0_i F(x_i' lambda) x_i - t = 0``:
one K x K system per step, ``A diag(w0 F') A^T``, built from the sparse matrix without
densifying the records dimension, with step halving when a step does not reduce the
residual. These are the same functions R's ``survey::calibrate`` (``calfun = "linear"``,
``"raking"``, ``"logit"``, and ``"linear"`` with ``bounds``) uses, so the weights agree.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from l0calib._checks import ratio_bounds
from l0calib.calibrate import CalibrationResult, _problem, _result
from l0calib.diagnostics import dependent_targets, list_names
from l0calib.exceptions import CalibrationError, ParameterError

__all__ = ["METHODS", "calibrate_exact"]

Method = Literal["linear", "raking", "logit", "truncated"]
METHODS = ("linear", "raking", "logit", "truncated")


class _CalFun:
    """F(u) and F'(u) of a calibration method, vectorised."""

    def __init__(self, method: str, bounds: tuple[float, float] | None) -> None:
        self.method = method
        self.bounds = bounds
        if method == "logit":
            lo, hi = bounds  # type: ignore[misc]
            self.a_coef = (hi - lo) / ((1 - lo) * (hi - 1))

    def f(self, u: np.ndarray) -> np.ndarray:
        if self.method == "linear":
            return 1.0 + u
        if self.method == "raking":
            return np.exp(np.minimum(u, 700.0))
        lo, hi = self.bounds  # type: ignore[misc]
        if self.method == "truncated":
            return np.clip(1.0 + u, lo, hi)
        # logit, written with exp(-|Au|) so that it never overflows
        au = self.a_coef * u
        e = np.exp(-np.abs(au))
        pos = au >= 0
        num = np.where(pos, lo * (hi - 1) * e + hi * (1 - lo), lo * (hi - 1) + hi * (1 - lo) * e)
        den = np.where(pos, (hi - 1) * e + (1 - lo), (hi - 1) + (1 - lo) * e)
        return num / den

    def df(self, u: np.ndarray) -> np.ndarray:
        if self.method == "linear":
            return np.ones_like(u)
        if self.method == "raking":
            return np.exp(np.minimum(u, 700.0))
        lo, hi = self.bounds  # type: ignore[misc]
        if self.method == "truncated":
            g = 1.0 + u
            return ((g > lo) & (g < hi)).astype(np.float64)
        au = self.a_coef * u
        e = np.exp(-np.abs(au))
        c, d = hi - 1, 1 - lo
        # A E (bc - ad) / (c + dE)^2 with E = exp(Au), divided through by E^2 when Au > 0.
        num = self.a_coef * e * c * d * (hi - lo)
        den = np.where(au >= 0, (c * e + d) ** 2, (c + d * e) ** 2)
        return num / den


def _check_method(method: str, bounds: Any) -> tuple[float, float] | None:
    if method not in METHODS:
        raise ParameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if bounds is None:
        if method in ("logit", "truncated"):
            raise ParameterError(f"method '{method}' needs bounds=(L, U) with L < 1 < U")
        return None
    lo, hi = ratio_bounds(bounds)  # the rule every entry point shares, then this one's
    if method == "raking":
        raise ParameterError("raking takes no bounds; use method='logit' for bounded raking")
    if not (math.isfinite(hi) and lo < 1 < hi):
        raise ParameterError(
            f"method '{method}' needs bounds with 0 <= lower < 1 < upper, upper finite, got "
            f"({lo:g}, {hi:g})"
        )
    return (lo, hi)


def calibrate_exact(
    matrix: Any,
    targets: Any = None,
    *,
    weights: Any = None,
    method: Method = "raking",
    bounds: tuple[float, float] | None = None,
    holdout: Any = None,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> CalibrationResult:
    """Calibrate all records so every fitted target is met exactly (Deville & Sarndal 1992).

    Parameters
    ----------
    matrix, targets, weights, holdout
        As for :func:`l0calib.calibrate`: the estimate matrix (targets x records), target
        values, initial weights ``w0`` (shape (n_records,)) and targets to report only.
    method : {"linear", "raking", "logit", "truncated"}, default "raking"
        The calibration function (see the module docstring). ``linear`` with ``bounds`` is
        the same as ``truncated``.
    bounds : (L, U), optional
        Bounds on ``g = w / w0``, ``0 <= L < 1 < U``; required by ``logit`` and
        ``truncated``.
    max_iter : int, default 50
        Newton iterations.
    tol : float, default 1e-10
        Convergence: every fitted target's ``|estimate - target| / max(|target|, 1)``.

    Returns
    -------
    CalibrationResult
        ``method`` is the calibration method; ``info`` holds ``iterations`` and
        ``max_rel_residual``; ``diagnostics`` the g-weight summary (``ratio_min``,
        ``ratio_quartiles``, ``ratio_max``), Kish effective sample size and design effect;
        ``history`` the residual per iteration.

    Raises
    ------
    CalibrationError
        Linearly dependent targets (naming which combine into which: drop or merge them,
        or use :func:`l0calib.calibrate`, which minimises the error instead of requiring
        zero), or no convergence in ``max_iter`` iterations (infeasible bounds, say).
    ParameterError
        Invalid arguments.

    Example
    -------
    >>> import numpy as np
    >>> A = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    >>> res = calibrate_exact(A, [10.0, 6.0], weights=np.full(4, 2.0), method="linear")
    >>> res.weights.round(6).tolist()
    [3.0, 2.0, 3.0, 2.0]
    """
    start = time.perf_counter()
    bnds = _check_method(method, bounds)
    if method == "linear" and bnds is not None:
        method = "truncated"
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ParameterError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ParameterError(f"tol must be a finite number > 0, got {tol!r}")
    pb = _problem(
        matrix, targets, weights, holdout, normalize_groups=False, loss="relative",
        scale_floor=1.0,
    )  # fmt: skip
    em = pb.em
    rows = np.flatnonzero(pb.fitted)
    a = em.matrix[rows].tocsr()
    at = a.T.tocsr()
    t = em.values[rows]
    scale = np.maximum(np.abs(t), 1.0)
    w0 = pb.w0
    cal = _CalFun(method, bnds)
    _check_rank(em, rows)

    lam = np.zeros(rows.size)
    history: list[tuple[int, float]] = []

    def residual(lmb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = at @ lmb
        return a @ (w0 * cal.f(u)) - t, u

    r, u = residual(lam)
    err = float(np.max(np.abs(r) / scale))
    history.append((0, err))
    it = 0
    for it in range(1, max_iter + 1):
        if err < tol:
            it -= 1
            break
        jac = (a @ sp.diags(w0 * cal.df(u)) @ at).toarray()
        try:
            step = np.linalg.solve(jac, -r)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(jac, -r, rcond=None)[0]
        # Step halving: accept the first step that lowers the scaled residual.
        norm0 = float(np.linalg.norm(r / scale))
        for _ in range(30):
            cand = lam + step
            r_new, u_new = residual(cand)
            if np.all(np.isfinite(r_new)) and np.linalg.norm(r_new / scale) < norm0:
                break
            step = step / 2
        lam, r, u = cand, r_new, u_new
        err = float(np.max(np.abs(r) / scale))
        history.append((it, err))
    if err >= tol:
        worst = np.argsort(-np.abs(r) / scale)[:5]
        names = ", ".join(f"{em.names[rows[k]]} ({r[k] / scale[k]:+.2e})" for k in worst)
        raise CalibrationError(
            f"{method} calibration did not converge in {max_iter} iterations (largest "
            f"relative residual {err:.3g}; worst targets: {names}). The targets may be "
            "infeasible for this method and these bounds: widen the bounds, drop or merge "
            "conflicting targets, or use l0calib.calibrate, which minimises the error "
            "instead of requiring zero"
        )
    w = w0 * cal.f(u)
    info = {"iterations": it, "max_rel_residual": err, "bounds": list(bnds) if bnds else None}
    return _result(
        pb, w, tol=None, converged=True, not_converged_reason="",
        history=pd.DataFrame(history, columns=["iteration", "max_rel_residual"]),
        n_iter=it, start=start, seed=0, method=method, info=info,
    )  # fmt: skip


def _check_rank(em: Any, rows: np.ndarray) -> None:
    """Refuse linearly dependent fitted targets, naming them."""
    sub = em.select_targets(np.isin(np.arange(em.n_targets), rows))
    deps = dependent_targets(sub)
    if not deps:
        return
    listed = "; ".join(f"{d} = combination of {list_names(p)}" for d, p in list(deps.items())[:5])
    more = f" (and {len(deps) - 5} more)" if len(deps) > 5 else ""
    raise CalibrationError(
        f"{len(deps)} target(s) are linear combinations of others, so exact calibration is "
        f"rank-deficient: {listed}{more}. Drop or merge them, or use l0calib.calibrate, "
        "which minimises the error instead"
    )


def check_method(method: str, bounds: Any = None) -> None:
    """Validate :func:`calibrate_exact`'s ``method`` and ``bounds`` without fitting (raises
    :class:`ParameterError`, as ``calibrate_exact`` would)."""
    _check_method(method, bounds)
