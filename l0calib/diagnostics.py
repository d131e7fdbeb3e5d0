"""Diagnostics of a set of weights: effective sample size, design effect, per-target errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from l0calib.targets import EstimateMatrix

__all__ = [
    "WeightDiagnostics",
    "check_targets",
    "dependent_targets",
    "design_effect",
    "effective_sample_size",
    "target_report",
    "weight_diagnostics",
]

REPORT_COLUMNS = (
    "name",
    "target",
    "estimate",
    "error",
    "rel_error",
    "abs_rel_error",
    "within_tolerance",
    "holdout",
)


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` over the non-zero weights.

    Kish (1965), *Survey Sampling*. Equal weights give the number of records; unequal
    weights give fewer. Returns 0.0 when every weight is 0.

    >>> effective_sample_size(np.array([1.0, 1.0, 1.0, 0.0]))
    3.0
    """
    w = np.asarray(weights, dtype=np.float64)
    s2 = float(np.dot(w, w))
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def design_effect(weights: np.ndarray) -> float:
    """Kish's design effect due to weighting, ``1 + CV^2`` of the non-zero weights.

    Equals ``n_nonzero / effective_sample_size``. Returns ``nan`` without non-zero weights.

    >>> design_effect(np.array([1.0, 3.0]))
    1.25
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w != 0]
    if w.size == 0:
        return float("nan")
    return float(w.size * np.dot(w, w) / w.sum() ** 2)


@dataclass(frozen=True)
class WeightDiagnostics:
    """Summary of final weights against initial weights.

    Attributes
    ----------
    n_records : int
        Records in the input.
    n_kept : int
        Records with a non-zero final weight.
    effective_sample_size : float
        Kish's ``(sum w)^2 / sum w^2``.
    design_effect : float
        ``1 + CV^2`` of the non-zero weights.
    ratio_min, ratio_max : float
        Smallest and largest ``w / w0`` over kept records with ``w0 > 0`` (``nan`` if none).
    ratio_quartiles : tuple of float
        25th, 50th and 75th percentiles of those ratios (the g-weights).
    total_weight, initial_total_weight : float
        ``sum w`` and ``sum w0``.
    """

    n_records: int
    n_kept: int
    effective_sample_size: float
    design_effect: float
    ratio_min: float
    ratio_max: float
    ratio_quartiles: tuple[float, float, float]
    total_weight: float
    initial_total_weight: float

    def as_dict(self) -> dict[str, object]:
        """Plain-Python dictionary (for JSON summaries)."""
        return {
            "n_records": self.n_records,
            "n_kept": self.n_kept,
            "effective_sample_size": self.effective_sample_size,
            "design_effect": self.design_effect,
            "ratio_min": self.ratio_min,
            "ratio_max": self.ratio_max,
            "ratio_quartiles": list(self.ratio_quartiles),
            "total_weight": self.total_weight,
            "initial_total_weight": self.initial_total_weight,
        }


def weight_diagnostics(weights: np.ndarray, initial: np.ndarray) -> WeightDiagnostics:
    """Diagnostics of ``weights`` (shape (n,)) against ``initial`` weights (shape (n,))."""
    w = np.asarray(weights, dtype=np.float64)
    w0 = np.asarray(initial, dtype=np.float64)
    kept = w != 0
    usable = kept & (w0 > 0)
    ratio = w[usable] / w0[usable]
    if ratio.size:
        q = np.percentile(ratio, [25, 50, 75])
        rmin, rmax, quartiles = float(ratio.min()), float(ratio.max()), tuple(map(float, q))
    else:
        nan = float("nan")
        rmin, rmax, quartiles = nan, nan, (nan, nan, nan)
    return WeightDiagnostics(
        n_records=int(w.size),
        n_kept=int(kept.sum()),
        effective_sample_size=effective_sample_size(w),
        design_effect=design_effect(w),
        ratio_min=rmin,
        ratio_max=rmax,
        ratio_quartiles=quartiles,  # type: ignore[arg-type]
        total_weight=float(w.sum()),
        initial_total_weight=float(w0.sum()),
    )


def target_report(
    em: EstimateMatrix,
    weights: np.ndarray,
    holdout: np.ndarray | None = None,
    *,
    scale_floor: float = 1.0,
    estimates: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per-target table: name, target, estimate, error, rel_error, abs_rel_error,
    within_tolerance, holdout.

    ``estimates`` (shape (n_targets,)) replaces ``em.estimates(weights)`` when the totals
    were computed elsewhere (summed over the shards of a distributed fit).

    ``rel_error = (estimate - target) / max(|target|, scale_floor)``; a target is within
    tolerance when ``abs_rel_error <= tolerance`` (its ``tolerance`` column, default 0) up
    to a float rounding margin of 1e-9.
    """
    est = em.estimates(weights) if estimates is None else np.asarray(estimates, np.float64)
    err = est - em.values
    scale = np.maximum(np.abs(em.values), scale_floor)
    rel = err / scale
    hold = np.zeros(em.n_targets, dtype=bool) if holdout is None else np.asarray(holdout, bool)
    return pd.DataFrame(
        {
            "name": list(em.names),
            "target": em.values,
            "estimate": est,
            "error": err,
            "rel_error": rel,
            "abs_rel_error": np.abs(rel),
            "within_tolerance": np.abs(rel) <= em.tolerance + 1e-9,
            "holdout": hold,
        },
        columns=list(REPORT_COLUMNS),
    )


