"""The ``l0calib`` Typer application: parse options, call the library, render results.

Exit codes: 0 success; 1 bad input or data error; 2 usage error; 3 the fit finished but
missed the requested tolerance.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import l0calib
from l0calib.exceptions import L0CalibError

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 bad input or data error; 2 usage error; "
    "3 the fit finished but missed the requested tolerance."
)

app = typer.Typer(
    name="l0calib",
    help="Calibrate survey weights to official totals, optionally keeping an exact number "
    "of records.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    # Tracebacks must never print local variables: they may hold microdata.
    pretty_exceptions_show_locals=False,
)

stdout = Console()
stderr = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into ``Error: ...`` on stderr and exit code 1."""
    try:
        yield
    except L0CalibError as exc:
        stderr.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"l0calib {l0calib.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """Calibrate survey weights to official totals, optionally keeping an exact number of
    records."""


@app.command(epilog=EXIT_CODES_HELP)
def gate(
    n: int = typer.Option(10_000, "--n", help="Number of gates."),
    init_mean: float = typer.Option(0.5, help="Initial sigmoid(log_alpha), in (0, 1)."),
    temperature: float = typer.Option(2 / 3, help="Concrete temperature beta (> 0)."),
    stretch: float = typer.Option(0.1, help="Stretch: gamma = -stretch, zeta = 1 + stretch."),
    draws: int = typer.Option(200, help="Monte-Carlo draws to average over."),
    seed: int = typer.Option(0, help="Seed for the initialisation and the draws."),
) -> None:
    """Sample a Hard Concrete gate and compare sampled and expected sparsity.

    A quick check of the installation and of a gate setting: on average, the number
    of non-zero sampled gates matches the analytic expectation, sum P(z != 0).
    """
    if draws < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--draws")
    with user_errors(), torch.no_grad():
        hc = l0calib.HardConcrete(
            n, temperature=temperature, stretch=stretch, init_mean=init_mean, seed=seed
        )
        expected = float(hc.get_penalty())
        nonzero = 0.0
        ones = 0.0
        for _ in range(draws):
            z = hc.sample()
            nonzero += float((z > 0).sum())
            ones += float((z == 1).sum())
        hc.eval()
        paper = hc.test_gates("paper")
        median = hc.test_gates("median")

    table = Table(title=f"Hard Concrete gate: n={n}, {draws} draws, seed={seed}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row(escape("expected non-zero gates, E[#z != 0]"), f"{expected:,.1f}")
    table.add_row("sampled non-zero gates (mean)", f"{nonzero / draws:,.1f}")
    table.add_row("sampled gates exactly 1 (mean)", f"{ones / draws:,.1f}")
    table.add_row("test-time gate, paper estimator (mean)", f"{float(paper.mean()):.4f}")
    table.add_row("test-time gate, median / l0 reference (mean)", f"{float(median.mean()):.4f}")
    stdout.print(table)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="l0calib")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
