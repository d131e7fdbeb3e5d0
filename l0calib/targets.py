"""Targets: the targets file format and the sparse estimate matrix built from microdata.

For target ``k`` and record (household) ``i``, ``A[k, i]`` is the record's contribution to
the target's total, so ``A @ w`` are the weighted estimates and ``t`` the values to match.
The file format is documented in ``docs/targets.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from l0calib.exceptions import DataError, ParameterError, TargetError, listed
from l0calib.expressions import (
    ColumnSource,
    Expression,
    ExpressionError,
    Value,
    closest,
    missing_message,
    parse_expression,
)
from l0calib.io import read_table

__all__ = [
    "ENTITIES",
    "TARGET_COLUMNS",
    "EstimateMatrix",
    "Target",
    "as_estimate_matrix",
    "build_estimate_matrix",
    "read_targets",
]

TARGET_COLUMNS = (
    "name",
    "value",
    "variable",
    "filter",
    "entity",
    "group",
    "importance",
    "tolerance",
)
ENTITIES = ("household", "person")
_MAX_LISTED = 5


@dataclass(frozen=True)
class Target:
    """One row of a targets file, validated.

    ``variable`` / ``filter`` are ``None`` when empty (count every entity / all entities).
    ``row`` is the 1-based data row in the file (the header is not counted), if known.
    """

    name: str
    value: float
    variable: str | None = None
    filter: str | None = None
    entity: str = "household"
    group: str | None = None
    importance: float = 1.0
    tolerance: float = 0.0
    row: int | None = None


def _blank(x: object) -> bool:
    return x is None or (isinstance(x, float) and np.isnan(x)) or str(x).strip() == ""


def _where(row: int | None, name: str | None) -> str:
    """``"data row 3 ('snap_CA')"``: where in the targets table, without the file's name
    (the message says it once, in front)."""
    label = f"data row {row}" if row is not None else "target"
    return f"{label} ({name!r})" if name else label


# A problem of a targets row: (data row, target name or None, what is wrong).
_Problem = tuple[int, str | None, str]


def _ranges(rows: list[int]) -> str:
    """``"1-3, 7, 8, 10-12 and 4 more"``: sorted row numbers, runs of three or more as
    ``first-last``, the first few listed."""
    runs: list[str] = []
    start = prev = rows[0]
    for r in [*rows[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.extend([str(start), str(prev)][: prev - start + 1] if prev - start < 2
                    else [f"{start}-{prev}"])  # fmt: skip
        if r is not None:
            start = prev = r
    return listed(runs)


def _target_error(label: str, problems: list[_Problem]) -> TargetError:
    """One error for every problem, in row order (stable). The message says the file once
    and gives one line per cause: a problem that many rows share (a column missing from
    the data...) is one line naming its rows; ``problems`` holds every row's problem."""
    ordered = sorted(problems, key=lambda p: p[0])
    groups: dict[str, list[_Problem]] = {}
    for p in ordered:
        groups.setdefault(p[2], []).append(p)
    lines = []
    for text, group in groups.items():
        if len(group) == 1:
            lines.append(f"{_where(group[0][0], group[0][1])}: {text}")
            continue
        names = [repr(n) for _, n, _ in group if n]
        shown = f" ({listed(names, 3)})" if names else ""
        lines.append(f"data rows {_ranges([r for r, _, _ in group])}{shown}: {text}")
    return TargetError.from_problems(  # type: ignore[return-value]
        label, [f"{_where(r, n)}: {text}" for r, n, text in ordered], lines=lines
    )


