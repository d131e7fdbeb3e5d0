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
what was expected. They never include microdata values beyond what is needed to locate
the problem.
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


class L0CalibError(Exception):
    """Base class of every error l0calib raises deliberately.

    ``problems`` lists every individual problem found (a file with 30 bad rows reports all
    30); the message is their summary.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]

    @classmethod
    def from_problems(cls, where: str, problems: list[str]) -> L0CalibError:
        """One error for several problems: ``"<where>: 3 problems:\n  - ..."``."""
        if len(problems) == 1:
            return cls(f"{where}: {problems[0]}", problems)
        listed = "\n".join(f"  - {p}" for p in problems)
        return cls(f"{where}: {len(problems)} problems:\n{listed}", problems)


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
