"""Diagnosis of a target set before any fit: can it be met, what contradicts what, what is at risk.

:func:`diagnose_targets` answers three questions about an :class:`~l0calib.EstimateMatrix`:

1. **Feasibility.** Is there a weight vector ``w >= 0`` (within ``bounds`` when given: on
   ``w / w0``, or with ``target_records = K`` on ``w / (w0 * n / K)`` as the engine reads
   them, a record then also free to be dropped) whose totals ``A @ w`` meet every target
   within its tolerance? If
   not, what is the least change to the target values that makes them feasible? This is a
   linear programme (minimum total relative change, solved with HiGHS through
   :func:`scipy.optimize.linprog`); each target's required move is reported with its
   direction.
2. **Conflicts.** Small sets of targets that cannot all hold together: irreducible
   infeasible subsets (IIS; Chinneck, *Feasibility and Infeasibility in Optimization*,
   2008). Candidates come from the support of the LP's dual solution (a Farkas
   certificate); a deletion filter makes each one irreducible. Each conflict comes with the
   inequality that the certificate proves, written as a sentence.
3. **Pruning risk.** With ``target_records = K``: targets whose supporting records a
   K-record sample would likely miss, or keep too few of to reach the target within the
   ratio bounds.

Exact linear dependence between targets (:func:`l0calib.diagnostics.dependent_targets`) is
reported with whether the dependent targets agree numerically.

Units: a relative change or gap is measured against ``max(|t_k|, 1)``, the scale that
``target_report`` and the tolerance column use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from l0calib._checks import ratio_bounds
from l0calib.diagnostics import dependent_targets, list_names
from l0calib.exceptions import CalibrationError, ParameterError
from l0calib.targets import EstimateMatrix

__all__ = [
    "Conflict",
    "Dependence",
    "PruningRisk",
    "TargetChange",
    "TargetDiagnosis",
    "annotate_check",
    "check_records",
    "diagnose_targets",
]

# A target set is feasible when the least total relative change is at most this (HiGHS's
# own primal feasibility tolerance is 1e-7 per row, in the same relative units).
FEASIBILITY_TOL = 1e-6
# Dual values (|y| <= 1) smaller than this are taken as zero when reading a certificate.
_DUAL_TOL = 1e-9
# LPs over at most this many records are solved directly, larger ones by column generation.
_DIRECT_COLUMNS = 1000
_SPREAD = 256  # evenly spaced records in a first working set
_RECENT = 3  # solutions whose positive records seed the next working set
_PRICING_TOL = 1e-9
_PRICING_BATCH = 500
# How many names a sentence lists before "and N more".
_LISTED = 6


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TargetChange:
    """How far one target must move for the whole set to become feasible.

    ``required_value = value + change``; ``rel_change = change / max(|value|, 1)``;
    ``direction`` is ``"up"`` or ``"down"``.
    """

    name: str
    value: float
    required_value: float
    change: float
    rel_change: float
    direction: str


@dataclass(frozen=True)
class Conflict:
    """A set of targets that cannot all hold (an irreducible infeasible subset when
    ``irreducible`` is True: dropping any one of them makes the rest feasible).

    ``coefficients`` (one per target, same order) are the multipliers ``c`` of the proof:
    every admissible weight vector gives ``sum_k c_k (A w)_k <= bound``, while the targets
    (even moved within their tolerances) give ``sum_k c_k t_k > bound``. They are scaled so
    that the largest magnitude is 1. ``message`` says the same in words.
    """

    targets: tuple[str, ...]
    coefficients: tuple[float, ...]
    bound: float
    lhs: float
    message: str
    irreducible: bool


@dataclass(frozen=True)
class Dependence:
    """A target whose row of ``A`` is an exact linear combination of other targets' rows.

    ``implied_value = sum_j coefficients[j] * value(combination[j])``; the targets agree
    when ``|value - implied_value|`` is within the targets' tolerances.
    """

    target: str
    combination: tuple[str, ...]
    coefficients: tuple[float, ...]
    value: float
    implied_value: float
    rel_gap: float
    agrees: bool


@dataclass(frozen=True)
class PruningRisk:
    """A target at risk when only ``target_records`` records are kept.

    Under a uniform draw of K of the n records without replacement (the hypergeometric
    model), ``expected_kept`` of the target's ``support`` records survive;
    ``p_short`` is the probability that fewer than ``needed`` survive (``needed`` is 1
    without bounds: the probability of missing every supporting record). With bounds,
    ``needed`` is the fewest average supporting records that reach the value at the upper
    ratio bound, and ``p_over`` the probability that more than ``allowed`` survive, so that
    even the lower bound overshoots. ``reason`` says which applies.
    """

    name: str
    support: int
    expected_kept: float
    needed: int
    p_short: float
    allowed: float
    p_over: float
    reason: str


@dataclass(frozen=True)
class TargetDiagnosis:
    """What :func:`diagnose_targets` found. Plain data; :meth:`to_dict` is JSON-ready.

    Attributes
    ----------
    feasible : bool
        Every target can be met within its tolerance by admissible weights.
    total_rel_change : float
        The least sum over targets of ``|change| / max(|value|, 1)`` that makes the set
        feasible (0 when feasible).
    changes : tuple of TargetChange
        The targets that move in that least change (empty when feasible).
    conflicts : tuple of Conflict
        Named contradictions, smallest first.
    conflicts_complete : bool
        False when the search stopped at ``max_conflicts`` or ``max_solves`` with
        contradictions left unnamed.
    dependencies : tuple of Dependence
        Exact linear dependences and whether they agree numerically.
    pruning_risks : tuple of PruningRisk
        Targets at risk with ``target_records`` (empty without it).
    """

    feasible: bool
    n_targets: int
    n_records: int
    total_rel_change: float
    changes: tuple[TargetChange, ...]
    conflicts: tuple[Conflict, ...]
    conflicts_complete: bool
    dependencies: tuple[Dependence, ...]
    pruning_risks: tuple[PruningRisk, ...]
    bounds: tuple[float, float] | None = None
    target_records: int | None = None
    draw: str = "uniform"
    seconds: float = 0.0
    lp_solves: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (for JSON and the HTML report)."""
        out = asdict(self)
        out["bounds"] = list(self.bounds) if self.bounds is not None else None
        for c in out["conflicts"]:
            c["targets"] = list(c["targets"])
            c["coefficients"] = list(c["coefficients"])
        for d in out["dependencies"]:
            d["combination"] = list(d["combination"])
            d["coefficients"] = list(d["coefficients"])
        for key in ("changes", "conflicts", "dependencies", "pruning_risks", "notes"):
            out[key] = list(out[key])
        return _plain(out)

    def dependent_names(self) -> dict[str, list[str]]:
        """``{dependent target: [the targets it combines]}``, as
        :func:`l0calib.diagnostics.dependent_targets` returns it."""
        return {d.target: list(d.combination) for d in self.dependencies}

    def messages(self, limit: int = 10) -> list[str]:
        """One line per finding, most serious first (for warnings); at most ``limit``
        conflict and risk lines each."""
        lines: list[str] = []
        if not self.feasible:
            moved = ", ".join(
                f"{c.name} {c.direction} {abs(c.rel_change):.2%}" for c in self.changes[:_LISTED]
            )
            more = f" and {len(self.changes) - _LISTED} more" if len(self.changes) > _LISTED else ""
            lines.append(
                f"the targets cannot all be met (least total change {self.total_rel_change:.3%}"
                f" of target values: {moved}{more})"
            )
        lines += [
            c.message if c.irreducible else f"{c.message} (not shown to be the smallest such set)"
            for c in self.conflicts[:limit]
        ]
        if len(self.conflicts) > limit:
            lines.append(f"... and {len(self.conflicts) - limit} more conflicts")
        if not self.conflicts_complete:
            lines.append("the conflict search stopped early; more contradictions may remain")
        disagree = [d for d in self.dependencies if not d.agrees]
        for d in disagree[:limit]:
            lines.append(
                f"{d.target} ({_fmt(d.value)}) is a linear combination of "
                f"{list_names(list(d.combination), _LISTED)}, which give "
                f"{_fmt(d.implied_value)} ({d.rel_gap:+.3%})"
            )
        if len(disagree) > limit:
            lines.append(f"... and {len(disagree) - limit} more disagreeing linear combinations")
        for r in self.pruning_risks[:limit]:
            lines.append(f"{r.name}: {r.reason}")
        if len(self.pruning_risks) > limit:
            lines.append(f"... and {len(self.pruning_risks) - limit} more targets at risk")
        return lines


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None  # JSON has no inf or NaN
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ---------------------------------------------------------------------------- the LP
class _Problem:
    """The scaled feasibility system ``lo_k <= (B x)_k <= hi_k``, ``xlo <= x <= xhi``.

    ``B = diag(1 / s) A diag(c)`` with ``s = max(|t|, 1)`` and ``c`` the initial weights
    (a positive stand-in where they are 0), so ``x = w / c`` is about 1 and each row is in
    relative units of its target: the LP is well scaled whatever the targets' magnitudes.
    """

    def __init__(
        self,
        em: EstimateMatrix,
        w0: np.ndarray,
        tol: np.ndarray,
        bounds: tuple[float, float] | None,
    ) -> None:
        self.em = em
        self.scale = np.maximum(np.abs(em.values), 1.0)
        self.rhs = em.values / self.scale
        self.tol = tol
        positive = w0[w0 > 0]
        stand_in = float(positive.mean()) if positive.size else 1.0
        if bounds is not None:
            # w = r * w0, so a record with w0 = 0 stays at 0: leave it out.
            cols = np.flatnonzero(w0 > 0)
            col_scale = w0[cols]
            self.xlo, self.xhi = float(bounds[0]), float(bounds[1])
        else:
            cols = np.arange(em.n_records)
            col_scale = np.where(w0 > 0, w0, stand_in)
            self.xlo, self.xhi = 0.0, np.inf
        a = em.matrix[:, cols] if bounds is not None else em.matrix
        self.b = sp.csr_matrix(sp.diags(1.0 / self.scale) @ a @ sp.diags(col_scale))
        self.b.eliminate_zeros()
        # Records away from their lower bound in the last few solutions: the deletion filter
        # solves many similar LPs in a row, so each column-generation run starts with them.
        self.recent: list[np.ndarray] = []
        self.solves = 0

    def relax(self, rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Least total relative change of targets ``rows`` alone.

        Returns ``(objective, delta, y)``: ``delta`` (len(rows)) is each target's move in
        units of its scale (new value ``t + s * delta``); ``y`` the LP's dual values on the
        rows (``|y| <= 1``), a Farkas certificate of the subset's infeasibility when the
        objective is positive.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return 0.0, np.zeros(0), np.zeros(0)
        sub = self.b[rows]  # CSR, every record: untouched columns are empty
        touched = np.zeros(sub.shape[1], dtype=bool)
        touched[sub.indices] = True
        cols = np.flatnonzero(touched)
        if cols.size <= _DIRECT_COLUMNS:
            return self._solve(rows, sub, cols)
        # Column generation (Dantzig-Wolfe pricing): solve over a working set of records with
        # the others held at their lower bound, then add the records whose reduced cost is
        # negative until there is none. Only a few hundred records are basic at the optimum,
        # so this is much faster than one LP over every record, and exact: at the end the
        # working solution (others at their bound) is optimal for the full LP.
        flag = np.zeros(sub.shape[1], dtype=bool)
        for r in self.recent:
            flag[r] = True
        flag[self._initial_columns(sub, cols)] = True
        flag &= touched
        work = np.flatnonzero(flag)
        while True:
            obj, delta, y = self._solve(rows, sub, work)
            reduced = -(y @ sub)  # zero on untouched records
            reduced[work] = 0.0
            bad = np.flatnonzero(reduced < -_PRICING_TOL)
            if bad.size == 0:
                return obj, delta, y
            add = bad[np.argsort(reduced[bad])[: max(_PRICING_BATCH, 2 * rows.size)]]
            work = np.union1d(work, add)

    @staticmethod
    def _initial_columns(sub: sp.csr_matrix, cols: np.ndarray) -> np.ndarray:
        """A deterministic spread of records: four per target, plus an even sample."""
        starts, lengths = sub.indptr[:-1], np.diff(sub.indptr)
        steps = np.linspace(0.0, 1.0, 4)
        pos = starts[:, None] + np.floor(steps[None, :] * np.maximum(lengths - 1, 0)[:, None])
        per_target = sub.indices[pos[lengths > 0].astype(np.int64).ravel()]
        spread = cols[np.linspace(0, cols.size - 1, _SPREAD).astype(np.int64)]
        return np.concatenate([spread, per_target])

    def _solve(
        self, rows: np.ndarray, sub: sp.csr_matrix, work: np.ndarray
    ) -> tuple[float, np.ndarray, np.ndarray]:
        from scipy.optimize import linprog

        m, n = rows.size, work.size
        part = sub[:, work]
        rhs = self.rhs[rows]
        if self.xlo != 0.0:
            # Records outside the working set sit at their lower bound.
            rest = np.ones(sub.shape[1])
            rest[work] = 0.0
            rhs = rhs - self.xlo * (sub @ rest)
        eye = sp.identity(m, format="csc")
        # Variables: x (n), e (m) in [-tol, tol], p (m) >= 0, q (m) >= 0;
        # B x - e - p + q = t / s, minimise sum(p + q): the target moves by p - q.
        a_eq = sp.hstack([part, -eye, -eye, eye], format="csc")
        cost = np.concatenate([np.zeros(n + m), np.ones(2 * m)])
        tol = self.tol[rows]
        lower = np.concatenate([np.full(n, self.xlo), -tol, np.zeros(2 * m)])
        upper = np.concatenate([np.full(n, self.xhi), tol, np.full(2 * m, np.inf)])
        self.solves += 1
        res = linprog(
            cost, A_eq=a_eq, b_eq=rhs, bounds=np.column_stack([lower, upper]), method="highs"
        )
        if res.status != 0:
            raise CalibrationError(f"the feasibility LP failed: {res.message}")
        z = res.x
        self.recent = [*self.recent[-(_RECENT - 1) :], work[z[:n] > self.xlo + 1e-12]]
        delta = z[n + m : n + 2 * m] - z[n + 2 * m :]
        y = np.asarray(res.eqlin.marginals, dtype=np.float64)
        return float(res.fun), delta, y

    def bound_term(self, rows: np.ndarray, y: np.ndarray) -> float:
        """``max over admissible x of y^T B_rows x`` (0 without bounds when ``B^T y <= 0``)."""
        g = self.b[rows].T @ y
        if np.isinf(self.xhi):
            return float(self.xlo * g.sum())  # a certificate has B^T y <= 0 here
        return float(np.sum(np.where(g > 0, self.xhi * g, self.xlo * g)))


# ---------------------------------------------------------------------------- conflicts
def _support(y: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.abs(y) > _DUAL_TOL)


def _components(prob: _Problem, rows: np.ndarray) -> list[np.ndarray]:
    """Split ``rows`` into groups of targets linked through shared records."""
    from scipy.sparse.csgraph import connected_components

    if rows.size <= 1:
        return [rows]
    pattern = prob.b[rows].copy()
    pattern.data = np.ones_like(pattern.data)
    link = (pattern @ pattern.T).tocsr()
    n_comp, label = connected_components(link, directed=False)
    return [rows[label == c] for c in range(n_comp)]


class _Search:
    """Deletion filter over a dual support, with an LP budget."""

    def __init__(self, prob: _Problem, max_solves: int) -> None:
        self.prob = prob
        self.last = prob.solves + max_solves
        self.support = prob.em.support()

    def out_of_time(self) -> bool:
        # A count of LPs rather than a clock: the same inputs give the same findings.
        return self.prob.solves >= self.last

    def infeasible(self, rows: np.ndarray) -> tuple[bool, np.ndarray]:
        """Whether ``rows`` alone are infeasible, and the certificate's support (as rows)."""
        obj, _, y = self.prob.relax(rows)
        return obj > FEASIBILITY_TOL, rows[_support(y)]

    def irreducible(self, rows: np.ndarray) -> tuple[np.ndarray, bool]:
        """Shrink an infeasible set to an IIS (Chinneck's deletion filter).

        Targets with the largest support are tried first, so the conflict found tends to be
        the local one (a state's bands) rather than one through national totals. When a
        removal keeps the set infeasible, the set shrinks at once to that LP's certificate
        support, which is itself infeasible. Before that, whole target groups (the targets
        file's ``group`` column) are tried out at once, the one with most members here first:
        one LP can then drop a family the conflict does not need (all the states' age
        bands, say), and the conflict found is smaller.
        Returns (rows, finished).
        """
        current = np.asarray(rows)
        groups = self.prob.em.groups
        labels = sorted(
            {groups[r] for r in current if groups[r] is not None},
            key=lambda g: (-int(np.sum(groups[current] == g)), str(g)),
        )
        for label in labels:
            member = groups[current] == label
            if member.all() or not member.any() or self.out_of_time():
                continue
            bad, supp = self.infeasible(current[~member])
            if bad:
                current = np.sort(supp) if supp.size else current[~member]
        essential: set[int] = set()
        while True:
            order = sorted(
                (int(r) for r in current if int(r) not in essential),
                key=lambda r: (-int(self.support[r]), r),
            )
            if not order:
                return current, True
            r = order[0]
            if self.out_of_time():
                return current, False
            trial = current[current != r]
            if trial.size == 0:
                essential.add(r)
                continue
            bad, supp = self.infeasible(trial)
            if bad:
                current = np.sort(supp) if supp.size else trial
            else:
                essential.add(r)


def _find_conflicts(
    prob: _Problem,
    delta_all: np.ndarray,
    y_all: np.ndarray,
    *,
    max_conflicts: int,
    max_solves: int,
) -> tuple[list[tuple[np.ndarray, bool]], bool]:
    """IISs covering the infeasibility of the whole set.

    Each round splits the certificate support of the remaining targets into groups linked
    by shared records, filters each group to an IIS, and then leaves out the target of each
    IIS that moves most in the least change (the likely culprit) before looking again,
    until the rest is feasible.
    """
    search = _Search(prob, max_solves)
    pool = np.ones(prob.em.n_targets, dtype=bool)
    found: list[tuple[np.ndarray, bool]] = []
    seen: set[tuple[int, ...]] = set()
    y, delta = y_all, delta_all
    rows_all = np.arange(prob.em.n_targets)
    while len(found) < max_conflicts:
        pool_rows = rows_all[pool]
        candidates = pool_rows[_support(y)]
        # Groups that share no record are infeasible on their own or not at all (the
        # certificate splits between them), so each is filtered separately.
        groups = sorted(_components(prob, candidates), key=len) if candidates.size else []
        dropped = False
        for group in [*groups, pool_rows]:
            if group is pool_rows and dropped:
                break  # the whole pool is only a fallback for numerical trouble
            if len(found) >= max_conflicts or search.out_of_time():
                return found, False
            bad, supp = search.infeasible(group)
            if not bad:
                continue
            iis, finished = search.irreducible(np.sort(supp) if supp.size else group)
            key = tuple(int(i) for i in iis)
            if key not in seen:
                seen.add(key)
                found.append((iis, finished))
            # Leave out the member that moves most in this pool's least change (the likely
            # culprit: leaving out another member only uncovers variants of this conflict).
            local = np.searchsorted(pool_rows, iis)
            moves = np.abs(delta[local])
            if moves.max() <= 0:
                moves = np.abs(y[local])
            pool[iis[int(np.argmax(moves))]] = False
            dropped = True
        if not dropped:
            return found, True  # the remaining targets are feasible after all
        obj, delta, y = prob.relax(rows_all[pool])
        if obj <= FEASIBILITY_TOL:
            return found, True
        if search.out_of_time():
            return found, False
    return found, False


# ---------------------------------------------------------------------------- sentences
def _fmt(v: float, digits: int = 4) -> str:
    """39.0M, 1.25B, 2,037,792 ... short but exact enough to compare."""
    a = abs(v)
    for above, unit, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "B"), (1e7, 1e6, "M")):
        if a >= above:
            return f"{v / unit:.{digits}g}{suffix}"
    if a >= 1e3:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _pair(a: float, b: float) -> tuple[str, str]:
    """Two numbers, with enough digits that they read differently when they differ."""
    for digits in (4, 6, 8, 10, 12, 15):
        fa, fb = _fmt(a, digits), _fmt(b, digits)
        if fa != fb:
            break
    return fa, fb