def list_names(names: list[str], limit: int = 6) -> str:
    """``"a, b, c and 4 more"``: at most ``limit`` names, for messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def dependent_targets(em: EstimateMatrix, *, max_targets: int = 5000) -> dict[str, list[str]]:
    """Targets whose row of ``A`` is a linear combination of other rows.

    Such constraints are redundant when consistent and contradictory when not (a state total
    given beside the sum of its counties, say). Found from a QR factorisation of the
    row-normalised Gram matrix ``A A^T`` in target order, so only for at most
    ``max_targets`` targets (returns ``{}`` above that, and for an empty matrix).

    Returns
    -------
    dict
        ``{dependent target: [the targets it combines]}``: a target is reported when it is
        a combination of targets listed *before* it.
    """
    import scipy.linalg

    k = em.n_targets
    if k == 0 or k > max_targets:
        return {}
    a = em.matrix
    norms = np.sqrt(np.asarray(a.multiply(a).sum(axis=1)).ravel())
    nz = norms > 0
    idx = np.flatnonzero(nz)
    if idx.size == 0:
        return {}
    an = a[idx].multiply(1.0 / norms[idx][:, None]).tocsr()
    gram = (an @ an.T).toarray()
    # QR without pivoting: column j's R_jj is ~0 exactly when target j lies in the span of
    # the targets before it, so the earlier targets stay the independent ones.
    r = scipy.linalg.qr(gram, mode="r")[0]
    diag = np.abs(np.diag(r))
    keep = diag > diag.max() * 1e-9
    independent, dependent = np.flatnonzero(keep), np.flatnonzero(~keep)
    out: dict[str, list[str]] = {}
    if dependent.size == 0:
        return out
    g_ii = gram[np.ix_(independent, independent)]
    coef = np.linalg.lstsq(g_ii, gram[np.ix_(independent, dependent)], rcond=None)[0]
    for j, d in enumerate(dependent):
        parts = independent[np.abs(coef[:, j]) > 1e-6]
        out[em.names[idx[d]]] = [em.names[idx[p]] for p in sorted(parts)]
    return out


def check_targets(
    em: EstimateMatrix,
    *,
    min_support: int = 10,
    max_targets: int = 5000,
    dependencies: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """One row per target: support, initial estimate and error, and flags.

    Flags (a ``;``-separated string, empty when fine): ``zero support`` (no record
    contributes: unusable), ``tiny support (< min_support records)``, ``duplicate of X``
    (the same row as target X up to a factor), ``linear combination of ...`` (see
    :func:`dependent_targets`; pass its result as ``dependencies`` when already computed).
    ``usable`` is False only for zero support.
    """
    support = em.support()
    weights = em.weights if em.weights is not None else np.ones(em.n_records)
    est = em.estimates(weights)
    rel = (est - em.values) / np.maximum(np.abs(em.values), 1.0)
    flags: list[list[str]] = [[] for _ in range(em.n_targets)]
    seen: dict[tuple[bytes, bytes], int] = {}
    for k in range(em.n_targets):
        if support[k] == 0:
            flags[k].append("zero support")
            continue
        if support[k] < min_support:
            flags[k].append(f"tiny support (< {min_support} records)")
        lo, hi = em.matrix.indptr[k], em.matrix.indptr[k + 1]
        data = em.matrix.data[lo:hi]
        key = (em.matrix.indices[lo:hi].tobytes(), np.round(data / data[0], 12).tobytes())
        if key in seen:
            flags[k].append(f"duplicate of {em.names[seen[key]]}")
        else:
            seen[key] = k
    names = {n: i for i, n in enumerate(em.names)}
    if dependencies is None:
        dependencies = dependent_targets(em, max_targets=max_targets)
    for dep, parts in dependencies.items():
        i = names[dep]
        if not any(f.startswith("duplicate of") for f in flags[i]):
            flags[i].append(f"linear combination of {list_names(parts)}")
    return pd.DataFrame(
        {
            "name": list(em.names),
            "support": support,
            "target": em.values,
            "initial_estimate": est,
            "initial_rel_error": rel,
            "flags": ["; ".join(f) for f in flags],
            "usable": support > 0,
        }
    )
