"""Every output of a run, planned, checked and committed together: all or nothing.

A run writes several things: the main table (``-o``), the persons of the kept records, one
table per other entity, the report directory and the per-target log. :class:`OutputPlan`
names them (everything after the main table's stem: ``<stem>_persons``, ``<stem>_<entity>``,
``<stem>_report/``), and refuses, before any work is done:

- two outputs that are the same file, or an output that is an input (links resolved);
- an existing output without ``force``;
- an output whose parent is a file, a report directory that is a file, a directory where
  a file is to go, a directory that cannot be written (read-only file system, permissions);
- in an existing report directory, any file of the same name as a report file that an
  earlier l0calib write did not list in that directory's manifest (``.l0calib-report.json``).
  A report directory is never removed: only the files l0calib wrote there are replaced.

:meth:`OutputPlan.transaction` then hands out temporary names beside each output
(``.<name>.<pid>-<hex>.l0calib.partial``); everything is written there, and only when all
of it is written are the files moved into place, the main table last. If anything fails
(an error, a full disk, Ctrl-C, SIGTERM), the temporary files are removed and any file
already replaced is put back, so the previous outputs (or nothing) remain. Leftovers of a
run killed outright (SIGKILL) are removed by the next run that writes the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from l0calib._version import __version__
from l0calib.exceptions import OutputError, ParameterError
from l0calib.hdf5 import is_hdf5
from l0calib.io import (
    _COMPRESSION,
    os_error,
    partial_path,
    remove_stale_partials,
    table_format,
    write_frame,
)

__all__ = ["REPORT_MANIFEST", "OutputPlan", "output_names"]

REPORT_MANIFEST = ".l0calib-report.json"
# What a report directory holds (l0calib.report.write_report_files writes them). Checked
# before the fit; the files actually written are checked again when they are placed.
REPORT_FILES = (
    "targets.csv", "history.csv", "summary.json", "weight_ratios.csv", "report.html",
)  # fmt: skip
_ENTITY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def _split(path: Path) -> tuple[str, str]:
    """``("out", ".csv.gz")`` for ``out.csv.gz``: the stem and the format's extension."""
    suffixes = path.suffixes
    if (
        len(suffixes) >= 2
        and suffixes[-2].lower() == ".csv"
        and (suffixes[-1].lower() in _COMPRESSION)
    ):
        ext = "".join(suffixes[-2:])
    else:
        ext = path.suffix
    return path.name[: len(path.name) - len(ext)] if ext else path.name, ext


def output_names(
    microdata: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    persons: str | os.PathLike[str] | None = None,
    entities: dict[str, str | os.PathLike[str]] | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    suffix: str = "reweighted",
) -> dict[str, Path]:
    """The output paths of a run, by role.

    ``table``: ``output``, default ``<microdata stem>_<suffix>.parquet`` in the current
    directory; ``persons``: ``<stem>_persons<ext>`` beside it; ``entity:<name>``:
    ``<stem>_<name><ext>``, where ``<stem>`` is the main table's stem and ``<ext>`` the
    extension (so the format) of that table's input; ``report``: ``report_dir``, default
    ``<stem>_report``.
    """
    src_stem, _ = _split(Path(microdata))
    out = Path(output) if output is not None else Path(f"{src_stem}_{suffix}.parquet")
    stem, _ = _split(out)
    names: dict[str, Path] = {"table": out}
    if persons is not None:
        names["persons"] = out.with_name(f"{stem}_persons{_split(Path(persons))[1]}")
    for name, path in (entities or {}).items():
        if not _ENTITY_NAME.match(name):
            raise ParameterError(
                f"entity name {name!r}: use letters, digits, '_' and '-' only (it names "
                "the output file)"
            )
        names[f"entity:{name}"] = out.with_name(f"{stem}_{name}{_split(Path(path))[1]}")
    names["report"] = (
        Path(report_dir) if report_dir is not None else out.with_name(f"{stem}_report")
    )
    return names