def _combo(names: list[str], coefs: np.ndarray, groups: list[object]) -> str:
    """``x``, ``the sum of the 5 age_by_state targets a, b, ...`` or ``2 × a + b``."""
    if bool(np.all(np.abs(coefs - 1.0) <= 1e-5)):
        if len(names) == 1:
            return names[0]
        common = set(groups)
        if len(common) == 1 and common != {None}:
            label = f"the {len(names)} {common.pop()} targets "
        else:
            label = f"{len(names)} targets " if len(names) > _LISTED else ""
        return f"the sum of {label}{list_names(names, _LISTED)}"
    terms = [
        n if abs(c - 1.0) <= 1e-5 else f"{c:.4g} × {n}"
        for n, c in zip(names[:_LISTED], coefs[:_LISTED], strict=True)
    ]
    more = f" + {len(names) - _LISTED} more terms" if len(names) > _LISTED else ""
    return " + ".join(terms) + more


def _conflict(prob: _Problem, rows: np.ndarray, irreducible: bool, weights: str) -> Conflict:
    """The certificate of an infeasible set, and a sentence for it."""
    em = prob.em
    _, _, y = prob.relax(rows)
    bound_scaled = prob.bound_term(rows, y)
    # In target units: sum_k c_k (A w)_k <= bound for all admissible w, with c = y / s.
    c = y / prob.scale[rows]
    norm = float(np.abs(c).max()) or 1.0
    c, bound = c / norm, bound_scaled / norm
    values = em.values[rows]
    lhs = float(c @ values)
    names = [em.names[r] for r in rows]
    groups = list(em.groups[rows])
    n = len(rows)
    pos, neg = np.flatnonzero(c > 0), np.flatnonzero(c < 0)
    within = " within their tolerances" if np.any(prob.tol[rows] > 0) else ""
    tail = f": these {n} targets cannot all hold{within}"

    def side(idx: np.ndarray, scale: float) -> tuple[str, float]:
        cs = np.abs(c[idx]) / scale
        text = _combo([names[i] for i in idx], cs, [groups[i] for i in idx])
        return text, float(cs @ values[idx])

    bound_small = abs(bound) <= 1e-9 * max(1.0, float(np.abs(c * values).sum()))
    if n == 1:
        reach = bound / c[0]
        most = "most" if c[0] > 0 else "least"
        rel = "above" if c[0] > 0 else "below"
        msg = (
            f"{names[0]} ({_fmt(values[0])}) is {rel} {_fmt(reach)}, the {most} that {weights} "
            f"can give{within}"
        )
        return Conflict(tuple(names), (float(np.sign(c[0])),), bound, lhs, msg, irreducible)
    if bound_small and pos.size and neg.size:
        # The smaller side is the subject: "pop_CA is below the sum of its bands".
        subject, other, rel = (neg, pos, "below") if len(neg) <= len(pos) else (pos, neg, "above")
        unit = float(np.abs(c[subject]).min())
        s_text, s_val = side(subject, unit)
        o_text, o_val = side(other, unit)
        s_fmt, o_fmt = _pair(s_val, o_val)
        msg = f"{s_text} ({s_fmt}) is {rel} {o_text} ({o_fmt})"
    else:
        left, lv = side(pos, 1.0)
        right, rv = side(neg, 1.0) if neg.size else ("", 0.0)
        cap = f"{right} + {_fmt(bound)}" if right else _fmt(bound)
        l_fmt, r_fmt = _pair(lv, rv + bound)
        msg = (
            f"with {weights}, {left} is at most {cap}, but the targets give {l_fmt} against {r_fmt}"
        )
    return Conflict(tuple(names), tuple(float(v) for v in c), bound, lhs, msg + tail, irreducible)


