"""Reading and writing tables (CSV, Parquet), with clear errors and atomic writes.

These are the readers the command line uses; they are public so a pipeline reads its files
exactly as the CLI would.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib.exceptions import DataError, OutputError, listed

__all__ = [
    "atomic_dir",
    "atomic_path",
    "count_rows",
    "partial_path",
    "read_table",
    "remove_stale_partials",
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
        that names such as ``01`` keep their leading zero; only empty cells are missing
        (``nan`` or ``NA`` stay text). Ignored for Parquet.
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
    except Exception as exc:  # pyarrow raises its own exception types for corrupt files
        wanted = [*(columns or []), *([where[0]] if where is not None else [])]
        missing = _missing_columns(p, fmt, wanted) if wanted else []
        if missing:
            raise DataError(f"{p}: {_not_in_file(missing)}") from None
        raise DataError(f"{p}: cannot read {fmt} file: {_reason(exc, p)}") from None
    missing = [c for c in columns or [] if c not in frame.columns]
    if missing:
        raise DataError(f"{p}: {_not_in_file(missing)}")
    if frame.shape[1] == 0:
        raise DataError(f"{p}: file has no columns")
    return frame


def _not_in_file(missing: list[str]) -> str:
    if len(missing) == 1:
        return f"column {missing[0]!r} is not in the file"
    return f"columns {listed([repr(c) for c in missing])} are not in the file"


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
        raise DataError(f"{p}: cannot read {fmt} file: {_reason(exc, p)}") from None


def _reason(exc: BaseException, p: Path) -> str:
    """What went wrong, in one line and without the file's name (the message says it
    first): an OSError's reason, else the first line of the library's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(exc).strip())
    lines = text.replace(f" '{p}'", "").splitlines()
    head = lines[0] if lines else ""
    if isinstance(exc, (ValueError, KeyError)) and head:
        return head
    return f"{type(exc).__name__}: {head}" if head else type(exc).__name__


