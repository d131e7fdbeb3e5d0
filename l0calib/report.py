"""Turning a calibration result into files: reweighted tables and a report directory.

Used by the command line, public so a pipeline writes exactly what the CLI writes.
Everything is written atomically: a failure leaves the previous files (or nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib._version import __version__
from l0calib.calibrate import CalibrationResult
from l0calib.exceptions import DataError, ParameterError

__all__ = [
    "apply_weights",
    "check_added_columns",
    "keep_linked_rows",
    "summary",
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
        "inflated_weight_ratio": info.get("weight_ratio_inflated"),
        "refit_converged": info.get("refit_converged"),
        "refit_iterations": info.get("refit_iterations"),
        "refit_message": info.get("refit_message"),
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


def write_report_files(
    result: CalibrationResult,
    directory: str | os.PathLike[str],
    *,
    n_targets: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``targets.csv``, ``summary.json`` and ``history.csv`` into the existing
    ``directory`` (not atomically: a temporary directory that is moved into place later,
    as :func:`write_report` and :class:`l0calib.outputs.OutputPlan` do)."""
    tmp = Path(directory)
    cols = ["name", "target", "estimate", "error", "rel_error", "holdout", "within_tolerance"]
    result.report[cols].to_csv(tmp / "targets.csv", index=False)
    result.history.to_csv(tmp / "history.csv", index=False)
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary(result, n_targets=n_targets, extra=extra), f, indent=2)
        f.write("\n")


def write_report(
    result: CalibrationResult,
    directory: str | os.PathLike[str],
    *,
    n_targets: int,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``targets.csv``, ``summary.json`` and ``history.csv`` into ``directory``.

    The files are assembled under a temporary name and moved into place when complete. An
    existing directory is never removed: only files an earlier l0calib write put there
    (listed in its manifest) are replaced, and only with ``overwrite``.

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
        tx.write_report(lambda d: write_report_files(result, d, n_targets=n_targets,
                                                     extra=extra))  # fmt: skip
    return target