def read_targets(
    targets: str | os.PathLike[str] | pd.DataFrame | Sequence[Target],
    *,
    source: str | None = None,
) -> list[Target]:
    """Read and validate a targets table (every problem is reported, not just the first).

    Parameters
    ----------
    targets : path, DataFrame or sequence of Target
        A CSV/Parquet file, a DataFrame with the columns of :data:`TARGET_COLUMNS` (``name``
        and ``value`` required), or already-built :class:`Target` objects.
    source : str, optional
        How to name the table in messages (defaults to the file name, or ``"targets"``).

    Returns
    -------
    list of Target

    Raises
    ------
    TargetError
        Listing every problem: missing required columns, misspelt optional columns, empty
        or duplicate names, non-numeric or non-finite values, unknown entities, negative
        importance or tolerance, expression syntax errors.
    DataError
        If the file cannot be read.
    """
    parsed, problems, label = _read_targets(targets, source)
    if problems:
        raise _target_error(label, problems)
    return parsed


def _read_targets(
    targets: str | os.PathLike[str] | pd.DataFrame | Sequence[Target], source: str | None
) -> tuple[list[Target], list[_Problem], str]:
    """Parse what can be parsed; return the good targets, every problem, the label."""
    if isinstance(targets, (str, os.PathLike)):
        source = source or Path(targets).name
        frame = read_table(targets, text_columns=True)
    elif isinstance(targets, pd.DataFrame):
        frame = targets
    else:
        items = list(targets)
        if not all(isinstance(t, Target) for t in items):
            raise ParameterError("targets must be a path, a DataFrame or a sequence of Target")
        frame = pd.DataFrame([{c: getattr(t, c) for c in TARGET_COLUMNS} for t in items])
    label = source or "targets"
    parsed, problems = _parse_frame(frame, label)
    return parsed, problems, label


MAX_NAME_LENGTH = 1000  # characters of a target name


def _parse_frame(frame: pd.DataFrame, source: str) -> tuple[list[Target], list[_Problem]]:
    """Parse rows; structural problems (missing columns, no rows) raise at once."""
    columns = [str(c).strip() for c in frame.columns]
    frame = frame.set_axis(columns, axis=1)
    problems: list[str] = []  # structural: raised at once
    for required in ("name", "value"):
        if required not in columns:
            hint = closest(required, columns)
            problems.append(
                f"required column '{required}' is missing"
                + (f" (found '{hint}': did you mean '{required}'?)" if hint else "")
                + f"; columns present: {', '.join(columns) or '(none)'}"
            )
    for col in columns:
        if col not in TARGET_COLUMNS:
            hint = closest(col, TARGET_COLUMNS)
            if hint is not None and hint not in columns:
                problems.append(f"column '{col}' is not a targets column (did you mean '{hint}'?)")
    if problems:
        raise TargetError.from_problems(source, problems)
    if len(frame) == 0:
        raise TargetError(f"{source}: the targets table has no rows")

    out: list[Target] = []
    row_problem_list: list[_Problem] = []
    first_row: dict[str, int] = {}
    for i, rec in enumerate(frame.to_dict("records"), start=1):
        name = None if _blank(rec.get("name")) else str(rec["name"]).strip()
        too_long = name is not None and len(name) > MAX_NAME_LENGTH
        shown_name = name[:40] + "..." if too_long and name else name
        row_problems: list[str] = []
        if name is None:
            row_problems.append("column 'name' is empty")
        elif too_long:
            row_problems.append(
                f"column 'name' is {len(name):,} characters long; at most {MAX_NAME_LENGTH}"
            )
        elif name in first_row:
            row_problems.append(f"duplicate target name (first used on data row {first_row[name]})")
        else:
            first_row[name] = i
        value = _number(rec.get("value"), "value", row_problems, required=True)
        importance = _number(rec.get("importance"), "importance", row_problems, default=1.0)
        tolerance = _number(rec.get("tolerance"), "tolerance", row_problems, default=0.0)
        if importance is not None and importance < 0:
            row_problems.append(f"column 'importance' must be >= 0, got {importance:g}")
        if tolerance is not None and tolerance < 0:
            row_problems.append(f"column 'tolerance' must be >= 0, got {tolerance:g}")
        entity = "household" if _blank(rec.get("entity")) else str(rec["entity"]).strip().lower()
        if entity not in ENTITIES:
            hint = closest(entity, ENTITIES)
            row_problems.append(
                f"column 'entity': unknown entity {entity!r}; expected one of "
                f"{', '.join(ENTITIES)}" + (f" (did you mean '{hint}'?)" if hint else "")
            )
        exprs: dict[str, str | None] = {}
        for col in ("variable", "filter"):
            text = None if _blank(rec.get(col)) else str(rec[col]).strip()
            exprs[col] = text
            if text is not None:
                try:
                    parse_expression(text)
                except ExpressionError as exc:
                    row_problems.append(f"column '{col}': {exc}")
        group = None if _blank(rec.get("group")) else str(rec["group"]).strip()
        if value is not None and value < 0 and exprs["variable"] is None:
            row_problems.append(
                f"column 'value': a count target (no 'variable') cannot be negative, got {value:g}"
            )
        row_problem_list.extend((i, shown_name, p) for p in row_problems)
        if not row_problems:
            out.append(
                Target(
                    name=name,  # type: ignore[arg-type]
                    value=value,  # type: ignore[arg-type]
                    variable=exprs["variable"],
                    filter=exprs["filter"],
                    entity=entity,
                    group=group,
                    importance=importance,  # type: ignore[arg-type]
                    tolerance=tolerance,  # type: ignore[arg-type]
                    row=i,
                )
            )
    return out, row_problem_list