# ---------------------------------------------------------------------------- dependence
def _dependencies(em: EstimateMatrix, tol: np.ndarray, max_targets: int) -> list[Dependence]:
    deps = dependent_targets(em, max_targets=max_targets)
    index = {n: i for i, n in enumerate(em.names)}
    scale = np.maximum(np.abs(em.values), 1.0)
    out: list[Dependence] = []
    for dep, parts in deps.items():
        d, p = index[dep], np.array([index[n] for n in parts], dtype=np.int64)
        ap = em.matrix[p]
        gram = (ap @ ap.T).toarray()
        rhs = (ap @ em.matrix[d].T).toarray().ravel()
        try:  # the parts are independent, so their Gram matrix is positive definite
            coef = np.linalg.solve(gram, rhs)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(gram, rhs, rcond=None)[0]
        implied = float(coef @ em.values[p])
        gap = float(em.values[d] - implied)
        slack = tol[d] * scale[d] + float(np.abs(coef) @ (tol[p] * scale[p]))
        rounding = 1e-9 * (abs(em.values[d]) + float(np.abs(coef) @ np.abs(em.values[p])))
        out.append(
            Dependence(
                target=dep,
                combination=tuple(parts),
                coefficients=tuple(float(c) for c in coef),
                value=float(em.values[d]),
                implied_value=implied,
                rel_gap=float(gap / scale[d]),
                agrees=bool(abs(gap) <= slack + rounding),
            )
        )
    return out