def _role(role: str) -> str:
    """How a role is named in messages."""
    if role.startswith("entity:"):
        return f"--entity {role[7:]} output"
    return {
        "table": "output (-o)",
        "persons": "persons output",
        "log": "log (--log)",
        "report": "report directory (--report-dir)",
    }.get(role, role)


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _same(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:  # hard links, bind mounts
        return os.path.samefile(a, b)
    except OSError:
        return False


def _manifest(directory: Path) -> set[str]:
    """File names an earlier l0calib write listed in ``directory``'s manifest."""
    try:
        data = json.loads((directory / REPORT_MANIFEST).read_text())
        return {f for f in data.get("files", []) if isinstance(f, str) and "/" not in f}
    except (OSError, ValueError, AttributeError):
        return set()


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _as_given(path: Path, ancestor: Path) -> Path:
    """``ancestor`` (an absolute parent of ``path``) as the user wrote it: ``notes.txt``
    for ``notes.txt/o.csv``, not its absolute path."""
    up = len(Path(os.path.abspath(path)).parts) - len(ancestor.parts)
    return Path(*path.parts[: len(path.parts) - up]) if 0 <= up < len(path.parts) else ancestor


def _check_place(path: Path, role: str, *, directory: bool = False) -> None:
    """``path`` can be created: no parent is a file, the parent is writable."""
    parent = _nearest_existing(path.parent if not directory or not path.exists() else path)
    if not parent.is_dir():
        raise OutputError(f"{path}: {_as_given(path, parent)} is not a directory")
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise OutputError(f"{path}: read-only file system ({parent})")
    except OSError:
        pass
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: permission denied (cannot write in {parent})")


@dataclass
class OutputPlan:
    """The outputs of one run: checked on creation, written by :meth:`transaction`.

    Parameters
    ----------
    tables : dict role -> path
        Table outputs by role (``table``, ``persons``, ``entity:<name>``, or any other);
        each is written in the format its extension names.
    report_dir : path, optional
        The report directory (see the module docstring for what may be replaced there).
    log : path, optional
        A file written by the fit itself (``calibrate(log_path=...)``); the transaction
        hands out its temporary name.
    inputs : dict label -> path
        Files the run reads; no output may be one of them.
    force : bool
        Replace existing outputs (never inputs, never files l0calib did not write in a
        report directory).

    Raises
    ------
    OutputError
        Naming the path and what is wrong, before anything is written.

    Example
    -------
    >>> import pandas as pd, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> plan = OutputPlan({"table": d / "out.csv"}, inputs={"microdata": d / "in.csv"})
    >>> with plan.transaction() as tx:
    ...     tx.write_table("table", pd.DataFrame({"x": [1]}))
    >>> (d / "out.csv").read_text()
    'x\\n1\\n'
    """

    tables: dict[str, Path] = field(default_factory=dict)
    report_dir: Path | None = None
    log: Path | None = None
    inputs: dict[str, Path] = field(default_factory=dict)
    force: bool = False
    report_files: tuple[str, ...] = REPORT_FILES

    def __post_init__(self) -> None:
        self.tables = {r: Path(p) for r, p in self.tables.items()}
        self.inputs = {r: Path(p) for r, p in self.inputs.items() if p is not None}
        self.report_dir = None if self.report_dir is None else Path(self.report_dir)
        self.log = None if self.log is None else Path(self.log)
        self.check()

    # ------------------------------------------------------------------ checking
    def files(self) -> dict[str, Path]:
        """Every output file by role (the report directory's files as ``report:<name>``)."""
        out = dict(self.tables)
        if self.log is not None:
            out["log"] = self.log
        if self.report_dir is not None:
            out.update({f"report:{f}": self.report_dir / f for f in self.report_files})
        return out

    def check(self, report_files: tuple[str, ...] | None = None) -> None:
        """Refuse collisions, existing outputs (without force) and unwritable places."""
        for role, path in self.tables.items():
            if is_hdf5(path):
                continue  # written whole by l0calib.hdf5.write_hdf5 into Transaction.path
            try:
                table_format(path)
            except Exception as exc:
                raise OutputError(f"{exc} ({_role(role)})") from None
        files = self.files()
        seen: dict[str, tuple[str, Path]] = {}
        for role, path in files.items():
            label = _role(role) if not role.startswith("report:") else "report file"
            k = _key(path)
            if k in seen:
                other = seen[k][0]
                raise OutputError(
                    f"{path}: would be written twice, as the {other} and as the {label}; "
                    "choose other names"
                )
            seen[k] = (label, path)
            for in_label, in_path in self.inputs.items():
                if _same(path, in_path):
                    raise OutputError(
                        f"{path}: the {label} would replace the input {in_label} ({in_path}); "
                        "inputs are never overwritten, choose another output"
                    )
        for role, path in files.items():
            if role.startswith("report:"):
                continue
            if path.is_dir():
                raise OutputError(f"{path}: is a directory (the {_role(role)})")
            _check_place(path, role)
            if os.path.lexists(path) and not self.force:
                raise OutputError(f"{path}: already exists (use --force to overwrite)")
        if self.report_dir is not None:
            d = self.report_dir
            for k, (label, _) in seen.items():
                if k == _key(d):
                    raise OutputError(f"{d}: is both the report directory and the {label}")
            for in_label, in_path in self.inputs.items():
                if _same(d, in_path) and not in_path.is_dir():
                    raise OutputError(f"{d}: the report directory is the input {in_label}")
            if os.path.lexists(d) and not d.is_dir():
                raise OutputError(f"{d}: exists and is not a directory (--report-dir)")
            _check_place(d, "report", directory=True)
            self._check_report_files(report_files or self.report_files)

    def _check_report_files(self, names: tuple[str, ...] | list[str]) -> None:
        d = self.report_dir
        assert d is not None
        if not d.is_dir():
            return
        ours = _manifest(d)
        for name in names:
            dest = d / name
            if not os.path.lexists(dest):
                continue
            if name not in ours or dest.is_dir() or dest.is_symlink():
                raise OutputError(
                    f"{dest}: exists and was not written by l0calib; it is never replaced "
                    "(choose another --report-dir)"
                )
            if not self.force:
                raise OutputError(f"{dest}: already exists (use --force to overwrite)")

    def remove_stale(self) -> None:
        """Remove temporary files of killed runs that wrote these same outputs."""
        for path in self.files().values():
            remove_stale_partials(path)
        if self.report_dir is not None:
            remove_stale_partials(self.report_dir)
            if self.report_dir.is_dir():
                remove_stale_partials(self.report_dir / REPORT_MANIFEST)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Temporary names for every output; all moved into place when the block ends
        without an exception, all removed (and replaced files restored) otherwise."""
        self.remove_stale()
        tx = Transaction(self)
        try:
            yield tx
            tx.commit()
        except BaseException:
            tx.rollback()
            raise


class Transaction:
    """Temporary files of an :class:`OutputPlan` (made by :meth:`OutputPlan.transaction`)."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self._temps: dict[str, Path] = {}
        self._made_dirs: list[Path] = []
        self._report_tmp: Path | None = None
        self._report_inside = False
        self._placed: list[tuple[Path, Path | None]] = []  # (dest, backup of the old one)
        self._renamed_dir: tuple[Path, Path] | None = None
        self._removed_later: list[Path] = []

    def _make_parents(self, path: Path) -> None:
        missing = []
        p = Path(os.path.abspath(path.parent))
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise os_error(exc, d) from None
            self._made_dirs.append(d)

    def path(self, role: str) -> Path:
        """The temporary path of output ``role`` (a table role, or ``log``); created empty."""
        if role in self._temps:
            return self._temps[role]
        dest = self.plan.files().get(role)
        if dest is None or role.startswith("report:"):
            raise ParameterError(f"no output {role!r} in this plan")
        self._make_parents(dest)
        tmp = partial_path(dest)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise os_error(exc, dest) from None
        self._temps[role] = tmp
        return tmp

    def write_table(
        self,
        role: str,
        frame: pd.DataFrame,
        *,
        source: str | os.PathLike[str] | None = None,
        computed: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Write ``frame`` to output ``role``'s temporary file, in its format (``source``
        and ``computed``: see :func:`l0calib.io.write_frame`)."""
        tmp = self.path(role)
        dest = self.plan.tables[role]
        try:
            write_frame(frame, tmp, like=dest, source=source, computed=computed)
        except OSError as exc:
            raise os_error(exc, dest) from None

    @property
    def report_dir_temp(self) -> Path:
        """A temporary directory for the report's files (flat: files only)."""
        if self._report_tmp is not None:
            return self._report_tmp
        d = self.plan.report_dir
        if d is None:
            raise ParameterError("this plan has no report directory")
        self._report_inside = d.is_dir()
        if self._report_inside:
            tmp = partial_path(d / REPORT_MANIFEST)
        else:
            self._make_parents(d)
            tmp = partial_path(d)
        try:
            tmp.mkdir()
        except OSError as exc:
            raise os_error(exc, d) from None
        self._report_tmp = tmp
        return tmp

    def write_report(self, write: Callable[[Path], Any]) -> None:
        """Call ``write(directory)`` to fill the report's temporary directory."""
        tmp = self.report_dir_temp
        try:
            write(tmp)
        except OSError as exc:
            raise os_error(exc, self.plan.report_dir or tmp) from None

    # ------------------------------------------------------------------ commit / rollback
    def _place(self, tmp: Path, dest: Path) -> None:
        backup = None
        if os.path.lexists(dest) and not self.plan.force:
            # It appeared while the run was fitting: still not ours to replace.
            raise OutputError(f"{dest}: already exists (use --force to overwrite)")
        if os.path.lexists(dest):
            backup = partial_path(dest)
            os.replace(dest, backup)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if backup is not None:
                os.replace(backup, dest)
            raise
        self._placed.append((dest, backup))

    def commit(self) -> None:
        """Move every written file into place, the main table last."""
        plan = self.plan
        # Persons, entity tables, log; then the report; the main table last.
        rank = {"persons": 0, "log": 2}
        report_first = sorted((r for r in self._temps if r != "table"),
                              key=lambda r: (rank.get(r, 1), r))  # fmt: skip
        try:
            for role in report_first:
                self._place(self._temps[role], plan.files()[role])
            if self._report_tmp is not None:
                self._commit_report()
            if "table" in self._temps:
                self._place(self._temps["table"], plan.files()["table"])
        except OSError as exc:
            raise os_error(exc, exc.filename or "output") from None
        for _, backup in self._placed:
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.unlink(backup)
        for stale in self._removed_later:
            with contextlib.suppress(OSError):
                stale.unlink()
        self._placed.clear()
        self._renamed_dir = None
        self._temps.clear()
        self._made_dirs.clear()

    def _commit_report(self) -> None:
        d = self.plan.report_dir
        tmp = self._report_tmp
        assert d is not None
        assert tmp is not None
        names = sorted(e.name for e in os.scandir(tmp) if e.is_file(follow_symlinks=False))
        if len(names) != len(os.listdir(tmp)):
            raise OutputError(f"{d}: a report may hold files only")
        old = _manifest(d) if self._report_inside else set()
        self.plan._check_report_files(names)
        manifest = {"written_by": f"l0calib {__version__}", "files": names}
        (tmp / REPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if not self._report_inside:
            if os.path.lexists(d):
                raise OutputError(f"{d}: appeared while the run was writing; nothing replaced")
            os.rename(tmp, d)
            self._renamed_dir = (d, tmp)
            return
        for name in [*names, REPORT_MANIFEST]:
            self._place(tmp / name, d / name)
        os.rmdir(tmp)
        # Files an earlier run listed but this one did not write: theirs, stale now.
        self._removed_later = [d / n for n in sorted(old - set(names))
                               if (d / n).is_file() and not (d / n).is_symlink()]  # fmt: skip

    def rollback(self) -> None:
        """Put back what was replaced and remove every temporary file and new directory."""
        if self._renamed_dir is not None:
            d, tmp = self._renamed_dir
            with contextlib.suppress(OSError):
                os.rename(d, tmp)
        for dest, backup in reversed(self._placed):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    os.unlink(dest)
        for tmp in self._temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        if self._report_tmp is not None:
            shutil.rmtree(self._report_tmp, ignore_errors=True)
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never anything we did not create
        self._placed.clear()
        self._temps.clear()
        self._made_dirs.clear()