def _number(
    raw: object, column: str, problems: list[str], *, required: bool = False, default: float = 0.0
) -> float | None:
    if _blank(raw):
        if required:
            problems.append(f"column '{column}' is empty")
            return None
        return default
    try:
        x = float(str(raw).strip().replace("_", ""))
    except ValueError:
        problems.append(f"column '{column}': {str(raw)[:40]!r} is not a number")
        return None
    if not np.isfinite(x):
        problems.append(f"column '{column}' must be finite, got {str(raw).strip()!r}")
        return None
    return x


# ---------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class EstimateMatrix:
    """The calibration problem's data: ``A`` (targets x records), ``t`` and target metadata.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix, shape (n_targets, n_records), float64
        ``matrix[k, i]`` is record ``i``'s contribution to target ``k``; records are in the
        microdata's row order.
    names : tuple of str, length n_targets
    values : numpy.ndarray, shape (n_targets,)
        Target totals ``t``.
    groups : numpy.ndarray of object, shape (n_targets,)
        Group label per target, ``None`` where the target has none.
    importance, tolerance : numpy.ndarray, shape (n_targets,)
        Loss multiplier (>= 0) and relative tolerance (>= 0) per target.
    record_ids : numpy.ndarray, shape (n_records,), optional
        The microdata's id column, when built from microdata.
    weights : numpy.ndarray, shape (n_records,), optional
        The microdata's initial weights, when built from microdata.
    zero_support : tuple of str
        Targets no record contributes to (kept as all-zero rows, only when allowed).
    """

    matrix: sp.csr_matrix
    names: tuple[str, ...]
    values: np.ndarray
    groups: np.ndarray
    importance: np.ndarray
    tolerance: np.ndarray
    record_ids: np.ndarray | None = None
    weights: np.ndarray | None = None
    zero_support: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        k, n = self.matrix.shape
        for label, arr in (
            ("values", self.values),
            ("groups", self.groups),
            ("importance", self.importance),
            ("tolerance", self.tolerance),
        ):
            if len(arr) != k:
                raise ParameterError(f"{label} has length {len(arr)}, expected {k} (targets)")
        if len(self.names) != k:
            raise ParameterError(f"names has length {len(self.names)}, expected {k} (targets)")
        for label, arr in (("record_ids", self.record_ids), ("weights", self.weights)):
            if arr is not None and len(arr) != n:
                raise ParameterError(f"{label} has length {len(arr)}, expected {n} (records)")

    @property
    def n_targets(self) -> int:
        """Number of targets (rows of ``matrix``)."""
        return int(self.matrix.shape[0])

    @property
    def n_records(self) -> int:
        """Number of records (columns of ``matrix``)."""
        return int(self.matrix.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_targets, n_records)``."""
        return (self.n_targets, self.n_records)

    def estimates(self, weights: np.ndarray) -> np.ndarray:
        """Weighted totals ``A @ w``, shape (n_targets,), for weights of shape (n_records,)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_records,):
            raise ParameterError(f"weights must have shape ({self.n_records},), got {w.shape}")
        return self.matrix @ w

    def support(self) -> np.ndarray:
        """Number of records contributing to each target, shape (n_targets,)."""
        return np.diff(self.matrix.indptr)

    def select_targets(self, keep: np.ndarray | Sequence[str]) -> EstimateMatrix:
        """A copy with only some targets: a boolean mask of length n_targets, or names."""
        mask = self._target_mask(keep)
        names = tuple(n for n, m in zip(self.names, mask, strict=True) if m)
        return EstimateMatrix(
            matrix=self.matrix[mask],
            names=names,
            values=self.values[mask],
            groups=self.groups[mask],
            importance=self.importance[mask],
            tolerance=self.tolerance[mask],
            record_ids=self.record_ids,
            weights=self.weights,
            zero_support=tuple(n for n in self.zero_support if n in set(names)),
        )

    def select_records(self, start: int, stop: int) -> EstimateMatrix:
        """The records ``start:stop`` (a contiguous block, e.g. one rank's shard) with
        every target; ``zero_support`` is not recomputed (it describes the whole matrix)."""
        if not 0 <= start <= stop <= self.n_records:
            raise ParameterError(f"record block {start}:{stop} is outside 0:{self.n_records}")
        return EstimateMatrix(
            matrix=self.matrix[:, start:stop],
            names=self.names,
            values=self.values,
            groups=self.groups,
            importance=self.importance,
            tolerance=self.tolerance,
            record_ids=None if self.record_ids is None else self.record_ids[start:stop],
            weights=self.weights[start:stop],
            zero_support=self.zero_support,
        )

    def _target_mask(self, keep: np.ndarray | Sequence[str], what: str = "mask") -> np.ndarray:
        """A boolean mask of targets from a mask or names; ``what`` names it in errors."""
        arr = np.asarray(keep)
        if arr.dtype == bool:
            if arr.shape != (self.n_targets,):
                raise ParameterError(f"{what} must have shape ({self.n_targets},), got {arr.shape}")
            return arr.copy()
        wanted = [str(x) for x in arr.ravel()]
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in wanted if n not in index]
        if unknown:
            hint = closest(unknown[0], self.names)
            items = [repr(n) for n in unknown]
            items[0] += f" (did you mean {hint!r}?)" if hint else ""
            raise TargetError(
                f"unknown target name {items[0]}" if len(items) == 1
                else f"{len(items):,} unknown target names: {listed(items)}"
            )  # fmt: skip
        mask = np.zeros(self.n_targets, dtype=bool)
        mask[[index[n] for n in wanted]] = True
        return mask

    def to_frame(self) -> pd.DataFrame:
        """Target metadata as a DataFrame (name, value, group, importance, tolerance, support)."""
        return pd.DataFrame(
            {
                "name": list(self.names),
                "value": self.values,
                "group": self.groups,
                "importance": self.importance,
                "tolerance": self.tolerance,
                "support": self.support(),
            }
        )

    @classmethod
    def from_arrays(
        cls,
        matrix: Any,
        values: Any,
        *,
        names: Sequence[str] | None = None,
        groups: Sequence[object] | None = None,
        importance: Any = None,
        tolerance: Any = None,
        weights: Any = None,
    ) -> EstimateMatrix:
        """From a targets x records matrix (scipy sparse or dense) and target values.

        This is l0-python's ``(M, y)`` pair. Names default to ``target_0, target_1, ...``.
        """
        a = _as_csr(matrix, "matrix")
        k = a.shape[0]
        t = _vector(values, k, "targets")
        return cls(
            matrix=a,
            names=tuple(str(n) for n in names) if names is not None else _default_names(k),
            values=t,
            groups=np.asarray(list(groups), dtype=object) if groups is not None else _none(k),
            importance=_vector(importance, k, "importance", 1.0, nonneg=True),
            tolerance=_vector(tolerance, k, "tolerance", 0.0, nonneg=True),
            weights=None if weights is None else _vector(weights, a.shape[1], "weights"),
        )

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, targets: Any, *, weights: Any = None
    ) -> EstimateMatrix:
        """From a dense records x targets DataFrame (microcalibrate's ``estimate_matrix``).

        ``targets`` is a vector in column order, or a mapping / Series keyed by column name.
        """
        names = [str(c) for c in frame.columns]
        if isinstance(targets, (Mapping, pd.Series)):
            lookup = dict(targets.items())
            absent = [n for n in names if n not in lookup]
            if absent:
                raise TargetError(f"no target value for estimate-matrix column {absent[0]!r}")
            targets = [lookup[n] for n in names]
        values = frame.to_numpy(dtype=np.float64)
        return cls.from_arrays(sp.csr_matrix(values.T), targets, names=names, weights=weights)