# ---------------------------------------------------------------------------- pruning
def _pruning_risks(
    em: EstimateMatrix,
    w0: np.ndarray,
    k: int,
    bounds: tuple[float, float] | None,
    risk_level: float,
) -> list[PruningRisk]:
    """Uniform draw of k of n records without replacement (hypergeometric counts).

    With bounds, a kept record's weight is ``r * w0 * n / k`` (the initial weight inflated
    to carry the dropped records, as the engine does) with ``L <= r <= U``. A target's
    supporting records contribute ``est0 / support`` each on average, so reaching ``t``
    needs about ``t * k * support / (U * n * est0)`` of them, and more than
    ``t * k * support / (L * n * est0)`` overshoot it.
    """
    from scipy.stats import hypergeom

    n = em.n_records
    support = em.support()
    est0 = em.matrix @ w0
    t = em.values
    out: list[PruningRisk] = []
    expected = support * k / n
    with np.errstate(divide="ignore", invalid="ignore"):
        per = t * k * support / (n * est0)  # kept supporting records needed at ratio 1
    for i in range(em.n_targets):
        s = int(support[i])
        if s == 0:
            continue
        needed, allowed = 1, math.inf
        usable = bounds is not None and np.isfinite(per[i]) and per[i] > 0 and est0[i] > 0
        if usable:
            needed = max(1, math.ceil(per[i] / bounds[1] - 1e-9))  # type: ignore[index]
            if bounds[0] > 0:  # type: ignore[index]
                allowed = per[i] / bounds[0]  # type: ignore[index]
        p_short = float(hypergeom.cdf(needed - 1, n, s, k)) if needed <= s else 1.0
        p_over = (
            float(hypergeom.sf(math.floor(allowed), n, s, k)) if math.isfinite(allowed) else 0.0
        )
        reasons = []
        if p_short >= risk_level:
            if needed == 1:
                reasons.append(
                    f"a uniform draw of {k:,} of {n:,} records misses all {s:,} supporting "
                    f"records with probability {p_short:.1%} (expected kept {expected[i]:.2f})"
                )
            else:
                reasons.append(
                    f"needs at least {needed:,} of its {s:,} supporting records at the upper "
                    f"ratio bound; a uniform draw of {k:,} keeps fewer with probability "
                    f"{p_short:.1%} (expected kept {expected[i]:.2f})"
                )
        if p_over >= risk_level:
            reasons.append(
                f"more than {allowed:.1f} kept supporting records overshoot it at the lower "
                f"ratio bound; a uniform draw of {k:,} keeps more with probability "
                f"{p_over:.1%} (expected kept {expected[i]:.2f})"
            )
        if reasons:
            out.append(
                PruningRisk(
                    name=em.names[i],
                    support=s,
                    expected_kept=float(expected[i]),
                    needed=int(needed),
                    p_short=p_short,
                    allowed=float(allowed),
                    p_over=p_over,
                    reason="; ".join(reasons),
                )
            )
    out.sort(key=lambda r: (-max(r.p_short, r.p_over), r.name))
    return out


