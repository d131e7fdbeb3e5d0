"""The refit solver: calibrated weights for a fixed set of records, solved in target space.

The engine's refit (and :func:`l0calib.refit`) minimises, over weight ratios ``r`` (one per
kept record, ``w = base * r``) within bounds ``lower <= r <= upper``::

    F(r) = sum_k c_k * max(|e_k| - tol_k, 0)^2 + (lambda / m) * ||r - 1||^2
    e = S^{-1} (B r - t)          B = A[:, kept] diag(base)        S = diag(scale)

The problem has as many unknowns as records (``m``, up to millions) but only as many
coupling constraints as targets (``K``, hundreds to thousands), so it is solved where it
is small, as classic calibration is (Newton on the Lagrange multipliers: Deville &
Sarndal 1992, JASA 87:376). Its Fenchel dual has one variable ``v_k`` per target::

    minimise D(v) = sum_k [v_k^2 / (4 c_k) + tol_k |v_k|] - v . e(r(v)) - (lambda/m)||r(v) - 1||^2
    r(v) = clip(1 - mu B~^T v, lower, upper),   mu = m / (2 lambda),   B~ = S^{-1} B

a strongly convex, piecewise-quadratic function of ``K`` variables whose minimiser gives
the primal solution through ``r(v)`` (always within the bounds). It is minimised by a
semismooth Newton method (Qi & Sun 1993, Math. Programming 58:353) with a backtracking
line search on ``D``: each step solves one ``K x K`` symmetric positive definite system,
``(diag(1 / 2c) + mu B~_A D_F B~_A^T) d = -R / 2c`` over the targets outside their
tolerance band (``A``) and the records strictly inside their bounds (``F``), dense
(Cholesky) up to a few thousand targets and by preconditioned conjugate gradients beyond.
Because the objective is piecewise quadratic, the iteration ends exactly once the sets
``A`` and ``F`` are right, usually in a handful of steps.

Convergence is reported honestly, by the duality gap ``F(r(v)) + D(v) >= 0``, which bounds
how far the returned ratios' objective is above the minimum. Without an L2 pull
(``lambda == 0``) the dual is not smooth and the solver falls back to L-BFGS-B on the
primal (as does a Newton step that cannot make progress); the result says which ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp
import scipy.sparse.linalg

__all__ = ["RatioSolution", "solve_ratios"]

# Above this many targets the Newton system is solved by conjugate gradients (matrix-free)
# instead of a dense Cholesky factorisation (a K x K float64 matrix: 128 MB at 4,096).
DENSE_MAX_TARGETS = 4096
# Recompute the dense B~_F B~_F^T from scratch when more than this fraction of the free
# records changed since it was formed; otherwise update it by the records that changed.
_REBUILD_FRACTION = 0.25
_ARMIJO = 1e-4


@dataclass(frozen=True)
class RatioSolution:
    """The outcome of :func:`solve_ratios`.

    Attributes
    ----------
    x : numpy.ndarray, shape (m,), float64
        The weight ratios ``r`` (within the bounds).
    dual : numpy.ndarray, shape (K,), float64
        One multiplier per row of the problem (0 for rows with coefficient 0); pass it as
        ``dual=`` to warm-start a related solve (e.g. the next swap round).
    success : bool
        The optimality conditions hold to the solver's tolerance.
    nit : int
        Iterations (Newton steps, plus L-BFGS-B iterations if it fell back).
    message : str
        How the solve ended, in words.
    method : str
        ``"newton"``, ``"newton+lbfgsb"`` or ``"lbfgsb"``.
    objective : float
        ``F(r)`` at the returned ratios.
    gap : float
        Duality gap ``F(r) + D(v)`` (``nan`` when L-BFGS-B produced the answer).
    """

    x: np.ndarray
    dual: np.ndarray
    success: bool
    nit: int
    message: str
    method: str
    objective: float
    gap: float


def _bound(name: str, value: float | np.ndarray, m: int) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (m,))
    if np.isnan(arr).any():
        raise ValueError(f"{name} bounds contain NaN")
    return arr


def solve_ratios(
    matrix: sp.spmatrix | np.ndarray,
    targets: np.ndarray,
    scale: np.ndarray,
    tol: np.ndarray,
    coef: np.ndarray,
    lambda_l2: float,
    *,
    lower: float | np.ndarray = 0.0,
    upper: float | np.ndarray = math.inf,
    max_iter: int = 2000,
    start: np.ndarray | None = None,
    dual: np.ndarray | None = None,
    rtol: float = 1e-12,
) -> RatioSolution:
    """Minimise the refit objective over ratios ``lower <= r <= upper``.

    Parameters
    ----------
    matrix : sparse or dense, shape (K, m)
        ``B = A[:, kept] diag(base)``: each kept record's contribution to each target at
        ratio 1 (its anchor weight).
    targets, scale, tol, coef : numpy.ndarray, shape (K,)
        Target values, the divisor of each error, the tolerance band (in units of the
        scaled error) and the loss weight ``c_k >= 0`` of each row.
    lambda_l2 : float
        Strength of the pull ``(lambda / m) ||r - 1||^2`` (>= 0; 0 falls back to L-BFGS-B).
    lower, upper : float or numpy.ndarray of shape (m,)
        Bounds on the ratios (``upper`` may be ``inf``); ``lower <= upper``.
    max_iter : int
        Most iterations (Newton steps; L-BFGS-B iterations for the fallback).
    start : numpy.ndarray, shape (m,), optional
        Starting ratios; used to derive a starting dual point.
    dual : numpy.ndarray, shape (K,), optional
        Starting multipliers (e.g. from a previous, related solve).
    rtol : float
        Converged when the duality gap (a bound on how far ``F(r)`` is above its minimum)
        is at most ``rtol * F(r)`` (or ``8 K eps F(r)``, its rounding level, if larger).

    Returns
    -------
    RatioSolution
    """
    B = sp.csr_matrix(matrix, dtype=np.float64)
    K, m = B.shape
    t = np.asarray(targets, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    tol = np.asarray(tol, dtype=np.float64)
    coef = np.asarray(coef, dtype=np.float64)
    lo, hi = _bound("lower", lower, m), _bound("upper", upper, m)
    if (lo > hi).any():
        raise ValueError(f"{int((lo > hi).sum())} lower bounds exceed their upper bounds")
    # Rows with coefficient 0 do not enter the objective (their multiplier is 0).
    rows = np.flatnonzero(coef > 0)
    Br = B[rows] if rows.size < K else B
    # Rows divided by their scale through the values alone (no sparse product pass).
    per_value = np.repeat(1.0 / scale[rows], np.diff(Br.indptr))
    Bs = sp.csr_matrix((Br.data * per_value, Br.indices, Br.indptr), shape=Br.shape)
    ts, tl, c = t[rows] / scale[rows], tol[rows], coef[rows]
    v_start = None if dual is None else np.asarray(dual, dtype=np.float64)[rows]

    if lambda_l2 <= 0 or m == 0:
        sol = _lbfgsb(Bs, ts, tl, c, lambda_l2, lo, hi, max_iter, start)
        return _expand(sol, rows, K)
    newton = _Newton(Bs, ts, tl, c, lambda_l2, lo, hi, rtol)
    sol = newton.solve(max_iter, start, v_start)
    if not sol.success and sol.method == "newton+lbfgsb":
        rest = max(max_iter - sol.nit, 1)
        fb = _lbfgsb(Bs, ts, tl, c, lambda_l2, lo, hi, rest, sol.x)
        sol = RatioSolution(
            x=fb.x, dual=sol.dual, success=fb.success, nit=sol.nit + fb.nit,
            message=f"{sol.message}; L-BFGS-B then: {fb.message}", method="newton+lbfgsb",
            objective=fb.objective, gap=math.nan,
        )  # fmt: skip
    return _expand(sol, rows, K)


def _expand(sol: RatioSolution, rows: np.ndarray, K: int) -> RatioSolution:
    dual = np.zeros(K)
    if sol.dual.size == rows.size:
        dual[rows] = sol.dual
    return RatioSolution(
        x=sol.x, dual=dual, success=sol.success, nit=sol.nit, message=sol.message,
        method=sol.method, objective=sol.objective, gap=sol.gap,
    )  # fmt: skip


def _grad_phi(e: np.ndarray, tol: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Gradient of sum_k c_k max(|e_k| - tol_k, 0)^2."""
    return 2.0 * c * np.sign(e) * np.maximum(np.abs(e) - tol, 0.0)