def _default_names(k: int) -> tuple[str, ...]:
    return tuple(f"target_{i}" for i in range(k))


def _none(k: int) -> np.ndarray:
    return np.full(k, None, dtype=object)


def _as_csr(matrix: Any, label: str) -> sp.csr_matrix:
    if sp.issparse(matrix):
        a = sp.csr_matrix(matrix, dtype=np.float64)
    else:
        arr = np.asarray(matrix, dtype=np.float64)
        if arr.ndim != 2:
            raise ParameterError(f"{label} must be 2-dimensional, got shape {arr.shape}")
        a = sp.csr_matrix(arr)
    a.sum_duplicates()
    if not np.all(np.isfinite(a.data)):
        bad = int(np.count_nonzero(~np.isfinite(a.data)))
        raise ParameterError(f"{label} has {bad} non-finite (NaN or inf) entries")
    return a


def _vector(
    x: Any, n: int, label: str, default: float | None = None, *, nonneg: bool = False
) -> np.ndarray:
    if x is None:
        if default is None:
            raise ParameterError(f"{label} are required")
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.shape != (n,):
        raise ParameterError(f"{label} has length {arr.shape[0]}, expected {n}")
    if not np.all(np.isfinite(arr)):
        raise ParameterError(f"{label} has {int(np.sum(~np.isfinite(arr)))} non-finite values")
    if nonneg and np.any(arr < 0):
        raise ParameterError(f"{label} must be >= 0; {int(np.sum(arr < 0))} are negative")
    return arr