# ---------------------------------------------------------------------------- check table
def annotate_check(frame: pd.DataFrame, diagnosis: TargetDiagnosis) -> pd.DataFrame:
    """Add the diagnosis to :func:`l0calib.diagnostics.check_targets`'s table.

    New columns: ``required_value`` and ``rel_change`` (the least change; NaN for targets
    that need not move), ``conflicts`` (1-based numbers of the conflicts a target is in,
    ``;``-separated), ``p_short`` (pruning risk, NaN when not at risk). ``flags`` gains
    ``must move up/down X%``, ``in conflict N``, whether a linear combination's values
    agree, and ``pruning risk P%``.
    """
    out = frame.copy()
    index = {n: i for i, n in enumerate(out["name"])}
    flags = [[f] if f else [] for f in out["flags"]]
    required = np.full(len(out), np.nan)
    rel = np.full(len(out), np.nan)
    for c in diagnosis.changes:
        i = index[c.name]
        required[i], rel[i] = c.required_value, c.rel_change
        flags[i].append(f"must move {c.direction} {abs(c.rel_change):.2%}")
    member: list[list[str]] = [[] for _ in range(len(out))]
    for number, conflict in enumerate(diagnosis.conflicts, start=1):
        for name in conflict.targets:
            member[index[name]].append(str(number))
    for i, numbers in enumerate(member):
        if numbers:
            flags[i].append(f"in conflict {', '.join(numbers)}")
    for d in diagnosis.dependencies:
        i = index[d.target]
        flags[i].append(
            "its values agree"
            if d.agrees
            else f"values disagree: they give {_fmt(d.implied_value)} ({d.rel_gap:+.2%})"
        )
    p_short = np.full(len(out), np.nan)
    for r in diagnosis.pruning_risks:
        i = index[r.name]
        p_short[i] = max(r.p_short, r.p_over)
        flags[i].append(f"pruning risk {p_short[i]:.0%}")
    out["flags"] = ["; ".join(f) for f in flags]
    out["required_value"] = required
    out["rel_change"] = rel
    out["conflicts"] = [";".join(m) for m in member]
    out["p_short"] = p_short
    return out


