"""Turning a calibration result into files: reweighted tables and a report directory.

A report directory holds ``targets.csv``, ``history.csv``, ``summary.json``,
``weight_ratios.csv`` and ``report.html`` (drawn from the other four by
:func:`l0calib.report_html.render_html`, so ``l0calib report DIR`` can draw it again).

Used by the command line, public so a pipeline writes exactly what the CLI writes.
Everything is written atomically: a failure leaves the previous files (or nothing).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib._version import __version__
from l0calib.calibrate import HISTORY_COLUMNS, CalibrationResult
from l0calib.diagnostics import check_targets
from l0calib.exceptions import DataError, ParameterError
from l0calib.targets import EstimateMatrix

__all__ = [
    "RATIO_EDGES",
    "apply_weights",
    "check_added_columns",
    "describe_inputs",
    "effective_tolerance",
    "history_table",
    "keep_linked_rows",
    "ratio_histogram",
    "summary",
    "target_facts",
    "targets_table",
    "with_weights",
    "write_report",
    "write_report_files",
]


def apply_weights(
    households: pd.DataFrame, result: CalibrationResult, *, weight_column: str
) -> pd.DataFrame:
    """The kept records with their new weights, in input order.

    Every original column is kept; ``weight_column`` holds the final weight and
    ``<weight_column>_initial`` the initial one.
    """
    return with_weights(households, result.weights, weight_column=weight_column)


def with_weights(
    households: pd.DataFrame, weights: np.ndarray, *, weight_column: str
) -> pd.DataFrame:
    """The rows with a non-zero entry in ``weights`` (shape (n_rows,)), carrying it.

    As :func:`apply_weights`, for weights that did not come from a calibration (a random
    draw with its design weights, say).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(households) != weights.size:
        raise ParameterError(
            f"the table has {len(households)} rows but there are {weights.size} weights"
        )
    kept = weights != 0
    out = households.loc[kept].copy()
    initial = f"{weight_column}_initial"
    if initial in out.columns:
        raise DataError(f"column '{initial}' already exists; rename it or choose another weight")
    position = out.columns.get_loc(weight_column) + 1
    out.insert(position, initial, out[weight_column].to_numpy())
    out[weight_column] = weights[kept]
    return out