def as_estimate_matrix(matrix: Any, targets: Any = None, *, weights: Any = None) -> EstimateMatrix:
    """Coerce what pipelines already have into an :class:`EstimateMatrix`.

    Accepts an ``EstimateMatrix`` (``targets`` must then be ``None``); a dense records x
    targets DataFrame with target values (microcalibrate); or a targets x records scipy
    sparse matrix / 2-D array with a vector of values (l0-python's ``M``, ``y``).
    """
    if isinstance(matrix, EstimateMatrix):
        if targets is not None:
            raise ParameterError("targets must be None when matrix is an EstimateMatrix")
        return matrix
    if targets is None:
        raise ParameterError("targets (the values to match) are required with a plain matrix")
    if isinstance(matrix, pd.DataFrame):
        return EstimateMatrix.from_frame(matrix, targets, weights=weights)
    return EstimateMatrix.from_arrays(matrix, targets, weights=weights)


# ---------------------------------------------------------------------------- building
def _load(frame_or_path: Any, label: str) -> tuple[pd.DataFrame, str]:
    if isinstance(frame_or_path, pd.DataFrame):
        return frame_or_path, label
    if isinstance(frame_or_path, (str, os.PathLike)):
        return read_table(frame_or_path), Path(frame_or_path).name
    raise ParameterError(f"{label} must be a DataFrame or a path, got {type(frame_or_path)}")


