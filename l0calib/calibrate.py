"""The calibration engine: L0L2-gated weights that match targets, with an exact record count.

Each record ``i`` has a weight parametrised relative to its initial weight and a Hard
Concrete gate (Louizos, Welling & Kingma 2017, arXiv:1712.01312)::

    w_i = w0_i * rho * exp(u_i) * z_i      z_i ~ HardConcrete(log_alpha_i)

where ``rho = n / (expected survivors)`` inflates the survivors' weights as records drop out,

and the training loss is, with ``e_k = (A_k w - t_k) / scale_k`` and
``scale_k = max(|t_k|, scale_floor)``::

    sum_k c_k * max(|e_k| - tol_k, 0)^2                        (fit; "relative" loss)
    + lambda_l0 * E[#{z_i != 0}] / n                           (L0: expected fraction kept)
    + lambda_l2 * sum_i P(z_i != 0) * (exp(u_i) - 1)^2 / n     (L2 toward rho * w0)

``c_k = importance_k * g_k / sum(importance * g)`` over the fitted targets, where ``g_k`` is
1 / (size of k's group) with ``normalize_groups`` (ungrouped targets are groups of one) and
1 otherwise. With ``target_records=K`` no L0 penalty needs tuning: after every step the gate
logits are shifted by one constant so that the expected number of survivors follows a
schedule from n down to K; then the K records most likely to be non-zero are kept and their
weights refitted without gates (a convex, bounded problem solved in float64 in target space,
:mod:`l0calib.refit`, pulled toward the kept records' inflated initial weights). See
``docs/engine.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from l0calib._checks import nonneg, nonneg_int, positive_int, ratio_bounds
from l0calib.coverage import COVERAGE_RECORDS, Coverage, coverage_needs, coverage_risk
from l0calib.diagnostics import WeightDiagnostics, target_report, weight_diagnostics
from l0calib.exceptions import ConvergenceWarning, CoverageWarning, ParameterError, TargetError
from l0calib.exchange import ExchangeResult, exchange
from l0calib.hardconcrete import _WORK_DTYPES, HardConcrete
from l0calib.io import atomic_path
from l0calib.refit import RatioSolution, solve_ratios
from l0calib.sparse import SparseOperator
from l0calib.targets import EstimateMatrix, as_estimate_matrix
from l0calib.threads import choose_threads, limit_threads

__all__ = ["CalibrationResult", "Progress", "calibrate", "refit"]

LossName = Literal["relative", "squared"]
LOG_COLUMNS = (
    "epoch",
    "loss",
    "target_name",
    "target",
    "estimate",
    "error",
    "abs_error",
    "rel_abs_error",
)
HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "fit_loss",
    "mean_abs_rel_error",
    "max_abs_rel_error",
    "expected_survivors",
    "survivor_goal",
    "lambda_l0",
    "gate_shift",
)


@dataclass(frozen=True)
class Progress:
    """What the engine reports to ``callback`` after each epoch (and each refit round).

    ``phase`` is ``"train"`` after each epoch, then ``"select"`` once, when the selection
    and refit start (repeating the last epoch's figures). Errors are over fitted
    (non-holdout) targets, for the current sampled (gated) weights: they rise while records
    are dropped and fall again with the refit. ``expected_survivors`` is ``sum P(z != 0)``; ``goal``
    is the survivor count the L0 controller aims at this epoch (``None`` without
    ``target_records``).
    """

    phase: str
    epoch: int
    epochs: int
    loss: float
    mean_abs_rel_error: float
    max_abs_rel_error: float
    expected_survivors: float
    goal: float | None
    lambda_l0: float


@dataclass(frozen=True)
class CalibrationResult:
    """The outcome of a calibration.

    Attributes
    ----------
    weights : numpy.ndarray, shape (n_records,), float64
        Final weights in the input's record order; 0 for dropped records.
    kept : numpy.ndarray of bool, shape (n_records,)
        ``weights != 0``.
    report : pandas.DataFrame
        One row per target: name, target, estimate, error, rel_error, abs_rel_error,
        within_tolerance, holdout.
    diagnostics : WeightDiagnostics
        Records kept, Kish effective sample size, design effect, ``w / w0`` summary.
    history : pandas.DataFrame
        One row per training epoch: epoch, loss, fit_loss, mean_abs_rel_error,
        max_abs_rel_error, expected_survivors, survivor_goal, lambda_l0.
    converged : bool
        The final solve converged and, if ``tol`` was given, every fitted target is within
        ``max(tol, its tolerance)``.
    n_iter : int
        Training epochs run (plus refit iterations, reported in ``info``).
    seconds : float
        Wall time.
    seed : int
    method : str
        ``"l0"`` for this engine; the classic methods name themselves.
    info : dict
        Method-specific figures (for the engine: errors before and after the refit,
        refit iterations, final lambda_l0...).
    keep_probability : numpy.ndarray, shape (n_records,), optional
        The engine's final ``P(z_i != 0)`` per record (1 for ungated and ``always_keep``
        records): how strongly training wanted each record. ``None`` for other methods.
    """

    weights: np.ndarray
    kept: np.ndarray
    report: pd.DataFrame
    diagnostics: WeightDiagnostics
    history: pd.DataFrame
    converged: bool
    n_iter: int
    seconds: float
    seed: int
    method: str = "l0"
    info: dict[str, Any] = field(default_factory=dict)
    keep_probability: np.ndarray | None = None

    def fitted_errors(self) -> pd.Series:
        """Absolute relative errors of the fitted (non-holdout) targets, by name."""
        r = self.report[~self.report["holdout"]]
        return pd.Series(r["abs_rel_error"].to_numpy(), index=r["name"], name="abs_rel_error")

    def holdout_errors(self) -> pd.Series:
        """Absolute relative errors of the holdout targets, by name."""
        r = self.report[self.report["holdout"]]
        return pd.Series(r["abs_rel_error"].to_numpy(), index=r["name"], name="abs_rel_error")


# ---------------------------------------------------------------------------- validation
def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device in ("cpu", "cuda") or str(device).startswith("cuda:"):
        dev = torch.device(device)
    else:
        raise ParameterError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was requested but torch sees no CUDA device")
    return dev


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in table.values():
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise ParameterError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def _holdout_mask(em: EstimateMatrix, holdout: Any) -> np.ndarray:
    if holdout is None:
        return np.zeros(em.n_targets, dtype=bool)
    return em._target_mask(holdout, what="holdout mask")


def _initial_weights(em: EstimateMatrix, weights: Any) -> np.ndarray:
    if weights is None:
        if em.weights is None:
            raise ParameterError(
                "weights (initial weights, one per record) are required: the matrix "
                "does not carry them"
            )
        w0 = np.asarray(em.weights, dtype=np.float64)
    else:
        w0 = np.asarray(weights, dtype=np.float64).ravel()
    if w0.shape != (em.n_records,):
        raise ParameterError(
            f"weights has length {w0.shape[0]}, but the matrix has {em.n_records} records (columns)"
        )
    bad = ~np.isfinite(w0)
    if bad.any():
        raise ParameterError(f"weights must be finite; {int(bad.sum())} are NaN or infinite")
    if (w0 < 0).any():
        raise ParameterError(f"weights must be >= 0; {int((w0 < 0).sum())} are negative")
    if not (w0 > 0).any():
        raise ParameterError("weights are all zero")
    return w0


def _target_coefficients(
    em: EstimateMatrix, fitted: np.ndarray, normalize_groups: bool
) -> np.ndarray:
    c = em.importance * fitted
    if normalize_groups:
        labels = [g if g is not None else f"\0{k}" for k, g in enumerate(em.groups)]
        sizes: dict[str, int] = {}
        for lab, f in zip(labels, fitted, strict=True):
            if f:
                sizes[lab] = sizes.get(lab, 0) + 1
        c = c / np.array([sizes.get(lab, 1) for lab in labels], dtype=np.float64)
    total = c.sum()
    if total <= 0:
        raise ParameterError("every fitted target has importance 0: nothing to fit")
    return c / total


@dataclass(frozen=True)
class _Problem:
    """A validated problem and its loss constants (float64, per target)."""

    em: EstimateMatrix
    w0: np.ndarray
    holdout: np.ndarray
    coef: np.ndarray  # loss weight c_k, 0 on holdout targets, sums to 1
    scale: np.ndarray  # divisor of each error
    tol: np.ndarray  # tolerance in units of the scaled error
    scale_floor: float

    @property
    def fitted(self) -> np.ndarray:
        return ~self.holdout


def _problem(
    matrix: Any,
    targets: Any,
    weights: Any,
    holdout: Any,
    *,
    normalize_groups: bool,
    loss: str,
    scale_floor: float,
    allow_empty: bool = False,
) -> _Problem:
    em = as_estimate_matrix(matrix, targets)
    w0 = _initial_weights(em, weights)
    if loss not in ("relative", "squared"):
        raise ParameterError(f"loss must be 'relative' or 'squared', got {loss!r}")
    if not (isinstance(scale_floor, (int, float)) and math.isfinite(scale_floor)):
        raise ParameterError(f"scale_floor must be a finite number > 0, got {scale_floor!r}")
    if scale_floor <= 0:
        raise ParameterError(f"scale_floor must be > 0, got {scale_floor!r}")
    hold = _holdout_mask(em, holdout)
    fitted = ~hold
    if not fitted.any():
        raise ParameterError("every target is in the holdout: nothing to fit")
    empty = [em.names[k] for k in np.flatnonzero((em.support() == 0) & fitted)]
    if empty and not allow_empty:  # a shard may hold no record of a target
        raise TargetError(
            f"{len(empty)} fitted target(s) have no record contributing (all-zero rows): "
            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; remove them or put "
            "them in the holdout"
        )
    rel_scale = np.maximum(np.abs(em.values), scale_floor)
    scale = rel_scale
    if loss == "squared":
        # Absolute errors, divided by one common scale so lr means the same thing.
        scale = np.full_like(rel_scale, math.sqrt(float(np.mean(rel_scale**2))))
    return _Problem(
        em=em,
        w0=w0,
        holdout=hold,
        coef=_target_coefficients(em, fitted, normalize_groups),
        scale=scale,
        tol=em.tolerance * rel_scale / scale,
        scale_floor=float(scale_floor),
    )


# ---------------------------------------------------------------------------- the log
class _CsvLog:
    """microcalibrate's per-target log, written to a temp file and renamed at the end."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self._ctx: Any = None
        self._file: Any = None
        self._writer: Any = None

    def __enter__(self) -> _CsvLog:
        if self.path is not None:
            self._ctx = atomic_path(self.path)
            tmp = self._ctx.__enter__()
            self._file = open(tmp, "w", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow(LOG_COLUMNS)
        return self

    def write(
        self, epoch: int, loss: float, names: Sequence[str], t: np.ndarray, est: np.ndarray
    ) -> None:
        if self._writer is None:
            return
        err = est - t
        rel = np.abs(err) / np.maximum(np.abs(t), 1e-300)
        for row in zip(names, t, est, err, np.abs(err), rel, strict=True):
            self._writer.writerow((epoch, loss, *row))

    def __exit__(self, *exc: object) -> None:
        if self._ctx is None:
            return
        self._file.close()
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------- the engine
class _GatedRecords(torch.autograd.Function):
    """The per-record terms of a gated step, with their gradient written out::

        r = exp(u)        s = sigmoid((noise + log_alpha) / beta)
        z = clamp(gamma + (zeta - gamma) s, 0, 1)        p = sigmoid(log_alpha - c)
        w = scale w0 r z      l2 = sum p (r - 1)^2        expected = sum p

    (``z = p = 1`` for fixed records, whose ``log_alpha`` gets no gradient). The same
    numbers as autograd through :meth:`HardConcrete.rsample` and
    :meth:`HardConcrete.get_active_prob`, in about half the passes over the records and a
    third of the allocations: at millions of records per process these passes, not the
    arithmetic, are the cost. ``noise`` (from :meth:`HardConcrete.next_noise`) is
    overwritten.
    """

    @staticmethod
    def forward(ctx, u, log_alpha, noise, w0, scale, gates, fixed):  # type: ignore[override]
        beta, gamma, zeta = gates.temperature, gates.gamma, gates.zeta
        r = torch.exp(u)
        s = noise.add_(log_alpha).div_(beta).sigmoid_()
        z = torch.mul(s, zeta - gamma).add_(gamma).clamp_(0.0, 1.0)
        p = torch.sub(log_alpha, gates._count_shift()).sigmoid_()
        if fixed is not None:
            z.masked_fill_(fixed, 1.0)
            p.masked_fill_(fixed, 1.0)
        w = torch.mul(w0, r).mul_(z)
        if scale != 1.0:
            w.mul_(scale)
        d = torch.sub(r, 1.0)
        d2 = d * d
        l2 = torch.dot(p, d2)
        ctx.save_for_backward(r, s, z, p, d, d2, w0)
        ctx.slope, ctx.scale, ctx.fixed = (zeta - gamma) / beta, scale, fixed
        return w, l2, p.sum()

    @staticmethod
    def backward(ctx, g_w, g_l2, g_expected):  # type: ignore[override]
        r, s, z, p, d, d2, w0 = ctx.saved_tensors
        a = torch.mul(g_w, w0).mul_(r)  # d loss / d z
        if ctx.scale != 1.0:
            a.mul_(ctx.scale)
        du = a * z  # = g_w * w
        # d z / d log_alpha = (zeta - gamma) / beta * s (1 - s) where 0 < z < 1, else 0.
        dla = torch.rsub(s, 1.0).mul_(s).mul_(a).mul_(ctx.slope)
        dla.masked_fill_((z <= 0.0) | (z >= 1.0), 0.0)
        # The penalty terms: through r into u, through p into log_alpha.
        q = torch.rsub(p, 1.0).mul_(p)  # d p / d log_alpha
        if g_l2 is not None:
            du.add_(torch.mul(p, d).mul_(r).mul_(2.0 * g_l2))
            dla.add_(torch.mul(d2, g_l2).mul_(q))
        if g_expected is not None:
            dla.add_(q.mul_(g_expected))
        if ctx.fixed is not None:
            dla.masked_fill_(ctx.fixed, 0.0)
        return du, dla, None, None, None, None, None


class _Fit:
    """Training state: parameters, optimizer, gates. One process, all records."""

    def __init__(
        self,
        pb: _Problem,
        *,
        gated: bool,
        lambda_l0: float,
        lambda_l2: float,
        lr: float,
        temperature: float,
        init_keep: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        fixed: np.ndarray | None = None,
        u: torch.Tensor | None = None,
        gates: HardConcrete | None = None,
        inflate: bool = True,
        l0_per_record: bool = True,
        l2_kind: Literal["ratio", "square"] = "ratio",
        reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
        n_total: int | None = None,
        index_offset: int = 0,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        """``u`` and ``gates`` may be supplied (and are then trained in place), as the
        PolicyEngine drop-in does; ``inflate=False``, ``l0_per_record=False`` and
        ``l2_kind="square"`` give that class's reference loss (see
        :mod:`l0calib.policyengine`). ``reduce``, ``n_total`` and ``index_offset`` make it
        one shard of a larger fit (:mod:`l0calib.distributed`): the partial estimates and
        the penalty sums are combined across processes with ``reduce(tensor, op)``."""
        self.n = pb.em.n_records
        self.reduce = reduce
        self.n_total = self.n if n_total is None else n_total
        self.device, self.dtype = device, dtype
        self.set_problem(pb)
        if u is None:
            u = torch.zeros(self.n, dtype=dtype, device=device, requires_grad=True)
        self.u = u
        if gates is None and gated:
            gates = HardConcrete(
                self.n, temperature=temperature, init_mean=init_keep, seed=seed,
                device=device, dtype=dtype, index_offset=index_offset,
            )  # fmt: skip
        self.gates = gates
        params = [self.u] + ([self.gates.log_alpha] if self.gates is not None else [])
        # fused: one pass per parameter instead of ten elementwise ops (per-record work
        # is half of an epoch at millions of records; docs/benchmarks.md).
        self.opt = torch.optim.Adam(params, lr=lr, fused=True)
        self.lambda_l0 = lambda_l0
        self.lambda_l2 = lambda_l2
        self.inflate, self.l0_per_record, self.l2_kind = inflate, l0_per_record, l2_kind
        # Records whose gate is held open (always kept); their weights are still trained.
        self.fixed = (
            None if fixed is None or not fixed.any() else torch.as_tensor(fixed, device=device)
        )
        self.n_fixed = 0 if self.fixed is None else int(fixed.sum())  # type: ignore[union-attr]
        # Bounds on exp(u), the ratio of a weight to its inflated initial weight: u is
        # projected into [log lo, log hi] after every step.
        self.u_bounds: tuple[float | None, float | None] | None = None
        if bounds is not None:
            lo, hi = bounds
            self.u_bounds = (
                math.log(lo) if lo > 0 else None,
                math.log(hi) if math.isfinite(hi) else None,
            )
            self._project_u()

    @torch.no_grad()
    def _project_u(self) -> None:
        if self.u_bounds is not None:
            self.u.clamp_(min=self.u_bounds[0], max=self.u_bounds[1])

    def set_problem(self, pb: _Problem) -> None:
        """(Re)load the matrix and the loss constants; parameters and optimizer are kept."""
        if pb.em.n_records != self.n:
            raise ParameterError(f"the matrix has {pb.em.n_records:,} records, expected {self.n:,}")

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.tensor(x, dtype=self.dtype, device=self.device)

        self.op = SparseOperator(pb.em.matrix, self.dtype, self.device)
        self.t, self.scale, self.tol_abs = tensor(pb.em.values), tensor(pb.scale), tensor(pb.tol)
        self.coef, self.w0 = tensor(pb.coef), tensor(pb.w0)

    def _open_fixed(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.fixed is None else torch.where(self.fixed, torch.ones_like(z), z)

    def fit_loss(self, est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = (est - self.t) / self.scale
        excess = torch.clamp(e.abs() - self.tol_abs, min=0.0)
        return (self.coef * excess * excess).sum(), e

    def step(self, inflation: float) -> tuple[float, float, torch.Tensor, float]:
        """One Adam step. ``inflation`` (>= 1) scales every weight by n / expected survivors,
        so ``u`` and the L2 term measure departures from the inflated initial weight."""
        self.opt.zero_grad(set_to_none=True)
        if self._fused_gates():
            g = self.gates
            scale = float(inflation) if self.inflate else 1.0
            w, l2_sum, expected = _GatedRecords.apply(
                self.u, g.log_alpha, g.next_noise(), self.w0, scale, g, self.fixed
            )  # type: ignore[union-attr]
            return self._finish(w, l2_sum / self.n_total, expected)
        ratio = torch.exp(self.u)
        if self.gates is not None:
            z = self._open_fixed(self.gates.rsample())
            w = (self.w0 * (inflation if self.inflate else 1.0)) * ratio * z
            p = self._open_fixed(self.gates.get_active_prob().to(ratio.dtype))
        else:
            w = self.w0 * ratio
            p = None  # every record is kept: no gate probabilities to weigh the L2 term by
        if self.l2_kind == "ratio":
            sq = (ratio - 1.0) ** 2
            l2 = (sq if p is None else p * sq).sum() / self.n_total
        else:  # the reference package's: squared weights without gates
            l2 = ((self.w0 * ratio) ** 2).sum()
        expected = ratio.new_tensor(float(self.n)) if p is None else p.sum()
        return self._finish(w, l2, expected)

    def _fused_gates(self) -> bool:
        g = self.gates
        return (
            g is not None and self.l2_kind == "ratio" and g.stretch > 0
            and g.log_alpha.dtype == self.u.dtype and self.u.dtype in _WORK_DTYPES
        )  # fmt: skip

    def _finish(
        self, w: torch.Tensor, l2: torch.Tensor, expected: torch.Tensor
    ) -> tuple[float, float, torch.Tensor, float]:
        """The sparse product, the loss and the optimizer step, from the records' terms."""
        est = self.op @ w
        if self.reduce is not None:
            # The loss sees the sum over every shard; gradients flow into this shard's part.
            est = est + (self.reduce(est.detach(), "sum") - est.detach())
        fit, e = self.fit_loss(est)
        penalty = self.lambda_l2 * l2 if self.lambda_l2 > 0 else torch.zeros_like(fit)
        if self.gates is not None and self.lambda_l0 > 0:
            per = self.n_total if self.l0_per_record else 1
            penalty = penalty + self.lambda_l0 * expected / per
        (fit + penalty).backward()
        self.opt.step()
        self._project_u()
        penalty, expected = penalty.detach(), expected.detach()
        if self.reduce is not None:
            penalty = self.reduce(penalty.double(), "sum")
            expected = self.reduce(expected.double(), "sum")
        total = float(fit.detach()) + float(penalty)
        return total, float(fit.detach()), e.detach(), float(expected)

    def project(self, goal: float) -> float:
        """Hold the expected number of survivors at ``goal`` (see
        :meth:`HardConcrete.shift_to_expected`): the exact-count controller."""
        free = None if self.fixed is None else ~self.fixed
        return self.gates.shift_to_expected(  # type: ignore[union-attr]
            goal - self.n_fixed, free, reduce=self.reduce
        )

    def expected_survivors(self) -> float:
        """``sum P(z != 0)`` over every record (every shard)."""
        if self.gates is None:
            return float(self.n_total)
        total = self.gates.get_active_prob().detach().double().sum()
        return float(total if self.reduce is None else self.reduce(total, "sum"))

    @torch.no_grad()
    def keep_scores(self) -> np.ndarray:
        if self.gates is None:
            return np.ones(self.n)
        return _np(self._open_fixed(self.gates.get_active_prob()))

    @torch.no_grad()
    def trained_weights(self, inflation: float) -> tuple[np.ndarray, np.ndarray]:
        """(weights with the test-time gate, weights with the gate removed), float64."""
        base = (self.w0 * torch.exp(self.u)).double().cpu().numpy()
        if self.gates is None:
            return base, base
        base = base * (inflation if self.inflate else 1.0)
        z = _np(self._open_fixed(self.gates.test_gates()))
        return base * z, base


def _solve_ratios(
    pb: _Problem,
    idx: np.ndarray,
    base: np.ndarray,
    lambda_l2: float,
    *,
    lower: float | np.ndarray,
    max_iter: int,
    start: np.ndarray | None = None,
    upper: float | np.ndarray | None = None,
    dual: np.ndarray | None = None,
) -> tuple[np.ndarray, RatioSolution]:
    """Minimise fit(A[:, idx] (base * r)) + lambda_l2 * mean((r - 1)^2) over
    ``lower <= r <= upper`` (floats or arrays of shape ``(idx.size,)``; ``upper=None`` is
    no upper bound), from ``start`` (default all ones) or the multipliers ``dual`` of a
    related solve.

    Convex, float64, solved in target space by :func:`l0calib.refit.solve_ratios`
    (semismooth Newton on the dual; L-BFGS-B without an L2 pull). Returns the ratios and
    the solver's :class:`~l0calib.refit.RatioSolution` (``nit``, ``success``,
    ``message``, ``dual``).
    """
    rows = np.flatnonzero(pb.fitted)
    m = pb.em.matrix[rows] if rows.size < pb.em.n_targets else pb.em.matrix
    if not (idx.size == m.shape[1] and (idx == np.arange(idx.size)).all()):
        m = m[:, idx]  # (every record, in order: no copy by column indexing)
    m = sp.csr_matrix(m)
    # Columns scaled by base through the values alone (a sparse product with a diagonal
    # matrix costs a full sparse-product pass; the index arrays are shared, read only).
    ab = sp.csr_matrix((m.data * base[m.indices], m.indices, m.indptr), shape=m.shape)
    sol = solve_ratios(
        ab, pb.em.values[rows], pb.scale[rows], pb.tol[rows], pb.coef[rows], lambda_l2,
        lower=lower, upper=math.inf if upper is None else upper, max_iter=max_iter,
        start=start, dual=None if dual is None else dual[rows],
    )  # fmt: skip
    full = np.zeros(pb.em.n_targets)
    full[rows] = sol.dual
    return sol.x, dataclasses.replace(sol, dual=full)


# A record the exact-count refit would drive to zero is swapped for the next candidate
# (up to _SWAP_ROUNDS times); after that, this floor on w / base keeps the count exact.
_SWAP_ROUNDS = 3
_FLOOR = 1e-4
# Exchange rounds after the refit with target_records (l0calib.exchange): at most this many,
# judging sets by the refit objective with this pull (a balance criterion: the kept records'
# inflated weights should need little moving); then the refit runs at its own pull.
EXCHANGE_ROUNDS = 30
EXCHANGE_PULL = 0.3
# A fitted target whose abs relative error exceeds max(MAX_ERROR, its tolerance) is
# "missed" by default: far outside anything a calibration should return unremarked.
MAX_ERROR = 0.5


def _refit_subset(
    pb: _Problem,
    kept: np.ndarray,
    base: np.ndarray,
    lambda_l2: float,
    max_iter: int,
    *,
    exact: bool,
    order: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
    coverage: Coverage | None = None,
    ratio_bounds: tuple[np.ndarray, np.ndarray] | None = None,
    exchange_rounds: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Refit the weights of the ``kept`` records, starting from and pulled toward ``base``.

    With ``exact``, the result has exactly ``kept.sum()`` non-zero weights: records driven
    to the floor are replaced by the next ones in ``order`` (candidates, best first);
    ``fixed`` records are never swapped out, nor is a record that ``coverage`` says a
    target needs. ``ratio_bounds`` are per-record (lower, upper) bounds on ``w / base``,
    shape (n_records,) each. With ``exact`` and ``exchange_rounds``, up to that many
    exchange rounds (:mod:`l0calib.exchange`) then swap kept records for any others that
    lower the refit's objective at the pull ``EXCHANGE_PULL``, at the same count, and the
    new set is refitted at ``lambda_l2``.
    """
    kept = kept.copy()
    floor = _FLOOR if exact else 0.0
    n = pb.em.n_records
    lo_all, hi_all = (np.zeros(n), np.full(n, np.inf)) if ratio_bounds is None else ratio_bounds
    total_iter, swaps, guarded = 0, 0, 0
    safe_base = np.maximum(base, 1e-12)
    lower_all = np.maximum(lo_all, floor)

    def solve(
        idx: np.ndarray, lam: float, dual: np.ndarray | None, start: np.ndarray | None = None
    ) -> tuple[np.ndarray, RatioSolution]:
        """The refit of the records ``idx`` at the pull ``lam``: (ratios, solution)."""
        return _solve_ratios(pb, idx, safe_base[idx], lam, lower=lower_all[idx],
                             max_iter=max_iter, start=start, upper=hi_all[idx],
                             dual=dual)  # fmt: skip

    def floored(idx: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Which of the records ``idx`` (not fixed) sit at their lower bound."""
        at = r <= lower_all[idx] * (1 + 1e-9)
        return at if fixed is None else at & ~fixed[idx]

    ratio = np.ones(n)  # a swap round starts from the previous round's ratios
    dual = None  # ... and multipliers
    for round_ in range(_SWAP_ROUNDS + 1):
        idx = np.flatnonzero(kept)
        r, res = solve(idx, lambda_l2, dual, ratio[idx])
        ratio[idx] = r
        dual = res.dual
        total_iter += int(res.nit)
        at_floor = floored(idx, r)
        if not exact or order is None or round_ == _SWAP_ROUNDS or not at_floor.any():
            break
        leaving = idx[at_floor]
        if coverage is not None:
            ok = coverage.removable(kept, leaving)
            guarded += int((~ok).sum())
            leaving = leaving[ok]
        candidates = order[~kept[order]][: leaving.size]
        if candidates.size == 0:
            break
        kept[leaving[: candidates.size]] = False
        kept[candidates] = True
        ratio[candidates] = 1.0
        swaps += int(candidates.size)
    exchanged: dict[str, Any] = {}
    if exact and order is not None:  # an exact-count selection: say what the rounds did
        exchanged = {"exchange_swaps": 0, "exchange_rounds": 0, "exchange_reverted": False}
    if exact and exchange_rounds > 0 and kept.sum() < n:
        ex = _exchange(pb, kept, solve, safe_base, lower_all, hi_all, fixed, coverage,
                       exchange_rounds, dual)  # fmt: skip
        swapped, reverted = ex.swaps, False
        if ex.swaps:
            r2, res2 = solve(ex.idx, lambda_l2, res.dual)
            total_iter += int(res2.nit)
            # Kept only if the refit at its own pull is no worse: the better balanced set
            # must not cost fit (measured: it usually lowers this objective by half or
            # more; where it rose, a small target ended far worse).
            if res2.objective <= res.objective:
                kept, idx, r, res = ex.kept, ex.idx, r2, res2
                at_floor = floored(idx, r)
            else:
                swapped, reverted = 0, True
        exchanged = {
            "exchange_swaps": swapped,
            "exchange_rounds": ex.rounds,
            "exchange_reverted": reverted,
            "exchange_objective_before": ex.objective_before,
            "exchange_objective": ex.objective,
        }
    w = np.zeros(pb.em.n_records)
    w[idx] = safe_base[idx] * r
    return w, {
        **exchanged,
        "refit_converged": bool(res.success),
        "refit_message": str(res.message),
        "refit_iterations": total_iter,
        "refit_swaps": swaps,
        "refit_swaps_refused_for_coverage": guarded,
        "refit_at_floor": int(at_floor.sum()) if exact else 0,
        "refit_method": res.method,
        "refit_objective": res.objective,
    }


def _exchange(
    pb: _Problem,
    kept: np.ndarray,
    solve_at: Callable[..., tuple[np.ndarray, RatioSolution]],
    base: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    fixed: np.ndarray | None,
    coverage: Coverage | None,
    rounds: int,
    dual: np.ndarray | None,
) -> ExchangeResult:
    """Exchange rounds on the refit of ``pb`` at the pull ``EXCHANGE_PULL``
    (:func:`l0calib.exchange.exchange`), warm-started from the multipliers ``dual``.
    ``solve_at(idx, pull, dual)`` refits the records ``idx``; ``base``, ``lower`` and
    ``upper`` (shape (n_records,)) are the anchor weights and ratio bounds it uses."""

    def solve(mask: np.ndarray, prev: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        i = np.flatnonzero(mask)
        r, sol = solve_at(i, EXCHANGE_PULL, dual if prev is None else prev.dual)
        return i, r, sol

    rows = np.flatnonzero(pb.fitted)
    return exchange(
        solve, kept, solve(kept, None), matrix=pb.em.matrix[rows], values=pb.em.values[rows],
        scale=pb.scale[rows], tol=pb.tol[rows], coef=pb.coef[rows], base=base,
        lambda_l2=EXCHANGE_PULL, lower=lower, upper=upper, fixed=fixed, coverage=coverage,
        rounds=rounds,
    )  # fmt: skip


def _result(
    pb: _Problem,
    weights: np.ndarray,
    *,
    tol: float | None,
    converged: bool,
    not_converged_reason: str,
    history: pd.DataFrame,
    n_iter: int,
    start: float,
    seed: int,
    method: str,
    info: dict[str, Any],
    keep_probability: np.ndarray | None = None,
    estimates: np.ndarray | None = None,
    diagnostics: WeightDiagnostics | None = None,
    max_error: float | None = MAX_ERROR,
) -> CalibrationResult:
    """Report, diagnostics and the tolerance check shared by every fitting function.

    A shard of a distributed fit passes the totals summed over every shard
    (``estimates``) and diagnostics reduced over them; otherwise both come from
    ``weights``. Missed targets (:func:`_missed_targets`) are named in a
    :class:`ConvergenceWarning`, listed in ``info["missed_targets"]`` and make the
    result not converged.
    """
    report = target_report(
        pb.em, weights, pb.holdout, scale_floor=pb.scale_floor, estimates=estimates
    )
    fitted_err = report.loc[pb.fitted, "abs_rel_error"].to_numpy()
    solved = converged
    if not solved:  # the solver stopped short (e.g. at its iteration cap): never silent
        warnings.warn(not_converged_reason, ConvergenceWarning, stacklevel=3)
    missed = _missed_targets(report, pb, max_error)
    if missed:
        converged = False
        warnings.warn(_missed_message(report, missed, max_error), ConvergenceWarning, stacklevel=3)
    if tol is not None:
        allowed = np.maximum(tol, pb.em.tolerance[pb.fitted]) + 1e-12
        outside_mask = fitted_err > allowed
        outside = int(outside_mask.sum())
        if outside:
            converged = False
            names = report.loc[pb.fitted, "name"].to_numpy()[outside_mask]
            order = np.argsort(-fitted_err[outside_mask], kind="stable")
            info = {**info, "outside_tolerance": [str(n) for n in names[order]]}
            listed = ", ".join(info["outside_tolerance"][:5]) + (" ..." if outside > 5 else "")
            warnings.warn(
                f"{outside} of {fitted_err.size} fitted targets are outside the requested "
                f"tolerance {tol:g} (largest abs relative error {fitted_err.max():.3g}): "
                f"{listed}",
                ConvergenceWarning,
                stacklevel=3,
            )
    hold = report.loc[pb.holdout, "abs_rel_error"]
    info = {
        **info,
        "missed_targets": missed,
        "mean_abs_rel_error": float(fitted_err.mean()),
        "max_abs_rel_error": float(fitted_err.max()),
        "holdout_mean_abs_rel_error": float(hold.mean()) if len(hold) else None,
        "holdout_max_abs_rel_error": float(hold.max()) if len(hold) else None,
    }
    return CalibrationResult(
        weights=weights,
        kept=weights != 0,
        report=report,
        diagnostics=weight_diagnostics(weights, pb.w0) if diagnostics is None else diagnostics,
        history=history,
        converged=converged,
        n_iter=n_iter,
        seconds=time.perf_counter() - start,
        seed=seed,
        method=method,
        info=info,
        keep_probability=keep_probability,
    )


def _history_frame(rows: list[tuple]) -> pd.DataFrame:
    """The history table; numeric columns even when no epoch ran."""
    frame = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    return frame if rows else frame.astype(np.float64)


def _missed_targets(report: pd.DataFrame, pb: _Problem, max_error: float | None) -> list[str]:
    """Names of fitted targets that are lost (estimate 0 for a non-zero target: -100 %) or
    whose abs relative error exceeds ``max(max_error, tolerance)``."""
    est, t = report["estimate"].to_numpy(), report["target"].to_numpy()
    bad = (t != 0) & (np.abs(est) <= 1e-12 * np.abs(t))
    if max_error is not None:
        allowed = np.maximum(max_error, pb.em.tolerance) * (1 + 1e-9)
        bad |= report["abs_rel_error"].to_numpy() > allowed
    bad &= pb.fitted
    return [pb.em.names[k] for k in np.flatnonzero(bad)]


def _missed_message(report: pd.DataFrame, missed: list[str], max_error: float | None) -> str:
    rows = report.set_index("name").loc[missed[:10], "rel_error"]
    listed = ", ".join(f"{name} ({err:+.1%})" for name, err in rows.items())
    more = f" and {len(missed) - 10} more" if len(missed) > 10 else ""
    limit = "at -100 %" if max_error is None else f"at -100 % or off by more than {max_error:g}"
    return (
        f"{len(missed)} fitted target(s) {limit} (relative): {listed}{more}; see "
        "report / info['missed_targets']"
    )


def _ratio_summary(w: np.ndarray, ref: np.ndarray) -> dict[str, float] | None:
    """min, quartiles and max of ``w / ref`` over records with both non-zero."""
    use = (w != 0) & (ref > 0)
    if not use.any():
        return None
    q = np.quantile(w[use] / ref[use], [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q1", "median", "q3", "max"), q.tolist(), strict=True))


@dataclass
class _Loop:
    """Training-loop state: enough to report a finished run or to resume an unfinished one.

    ``start`` is the expected number of survivors the schedule started from; ``done`` is
    set when the loop ended early (plateau or callback), so a resumed run stops too.
    """

    epoch: int = 0
    history: list[tuple] = field(default_factory=list)
    survivors: float = math.nan
    shift: float = 0.0
    best: float = math.inf
    since_best: int = 0
    start: float = math.nan
    done: bool = False


def _train(
    fit: _Fit,
    pb: _Problem,
    *,
    epochs: int,
    k_goal: int | None,
    patience: int,
    callback: Callable[[Progress], bool | None] | None,
    log: _CsvLog,
    log_every: int,
    epoch0: int = 0,
    resume: _Loop | None = None,
    checkpoint: Callable[[_Loop], None] | None = None,
    checkpoint_every: int = 0,
) -> _Loop:
    """Run up to ``epochs`` Adam steps, holding the survivor schedule toward ``k_goal``.

    The schedule falls linearly over the first 60% of the epochs from the current expected
    survivors (n on a fresh fit) to ``k_goal``; early stopping counts only once it is there.
    ``epoch0`` numbers the epochs of a continued fit. ``resume`` continues a loop saved by
    ``checkpoint`` (called every ``checkpoint_every`` epochs with the loop state, after the
    optimizer step of that epoch), so a resumed run equals an uninterrupted one.
    """
    em, n = pb.em, fit.n_total
    fitted_t = torch.as_tensor(pb.fitted, device=fit.device)
    ramp = max(1, int(0.6 * epochs))
    if resume is None:
        expected = fit.expected_survivors()
        resume = _Loop(epoch=epoch0, start=expected, survivors=expected)
    st = resume
    first = st.epoch - epoch0 + 1
    for step in range(first, epochs + 1):
        if st.done:
            break
        epoch = epoch0 + step
        goal = (
            st.start - (st.start - k_goal) * min(1.0, step / ramp) if k_goal is not None else None
        )
        # Weights are inflated by n / expected survivors (a Horvitz-Thompson-like
        # expansion), so survivors carry the totals without u having to learn it.
        inflation = n / goal if goal is not None else n / max(st.survivors, 1.0)
        total, fit_l, e, expected = fit.step(inflation)
        st.survivors = expected
        if goal is not None:
            st.shift += fit.project(goal)
            expected = goal
        abs_e = e.abs()[fitted_t]
        mean_e, max_e = float(abs_e.mean()), float(abs_e.max())
        lam = fit.lambda_l0 if k_goal is None else float("nan")
        st.history.append((epoch, total, fit_l, mean_e, max_e, expected, goal, lam, st.shift))
        st.epoch = epoch
        if log.path is not None and (epoch % log_every == 0 or epoch == 1):
            log.write(epoch, total, em.names, em.values, em.values + _np(e * fit.scale))
        stop = False
        if callback is not None:
            progress = Progress(
                "train", epoch, epoch0 + epochs, total, mean_e, max_e, expected, goal, lam
            )
            stop = callback(progress) is False
        if not stop and not (goal is not None and goal > k_goal):  # type: ignore[operator]
            if total < st.best * (1 - 1e-3):
                st.best, st.since_best = total, 0
            else:
                st.since_best += 1
                stop = st.since_best >= patience
        st.done = stop
        if checkpoint is not None and checkpoint_every and epoch % checkpoint_every == 0:
            checkpoint(st)
    if k_goal is not None:
        st.survivors = float(k_goal)
    return st


# Records kept per fitted target from which the default selection is "balanced".
BALANCED_RECORDS_PER_TARGET = 20


def _selection_mode(
    k_goal: int | None, n: int, n_fitted: int, lambda_l2: float | None, refit_l2: float | None
) -> tuple[str, float, float | None]:
    """The training pull, the refit pull and the name of the selection they make.

    With ``lambda_l2`` not given and ``K >= 20 x fitted targets`` (a random sample of ``K``
    could carry the targets): a *balanced* selection, training pull 10 (weights held near
    their inflated initial values, so the gates choose records whose design weights already
    hit the targets) and refit pull 3e-4. With fewer records per target, a *free* one
    (training pull 1e-3): the trained weights must move for the kept records to fit at
    all. (A pull of 0.03 gives a higher effective sample size but a worse holdout error:
    docs/benchmarks.md, "Pruning you can trust".)
    """
    if lambda_l2 is not None:
        return "given", lambda_l2, refit_l2
    if k_goal is not None and k_goal < n and k_goal >= BALANCED_RECORDS_PER_TARGET * n_fitted:
        return "balanced", 10.0, 3e-4 if refit_l2 is None else refit_l2
    return "free", 1e-3, refit_l2


def _default_refit_l2(n_kept: int, n: int) -> float:
    """The refit's default pull: 1e-3 when records were dropped (it limits the variance a
    smaller sample adds to untargeted totals), 1e-6 when all are kept (so a consistent
    problem is fitted exactly)."""
    return 1e-6 if n_kept == n else 1e-3


def _select_and_refit(
    fit: _Fit,
    pb: _Problem,
    k_goal: int | None,
    survivors: float,
    *,
    fixed: np.ndarray | None,
    refit: bool,
    refit_l2: float | None,
    refit_anchor: str,
    refit_max_iter: int,
    coverage_records: int = COVERAGE_RECORDS,
    bounds: tuple[float, float] | None = None,
    cover: Coverage | None = None,
    exchange_rounds: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """Keep exactly ``k_goal`` records (or the open gates) and refit their weights.

    With ``k_goal``, every fitted target keeps ``min(support, coverage_records)`` of its
    supporting records (:mod:`l0calib.coverage`), in the top-K step and in the refit's
    swaps. ``bounds`` are (lower, upper) bounds on the ratio of a final weight to its
    inflated initial weight ``w0 * n / K``.

    Returns (final weights, trained weights of the kept records, refit info, keep scores).
    """
    n = fit.n
    gated_w, base = fit.trained_weights(fit.n_total / max(survivors, 1.0))
    # Highest keep-probability first (always_keep records first of all); ties go to the
    # lower record index (stable sort).
    scores = fit.keep_scores()
    rank = -np.where(fixed, np.inf, scores) if fixed is not None else -scores
    order = np.argsort(rank, kind="stable")
    exchanged = 0
    if k_goal is not None:
        kept = np.zeros(n, dtype=bool)
        kept[order[:k_goal]] = True
        if cover is None and coverage_records > 0 and k_goal < n:
            need = coverage_needs(pb.em.support(), pb.fitted, coverage_records)
            cover = Coverage(pb.em.matrix, need)
        if cover is not None:
            # Every fitted target keeps min(support, m) supporters (l0calib.coverage).
            kept, exchanged = cover.cover(kept, order, fixed)
    else:
        kept = gated_w > 0  # lambda_l0 given, or no gates: the open test-time gates
    before = np.where(kept, gated_w, 0.0)
    weights_out, info = before, {"refit_converged": True}
    if refit and kept.any():
        if refit_l2 is None:
            refit_l2 = _default_refit_l2(int(kept.sum()), n)
        inflated = pb.w0 * (n / int(kept.sum()))
        if refit_anchor == "initial":
            # The kept records' initial weights, inflated to carry the dropped ones (a
            # Horvitz-Thompson expansion): measured to keep untargeted totals closer than
            # anchoring on the trained weights (docs/benchmarks.md).
            base = inflated
        ratio_bounds = None
        if bounds is not None:
            # Bounds are on w / inflated initial weight; the refit works in w / base.
            per = inflated / np.maximum(base, 1e-300)
            ratio_bounds = (bounds[0] * per, bounds[1] * per)
        weights_out, info = _refit_subset(
            pb, kept, base, refit_l2, refit_max_iter,
            exact=k_goal is not None, order=order, fixed=fixed, coverage=cover,
            ratio_bounds=ratio_bounds, exchange_rounds=exchange_rounds,
        )  # fmt: skip
    if cover is not None:
        info["coverage_exchanged"] = exchanged
        info["coverage_short"] = [pb.em.names[k] for k in cover.short(weights_out != 0)]
    return weights_out, before, info, scores


def _warn_coverage(
    pb: _Problem, cover: Coverage, k_goal: int, m: int, fixed: np.ndarray | None
) -> None:
    """Before training: warn when ``k_goal`` records look too few to keep
    ``min(support, m)`` supporters of every fitted target (naming them)."""
    n_fixed = 0 if fixed is None else int(fixed.sum())
    at_risk = coverage_risk(cover, k_goal - n_fixed, pb.em.names, fixed)
    if at_risk:
        warnings.warn(
            f"target_records={k_goal:,} may be too few to keep min(support, {m}) supporting "
            f"records of every fitted target; {len(at_risk)} target(s) may end short: "
            f"{', '.join(at_risk[:10])}{' ...' if len(at_risk) > 10 else ''}",
            CoverageWarning,
            stacklevel=3,
        )


def calibrate(
    matrix: Any,
    targets: Any = None,
    *,
    weights: Any = None,
    target_records: int | None = None,
    lambda_l0: float | None = None,
    lambda_l2: float | None = None,
    epochs: int = 600,
    lr: float = 0.05,
    loss: LossName = "relative",
    normalize_groups: bool = True,
    holdout: Any = None,
    always_keep: Any = None,
    tol: float | None = None,
    temperature: float = 0.25,
    init_keep: float = 0.99,
    scale_floor: float = 1.0,
    refit: bool = True,
    refit_l2: float | None = None,
    refit_anchor: Literal["initial", "trained"] = "initial",
    refit_max_iter: int = 2000,
    patience: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    callback: Callable[[Progress], bool | None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    log_every: int = 10,
    bounds: tuple[float, float] | None = None,
    max_error: float | None = MAX_ERROR,
    coverage: int = COVERAGE_RECORDS,
    exchange_rounds: int = EXCHANGE_ROUNDS,
    threads: int | None = None,
) -> CalibrationResult:
    """Calibrate weights to targets, optionally keeping exactly ``target_records`` records.

    Parameters
    ----------
    matrix : EstimateMatrix, DataFrame, scipy sparse matrix or 2-D array
        The estimate matrix ``A`` (targets x records), or anything
        :func:`l0calib.as_estimate_matrix` accepts (with ``targets``).
    targets : array-like or mapping, optional
        Target values ``t``, shape (n_targets,), when ``matrix`` does not carry them.
    weights : array-like, shape (n_records,), optional
        Initial weights ``w0`` (finite, >= 0); defaults to the matrix's own.
    target_records : int, optional
        Return exactly this many non-zero weights (1 <= K <= n_records). The L0 strength is
        then steered automatically; do not pass ``lambda_l0``.
    lambda_l0 : float, optional
        Without ``target_records``: the L0 strength, multiplying the expected *fraction* of
        records kept. ``None`` or 0 calibrates all records without gates.
    lambda_l2 : float, optional
        Training: strength of the L2 pull of each weight toward its initial weight inflated
        by n / (expected survivors), as a mean over records, in expectation over the gates.
        Default: with ``target_records >= 20 x`` the number of fitted targets, 10 (and
        ``refit_l2`` 3e-4): a *balanced* selection, whose weights barely move in training,
        so the gates pick records whose inflated initial weights already hit the targets
        (better untargeted totals than a random draw at that size); otherwise 1e-3, a
        *free* selection. ``info["selection"]`` says which (``"given"`` when passed); see
        ``docs/engine.md``.
    epochs : int, default 600
        Training steps (each uses every record). The refit runs after them. Without gates
        (no ``target_records`` below the number of records, no ``lambda_l0``) and with
        ``refit_anchor="initial"`` training cannot change the result, so no epochs run:
        the refit solves the problem directly (``history`` is then empty, ``n_iter`` 0).
    lr : float, default 0.05
        Adam learning rate for the log weight ratios and gate logits.
    loss : {"relative", "squared"}
        ``relative``: errors divided by ``max(|t_k|, scale_floor)``. ``squared``: absolute
        errors, divided by one common scale (the root mean square of those).
    normalize_groups : bool, default True
        Weigh each target group equally (targets without a group are groups of one).
    holdout : sequence of target names, or boolean mask, optional
        Targets left out of the loss but reported (``report["holdout"]``).
    always_keep : boolean mask of shape (n_records,), or integer indices, optional
        Records that must survive: their gates are held open (their weights are still
        trained and refitted) and they count toward ``target_records``, which must be at
        least their number. The selection gates use this to train the L0 part of a hybrid
        sample around a random part.
    tol : float, optional
        Requested maximum absolute relative error on fitted targets (a target's own
        ``tolerance`` counts if larger). Missing it sets ``converged=False`` and warns with
        :class:`~l0calib.ConvergenceWarning`.
    temperature : float, default 0.25
        Hard Concrete temperature (lower than the paper's 2/3: less gate noise gave
        better untargeted totals in our benchmark; see ``docs/benchmarks.md``).
    init_keep : float, default 0.99
        Initial ``sigmoid(log_alpha)`` of every gate.
    scale_floor : float, default 1.0
        Smallest divisor of a relative error, in the target's units, so a target of 0
        does not divide by zero.
    refit : bool, default True
        Refit the kept weights without gates (float64, non-negative; semismooth Newton in
        target space, see :mod:`l0calib.refit`).
    refit_l2 : float, optional
        Refit: strength of the pull toward the anchor weights, ``mean((w / w_anchor -
        1)^2)``. Default 3e-4 after a balanced selection (see ``lambda_l2``), 1e-3 when
        records are otherwise dropped (it limits the variance a smaller
        sample adds to untargeted totals; measured in ``docs/benchmarks.md``) and 1e-6 when
        every record is kept (then it only picks among equally good fits, so a consistent
        problem is fitted exactly).
    refit_anchor : {"initial", "trained"}, default "initial"
        What the refit starts from and is pulled toward: the kept records' initial weights
        inflated by n / (records kept), or the trained weights without gates.
    refit_max_iter : int, default 2000
    patience : int, default 100
        Stop training early when the loss has not improved by 0.1% for this many epochs
        (only once the survivor goal is reached).
    seed : int, default 0
        Seeds the gate noise. Same inputs and seed give identical weights on CPU.
    device : {"cpu", "cuda", "auto"}
    dtype : {"float32", "float64"}
        Training precision; the refit is always float64.
    callback : callable, optional
        Called with a :class:`Progress` after every epoch; returning ``False`` stops
        training early (the refit still runs).
    log_path : path, optional
        A CSV log in microcalibrate's format (epoch, loss, target_name, target, estimate,
        error, abs_error, rel_abs_error), one block every ``log_every`` epochs.
    log_every : int, default 10
    bounds : (float, float), optional
        ``(lower, upper)`` bounds on the ratio of each final weight to its inflated
        initial weight ``w0 * n / K`` (``w0`` without ``target_records``), with
        ``0 <= lower <= 1 <= upper`` (upper may be ``inf``), as R survey's ``bounds``.
        Training keeps ``exp(u)`` inside them; the refit solves within them. Tight bounds
        can make targets unreachable (they are then reported as missed).
    max_error : float or None, default 0.5
        A fitted target whose abs relative error exceeds ``max(max_error, its
        tolerance)``, or whose estimate is 0 for a non-zero target (-100 %), is *missed*:
        named in a :class:`~l0calib.ConvergenceWarning`, listed in
        ``info["missed_targets"]``, and ``converged`` is ``False``. ``None`` flags only
        targets at -100 %.
    coverage : int, default 3
        With ``target_records``: every fitted target keeps at least ``min(support,
        coverage)`` of the records that support it (non-zero entries in its row), in the
        top-K step and in the refit's swaps (:mod:`l0calib.coverage`). 0 turns it off.
        When ``target_records`` looks too small to cover every target, a
        :class:`~l0calib.CoverageWarning` names them before training.
    exchange_rounds : int, default 30
        With ``target_records``: after the refit, up to this many rounds exchange kept
        records for others that lower the refit's objective judged at a strong pull (0.3:
        sets whose inflated initial weights need little moving to meet the targets), the
        count staying exactly ``target_records``; the new set is then refitted at
        ``refit_l2`` (:mod:`l0calib.exchange`; coverage, bounds and ``always_keep`` hold).
        Measured to raise the effective sample size by 0.05-0.1 K at the same fitted and
        holdout error (``docs/benchmarks.md``). ``info["exchange_swaps"]`` counts the
        records exchanged (0 when none), ``info["exchange_rounds"]`` the rounds run,
        ``info["exchange_reverted"]`` whether they were undone because the refit at
        ``refit_l2`` came out worse. 0 turns them off.
    threads : int, optional
        Threads for this fit (torch's and the BLAS libraries' together; capped at the
        cores this process may use). Default: 1 below two million records and 20 million
        non-zeros (robust on a busy machine), every core above (see
        :mod:`l0calib.threads`). ``info["threads"]`` says how many ran.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    ParameterError
        Invalid arguments or shapes, non-finite or negative weights, ``target_records`` out
        of range.
    TargetError
        A fitted target that no record contributes to.

    Example
    -------
    >>> import numpy as np
    >>> A = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    >>> res = calibrate(A, [8.0, 5.0], weights=np.ones(4), epochs=50)
    >>> np.round(res.report["estimate"].to_numpy(), 4).tolist()
    [8.0, 5.0]
    """
    start = time.perf_counter()
    pb = _problem(
        matrix, targets, weights, holdout,
        normalize_groups=normalize_groups, loss=loss, scale_floor=scale_floor,
    )  # fmt: skip
    em, n = pb.em, pb.em.n_records
    dev = _resolve_device(device)
    tdtype = _resolve_dtype(dtype)
    _check_options(
        n, target_records, lambda_l0, lambda_l2, epochs, lr, temperature, init_keep,
        patience, log_every, tol, refit_max_iter,
    )  # fmt: skip
    if refit_l2 is not None:
        nonneg("refit_l2", refit_l2)
    selection, lambda_l2, refit_l2 = _selection_mode(
        target_records, n, int(pb.fitted.sum()), lambda_l2, refit_l2
    )
    if refit_anchor not in ("initial", "trained"):
        raise ParameterError(f"refit_anchor must be 'initial' or 'trained', got {refit_anchor!r}")
    fixed = None if always_keep is None else _record_mask("always_keep", always_keep, n)
    if fixed is not None and target_records is not None and fixed.sum() > target_records:
        raise ParameterError(
            f"always_keep holds {int(fixed.sum()):,} records, more than target_records "
            f"({target_records:,})"
        )
    bounds = ratio_bounds(bounds)
    if max_error is not None:
        nonneg("max_error", max_error)
    coverage = nonneg_int("coverage", coverage)
    nonneg_int("exchange_rounds", exchange_rounds)
    k_goal = target_records
    cover = None
    if k_goal is not None and k_goal < n and coverage:
        cover = Coverage(pb.em.matrix, coverage_needs(pb.em.support(), pb.fitted, coverage))
        _warn_coverage(pb, cover, k_goal, coverage, fixed)
    gated = (k_goal is not None and k_goal < n) or bool(lambda_l0)
    n_threads = choose_threads(n, em.matrix.nnz, threads)
    with limit_threads(n_threads):
        fit = _Fit(
            pb, gated=gated, lambda_l0=float(lambda_l0 or 0.0), lambda_l2=lambda_l2, lr=lr,
            temperature=temperature, init_keep=init_keep, seed=seed, device=dev, dtype=tdtype,
            fixed=fixed, bounds=bounds,
        )  # fmt: skip
        # Without gates, a refit anchored on the initial weights solves the whole problem and
        # nothing training does reaches the result: skip the epochs.
        direct = not gated and refit and refit_anchor == "initial"
        with _CsvLog(log_path) as log:
            if direct:
                loop = _Loop(epoch=0, survivors=float(n), start=float(n))
            else:
                loop = _train(
                    fit, pb, epochs=epochs, k_goal=k_goal if gated else None, patience=patience,
                    callback=callback, log=log, log_every=log_every,
                )  # fmt: skip
            if callback is not None and loop.history:
                # One "select" report: training is over, the selection and refit start.
                h = loop.history[-1]
                callback(Progress("select", loop.epoch, loop.epoch, *h[1:2], *h[3:8]))
            weights_out, before, info, scores = _select_and_refit(
                fit, pb, k_goal, loop.survivors, fixed=fixed, refit=refit, refit_l2=refit_l2,
                refit_anchor=refit_anchor, refit_max_iter=refit_max_iter,
                coverage_records=coverage, bounds=bounds, cover=cover,
                exchange_rounds=exchange_rounds,
            )  # fmt: skip
            if log.path is not None:
                final = em.estimates(weights_out)
                log.write(loop.epoch + 1, float("nan"), em.names, em.values, final)
            if direct and callback is not None:
                # No epochs ran: the caller still hears of the (only) phase that did.
                rel = np.abs(em.estimates(weights_out) - em.values)
                rel /= np.maximum(np.abs(em.values), pb.scale_floor)
                rel = rel[pb.fitted]
                callback(Progress(
                    "refit", 0, 0, float(info.get("refit_objective", math.nan)),
                    float(rel.mean()), float(rel.max()), float(n), None, 0.0,
                ))  # fmt: skip

        before_err = target_report(em, before, pb.holdout, scale_floor=scale_floor)
        before_fitted = before_err.loc[pb.fitted, "abs_rel_error"]
        info.update(
            {
                "target_records": target_records,
                "selection": selection,
                "lambda_l2": lambda_l2,
                "lambda_l0_final": fit.lambda_l0 if k_goal is None else None,
                "gate_shift_final": loop.shift,
                "mean_abs_rel_error_before_refit": float(before_fitted.mean()),
                "max_abs_rel_error_before_refit": float(before_fitted.max()),
                "device": str(dev),
                "dtype": str(tdtype).removeprefix("torch."),
                "threads": n_threads,
                "bounds": list(bounds) if bounds is not None else None,
                "weight_ratio_inflated": _ratio_summary(
                    weights_out, pb.w0 * (n / max(int(np.count_nonzero(weights_out)), 1))
                ),
            }
        )
        return _result(
            pb,
            weights_out,
            tol=tol,
            converged=bool(info["refit_converged"]),
            not_converged_reason=f"the refit did not converge: {info.get('refit_message', '')}",
            history=_history_frame(loop.history),
            n_iter=loop.epoch,
            start=start,
            seed=seed,
            method="l0",
            info=info,
            keep_probability=scores,
            max_error=max_error,
        )


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def refit(
    matrix: Any,
    keep: Any,
    targets: Any = None,
    *,
    weights: Any = None,
    holdout: Any = None,
    lambda_l2: float = 1e-3,
    normalize_groups: bool = True,
    loss: LossName = "relative",
    scale_floor: float = 1.0,
    tol: float | None = None,
    max_iter: int = 2000,
    keep_all: bool = False,
    bounds: tuple[float, float] | None = None,
    max_error: float | None = MAX_ERROR,
    threads: int | None = None,
) -> CalibrationResult:
    """Reweight a chosen subset of records so the targets hold (no gates, no training).

    Minimises the engine's fit loss plus ``lambda_l2 * mean((w / w_start - 1)^2)`` over
    non-negative weights of the ``keep`` records (float64, solved in target space by
    :func:`l0calib.refit.solve_ratios`); the others get 0.
    This is the engine's refit step on its own: use it for a sample drawn some other way
    (for example at random, as a baseline).

    Parameters
    ----------
    matrix, targets
        As for :func:`calibrate`.
    keep : array-like of bool, shape (n_records,), or integer indices
        The records to keep.
    weights : array-like, shape (n_records,), optional
        Starting weights of the kept records (e.g. initial weights inflated by n / K);
        defaults to the matrix's own weights.
    holdout, lambda_l2, normalize_groups, loss, scale_floor, tol
        As for :func:`calibrate`.
    max_iter : int, default 2000
        Most solver iterations (Newton steps; usually under 10). Stopping at the cap warns
        with :class:`~l0calib.ConvergenceWarning` and sets ``converged=False``.
    keep_all : bool, default False
        Hold every kept record's weight at or above ``1e-4`` times its starting weight, so
        exactly the ``keep`` records have non-zero weights (as the engine does for
        ``target_records``). Otherwise a record may end at 0 if that fits best.
    bounds : (float, float), optional
        ``(lower, upper)`` bounds on ``w / weights`` (the ratio to the starting weights,
        which for a drawn sample are its inflated initial weights), ``0 <= lower <= 1 <=
        upper``.
    max_error : float or None, default 0.5
        As for :func:`calibrate`: missed targets are warned about, listed in
        ``info["missed_targets"]`` and make ``converged`` False.
    threads : int, optional
        As for :func:`calibrate` (the refit's factorisations use the BLAS threads).

    Returns
    -------
    CalibrationResult
        ``method="refit"``.
    """
    start = time.perf_counter()
    pb = _problem(
        matrix, targets, weights, holdout,
        normalize_groups=normalize_groups, loss=loss, scale_floor=scale_floor,
    )  # fmt: skip
    mask = _record_mask("keep", keep, pb.em.n_records)
    if not mask.any():
        raise ParameterError("keep selects no record")
    positive_int("max_iter", max_iter)
    nonneg("lambda_l2", lambda_l2)
    bounds = ratio_bounds(bounds)
    if max_error is not None:
        nonneg("max_error", max_error)
    n = pb.em.n_records
    rb = None if bounds is None else (np.full(n, bounds[0]), np.full(n, bounds[1]))
    n_threads = choose_threads(int(mask.sum()), pb.em.matrix.nnz, threads)
    with limit_threads(n_threads):
        w, info = _refit_subset(pb, mask, pb.w0, lambda_l2, max_iter, exact=keep_all,
                                ratio_bounds=rb)  # fmt: skip
    info["threads"] = n_threads
    info["bounds"] = list(bounds) if bounds is not None else None
    info["weight_ratio_inflated"] = _ratio_summary(w, pb.w0)
    return _result(
        pb,
        w,
        tol=tol,
        converged=info["refit_converged"],
        not_converged_reason=f"the refit did not converge: {info['refit_message']}",
        history=_history_frame([]),
        n_iter=info["refit_iterations"],
        start=start,
        seed=0,
        method="refit",
        info=info,
        max_error=max_error,
    )


def _record_mask(name: str, value: Any, n: int) -> np.ndarray:
    """A boolean mask of shape (n,) from a mask or from integer record indices."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ParameterError(f"{name} mask must have shape ({n},), got {arr.shape}")
        return arr.copy()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ParameterError(f"{name} must be a boolean mask or integer indices, got {arr.dtype}")
    idx = arr.astype(np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ParameterError(f"{name} indices must be in [0, {n}), got {idx.min()}..{idx.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


def _check_options(
    n: int,
    target_records: int | None,
    lambda_l0: float | None,
    lambda_l2: float | None,
    epochs: int,
    lr: float,
    temperature: float,
    init_keep: float,
    patience: int,
    log_every: int,
    tol: float | None,
    refit_max_iter: int,
) -> None:
    if target_records is not None:
        if isinstance(target_records, bool) or not isinstance(target_records, (int, np.integer)):
            raise ParameterError(f"target_records must be an integer, got {target_records!r}")
        if not 1 <= target_records <= n:
            raise ParameterError(
                f"target_records must be between 1 and the number of records ({n:,}), "
                f"got {target_records:,}"
            )
        if lambda_l0 is not None:
            raise ParameterError(
                "lambda_l0 is steered automatically when target_records is set; pass one "
                "or the other"
            )
    if lambda_l2 is not None:
        nonneg("lambda_l2", lambda_l2)
    if lambda_l0 is not None:
        nonneg("lambda_l0", lambda_l0)
    for name, value in (
        ("epochs", epochs),
        ("patience", patience),
        ("log_every", log_every),
        ("refit_max_iter", refit_max_iter),
    ):
        positive_int(name, value)
    for name, value in (("lr", lr), ("temperature", temperature)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ParameterError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(init_keep, (int, float)) and 0 < init_keep < 1):
        raise ParameterError(f"init_keep must be strictly between 0 and 1, got {init_keep!r}")
    if tol is not None:
        nonneg("tol", tol)


def check_options(n_records: int, **options: Any) -> None:
    """Validate :func:`calibrate`'s options for a problem of ``n_records`` records, without
    fitting: the same :class:`ParameterError` ``calibrate`` would raise, raised before any
    data-dependent work (the CLI calls it before it reports on the targets). Options not
    given take ``calibrate``'s defaults."""
    import inspect

    given = {
        name: p.default
        for name, p in inspect.signature(calibrate).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    unknown = set(options) - set(given)
    if unknown:
        raise ParameterError(f"unknown calibrate option(s): {', '.join(sorted(unknown))}")
    given.update(options)
    _check_options(
        n_records, given["target_records"], given["lambda_l0"], given["lambda_l2"],
        given["epochs"], given["lr"], given["temperature"], given["init_keep"],
        given["patience"], given["log_every"], given["tol"], given["refit_max_iter"],
    )  # fmt: skip
    _resolve_device(given["device"])
    _resolve_dtype(given["dtype"])
    ratio_bounds(given["bounds"])
    if given["max_error"] is not None:
        nonneg("max_error", given["max_error"])
    nonneg_int("coverage", given["coverage"])
    nonneg_int("exchange_rounds", given["exchange_rounds"])