def _primal(e: np.ndarray, r: np.ndarray, tol: np.ndarray, c: np.ndarray, lam_m: float) -> float:
    excess = np.maximum(np.abs(e) - tol, 0.0)
    d = r - 1.0
    return float(np.dot(c, excess * excess)) + lam_m * float(np.dot(d, d))


class _Newton:
    """Semismooth Newton on the dual (see the module docstring)."""

    def __init__(self, Bs, ts, tol, c, lam, lo, hi, rtol) -> None:  # type: ignore[no-untyped-def]
        self.B, self.BT = Bs, Bs.T.tocsr()
        self.t, self.tol, self.c = ts, tol, c
        self.K, self.m = Bs.shape
        self.lam_m = lam / self.m
        self.mu = self.m / (2.0 * lam)
        self.lo, self.hi, self.rtol = lo, hi, rtol
        self.gap_tol = max(rtol, 8.0 * self.K * np.finfo(np.float64).eps)
        self.M: np.ndarray | None = None  # B~_F B~_F^T (dense), for the free set self.M_free
        self.M_free: np.ndarray | None = None

    # -- the map from multipliers to ratios, and what it implies
    def at(self, v: np.ndarray) -> dict:
        u = 1.0 - self.mu * (self.BT @ v)
        r = np.clip(u, self.lo, self.hi)
        free = (u > self.lo) & (u < self.hi)
        e = self.B @ r - self.t
        g = _grad_phi(e, self.tol, self.c)
        d = r - 1.0
        reg = self.lam_m * float(np.dot(d, d))
        dual = float(
            np.dot(v * v, 0.25 / self.c) + np.dot(self.tol, np.abs(v)) - np.dot(v, e) - reg
        )
        excess = np.maximum(np.abs(e) - self.tol, 0.0)
        primal = float(np.dot(self.c, excess * excess)) + reg
        return {"v": v, "r": r, "free": free, "e": e, "g": g, "R": v - g,
                "D": dual, "F": primal}  # fmt: skip

    def converged(self, s: dict) -> bool:
        """The duality gap certifies the primal point: ``F(r) - min F <= gap``. Its terms
        are all of the size of ``F``, so it is computed to about ``K eps F``."""
        gap = s["F"] + s["D"]
        return gap <= self.gap_tol * s["F"] + 1e-300

    # -- the generalised Hessian B~_F B~_F^T (dense) on the free records
    def gram(self, free: np.ndarray) -> np.ndarray:
        if self.M is not None and self.M_free is not None:
            changed = np.flatnonzero(free != self.M_free)
            if changed.size <= _REBUILD_FRACTION * max(int(free.sum()), 1):
                if changed.size:
                    add = changed[free[changed]]
                    rem = changed[~free[changed]]
                    self.M += _outer(self.BT, add) - _outer(self.BT, rem)
                    self.M_free = free.copy()
                return self.M
        self.M = _outer(self.BT, np.flatnonzero(free), self.B)
        self.M_free = free.copy()
        return self.M

    def direction(self, s: dict) -> np.ndarray:
        R, free = s["R"], s["free"]
        act = np.abs(s["e"]) > self.tol
        d = -R.copy()  # rows inside their tolerance band: v_k -> 0
        a = np.flatnonzero(act)
        if a.size == 0:
            return d
        n_idx = np.flatnonzero(~act)
        rhs = -R[a] / (2.0 * self.c[a])
        if self.K <= DENSE_MAX_TARGETS:
            M = self.gram(free)
            if n_idx.size:
                rhs -= self.mu * (M[np.ix_(a, n_idx)] @ d[n_idx])
            H = self.mu * M[np.ix_(a, a)]
            H[np.diag_indices_from(H)] += 0.5 / self.c[a]
            try:
                d[a] = scipy.linalg.cho_solve(
                    scipy.linalg.cho_factor(H, lower=True, check_finite=False), rhs,
                    check_finite=False,
                )  # fmt: skip
            except np.linalg.LinAlgError:
                d[a] = scipy.linalg.lstsq(H, rhs, check_finite=False)[0]
            return d
        # Matrix-free: H x = x / 2c + mu B~_A (D_F (B~_A^T x)).
        BT_free = self.BT[np.flatnonzero(free)]
        BA = BT_free[:, a]
        if n_idx.size:
            rhs -= self.mu * (BA.T @ (BT_free[:, n_idx] @ d[n_idx]))
        inv2c = 0.5 / self.c[a]

        def hv(x: np.ndarray) -> np.ndarray:
            return inv2c * x + self.mu * (BA.T @ (BA @ x))

        diag = inv2c + self.mu * np.asarray(BA.multiply(BA).sum(axis=0)).ravel()
        op = scipy.sparse.linalg.LinearOperator((a.size, a.size), matvec=hv, dtype=np.float64)
        pre = scipy.sparse.linalg.LinearOperator(
            (a.size, a.size), matvec=lambda x: x / diag, dtype=np.float64
        )
        x, _ = scipy.sparse.linalg.cg(op, rhs, M=pre, rtol=1e-10, maxiter=10 * a.size)
        d[a] = x
        return d

    def slope(self, s: dict, d: np.ndarray) -> float:
        """Directional derivative of D at v along d (the |v| term one-sided)."""
        v = s["v"]
        smooth = np.dot(v * 0.5 / self.c - s["e"], d)
        l1 = np.where(v != 0, np.sign(v) * d, np.abs(d))
        return float(smooth + np.dot(self.tol, l1))

    def solve(
        self, max_iter: int, start: np.ndarray | None, v0: np.ndarray | None
    ) -> RatioSolution:
        # Candidate starting points: the given multipliers, those implied by the starting
        # ratios' errors, and 0 (all records at ratio 1: the first step is then the
        # classic linear calibration); the one with the lowest dual objective wins.
        cands = [np.zeros(self.K)]
        if start is not None:
            r0 = np.clip(np.asarray(start, dtype=np.float64), self.lo, self.hi)
            cands.append(_grad_phi(self.B @ r0 - self.t, self.tol, self.c))
        if v0 is not None and v0.shape == (self.K,) and np.isfinite(v0).all():
            cands.append(v0)
        s = min((self.at(v) for v in cands), key=lambda st: st["D"])
        it = 0
        while True:
            if self.converged(s):
                return self._done(s, it, True, "converged (semismooth Newton on the dual)")
            if it >= max_iter:
                return self._done(
                    s, it, False, f"stopped at the iteration cap (max_iter={max_iter})"
                )
            it += 1
            new, full = self._newton_step(s)
            if not full:
                # A shortened semismooth step means the sets it assumed were wrong (with
                # tolerances > 0); the face step may then get further.
                face = self._face_step(s)
                if face is not None and (new is None or face["D"] < new["D"]):
                    new = face
            if new is None:
                return self._stalled(s, it, "no step decreased the dual objective")
            s = new

    def _search(self, s: dict, d: np.ndarray, slope: float, project=None, tries=40):  # type: ignore[no-untyped-def]
        """Backtracking (Armijo) on the dual objective along ``d``."""
        self.alpha = alpha = 1.0
        for _ in range(tries):
            v = s["v"] + alpha * d
            if project is not None:
                v = project(v)
                slope_a = float(np.dot(slope, v - s["v"]))  # slope is the pseudo-gradient
            else:
                slope_a = alpha * slope
            trial = self.at(v)
            if trial["D"] <= s["D"] + _ARMIJO * slope_a:
                return trial
            self.alpha = alpha = alpha * 0.5
        return None

    def _newton_step(self, s: dict) -> tuple[dict | None, bool]:
        """The semismooth Newton step on v = grad_phi(e(r(v))): fast once the sets settle.
        Returns the new state (or None) and whether the full step was taken."""
        d = self.direction(s)
        slope = self.slope(s, d)
        if not slope < 0:
            return None, False
        new = self._search(s, d, slope, tries=30)
        return new, new is not None and (self.alpha == 1.0 or not self.tol.any())

    def _face_step(self, s: dict) -> dict | None:
        """A Newton step on the orthant face of the tolerance term ``tol |v|`` (as in
        OWL-QN, Andrew & Gao 2007), with the step projected onto that orthant: a descent
        step where the semismooth one is not (only with tolerances > 0)."""
        v = s["v"]
        gs = v * (0.5 / self.c) - s["e"]
        pg = np.where(v > 0, gs + self.tol, np.where(v < 0, gs - self.tol, 0.0))
        zero = v == 0
        pg[zero] = np.where(gs[zero] + self.tol[zero] < 0, gs[zero] + self.tol[zero],
                            np.where(gs[zero] - self.tol[zero] > 0,
                                     gs[zero] - self.tol[zero], 0.0))  # fmt: skip
        orth = np.where(v != 0, np.sign(v), -np.sign(pg))
        f = np.flatnonzero(orth != 0)
        if f.size == 0:
            return None
        d = np.zeros(self.K)
        H = self.mu * self.gram(s["free"])[np.ix_(f, f)] if self.K <= DENSE_MAX_TARGETS else None
        if H is not None:
            H[np.diag_indices_from(H)] += 0.5 / self.c[f]
            try:
                d[f] = -scipy.linalg.cho_solve(
                    scipy.linalg.cho_factor(H, lower=True, check_finite=False), pg[f],
                    check_finite=False,
                )  # fmt: skip
            except np.linalg.LinAlgError:
                d[f] = -pg[f] * 2.0 * self.c[f]
        else:
            d[f] = -pg[f] * 2.0 * self.c[f]
        d[d * pg > 0] = 0.0  # align with the steepest descent direction
        if not np.dot(pg, d) < 0:
            d = -pg * 2.0 * self.c
        if not np.dot(pg, d) < 0:
            return None

        def project(x: np.ndarray) -> np.ndarray:
            return np.where(np.sign(x) == orth, x, 0.0)

        return self._search(s, d, pg, project=project)

    def _stalled(self, s: dict, it: int, why: str) -> RatioSolution:
        # Near the optimum the dual objective stops resolving further decrease; accept a
        # point whose gap is already near rounding level, otherwise hand over.
        if s["F"] + s["D"] <= 1e3 * self.gap_tol * s["F"] + 1e-300:
            return self._done(s, it, True, f"converged to rounding level ({why})")
        return self._done(s, it, False, why, method="newton+lbfgsb")

    def _done(
        self, s: dict, it: int, ok: bool, message: str, method: str = "newton"
    ) -> RatioSolution:
        return RatioSolution(
            x=s["r"], dual=s["v"], success=ok, nit=it, message=message, method=method,
            objective=s["F"], gap=s["F"] + s["D"],
        )  # fmt: skip