_OPTION = {"id": "--id-column", "weight": "--weight-column",
           "household link": "--person-household-column"}  # fmt: skip


def _column_problem(
    frame: pd.DataFrame, column: str, role: str, taken: tuple[str, ...] = ()
) -> str | None:
    """``taken``: columns with another role, never suggested for this one."""
    if column in frame.columns:
        return None
    hint = closest(column, [str(c) for c in frame.columns if c not in taken])
    option = f"; name it with {_OPTION[role]} (or {_OPTION[role][2:].replace('-', '_')}=)"
    return (
        f"{role} column '{column}' is not in the data"
        + (f" (did you mean '{hint}'?)" if hint else "")
        + option
    )


def _rows(positions: np.ndarray) -> str:
    """``"data rows 1, 4, 9, 12, 20 and 3 more"`` from 0-based positions in a table."""
    shown = ", ".join(str(int(p) + 1) for p in positions[:_MAX_LISTED])
    more = f" and {len(positions) - _MAX_LISTED:,} more" if len(positions) > _MAX_LISTED else ""
    return f"data row{'s' if len(positions) > 1 else ''} {shown}{more}"


def _in_rows(positions: np.ndarray) -> str:
    """``"1 row (data row 2)"``, ``"3 rows (data rows 1, 2, 5)"``."""
    n = len(positions)
    return f"{n:,} row{'s' if n != 1 else ''} ({_rows(positions)})"


def _check_households(
    frame: pd.DataFrame, label: str, id_column: str, weight_column: str
) -> np.ndarray:
    problems = [
        p
        for p in (
            _column_problem(frame, id_column, "id", (weight_column,)),
            _column_problem(frame, weight_column, "weight", (id_column,)),
        )
        if p
    ]
    if problems:
        raise DataError.from_problems(label, problems)
    if len(frame) == 0:
        raise DataError(f"{label}: the table has no rows")
    ids = frame[id_column]
    if ids.isna().any():
        rows = np.flatnonzero(ids.isna().to_numpy())
        problems.append(f"column '{id_column}' is empty in {_in_rows(rows)}")
    dup = ids.duplicated(keep=False).to_numpy() & ~ids.isna().to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        examples = ", ".join(repr(v) for v in pd.unique(ids.iloc[rows])[:_MAX_LISTED].tolist())
        problems.append(
            f"column '{id_column}' must be unique; {len(rows):,} rows share an id "
            f"({_rows(rows)}; ids {examples})"
        )
    w_raw = frame[weight_column]
    if not pd.api.types.is_numeric_dtype(w_raw.dtype) or pd.api.types.is_bool_dtype(w_raw.dtype):
        problems.append(f"column '{weight_column}' must be numeric, got {w_raw.dtype}")
        raise DataError.from_problems(label, problems)
    w = w_raw.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(w)
    if bad.any():
        rows = np.flatnonzero(bad)
        problems.append(
            f"column '{weight_column}' must be finite; missing or infinite in {_in_rows(rows)}"
        )
    neg = np.isfinite(w) & (w < 0)
    if neg.any():
        rows = np.flatnonzero(neg)
        problems.append(f"column '{weight_column}' must be >= 0; negative in {_in_rows(rows)}")
    if not problems and not (w > 0).any():
        problems.append(f"column '{weight_column}' is 0 in every row: no weight to calibrate")
    if problems:
        raise DataError.from_problems(label, problems)
    return w


def _link_persons(
    persons: pd.DataFrame, label: str, link: str, household_ids: pd.Series, hh_label: str
) -> np.ndarray:
    problem = _column_problem(persons, link, "household link", ("person_id",))
    if problem:
        raise DataError(f"{label}: {problem}")
    keys = persons[link]
    pos = pd.Index(household_ids).get_indexer(keys)
    bad = pos < 0
    if bad.any():
        rows = np.flatnonzero(bad)
        examples = ", ".join(repr(v) for v in pd.unique(keys.iloc[rows])[:_MAX_LISTED].tolist())
        raise DataError(
            f"{label}: {len(rows):,} person{' points' if len(rows) == 1 else 's point'} at "
            f"households not in {hh_label} "
            f"(column '{link}', {_rows(rows)}; ids {examples})"
        )
    return pos