def _missing_columns(p: Path, fmt: str, wanted: list[str]) -> list[str]:
    """Which of ``wanted`` the file's header lacks ([] when it cannot tell)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            present = set(pq.read_schema(p).names)
        else:
            present = {str(c) for c in pd.read_csv(p, nrows=0, encoding="utf-8-sig").columns}
    except Exception:
        return []
    return [c for c in dict.fromkeys(wanted) if c not in present]


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
    # The index keeps each row's position in the file (see write_frame's ``source``).
    parts = [chunk[chunk[column].isin(keep)] for chunk in
             _read_csv(p, columns, text, chunksize=1_000_000)]  # fmt: skip
    return pd.concat(parts) if parts else pd.DataFrame(columns=columns)


def _read_csv(p: Path, columns: list[str] | None, text: bool, **kwargs: Any) -> Any:
    try:
        if text:  # every cell as written; only an empty one is missing ("nan" is text)
            kwargs.update(dtype=str, keep_default_na=False, na_values=[""])
        else:
            kwargs.update(dtype={c: str for c in _code_columns(p)})
        return pd.read_csv(p, usecols=columns, encoding="utf-8-sig", low_memory=False, **kwargs)
    except UnicodeDecodeError as exc:
        line = _line_of_byte(p, exc.start)
        raise DataError(
            f"{p}: line {line}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: file has no header row (it is empty)") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{p}: {_malformed(exc)}") from None


_CODES: dict[tuple[str, int, int], list[str]] = {}


def _code_columns(p: Path) -> list[str]:
    """Columns of a CSV file that hold codes, not numbers: some value has a leading zero
    (``01612596057020``, ZIP ``02134``, FIPS ``06``) or more digits than a float keeps.
    They are read as text, so they mean in a filter and come out exactly what the file
    says, as they would from Parquet. One scan per file version, remembered."""
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CODES:
        found: set[str] = set()
        batches = _csv_text_batches(p)
        if batches is not None:
            names, stream = batches
            for _, batch in stream:
                for k, name in enumerate(names):
                    if name not in found and _has_codes(batch.column(k)):
                        found.add(name)
        if len(_CODES) > 32:
            _CODES.clear()
        _CODES[key] = sorted(found)
    return _CODES[key]


def _has_codes(column: Any) -> bool:
    """Whether some text of an Arrow string column matches ``_LOSSY`` (a leading zero
    before a digit, or 16+ digits), by cheap kernels first: a regex over every cell of a
    numeric column costs more than reading the file."""
    import pyarrow.compute as pc

    def digit_at(values: Any, i: int) -> bool:
        return bool(pc.any(pc.utf8_is_digit(pc.utf8_slice_codeunits(values, i, i + 1))).as_py())

    zero = pc.filter(column, pc.starts_with(column, "0"))
    if len(zero) and digit_at(zero, 1):
        return True
    signed = pc.filter(column, pc.or_(pc.starts_with(column, "-0"), pc.starts_with(column, "+0")))
    if len(signed) and digit_at(signed, 2):
        return True
    long = pc.filter(column, pc.greater_equal(pc.binary_length(column), 16))
    return len(long) > 0 and bool(pc.any(pc.match_substring_regex(long, _LOSSY.pattern)).as_py())


def _csv_text_batches(p: Path) -> tuple[list[str], Iterator[tuple[int, Any]]] | None:
    """The header names and ``(first row, record batch)`` of every cell as text, by
    pyarrow's streaming reader (fast, little memory); None when it cannot read the file
    (pandas then reads it, and reports any problem itself)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        names = [str(c) for c in pd.read_csv(p, nrows=0, encoding="utf-8-sig").columns]
        keys = [f"c{i}" for i in range(len(names))]
        reader = pcsv.open_csv(
            p,
            read_options=pcsv.ReadOptions(skip_rows=1, column_names=keys, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(keys, pa.string()), strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )  # fmt: skip
    except Exception:
        return None

    def stream() -> Iterator[tuple[int, Any]]:
        at = 0
        try:
            for batch in reader:
                yield at, batch
                at += batch.num_rows
        except Exception:
            return

    return names, stream()


def _malformed(exc: Exception) -> str:
    """pandas' tokenizer error as ``line N: what`` (lines of the file, the header line 1)."""
    text = str(exc).strip()
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if m:
        return f"line {m[2]}: {m[3]} fields where the header has {m[1]} (malformed CSV)"
    m = re.search(r"EOF inside string starting at row (\d+)", text)
    if m:  # pandas counts that row from 0, the header included
        return f"line {int(m[1]) + 1}: a quoted cell is never closed (malformed CSV)"
    return f"malformed CSV: {text.splitlines()[0] if text else type(exc).__name__}"


def _line_of_byte(p: Path, offset: int) -> int:
    with open(p, "rb") as f:
        return f.read(offset).count(b"\n") + 1


# Temporary names: ``.<name>.<pid>-<random>.l0calib.partial`` beside the file they become.
# The pid lets a later run remove the leftovers of a killed run (its pid is gone) without
# touching a running one's; nothing else is ever removed.
_PARTIAL = ".l0calib.partial"
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.l0calib\.partial$")


def partial_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path`` (not created): ``.<name>.<pid>-<hex>``
    ``.l0calib.partial``, the only names :func:`remove_stale_partials` removes."""
    target = Path(path)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{_PARTIAL}")


def remove_stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files (or directories) of ``path`` left by killed runs.

    Only names :func:`partial_path` makes for this very ``path``, whose process id is no
    longer running, are removed. Returns what was removed.
    """
    target = Path(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent if str(target.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL_RE.match(entry.name)
        if m is None or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        stale = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    If the body raises (or is interrupted), the temporary file is removed and ``path`` is
    left as it was, so no partial output is ever visible. Leftovers of a killed run
    writing the same ``path`` are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = partial_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; its files go into ``path`` only on success.

    Only files are placed (a flat directory). An existing ``path`` is never removed: with
    ``overwrite``, files it holds that a previous l0calib write listed in its manifest may
    be replaced; any other existing file of the same name is a :class:`DataError`. See
    :class:`l0calib.outputs.OutputPlan`, which does this for a whole run.
    """
    from l0calib.outputs import OutputPlan

    plan = OutputPlan(report_dir=Path(path), force=overwrite)
    with plan.transaction() as tx:
        yield tx.report_dir_temp


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` as CSV or Parquet (by extension), atomically.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputError
        When the file system refuses (full disk, read-only, a parent that is a file...):
        ``"<path>: <reason>"``; nothing is left behind.
    """
    p = Path(path)
    table_format(p)  # refuse an unsupported extension before writing anything
    try:
        with atomic_path(p) as tmp:
            write_frame(frame, tmp, like=p)
    except OSError as exc:
        raise os_error(exc, p) from None
    return p


def write_frame(
    frame: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    computed: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Write ``frame`` to ``path`` (not atomically) in the format ``like``'s name implies.

    For writing into a temporary file that is renamed to ``like`` later (see
    :func:`atomic_path` and :class:`l0calib.outputs.OutputPlan`).

    With ``source``, a CSV file ``frame``'s rows came from (its index holding their 0-based
    row positions in that file), every column not in ``computed`` is given back as it was
    in the file: the same text in a CSV output (ids such as ``01612596057020`` keep their
    leading zero, ``1.10`` stays ``1.10``); in a Parquet output, the columns whose numbers
    would lose something (a leading zero, more than 15 digits) stay text.
    """
    if source is not None and table_format(source) == "csv":
        frame = _with_source_text(frame, Path(source), set(computed),
                                  all_text=table_format(like) == "csv")  # fmt: skip
    if table_format(like) == "csv":
        frame.to_csv(path, index=False, compression=_compression(Path(like)))
    else:
        frame.to_parquet(path, index=False)


# A leading zero, or more digits than a float64 keeps: a code, not a number.
_LOSSY = re.compile(r"^[+-]?0\d|^[+-]?\d{16,}$")


def _with_source_text(
    frame: pd.DataFrame, source: Path, computed: set[str], *, all_text: bool
) -> pd.DataFrame:
    index = frame.index
    if len(frame) == 0 or not index.is_unique or not pd.api.types.is_integer_dtype(index):
        return frame
    batches = _csv_text_batches(source)
    if batches is None:
        return frame
    import pyarrow as pa

    names, stream = batches
    wanted = [i for i, c in enumerate(names) if c in frame.columns and c not in computed]
    positions = np.sort(index.to_numpy())
    parts = []
    for at, batch in stream:
        lo, hi = np.searchsorted(positions, [at, at + batch.num_rows])
        if hi > lo:
            parts.append(batch.select(wanted).take(pa.array(positions[lo:hi] - at)))
    if sum(b.num_rows for b in parts) != len(frame):
        return frame  # rows not from this file: keep the values as they are
    table = pa.Table.from_batches(parts).rename_columns([names[i] for i in wanted])
    text = table.to_pandas()
    text.index = positions
    text = text.loc[index]
    out = frame.copy()
    for column in text.columns:
        if frame[column].dtype == object and not all_text:
            continue  # already text
        values = text[column]
        if all_text:
            out[column] = values.to_numpy()
        elif values.str.match(_LOSSY).any():
            out[column] = values.where(values != "", None).to_numpy()
    return out


def _compression(p: Path) -> str | None:
    return _COMPRESSION.get(p.suffix.lower())


def os_error(exc: OSError, path: str | os.PathLike[str]) -> OutputError:
    """An :class:`OutputError` ``"<path>: <reason>"`` for an operating-system error."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename and not _is_partial(exc.filename) else path
    return OutputError(f"{where}: {reason}")


def _is_partial(name: Any) -> bool:
    return isinstance(name, (str, os.PathLike)) and str(name).endswith(_PARTIAL)
