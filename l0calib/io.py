"""Reading and writing tables (CSV, Parquet), with clear errors and atomic writes.

These are the readers the command line uses; they are public so a pipeline reads its files
exactly as the CLI would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib.exceptions import DataError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "count_rows",
    "read_table",
    "table_format",
    "write_frame",
    "write_table",
]

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# Compressed CSV: the suffix after .csv, and pandas' name for the codec.
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz"}


def table_format(path: str | os.PathLike[str]) -> str:
    """``"csv"`` or ``"parquet"`` from a file name (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``).

    Raises
    ------
    DataError
        For any other extension.
    """
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if len(suffixes) >= 2 and suffixes[-2] == ".csv" and suffixes[-1] in _COMPRESSION:
        return "csv"
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{p}: unsupported file extension {p.suffix or '(none)'!r}; "
            "expected .csv (optionally .gz/.bz2/.zip/.xz), .parquet or .pq"
        )
    return fmt


def read_table(
    path: str | os.PathLike[str],
    *,
    columns: list[str] | None = None,
    text_columns: bool = False,
    rows: tuple[int, int] | None = None,
    where: tuple[str, Any] | None = None,
) -> pd.DataFrame:
    """Read a CSV or Parquet file into a DataFrame.

    CSV files must be UTF-8 (a byte-order mark is accepted). String columns stay strings;
    empty CSV cells become missing values.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its extension picks the format (see :func:`table_format`).
    columns : list of str, optional
        Read only these columns (every one must exist).
    text_columns : bool, default False
        Read every CSV column as text (no type inference), as the targets reader does so
        that names such as ``01`` keep their leading zero. Ignored for Parquet.
    rows : (start, stop), optional
        Read only rows ``start:stop`` (0-based, header excluded): one process's share of a
        large file. Parquet reads only the row groups that overlap; CSV streams through the
        file keeping only those rows. The index still counts from 0.
    where : (column, values), optional
        Keep only rows whose ``column`` is in ``values`` (e.g. the persons of some
        households). Parquet pushes the filter into the reader; CSV filters in chunks.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    DataError
        If the file is missing, unreadable, empty, not UTF-8, or lacks a requested column.
        The message names the file (and the line or byte for encoding problems).

    Example
    -------
    >>> import pandas as pd, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "h.csv")
    >>> pd.DataFrame({"household_id": [1, 2], "household_weight": [10.0, 20.0]}).to_csv(
    ...     path, index=False)
    >>> read_table(path).shape
    (2, 2)
    """
    p = Path(path)
    fmt = table_format(p)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a {fmt} file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    try:
        if rows is not None:
            frame = _read_rows(p, fmt, columns, text_columns, rows)
        elif where is not None:
            frame = _read_where(p, fmt, columns, text_columns, where)
        elif fmt == "csv":
            frame = _read_csv(p, columns, text_columns)
        else:
            frame = pd.read_parquet(p, columns=columns)
    except DataError:
        raise
    except (ValueError, KeyError) as exc:
        if columns is not None:
            raise DataError(f"{p}: cannot read columns {columns}: {exc}") from None
        raise DataError(f"{p}: cannot read {fmt} file: {exc}") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read {fmt} file: {exc}") from None
    except Exception as exc:  # pyarrow raises its own exception types for corrupt files
        raise DataError(f"{p}: cannot read {fmt} file: {type(exc).__name__}: {exc}") from None
    if frame.shape[1] == 0:
        raise DataError(f"{p}: file has no columns")
    return frame


def count_rows(path: str | os.PathLike[str]) -> int:
    """Number of data rows of a CSV or Parquet file (Parquet: from its metadata)."""
    p = Path(path)
    fmt = table_format(p)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(p).metadata.num_rows)
        first = pd.read_csv(p, nrows=0, encoding="utf-8-sig").columns[:1].tolist()
        chunks = pd.read_csv(p, usecols=first, chunksize=1_000_000, encoding="utf-8-sig")
        return sum(len(c) for c in chunks)
    except Exception as exc:
        raise DataError(f"{p}: cannot read {fmt} file: {type(exc).__name__}: {exc}") from None


def _read_rows(
    p: Path, fmt: str, columns: list[str] | None, text: bool, rows: tuple[int, int]
) -> pd.DataFrame:
    start, stop = rows
    if not 0 <= start <= stop:
        raise DataError(f"{p}: invalid row range {start}:{stop}")
    if fmt == "csv":
        return _read_csv(p, columns, text, skiprows=range(1, start + 1), nrows=stop - start)
    import pyarrow.parquet as pq

    f = pq.ParquetFile(p)
    groups, first, at = [], None, 0
    for g in range(f.num_row_groups):
        size = f.metadata.row_group(g).num_rows
        if at + size > start and at < stop:
            groups.append(g)
            first = at if first is None else first
        at += size
    if not groups:
        return f.schema_arrow.empty_table().to_pandas()[columns or slice(None)]
    table = f.read_row_groups(groups, columns=columns)
    table = table.slice(start - first, stop - start)  # type: ignore[operator]
    return table.to_pandas().reset_index(drop=True)


def _read_where(
    p: Path, fmt: str, columns: list[str] | None, text: bool, where: tuple[str, Any]
) -> pd.DataFrame:
    column, values = where
    keep = pd.Index(np.asarray(values))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p, columns=columns, filters=[(column, "in", keep.tolist())])
        return table.to_pandas().reset_index(drop=True)
    parts = [chunk[chunk[column].isin(keep)] for chunk in
             _read_csv(p, columns, text, chunksize=1_000_000)]  # fmt: skip
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _read_csv(p: Path, columns: list[str] | None, text: bool, **kwargs: Any) -> Any:
    try:
        return pd.read_csv(
            p, usecols=columns, encoding="utf-8-sig", low_memory=False,
            dtype=str if text else None, **kwargs,
        )  # fmt: skip
    except UnicodeDecodeError as exc:
        line = _line_of_byte(p, exc.start)
        raise DataError(
            f"{p}: line {line}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: file has no header row (it is empty)") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{p}: malformed CSV: {exc}") from None


def _line_of_byte(p: Path, offset: int) -> int:
    with open(p, "rb") as f:
        return f.read(offset).count(b"\n") + 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    If the body raises (or is interrupted), the temporary file is removed and ``path`` is
    left as it was, so no partial output is ever visible.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give it the mode a normal open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` only on success.

    An existing ``path`` is replaced only with ``overwrite``; otherwise it is a
    :class:`DataError`. On failure the temporary directory is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise DataError(f"{path}: already exists (use --force / overwrite=True)")
            shutil.rmtree(path)
        os.replace(tmp, path)
        os.chmod(path, 0o777 & ~_umask())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` as CSV or Parquet (by extension), atomically.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    p = Path(path)
    table_format(p)  # refuse an unsupported extension before writing anything
    with atomic_path(p) as tmp:
        write_frame(frame, tmp, like=p)
    return p


def write_frame(frame: pd.DataFrame, path: Path, *, like: Path) -> None:
    """Write ``frame`` to ``path`` (not atomically) in the format ``like``'s name implies.

    For writing into a temporary file that is renamed to ``like`` later (see
    :func:`atomic_path`).
    """
    if table_format(like) == "csv":
        frame.to_csv(path, index=False, compression=_compression(like))
    else:
        frame.to_parquet(path, index=False)


def _compression(p: Path) -> str | None:
    return _COMPRESSION.get(p.suffix.lower())