class _Entity:
    """An entity table's columns, and for persons the row of each person's household;
    ``label`` names the table in messages."""

    def __init__(
        self,
        frame: pd.DataFrame,
        label: str,
        household_pos: np.ndarray | None = None,
        households: ColumnSource | None = None,
    ) -> None:
        self.source = ColumnSource(frame, parent=households, parent_rows=household_pos)
        self.label = label
        self.household_pos = household_pos  # None for households themselves


def _broadcast(v: Value, n: int, dtype: type) -> np.ndarray:
    data = np.asarray(v.data)
    return np.broadcast_to(data.astype(dtype), (n,)) if data.ndim == 0 else data.astype(dtype)


def _eval_filter(entity: _Entity, text: str) -> np.ndarray:
    value = parse_expression(text).evaluate(entity.source)
    if value.kind != "bool":
        noun = "text" if value.kind == "str" else "a number"
        raise ExpressionError(
            f"a filter must be true/false, got {noun} (use a comparison such as x > 0)"
        )
    msg = missing_message(value)
    if msg:
        raise ExpressionError(msg)
    return _broadcast(value, entity.source.n_rows, bool)


def _eval_variable(entity: _Entity, expr: Expression, mask: np.ndarray) -> np.ndarray:
    value = expr.evaluate(entity.source)
    if value.kind == "str":
        raise ExpressionError("a variable must be numeric, got text")
    data = _broadcast(value, entity.source.n_rows, np.float64)
    if value.missing is not None:
        used = value.missing & mask
        if used.any():
            msg = missing_message(Value(data, "num", used, value.missing_from))
            raise ExpressionError(str(msg))
    bad = ~np.isfinite(data) & mask
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ExpressionError(
            f"the variable gives non-finite values (inf or NaN) in {len(rows):,} "
            f"row{'s' if len(rows) != 1 else ''} of {entity.label} ({_rows(rows)})"
        )
    return data