def check_added_columns(
    frame: pd.DataFrame, path: str | os.PathLike[str], weight_column: str,
    also: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Refuse, before any work, a table that already has a column the output adds
    (``<weight_column>_initial``, and ``also``); the message names ``path``."""
    for added in (f"{weight_column}_initial", *also):
        if added in frame.columns:
            raise DataError(
                f"{path}: column '{added}' already exists, and the output adds a column of "
                "that name; rename it (or choose another --weight-column)"
            )


def keep_linked_rows(
    frame: pd.DataFrame, link_column: str, kept_ids: np.ndarray | pd.Series
) -> pd.DataFrame:
    """Rows of ``frame`` (e.g. persons) whose ``link_column`` is one of ``kept_ids``."""
    return frame.loc[frame[link_column].isin(pd.Index(kept_ids))]


def summary(
    result: CalibrationResult, *, n_targets: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The figures of ``summary.json``: counts, errors, effective sample size, time..."""
    d = result.diagnostics
    info = result.info
    out: dict[str, Any] = {
        "n_records_in": d.n_records,
        "n_records_out": d.n_kept,
        "target_records": info.get("target_records"),
        "selection": info.get("selection"),
        "lambda_l2": info.get("lambda_l2"),
        "n_targets": n_targets,
        "n_holdout": int(result.report["holdout"].sum()),
        "mean_abs_rel_error": info.get("mean_abs_rel_error"),
        "max_abs_rel_error": info.get("max_abs_rel_error"),
        "holdout_mean_abs_rel_error": info.get("holdout_mean_abs_rel_error"),
        "holdout_max_abs_rel_error": info.get("holdout_max_abs_rel_error"),
        "mean_abs_rel_error_before_refit": info.get("mean_abs_rel_error_before_refit"),
        "effective_sample_size": d.effective_sample_size,
        "design_effect": d.design_effect,
        "weight_ratio": {
            "min": d.ratio_min,
            "quartiles": list(d.ratio_quartiles),
            "max": d.ratio_max,
        },
        "seconds": result.seconds,
        "epochs_run": result.n_iter,
        "seed": result.seed,
        "converged": result.converged,
        # Fitted targets at -100 % or beyond max_error (l0calib.calibrate), by name.
        "missed_targets": list(info.get("missed_targets") or []),
        # Fitted targets outside max(tol, their own tolerance) when a tol was given, worst first.
        "outside_tolerance": list(info.get("outside_tolerance") or []),
        "inflated_weight_ratio": info.get("weight_ratio_inflated"),
        "refit_converged": info.get("refit_converged"),
        "refit_iterations": info.get("refit_iterations"),
        "refit_message": info.get("refit_message"),
        # Records exchanged after the refit (l0calib.exchange); None without target_records.
        "exchange_swaps": info.get("exchange_swaps"),
        # Kept records the exact-count refit holds at its floor (1e-4 x the anchor weight).
        "refit_at_floor": info.get("refit_at_floor"),
        "method": result.method,
        "l0calib_version": __version__,
    }
    out.update(extra or {})
    return _jsonable(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


# Fixed log-spaced edges for the histogram of w / w0 (1e-4 to 1e4, 20 bins a decade), so
# histograms of the shards of a distributed fit add up; ratios outside fall in the end bins.
RATIO_EDGES = 10.0 ** np.linspace(-4.0, 4.0, 161)

TARGET_COLUMNS = (
    "name",
    "group",
    "target",
    "initial_estimate",
    "initial_rel_error",
    "estimate",
    "error",
    "rel_error",
    "tolerance",
    "within_tolerance",
    "holdout",
    "support",
    "kept_support",
    "flags",
)


def target_facts(
    em: EstimateMatrix, weights: np.ndarray, *, structure: bool = True
) -> pd.DataFrame:
    """Per-target facts the report adds to the fit: group, own tolerance, initial estimate,
    support (records contributing) and kept support (of those, records with a non-zero
    final ``weights``, shape (n_records,)), and flags.

    ``initial_estimate``, ``support`` and ``kept_support`` add up over record shards.
    Flags: ``zero support``, ``tiny support (< 10 records)``, and with ``structure`` the
    duplicate and linear-combination flags of :func:`l0calib.diagnostics.check_targets`
    (they need every record; checked for at most 1,000 targets). :func:`targets_table`
    adds ``none kept`` (support, but no kept record).
    """
    w = np.asarray(weights, dtype=np.float64)
    initial = em.weights if em.weights is not None else np.ones(em.n_records)
    kept = (w != 0).astype(np.float64)
    support = em.support().astype(np.int64)
    kept_support = np.asarray((em.matrix != 0).astype(np.float64) @ kept).round().astype(np.int64)
    if structure:
        flags = check_targets(em, max_targets=1000)["flags"].tolist()
    else:
        tiny = np.where(support < 10, "tiny support (< 10 records)", "")
        flags = np.where(support == 0, "zero support", tiny).tolist()
    return pd.DataFrame(
        {
            "name": list(em.names),
            "group": [g if g is not None else "" for g in em.groups],
            "own_tolerance": em.tolerance,
            "initial_estimate": em.estimates(initial),
            "support": support,
            "kept_support": kept_support,
            "flags": flags,
        }
    )


def ratio_histogram(weights: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Counts of kept records' ``w / w0`` in the bins of :data:`RATIO_EDGES`, shape (160,).

    Ratios below 1e-4 or above 1e4 are counted in the first or last bin; records with
    ``w0 <= 0`` are left out. Counts add up over record shards.
    """
    w = np.asarray(weights, dtype=np.float64)
    w0 = np.asarray(initial, dtype=np.float64)
    use = (w != 0) & (w0 > 0)
    r = np.clip(w[use] / w0[use], RATIO_EDGES[0], RATIO_EDGES[-1])
    return np.histogram(r, bins=RATIO_EDGES)[0]


def describe_inputs(paths: dict[str, str | os.PathLike[str] | None]) -> list[dict[str, Any]]:
    """``[{"role", "path", "name", "bytes", "sha256"}]`` for each existing input file."""
    out = []
    for role, path in paths.items():
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            continue
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out.append(
            {
                "role": role,
                "path": str(p),
                "name": p.name,
                "bytes": p.stat().st_size,
                "sha256": digest.hexdigest(),
            }
        )
    return out


def effective_tolerance(own: np.ndarray, tol: float | None) -> np.ndarray:
    """Each target's tolerance as the fit's ``converged`` check applies it:
    ``max(tol, own)`` with ``tol``, else the target's own (``nan`` where it has none)."""
    own = np.asarray(own, dtype=np.float64)
    if tol is not None:
        return np.maximum(own, tol)
    return np.where(own > 0, own, np.nan)


def targets_table(
    result: CalibrationResult, facts: pd.DataFrame | None, *, tol: float | None
) -> pd.DataFrame:
    """The rows of ``targets.csv`` (columns :data:`TARGET_COLUMNS`).

    ``within_tolerance`` compares ``|rel_error|`` with the effective tolerance (see
    :func:`effective_tolerance`); it is empty where no tolerance applies.
    """
    rep = result.report
    k = len(rep)
    if facts is None:
        nan = np.full(k, np.nan)
        facts = pd.DataFrame(
            {"name": rep["name"], "group": "", "own_tolerance": 0.0, "initial_estimate": nan,
             "support": pd.array([pd.NA] * k, dtype="Int64"),
             "kept_support": pd.array([pd.NA] * k, dtype="Int64"), "flags": ""}
        )  # fmt: skip
    target = rep["target"].to_numpy(dtype=np.float64)
    # The relative scale of the fit (max(|t|, floor)) is recovered from its own columns.
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(rep["rel_error"] != 0, rep["error"] / rep["rel_error"], np.nan)
    scale = np.where(np.isfinite(scale), scale, np.maximum(np.abs(target), 1.0))
    initial = facts["initial_estimate"].to_numpy(dtype=np.float64)
    flags = facts["flags"].astype(str).to_numpy(dtype=object)
    support = pd.to_numeric(facts["support"]).to_numpy(dtype=np.float64, na_value=np.nan)
    kept_support = pd.to_numeric(facts["kept_support"]).to_numpy(np.float64, na_value=np.nan)
    none_kept = (support > 0) & (kept_support == 0)
    flags[none_kept] = ["; ".join(x for x in (f, "none kept") if x) for f in flags[none_kept]]
    tolerance = effective_tolerance(facts["own_tolerance"].to_numpy(), tol)
    within = pd.array(
        [None if np.isnan(t) else bool(a <= t + 1e-9)
         for a, t in zip(rep["abs_rel_error"], tolerance, strict=True)],
        dtype="boolean",
    )  # fmt: skip
    return pd.DataFrame(
        {
            "name": rep["name"],
            "group": facts["group"].to_numpy(),
            "target": target,
            "initial_estimate": initial,
            "initial_rel_error": (initial - target) / scale,
            "estimate": rep["estimate"],
            "error": rep["error"],
            "rel_error": rep["rel_error"],
            "tolerance": tolerance,
            "within_tolerance": within,
            "holdout": rep["holdout"],
            "support": facts["support"].to_numpy(),
            "kept_support": facts["kept_support"].to_numpy(),
            "flags": flags,
        },
        columns=list(TARGET_COLUMNS),
    )


def history_table(result: CalibrationResult, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``history.csv``: a ``phase`` column, the initial weights' errors (epoch
    0, ``initial``), one ``train`` row per epoch, then ``selection`` (the kept records with
    their trained weights) and ``refit`` rows, so the last row holds the summary's errors.
    For a classic calibration: ``initial``, one row per iteration named after the method
    (its largest relative residual as ``max_abs_rel_error``) and ``final``."""
    fitted = ~table["holdout"].to_numpy(dtype=bool)
    info = result.info
    columns = ["phase", *HISTORY_COLUMNS]
    rows: list[dict[str, Any]] = []
    init_err = np.abs(table["initial_rel_error"].to_numpy(dtype=np.float64))[fitted]
    if init_err.size and np.isfinite(init_err).all():
        rows.append(
            {"phase": "initial", "epoch": 0, "mean_abs_rel_error": float(init_err.mean()),
             "max_abs_rel_error": float(init_err.max()),
             "expected_survivors": result.diagnostics.n_records}
        )  # fmt: skip
    hist = result.history
    if "epoch" not in hist.columns and "iteration" in hist.columns:  # a classic method
        hist = pd.DataFrame(
            {"epoch": hist["iteration"], "max_abs_rel_error": hist.get("max_rel_residual")}
        )
    train = hist.reindex(columns=list(HISTORY_COLUMNS)).copy()
    train.insert(0, "phase", "train" if result.method == "l0" else result.method)
    last = int(train["epoch"].max()) if len(train) else 0
    tail: list[dict[str, Any]] = []
    if len(train) and info.get("mean_abs_rel_error_before_refit") is not None:
        tail.append(
            {"phase": "selection", "epoch": last + 1,
             "mean_abs_rel_error": info["mean_abs_rel_error_before_refit"],
             "max_abs_rel_error": info.get("max_abs_rel_error_before_refit"),
             "expected_survivors": result.diagnostics.n_kept}
        )  # fmt: skip
        phase, epoch = "refit", last + 2
    else:
        phase, epoch = "final", last + 1
    tail.append(
        {"phase": phase, "epoch": epoch, "mean_abs_rel_error": info.get("mean_abs_rel_error"),
         "max_abs_rel_error": info.get("max_abs_rel_error"),
         "expected_survivors": result.diagnostics.n_kept}
    )  # fmt: skip
    parts = [pd.DataFrame(rows, columns=columns), train, pd.DataFrame(tail, columns=columns)]
    return pd.concat([p for p in parts if len(p)], ignore_index=True)[columns]


def write_report_files(
    result: CalibrationResult,
    directory: str | os.PathLike[str],
    *,
    n_targets: int,
    extra: dict[str, Any] | None = None,
    matrix: EstimateMatrix | None = None,
    facts: pd.DataFrame | None = None,
    ratio_counts: np.ndarray | None = None,
    tol: float | None = None,
    html: bool = True,
) -> None:
    """Write the report's files (``targets.csv``, ``history.csv``, ``summary.json``,
    ``weight_ratios.csv``, ``report.html``) into the existing ``directory`` (not
    atomically: a temporary directory that is moved into place later, as
    :func:`write_report` and :class:`l0calib.outputs.OutputPlan` do). The keywords are
    :func:`write_report`'s."""
    tmp = Path(directory)
    if facts is None and matrix is not None:
        facts = target_facts(matrix, result.weights)
    if ratio_counts is None and matrix is not None and matrix.weights is not None:
        ratio_counts = ratio_histogram(result.weights, matrix.weights)
    table = targets_table(result, facts, tol=tol)
    hold = table["holdout"].to_numpy(dtype=bool)
    initial = table["initial_rel_error"].abs()
    info = {
        "tol": tol,
        "finished_at": _now(),
        # the initial weights' errors, to read the final ones against
        "initial_mean_abs_rel_error": initial[~hold].mean() if (~hold).any() else None,
        "holdout_initial_mean_abs_rel_error": initial[hold].mean() if hold.any() else None,
    }
    table.to_csv(tmp / "targets.csv", index=False)
    history_table(result, table).to_csv(tmp / "history.csv", index=False)
    if ratio_counts is not None:
        pd.DataFrame({"low": RATIO_EDGES[:-1], "high": RATIO_EDGES[1:], "count": ratio_counts}).loc[
            lambda f: f["count"] > 0
        ].to_csv(tmp / "weight_ratios.csv", index=False)
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary(result, n_targets=n_targets, extra={**info, **(extra or {})}),
                  f, indent=2)  # fmt: skip
        f.write("\n")
    if html:
        from l0calib.report_html import render_html

        render_html(tmp)


def write_report(
    result: CalibrationResult,
    directory: str | os.PathLike[str],
    *,
    n_targets: int,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    matrix: EstimateMatrix | None = None,
    facts: pd.DataFrame | None = None,
    ratio_counts: np.ndarray | None = None,
    tol: float | None = None,
    html: bool = True,
) -> Path:
    """Write a report directory: ``targets.csv``, ``history.csv``, ``summary.json``,
    ``weight_ratios.csv`` and ``report.html`` (see docs/report.md).

    The files are assembled under a temporary name and moved into place when complete. An
    existing directory is never removed: only files an earlier l0calib write put there
    (listed in its manifest) are replaced, and only with ``overwrite``.

    Parameters
    ----------
    result : CalibrationResult
    directory : path
    n_targets : int
    extra : dict, optional
        More ``summary.json`` fields (command, inputs, options, bounds...).
    overwrite : bool
        Replace an existing directory.
    matrix : EstimateMatrix, optional
        The fit's matrix (initial weights in ``matrix.weights``): gives the initial
        estimates, groups, support and flags of ``targets.csv``. Without it (and without
        ``facts``) those columns are empty.
    facts : DataFrame, optional
        :func:`target_facts` computed elsewhere (summed over the shards of a distributed fit).
    ratio_counts : numpy.ndarray, shape (160,), optional
        :func:`ratio_histogram` computed elsewhere; default from ``result.weights`` and
        ``matrix.weights``.
    tol : float, optional
        The ``tol`` the fit was given (for ``within_tolerance``).
    html : bool
        Also render ``report.html``.

    Returns
    -------
    pathlib.Path
        The report directory.

    Raises
    ------
    OutputError
        If a file would be replaced without ``overwrite``, or a file of the same name that
        l0calib did not write is in the way.
    """
    from l0calib.outputs import OutputPlan

    target = Path(directory)
    with OutputPlan(report_dir=target, force=overwrite).transaction() as tx:
        tx.write_report(
            lambda d: write_report_files(
                result, d, n_targets=n_targets, extra=extra, matrix=matrix, facts=facts,
                ratio_counts=ratio_counts, tol=tol, html=html,
            )
        )  # fmt: skip
    return target


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