def _outer(BT: sp.csr_matrix, idx: np.ndarray, B: sp.csr_matrix | None = None) -> np.ndarray:
    """Dense B~[:, idx] B~[:, idx]^T from the record-major transpose ``BT`` (and, when
    every record is in ``idx``, from ``B`` itself: no row selection or transposition)."""
    K = BT.shape[1]
    if idx.size == 0:
        return np.zeros((K, K))
    if B is not None and idx.size == BT.shape[0]:
        return np.asarray((B @ BT).toarray())
    sub = BT[idx]
    return np.asarray((sub.T @ sub).toarray())


def _lbfgsb(
    Bs: sp.csr_matrix,
    ts: np.ndarray,
    tol: np.ndarray,
    c: np.ndarray,
    lam: float,
    lo: np.ndarray,
    hi: np.ndarray,
    max_iter: int,
    start: np.ndarray | None,
) -> RatioSolution:
    """The primal by L-BFGS-B: used without an L2 pull, or when Newton cannot proceed."""
    m = Bs.shape[1]
    BT = Bs.T.tocsr()
    lam_m = lam / max(m, 1)

    def fun(r: np.ndarray) -> tuple[float, np.ndarray]:
        e = Bs @ r - ts
        return _primal(e, r, tol, c, lam_m), BT @ _grad_phi(e, tol, c) + 2.0 * lam_m * (r - 1.0)

    x0 = np.ones(m) if start is None else np.asarray(start, dtype=np.float64)
    res = scipy.optimize.minimize(
        fun,
        np.clip(x0, lo, hi),
        jac=True,
        method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(lo, hi),
        options={"maxiter": max_iter, "maxcor": 20, "ftol": 1e-15, "gtol": 1e-12},
    )
    msg = str(res.message)
    if not res.success and res.nit >= max_iter:
        msg = f"stopped at the iteration cap (max_iter={max_iter}): {msg}"
    return RatioSolution(
        x=res.x, dual=np.zeros(0), success=bool(res.success), nit=int(res.nit), message=msg,
        method="lbfgsb", objective=float(res.fun), gap=math.nan,
    )  # fmt: skip