def check_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The check table as JSON-ready records (NaN becomes None)."""
    return _plain(frame.to_dict("records"))


# ---------------------------------------------------------------------------- entry point
def _lp_bounds(
    bounds: tuple[float, float] | None, n: int, k: int | None
) -> tuple[float, float] | None:
    """Bounds on ``w / w0`` for the feasibility LP over every record.

    ``bounds`` are on the ratio to the inflated initial weight ``w0 * n / k``; with ``k < n``
    a record may also be dropped (w = 0), so the LP takes the convex hull of
    ``{0} | [L n / k, U n / k]``, which is ``[0, U n / k]``.
    """
    if bounds is None or k is None:
        return bounds
    lo, hi = bounds
    inflate = n / int(k)
    return (lo if int(k) >= n else 0.0), hi * inflate


def _weights_text(bounds: tuple[float, float] | None, n: int, k: int | None) -> str:
    """How a conflict sentence names the admissible weights."""
    if bounds is None:
        return "non-negative weights"
    lo, hi = bounds
    if k is None or int(k) >= n:
        return f"weights within bounds [{lo:g}, {hi:g}] on w / w0"
    return f"weights of at most {hi:g} x the inflated initial weight (w0 x {n:,} / {int(k):,})"


def diagnose_targets(
    em: EstimateMatrix,
    weights: np.ndarray | None = None,
    *,
    bounds: tuple[float, float] | None = None,
    tolerance: float | Sequence[float] | np.ndarray | None = None,
    target_records: int | None = None,
    exclude: Sequence[str] | None = None,
    max_conflicts: int = 20,
    max_solves: int = 2000,
    risk_level: float = 0.05,
    max_dependence_targets: int = 5000,
) -> TargetDiagnosis:
    """Diagnose a target set before fitting: feasibility, named conflicts, pruning risk.

    Parameters
    ----------
    em : EstimateMatrix
        The problem, shape (n_targets, n_records).
    weights : numpy.ndarray, shape (n_records,), optional
        Initial weights ``w0`` (default ``em.weights``, else ones). They scale the LP and
        anchor ``bounds``; without bounds any non-negative weights are admissible.
    bounds : (L, U), optional
        Bounds on the ratio of a final weight to its inflated initial weight
        ``w0 * n / K`` (``w0`` itself without ``target_records``), read as
        :func:`l0calib.calibrate` reads them: ``0 <= L <= 1 <= U``, ``L < U``, ``U`` may be
        ``inf``. Records with ``w0 = 0`` stay at 0. Without ``target_records`` every record
        keeps ``L <= w / w0 <= U`` (as :func:`l0calib.calibrate_exact` does). With
        ``K = target_records < n`` a record is either dropped or kept within the bounds,
        so the feasibility test allows ``0 <= w / w0 <= U * n / K`` (the convex hull of
        both): a target found unreachable there is out of the engine's reach for any
        selection of ``K`` records; one found reachable may still be missed by a
        particular selection. The pruning risk reads the bounds the same way.
    tolerance : float or array of shape (n_targets,), optional
        Relative tolerance per target, replacing ``em.tolerance`` (a target is met when
        ``|A w - t| <= tolerance * max(|t|, 1)``).
    target_records : int, optional
        Report targets at risk when only this many records are kept.
    exclude : sequence of str, optional
        Targets to leave out (a fit's holdout targets, which it does not try to meet).
    max_conflicts : int, default 20
        Stop naming conflicts after this many.
    max_solves : int, default 2000
        LP solves (of HiGHS, counting each column-generation round) after which the
        conflict search stops (``conflicts_complete`` is then False). A count rather than
        a time limit, so the findings do not depend on the machine's load. Proving a
        conflict of m targets irreducible takes at least m solves.
    risk_level : float, default 0.05
        A target is at pruning risk when its probability of falling short is at least this.
    max_dependence_targets : int, default 5000
        Above this many targets the (dense) linear-dependence check is skipped.

    Returns
    -------
    TargetDiagnosis

    Raises
    ------
    ParameterError
        Bad weights, bounds, tolerance or target_records.
    CalibrationError
        If the LP solver fails (not for an infeasible target set: that is the answer).

    Example
    -------
    >>> import numpy as np
    >>> from l0calib import EstimateMatrix
    >>> # a state total and its two bands: 100 people cannot be 60 + 50
    >>> a = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    >>> em = EstimateMatrix.from_arrays(a, [100.0, 60.0, 50.0], names=["pop", "young", "old"])
    >>> d = diagnose_targets(em)
    >>> d.feasible, d.conflicts[0].targets, round(d.total_rel_change, 2)
    (False, ('pop', 'young', 'old'), 0.1)
    >>> print(d.conflicts[0].message)
    pop (100) is below the sum of young, old (110): these 3 targets cannot all hold
    """
    start = time.perf_counter()
    if exclude:
        keep = ~em._target_mask(list(exclude), "exclude")
        em = em.select_targets(keep)
    k, n = em.shape
    w0 = weights if weights is not None else em.weights
    w0 = np.asarray(np.ones(n) if w0 is None else w0, dtype=np.float64).ravel()
    if w0.shape != (n,) or not np.all(np.isfinite(w0)) or np.any(w0 < 0):
        raise ParameterError(f"weights must be finite, >= 0 and of shape ({n},)")
    bnds = ratio_bounds(bounds)
    if tolerance is None:
        tol = np.asarray(em.tolerance, dtype=np.float64)
    else:
        tol = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), (k,)).copy()
    if not np.all(np.isfinite(tol)) or np.any(tol < 0):
        raise ParameterError("tolerance must be finite and >= 0")
    if target_records is not None and (
        isinstance(target_records, bool) or not 1 <= int(target_records) <= n
    ):
        raise ParameterError(
            f"target_records must be between 1 and the number of records ({n:,}), "
            f"got {target_records!r}"
        )

    notes: list[str] = []
    changes: list[TargetChange] = []
    conflicts: list[Conflict] = []
    complete = True
    total = 0.0
    solves = 0
    if k > 0:
        prob = _Problem(em, w0, tol, _lp_bounds(bnds, n, target_records))
        rows = np.arange(k)
        total, delta, y = prob.relax(rows)
        if total > FEASIBILITY_TOL:
            scale = prob.scale
            for i in np.flatnonzero(np.abs(delta) > FEASIBILITY_TOL / max(k, 1)):
                ch = float(delta[i] * scale[i])
                changes.append(
                    TargetChange(
                        name=em.names[i],
                        value=float(em.values[i]),
                        required_value=float(em.values[i] + ch),
                        change=ch,
                        rel_change=float(delta[i]),
                        direction="up" if ch > 0 else "down",
                    )
                )
            changes.sort(key=lambda c: -abs(c.rel_change))
            found, complete = _find_conflicts(
                prob, delta, y, max_conflicts=max_conflicts, max_solves=max_solves
            )
            weights_text = _weights_text(bnds, n, target_records)
            conflicts = [_conflict(prob, iis, done, weights_text) for iis, done in found]
            conflicts.sort(key=lambda c: (len(c.targets), c.targets))
        solves = prob.solves
    deps = _dependencies(em, tol, max_dependence_targets)
    if k > max_dependence_targets:
        notes.append(f"linear dependence not checked: more than {max_dependence_targets} targets")
    risks = (
        _pruning_risks(em, w0, int(target_records), bnds, risk_level)
        if target_records is not None
        else []
    )
    return TargetDiagnosis(
        feasible=not total > FEASIBILITY_TOL,
        n_targets=k,
        n_records=n,
        total_rel_change=float(total) if total > FEASIBILITY_TOL else 0.0,
        changes=tuple(changes),
        conflicts=tuple(conflicts),
        conflicts_complete=complete,
        dependencies=tuple(deps),
        pruning_risks=tuple(risks),
        bounds=bnds,
        target_records=None if target_records is None else int(target_records),
        seconds=time.perf_counter() - start,
        lp_solves=solves,
        notes=tuple(notes),
    )
