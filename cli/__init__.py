"""The ``l0calib`` command line: a thin Typer layer over the :mod:`l0calib` library.

Installed as the ``l0calib_cli`` package. The library never imports it.

:func:`run` is the console script. It handles Ctrl-C and SIGTERM from its first line,
before the heavy imports, so an interrupt at any moment prints one line (never a
traceback), the temporary files of the run are removed on the way out, and the exit code
is 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import signal
import sys

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """Raised by the signal handlers: a BaseException, so no ``except Exception`` (Typer's
    own included) swallows it, while every ``finally`` (the outputs' rollback) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:  # fmt: skip
    """Warnings as one line, ``Warning: <message>``: never the path and source line of the
    code that warned (a user needs the message, not where it sits in the installation)."""
    sys.stderr.write(f"Warning: {message}\n")


def run() -> None:
    """Console-script entry point."""
    import warnings

    warnings.showwarning = show_warning
    previous = {s: signal.signal(s, _raise) for s in EXIT_SIGNAL}
    try:
        from l0calib_cli.main import app

        app(prog_name="l0calib")
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        # Further signals while saying so must not print a traceback either.
        for s in EXIT_SIGNAL:
            signal.signal(s, signal.SIG_IGN)
        name = "Interrupted" if signum == signal.SIGINT else "Terminated"
        sys.stderr.write(f"{name}; no output was written.\n")
        sys.exit(EXIT_SIGNAL.get(signum, 1))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
