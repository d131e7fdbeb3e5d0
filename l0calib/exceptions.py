"""Errors and warnings raised by l0calib.

Every error the library raises on purpose derives from :class:`L0CalibError`, so a caller
can catch them all in one place (the CLI does, and prints ``Error: <message>``). Errors
about bad input also derive from :class:`ValueError`, so code written against plain
Python conventions keeps working::

    L0CalibError
    ├── ParameterError(ValueError)   an argument to a library function is invalid
    ├── DataError(ValueError)        the microdata (records, weights, persons) is unusable
    ├── TargetError(ValueError)      a target definition or expression is unusable
    ├── CalibrationError             the fit itself cannot be done (e.g. infeasible targets)
    └── OutputError                  an output cannot be written: it exists, it is also an
                                     input or another output, or the file system refused

    ConvergenceWarning(UserWarning)  a fit finished without reaching the requested tolerance,
                                     or with targets missed by far
    CoverageWarning(UserWarning)     the record count asked for may not cover every target

Messages say what is wrong, where (file, row, column, target name), what was found and
what was expected, naming the file once. Rows are counted as *data rows*: the first row
after the header is data row 1, in CSV and Parquet alike (so data row N is line N + 1 of
a CSV file whose cells hold no line breaks); "line N" is used only for problems of a CSV
file's text (encoding, quoting), counting the header as line 1. Long lists are cut to
their first few items and "and N more"; :attr:`L0CalibError.problems` keeps every one.
They never include microdata values beyond what is needed to locate the problem.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConvergenceWarning",
    "CoverageWarning",
    "DataError",
    "L0CalibError",
    "OutputError",
    "ParameterError",
    "TargetError",
]

MAX_LISTED = 5  # items of a list shown in a message before "and N more"


def listed(items: list[str], limit: int = MAX_LISTED, *, sep: str = ", ") -> str:
    """``"a, b, c, d, e and 97 more"``: the first ``limit`` items, then how many are left."""
    items = [str(i) for i in items]
    shown = sep.join(items[:limit])
    return f"{shown} and {len(items) - limit:,} more" if len(items) > limit else shown


class L0CalibError(Exception):
    """Base class of every error l0calib raises deliberately.

    ``problems`` lists every individual problem found (a file with 30 bad rows reports all
    30); the message is their summary. ``where`` names the file (or table) they are in,
    when the error was made by :meth:`from_problems`; the problems then do not repeat it.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]
        self.where: str | None = None

    @classmethod
    def from_problems(
        cls, where: str, problems: list[str], *, lines: list[str] | None = None
    ) -> L0CalibError:
        """One error for several problems: ``"<where>: 3 problems:\n  - ..."``.

        ``where`` (a file name) is said once; the problems must not repeat it. The message
        lists the first :data:`MAX_LISTED` problems (or ``lines``, a shorter summary of
        them, e.g. one line per cause) and how many more there are; ``problems`` keeps all.
        """
        shown = problems if lines is None else lines
        if len(shown) == 1:
            error = cls(f"{where}: {shown[0]}", problems)
        else:
            items = [f"  - {p}" for p in shown[:MAX_LISTED]]
            if len(shown) > MAX_LISTED:
                items.append(f"  - and {len(shown) - MAX_LISTED:,} more")
            error = cls(f"{where}: {len(problems):,} problems:\n" + "\n".join(items), problems)
        error.where = where
        return error


class ParameterError(L0CalibError, ValueError):
    """An argument given to a library function or class is out of its allowed range."""


class DataError(L0CalibError, ValueError):
    """The microdata cannot be used: unreadable file, bad weights, duplicate ids..."""


class TargetError(L0CalibError, ValueError):
    """A target row or one of its expressions cannot be used."""


class CalibrationError(L0CalibError):
    """The calibration problem cannot be solved as posed (infeasible, rank-deficient...)."""


class ConvergenceWarning(UserWarning):
    """A fit stopped before meeting the requested tolerance; results are still returned."""


class CoverageWarning(UserWarning):
    """Before training: the requested record count may be too small to keep enough
    supporting records of every fitted target (the warning names them)."""


class OutputError(L0CalibError):
    """An output cannot be written: it already exists (without overwrite), it is an input
    or another output of the same run, or the file system refused (``"<path>: <reason>"``).
    """