def build_estimate_matrix(
    households: pd.DataFrame | str | os.PathLike[str],
    targets: str | os.PathLike[str] | pd.DataFrame | Sequence[Target],
    persons: pd.DataFrame | str | os.PathLike[str] | None = None,
    *,
    id_column: str = "household_id",
    weight_column: str = "household_weight",
    person_household_column: str = "person_household_id",
    allow_zero_support: bool = False,
    table_names: dict[str, str] | None = None,
) -> EstimateMatrix:
    """Build the sparse estimate matrix from microdata and a targets table.

    Parameters
    ----------
    households : DataFrame or path
        One row per record: a unique id column, a finite non-negative weight column, and
        the variables the targets use.
    targets : path, DataFrame or sequence of Target
        See :func:`read_targets` and ``docs/targets.md``.
    persons : DataFrame or path, optional
        One row per person, linked to ``households`` by ``person_household_column``;
        needed by targets with ``entity = person``. Their expressions may also use
        household columns the persons table lacks (each person gets its household's value).
    id_column, weight_column, person_household_column : str
        Column names (PolicyEngine's defaults).
    allow_zero_support : bool, default False
        Keep targets no record contributes to as all-zero rows (listed in
        ``zero_support``) instead of reporting them as errors.
    table_names : dict, optional
        How messages name the ``"households"`` and ``"persons"`` tables given as frames
        (e.g. the files they were read from). Default: those words (a path's file name).

    Returns
    -------
    EstimateMatrix
        CSR float64 matrix of shape (n_targets, n_households), households in input order.

    Raises
    ------
    DataError
        Bad microdata: missing id/weight columns, duplicate ids, non-finite or negative
        weights, persons linked to unknown households.
    TargetError
        Every target that cannot be evaluated, each named with its row and column.

    Example
    -------
    >>> import pandas as pd
    >>> hh = pd.DataFrame({"household_id": [1, 2, 3], "household_weight": [10.0, 20.0, 30.0],
    ...                    "state": ["CA", "NY", "CA"], "income": [100.0, 0.0, 50.0]})
    >>> tg = pd.DataFrame({"name": ["hh_CA", "income"], "value": [45, 6000],
    ...                    "filter": ['state == "CA"', None], "variable": [None, "income"]})
    >>> em = build_estimate_matrix(hh, tg)
    >>> em.matrix.toarray()
    array([[  1.,   0.,   1.],
           [100.,   0.,  50.]])
    """
    labels = dict(table_names or {})
    hh_frame, hh_label = _load(households, labels.get("households", "households"))
    weights = _check_households(hh_frame, hh_label, id_column, weight_column)
    # Rows that cannot be parsed are reported together with those that cannot be evaluated.
    target_list, problems, tg_label = _read_targets(targets, None)
    n = len(hh_frame)

    entities: dict[str, _Entity] = {"household": _Entity(hh_frame, hh_label)}
    if persons is not None:
        p_frame, p_label = _load(persons, labels.get("persons", "persons"))
        pos = _link_persons(
            p_frame, p_label, person_household_column, hh_frame[id_column], hh_label
        )
        entities["person"] = _Entity(p_frame, p_label, pos, entities["household"].source)

    zero: list[str] = []

    indptr = [0]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for t in target_list:
        entity = entities.get(t.entity)
        if entity is None:
            # One cause however many targets it touches: one line of the message.
            problems.append((t.row or 0, t.name, "entity 'person' needs a persons table, and "
                             "none was given (--persons FILE)"))  # fmt: skip
            continue
        m = entity.source.n_rows
        column = "filter"
        try:
            mask = _eval_filter(entity, t.filter) if t.filter else np.ones(m, dtype=bool)
            column = "variable"
            if t.variable:
                contrib = _eval_variable(entity, parse_expression(t.variable), mask)
                contrib = np.where(mask, contrib, 0.0)
            else:
                contrib = mask.astype(np.float64)
        except ExpressionError as exc:
            problems.append((t.row or 0, t.name, f"column '{column}': {exc}"))
            continue
        if entity.household_pos is not None:
            nz = contrib != 0
            contrib = np.bincount(entity.household_pos[nz], weights=contrib[nz], minlength=n)
        idx = np.flatnonzero(contrib)
        if idx.size == 0:
            if not allow_zero_support:
                what = (
                    "its filter selects no record" if not mask.any() else "every contribution is 0"
                )
                message = (
                    f"zero support: {what}, so no weighting can reach "
                    f"{t.value:g} (fix the filter or remove the target)"
                )
                problems.append((t.row or 0, t.name, message))
                continue
            zero.append(t.name)
        indices.append(idx)
        data.append(contrib[idx])
        indptr.append(indptr[-1] + idx.size)
    if problems:
        # Parse problems and evaluation problems together, in file row order.
        raise _target_error(tg_label, problems)

    matrix = sp.csr_matrix(
        (
            np.concatenate(data) if data else np.empty(0),
            np.concatenate(indices) if indices else np.empty(0, dtype=np.int64),
            np.asarray(indptr, dtype=np.int64),
        ),
        shape=(len(target_list), n),
    )
    return EstimateMatrix(
        matrix=matrix,
        names=tuple(t.name for t in target_list),
        values=np.array([t.value for t in target_list], dtype=np.float64),
        groups=np.array([t.group for t in target_list], dtype=object),
        importance=np.array([t.importance for t in target_list], dtype=np.float64),
        tolerance=np.array([t.tolerance for t in target_list], dtype=np.float64),
        record_ids=hh_frame[id_column].to_numpy(),
        weights=weights,
        zero_support=tuple(zero),
    )
