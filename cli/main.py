"""The ``l0calib`` Typer application: parse options, call the library, render results.

Exit codes: 0 success; 1 bad input or data error; 2 usage error; 3 the fit finished but
missed the requested tolerance or left fitted targets missed by far.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

import l0calib  # light: its public names load on first use
from l0calib.exceptions import L0CalibError, listed

if TYPE_CHECKING:
    from l0calib.outputs import Transaction


class _Lazy:
    """A module imported on first attribute access: ``--help`` and ``--version`` answer
    without loading numpy, pandas or torch (seconds on a busy machine)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def _lazy_function(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


np = _Lazy("numpy")
pd = _Lazy("pandas")
torch = _Lazy("torch")
check_options = _lazy_function("l0calib.calibrate", "check_options")
check_method = _lazy_function("l0calib.classic", "check_method")
annotate_check = _lazy_function("l0calib.diagnose", "annotate_check")
check_records = _lazy_function("l0calib.diagnose", "check_records")
diagnose_targets = _lazy_function("l0calib.diagnose", "diagnose_targets")
check_targets = _lazy_function("l0calib.diagnostics", "check_targets")
is_hdf5 = _lazy_function("l0calib.hdf5", "is_hdf5")
read_table = _lazy_function("l0calib.io", "read_table")
OutputPlan = _lazy_function("l0calib.outputs", "OutputPlan")
output_names = _lazy_function("l0calib.outputs", "output_names")
apply_weights = _lazy_function("l0calib.report", "apply_weights")
check_added_columns = _lazy_function("l0calib.report", "check_added_columns")
describe_inputs = _lazy_function("l0calib.report", "describe_inputs")
keep_linked_rows = _lazy_function("l0calib.report", "keep_linked_rows")
summary = _lazy_function("l0calib.report", "summary")
with_weights = _lazy_function("l0calib.report", "with_weights")
write_report_files = _lazy_function("l0calib.report", "write_report_files")
ShardedRun = _lazy_function("l0calib.sharded", "ShardedRun")
fingerprint = _lazy_function("l0calib.sharded", "fingerprint")
holdout_names = _lazy_function("l0calib.sharded", "holdout_names")
read_entities = _lazy_function("l0calib.sharded", "read_entities")
run_rank = _lazy_function("l0calib.sharded", "run_rank")
run_sharded = _lazy_function("l0calib.sharded", "run_sharded")

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 bad input or data error; 2 usage error; "
    "3 the fit finished but missed the requested tolerance or left targets missed by far."
)
EXIT_TOLERANCE = 3


_LIST_ITEM = re.compile(r"\s*(?:[-*\u2022]|\d+[.)])\s")


def _paragraphs(text: str | None) -> str | None:
    """A command's docstring as the help shows it: the lines of each paragraph joined into
    one (the help renderer wraps them to the terminal; a hard-wrapped line would end
    raggedly), blank-line paragraph breaks kept, each list item (``- ``, ``* ``, ``1. ``)
    on a line of its own. A paragraph starting with click's ``\\b`` stays as written."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not _LIST_ITEM.match(line):
                lines[-1] = f"{lines[-1]} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _plain_flags(params: list) -> list:
    """Flags take no value: show no ``<bool>`` type beside them in the help."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    """Help that reads as written: flags carry no ``<bool>`` type, the usage line names
    the arguments in capitals without braces (``MICRODATA TARGETS``), and the docstring's
    paragraphs are wrapped to the terminal as paragraphs (see :func:`_paragraphs`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _paragraphs(self.help)

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "").upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces


class _Group(TyperGroup):
    """The app's group: as :class:`_Command`, no ``<bool>`` on its flags, paragraphs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _paragraphs(self.help)

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="l0calib",
    cls=_Group,
    help="Calibrate survey weights to official totals, optionally keeping an exact number "
    "of records.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    # "rich", not "markdown": markdown drops text in angle brackets (<MICRODATA stem>).
    rich_markup_mode="rich",
    # Tracebacks must never print local variables: they may hold microdata.
    pretty_exceptions_show_locals=False,
)

stdout = Console()
stderr = Console(stderr=True)


def _say(message: str) -> None:
    """Print to stderr as plain text, unwrapped (messages are matched by scripts)."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def user_errors(*, json_output: bool = False) -> Iterator[None]:
    """Turn library errors into ``Error: ...`` on stderr and exit code 1. With
    ``json_output``, stdout also gets ``{"error", "error_type", "file", "problems"}``: the
    message, which lists the first few problems, and every one of them for a program."""
    try:
        yield
    except L0CalibError as exc:
        if json_output:
            out = {"error": str(exc), "error_type": type(exc).__name__, "file": exc.where,
                   "problems": exc.problems}  # fmt: skip
            stdout.print_json(json.dumps(out))
        _say(f"Error: {exc}")
        raise typer.Exit(code=1) from None
    except OSError as exc:  # the file system refused: which path, and why
        where = exc.filename if exc.filename is not None else "a file"
        _say(f"Error: {where}: {exc.strerror or exc}")
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


# ---------------------------------------------------------------------------- options
MICRODATA = typer.Argument(..., help="Households: a .parquet or .csv file.", show_default=False)
TARGETS = typer.Argument(..., help="Targets file (.csv), see docs/targets.md.", show_default=False)
PERSONS = typer.Option(None, "--persons", help="Persons table (.parquet or .csv).")
PERSON_LINK = typer.Option(
    "person_household_id", "--person-household-column", help="Persons' household id column."
)
WEIGHT_COLUMN = typer.Option("household_weight", "--weight-column", help="Initial weights.")
ID_COLUMN = typer.Option("household_id", "--id-column", help="Unique household id column.")


ENTITY = typer.Option(
    None,
    "--entity",
    metavar="NAME=PATH",
    help="NAME=PATH: another entity table (e.g. tax_unit=tu.parquet); "
    "its rows of kept households are written beside the output. Repeatable.",
)
ENTITY_LINK = typer.Option(
    None,
    "--entity-link",
    metavar="NAME=COLUMN",
    help="NAME=COLUMN: the household id column of an --entity "
    "(default <NAME>_household_id). Repeatable.",
)


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise typer.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint=option)
        if name in out:
            raise typer.BadParameter(f"{name!r} given twice", param_hint=option)
        out[name] = rest
    return out


def _load(
    microdata: Path, targets: Path, persons: Path | None, id_column: str, weight_column: str,
    person_household_column: str, *, allow_zero_support: bool = False,
    phases: _Phases | None = None,
):  # fmt: skip
    phases = phases if phases is not None else _Phases(quiet=True)
    with phases.phase("reading", inputs=True) as step:
        households = read_table(microdata)
        check_added_columns(households, microdata, weight_column)
        person_frame = read_table(persons) if persons is not None else None
        step.status = f"{len(households):,} households" + (
            f", {len(person_frame):,} persons" if person_frame is not None else "")  # fmt: skip
    with phases.phase("building the matrix", inputs=True) as step:
        em = l0calib.build_estimate_matrix(
            households, targets, person_frame, id_column=id_column,
            weight_column=weight_column, person_household_column=person_household_column,
            allow_zero_support=allow_zero_support,
            table_names={"households": str(microdata), "persons": str(persons)},
        )  # fmt: skip
        step.status = f"{em.n_targets:,} targets x {em.n_records:,} records"
    return households, person_frame, em


class _Step:
    """One phase on the terminal: a live row with its elapsed time, or one line when done."""

    def __init__(
        self, phases: _Phases, label: str, total: float | None, *, inputs: bool = False
    ) -> None:
        if not inputs:
            phases.release()
        self.phases, self.label, self.status = phases, label, ""
        self.t0 = time.perf_counter()
        self.finished = False
        bar = phases.bar
        self.task = bar.add_task(label, total=total, status="") if bar is not None else None

    def update(self, completed: float | None = None, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self.task is not None:
            self.phases.bar.update(self.task, completed=completed, status=self.status)

    def done(self) -> None:
        if self.finished:
            return
        self.finished = True
        bar = self.phases.bar
        if self.task is not None:
            total = next(t.total for t in bar.tasks if t.id == self.task) or 1
            bar.update(self.task, total=total, completed=total, status=self.status)
            bar.stop_task(self.task)
        elif not self.phases.quiet:
            detail = f" ({self.status})" if self.status else ""
            self.phases.say(f"{self.label}: {time.perf_counter() - self.t0:.1f} s{detail}")


class _Phases:
    """The long phases of a command on stderr (reading, building the matrix, training,
    selecting and refitting, writing), each labelled with its elapsed time: live rows on a
    terminal, one line per finished phase otherwise, nothing when quiet.

    Without a terminal, the lines of the phases that read and check the inputs are held
    until the inputs are found good (:meth:`release`, or the first later phase), so bad
    input prints one message, the error, and nothing else."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.held: list[str] | None = []
        self.bar: Progress | None = None
        if not quiet and stderr.is_terminal:
            self.bar = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description:<24}"),
                BarColumn(bar_width=24),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=stderr,
            )

    def __enter__(self) -> _Phases:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        if exc_type is None:
            self.release()

    def say(self, line: str) -> None:
        if self.held is not None:
            self.held.append(line)
        else:
            _say(line)

    def release(self) -> None:
        """The inputs are good: print the held phase lines, and every later one at once."""
        held, self.held = self.held, None
        for line in held or []:
            _say(line)

    @contextmanager
    def phase(self, label: str, *, inputs: bool = False) -> Iterator[_Step]:
        step = _Step(self, label, None, inputs=inputs)
        yield step
        step.done()

    @contextmanager
    def fitting(self, epochs: int) -> Iterator[Callable[[l0calib.Progress], None]]:
        """The engine's callback: a training row by epoch, then the selection and refit."""
        train = _Step(self, "training", epochs)
        after: list[_Step] = []

        def callback(p: l0calib.Progress) -> None:
            if p.phase == "train":
                train.update(completed=p.epoch, status=_training_status(p))
            elif not after:
                train.done()
                after.append(_Step(self, "selecting and refitting", None))

        yield callback
        train.done()
        for step in after:
            step.done()


def _training_status(p: l0calib.Progress) -> str:
    """Epoch, loss and error in words that say what the error is: under the gates it is
    the error of the expected (gated) weights, which rises as records drop out and falls
    again with the refit."""
    head = f"epoch {p.epoch}/{p.epochs}, loss {p.loss:.3g}"
    if p.goal is not None or p.lambda_l0 > 0:
        return (f"{head}, error under the gates {p.mean_abs_rel_error:.1%} (falls with the "
                f"refit), expected survivors {p.expected_survivors:,.0f}")  # fmt: skip
    return f"{head}, mean error {p.mean_abs_rel_error:.2%}"


def _holdout(names: tuple[str, ...], holdout: str | None, fraction: float | None, seed: int):
    """The held-out target names (see :func:`l0calib.sharded.holdout_names`)."""
    _check_holdout(holdout, fraction)
    return holdout_names(names, holdout, fraction, seed)


def _holdout_of(em: l0calib.EstimateMatrix, holdout: str | None, fraction: float | None,
                seed: int):  # fmt: skip
    """:func:`_holdout` for ``em``'s targets, the names checked now (bad input is found
    before anything is shown of the fit)."""
    held = _holdout(em.names, holdout, fraction, seed)
    if held:
        em.select_targets(held)  # raises, naming an unknown target
    return held


def _check_holdout(holdout: str | None, fraction: float | None) -> None:
    if holdout and fraction is not None:
        raise typer.BadParameter("give --holdout or --holdout-fraction, not both")
    if fraction is not None and not 0 <= fraction < 1:
        raise typer.BadParameter("must be in [0, 1)", param_hint="--holdout-fraction")


def _worker_progress(show: bool, epochs: int):
    """The training display of a sharded run's rank 0, as the other commands show it
    (picklable: a module-level function). Returns (context manager, callback)."""
    if not show:
        return None, None
    phases = _Phases(quiet=False)
    entered: list[Callable[[l0calib.Progress], None]] = []

    @contextmanager
    def display() -> Iterator[None]:
        with phases, phases.fitting(epochs) as callback:
            entered.append(callback)
            yield

    def callback(p: l0calib.Progress) -> None:
        if entered:
            entered[0](p)

    return display(), callback


@dataclass
class _Outputs:
    """A fitting command's outputs: the library's plan, and what the CLI prints of it."""

    plan: OutputPlan
    entities: list[tuple[str, Path, str]]  # name, input path, link column
    extra: dict
    start: float
    inputs: dict[str, Path | None] = field(default_factory=dict)  # the report's inputs

    def report_extra(self) -> dict:
        """``summary.json``'s run description: command, inputs (size, sha256), options."""
        return {**self.extra, "inputs": describe_inputs(self.inputs)}

    def written(self) -> list[str]:
        paths = [str(p) for p in self.plan.tables.values()]
        paths.append(paths.pop(0))  # the main table is committed last
        if self.plan.log is not None:
            paths.append(str(self.plan.log))
        if self.plan.report_dir is not None:
            paths.append(f"{self.plan.report_dir}/")
        return paths

    def entity_inputs(self) -> dict[str, Path]:
        return {name: path for name, path, _ in self.entities}


def _plan_outputs(
    microdata: Path, targets: Path | None, persons: Path | None, output: Path | None,
    report_dir: Path | None, log: Path | None, force: bool, *, report: bool = True,
    suffix: str = "reweighted", entity: list[str] | None = None,
    entity_link: list[str] | None = None, checkpoint: Path | None = None,
    options: dict[str, object] | None = None,
) -> _Outputs:  # fmt: skip
    """Name, check and plan every output before any input is read (exit 1 on a problem)."""
    links = _pairs(entity_link or [], "--entity-link")
    pairs = _pairs(entity or [], "--entity")
    unknown = set(links) - set(pairs)
    if unknown:
        raise typer.BadParameter(f"no --entity named {sorted(unknown)[0]!r}",
                                 param_hint="--entity-link")  # fmt: skip
    entities = [(n, Path(p), links.get(n, f"{n}_household_id")) for n, p in pairs.items()]
    with user_errors():
        names = output_names(microdata, output, persons=persons,
                             entities={n: p for n, p, _ in entities}, report_dir=report_dir,
                             suffix=suffix)  # fmt: skip
        inputs: dict[str, Path | None] = {
            "MICRODATA": microdata,
            "TARGETS": targets,
            "--persons": persons,
            "--checkpoint": checkpoint,
        }
        inputs.update({f"--entity {n}": p for n, p, _ in entities})
        plan = OutputPlan(
            {r: p for r, p in names.items() if r != "report"},
            report_dir=names["report"] if report else None, log=log,
            inputs={k: v for k, v in inputs.items() if v is not None}, force=force,
        )  # fmt: skip
    extra = {
        "command": " ".join(["l0calib", *sys.argv[1:]]),
        "microdata": str(microdata),
        "targets": str(targets) if targets is not None else None,
        "output": str(names["table"]),
        # every option as given or defaulted, for the report
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in (options or {}).items()},
    }
    report_inputs = {"microdata": microdata, "targets": targets, "persons": persons,
                     **{f"entity {n}": p for n, p, _ in entities}}  # fmt: skip
    return _Outputs(plan, entities, extra, time.perf_counter(), report_inputs)


def _write_outputs(
    tx: Transaction, outs: _Outputs, kept: pd.DataFrame, person_frame, entity_frames: list,
    result, n_targets: int | None, *, microdata: Path, persons: Path | None, id_column: str,
    weight_column: str, person_household_column: str, em: l0calib.EstimateMatrix | None = None,
    tol: float | None = None, more: dict | None = None,
) -> dict | None:  # fmt: skip
    """Write every table and the report into the transaction; the figures shown after.

    ``em`` (the fit's matrix) gives the report its initial estimates, groups and support;
    ``more`` adds ``summary.json`` fields (bounds, the selection split...)."""
    computed = {weight_column, f"{weight_column}_initial", "selection"}
    tx.write_table("table", kept, source=microdata, computed=computed)
    kept_ids = kept[id_column].to_numpy()
    if person_frame is not None:
        linked = keep_linked_rows(person_frame, person_household_column, kept_ids)
        tx.write_table("persons", linked, source=persons)
    for (name, path, link), frame in zip(outs.entities, entity_frames, strict=True):
        tx.write_table(f"entity:{name}", keep_linked_rows(frame, link, kept_ids), source=path)
    if result is None:
        return None
    extra = {**outs.report_extra(), **(more or {}),
             "seconds_total": time.perf_counter() - outs.start}  # fmt: skip
    tx.write_report(lambda d: write_report_files(result, d, n_targets=n_targets or 0,
                                                 extra=extra, matrix=em, tol=tol))  # fmt: skip
    return _shown(result, n_targets or 0, extra)


def _shown(result: l0calib.CalibrationResult, n_targets: int, extra: dict) -> dict:
    fitted = result.report[~result.report["holdout"]].nlargest(5, "abs_rel_error")
    worst = [[str(n), float(e)] for n, e in zip(fitted["name"], fitted["rel_error"],
                                                strict=True)]  # fmt: skip
    return {"summary": summary(result, n_targets=n_targets, extra=extra), "worst": worst}


def _final_table(shown: dict) -> Table:
    s = shown["summary"]
    table = Table(title=f"l0calib ({s['method']})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("records in / out", f"{s['n_records_in']:,} / {s['n_records_out']:,}")
    errors = f"{s['mean_abs_rel_error']:.3%} / {s['max_abs_rel_error']:.3%}"
    table.add_row("fitted targets: mean / max abs rel error", errors)
    if s.get("holdout_mean_abs_rel_error") is not None:
        table.add_row("holdout targets: mean abs rel error",
                      f"{s['holdout_mean_abs_rel_error']:.3%}")  # fmt: skip
    table.add_row("effective sample size (Kish)", f"{s['effective_sample_size']:,.0f}")
    if s.get("seconds_total") is not None:
        table.add_row("time: fit / whole run", f"{s['seconds']:.1f} s / {s['seconds_total']:.1f} s")
    else:
        table.add_row("time: fit", f"{s['seconds']:.1f} s")
    for name, rel_error in shown["worst"]:
        table.add_row(escape(f"worst: {name}"), f"{rel_error:+.3%}")
    return table


def _finish(outs: _Outputs, shown: dict | None, quiet: bool, tol: float | None = None) -> None:
    """The summary table, the files written, and exit code 3 for a missed tolerance or
    missed targets."""
    if not quiet:
        if shown is not None:
            stdout.print(_final_table(shown))
        stdout.print(f"wrote {', '.join(outs.written())}")
    if shown is not None:
        s = shown["summary"]
        reason = None
        if s.get("refit_converged") is False:
            reason = f"the refit did not converge ({s.get('refit_message')})"
        _exit_for(bool(s["converged"]), s["max_abs_rel_error"] or float("nan"),
                  s.get("missed_targets"), tol, reason,
                  outside=s.get("outside_tolerance"))  # fmt: skip


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def reweight(
    ctx: typer.Context,
    microdata: Path = MICRODATA,
    targets: Path = TARGETS,
    target_records: int | None = typer.Option(
        None, "--target-records", help="Keep exactly this many households."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output table (.parquet or .csv). Default: <MICRODATA stem>_reweighted.parquet.",
    ),
    weight_column: str = WEIGHT_COLUMN,
    id_column: str = ID_COLUMN,
    persons: Path | None = PERSONS,
    person_household_column: str = PERSON_LINK,
    report_dir: Path | None = typer.Option(
        None, "--report-dir", help="Report directory. Default: <output stem>_report/."
    ),
    epochs: int = typer.Option(600, "--epochs", help="Training epochs."),
    lambda_l0: float | None = typer.Option(
        None, "--lambda-l0", help="L0 strength (only without --target-records)."
    ),
    lambda_l2: float | None = typer.Option(
        None,
        "--lambda-l2",
        help="Training L2 pull toward the inflated initial weights. Default: 10 (a balanced "
        "selection) when --target-records is at least 20 x the fitted targets, else 0.001.",
    ),
    lr: float = typer.Option(0.05, "--lr", help="Learning rate."),
    holdout: str | None = typer.Option(
        None, "--holdout", help="Comma-separated target names to report but not fit."
    ),
    holdout_fraction: float | None = typer.Option(
        None, "--holdout-fraction", help="Hold out this fraction of targets, chosen by --seed."
    ),
    tol: float | None = typer.Option(
        None, "--tol", help="Requested max abs relative error; missing it exits with 3."
    ),
    bounds: str | None = typer.Option(
        None, "--bounds", help="LO,HI bounds on final / inflated initial weight, e.g. 0.2,5."
    ),
    max_error: float = typer.Option(
        0.5,
        "--max-error",
        help="A fitted target off by more than this (relative), or at -100 %, is named as "
        "missed, and the run exits with 3.",
    ),
    exchange_rounds: int = typer.Option(
        30,
        "--exchange-rounds",
        help="With --target-records: rounds that swap kept records for better balanced ones "
        "after the refit (0: none). Sharded runs (--nproc, --checkpoint) make none.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random step."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    log: Path | None = typer.Option(None, "--log", help="Per-target CSV log (microcalibrate)."),
    entity: list[str] | None = ENTITY,
    entity_link: list[str] | None = ENTITY_LINK,
    nproc: int = typer.Option(
        1, "--nproc", help="Worker processes: records split across them (torch.distributed)."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Directory for per-process checkpoints (resumable run)."
    ),
    checkpoint_every: int = typer.Option(
        100, "--checkpoint-every", help="Epochs between checkpoints."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint."),
    dtype: str = typer.Option("float32", "--dtype", help="Training precision: float32 or float64."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="Threads per process (torch and BLAS together; at most the cores). Default: 1 "
        "below 2 million records, else every core (shared among --nproc workers).",
    ),
    period: str | None = typer.Option(
        None, "--period", help="HDF5 input: the period (e.g. 2024) to read and reweight."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
) -> None:
    """Calibrate household weights to the targets, optionally keeping exactly N households.

    Writes the kept households with their new weights (the initial weight kept as
    `<weight column>_initial`), the kept households' persons with `--persons`, and a
    report directory (report.html, targets.csv, summary.json, history.csv,
    weight_ratios.csv). A PolicyEngine HDF5 dataset (`.h5`) is read whole (persons and
    every entity from the file, `--period` choosing the period) and written back pruned,
    in the same layout (`-o small.h5`).
    """
    if is_hdf5(microdata):
        _hdf5_refusals(
            "--persons, --entity, --entity-link, --nproc and --checkpoint do not apply",
            persons is not None or bool(entity or entity_link) or nproc > 1
            or checkpoint is not None,
            (id_column, weight_column, person_household_column),
        )  # fmt: skip
        _check_holdout(holdout, holdout_fraction)
        fit = {"target_records": target_records, "lambda_l0": lambda_l0,
               "lambda_l2": lambda_l2, "epochs": epochs, "lr": lr, "tol": tol, "seed": seed,
               "device": device, "dtype": dtype, "threads": threads,
               "bounds": _parse_bounds(bounds), "max_error": max_error,
               "exchange_rounds": exchange_rounds}  # fmt: skip
        _reweight_hdf5(microdata, targets, output, report_dir, log, period, fit, holdout,
                       holdout_fraction, force, quiet)  # fmt: skip
        return
    _no_period(period)
    if resume and checkpoint is None:
        raise typer.BadParameter("needs --checkpoint DIR", param_hint="--resume")
    if nproc < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--nproc")
    if checkpoint_every < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--checkpoint-every")
    _check_holdout(holdout, holdout_fraction)
    launched = _torchrun_rank()
    run = ShardedRun(
        microdata=microdata, targets=targets, persons=persons, id_column=id_column,
        weight_column=weight_column, person_household_column=person_household_column,
        target_records=target_records, lambda_l0=lambda_l0, lambda_l2=lambda_l2,
        epochs=epochs, lr=lr, holdout=holdout, holdout_fraction=holdout_fraction, tol=tol,
        seed=seed, device=device, dtype=dtype, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume, quiet=quiet,
        progress=_worker_progress, bounds=_parse_bounds(bounds), max_error=max_error,
        threads=threads,
    )  # fmt: skip
    if launched is not None and launched[0] != 0:
        # Another rank under torchrun: it fits its block; rank 0 plans and writes.
        links = _pairs(entity_link or [], "--entity-link")
        run.entities = [(n, Path(p), links.get(n, f"{n}_household_id"))
                        for n, p in _pairs(entity or [], "--entity").items()]  # fmt: skip
        with user_errors():
            if checkpoint is not None:
                run.fingerprint = fingerprint(run, launched[1])
            run_rank(*launched, run)
        return
    outs = _plan_outputs(microdata, targets, persons, output, report_dir, log, force,
                         entity=entity, entity_link=entity_link,
                         checkpoint=checkpoint, options=ctx.params)  # fmt: skip
    sharded = nproc > 1 or checkpoint is not None or launched is not None
    if sharded and target_records is not None and exchange_rounds > 0 and not quiet:
        _say("Note: sharded runs (--nproc, --checkpoint) make no exchange rounds after the "
             "refit; the kept records are the trained selection's (docs/engine.md).")  # fmt: skip
    with user_errors(), outs.plan.transaction() as tx, _Phases(quiet or sharded) as phases:
        log_tmp = tx.path("log") if log is not None else None
        if sharded:
            run.entities = outs.entities
            run.log = log_tmp
            run.temp_tables = {r: (tx.path(r), p) for r, p in outs.plan.tables.items()}
            run.report_temp = tx.report_dir_temp
            run.extra = outs.report_extra()
            if checkpoint is not None:
                run.fingerprint = fingerprint(run, launched[1] if launched else nproc)
            shown = run_rank(*launched, run) if launched else run_sharded(run, nproc)
        else:
            households, person_frame, em = _load(
                microdata, targets, persons, id_column, weight_column, person_household_column,
                phases=phases,
            )  # fmt: skip
            entity_frames = read_entities(outs.entities, households, id_column)
            held = _holdout_of(em, holdout, holdout_fraction, seed)
            # Option errors come alone, before any finding about the targets.
            check_options(
                em.n_records, target_records=target_records, lambda_l0=lambda_l0,
                lambda_l2=lambda_l2, epochs=epochs, lr=lr, tol=tol, device=device, dtype=dtype,
                bounds=run.bounds, max_error=max_error, exchange_rounds=exchange_rounds,
            )  # fmt: skip
            phases.release()
            _warn_targets(em, quiet, exclude=held, target_records=target_records,
                          bounds=run.bounds)  # fmt: skip
            with (
                phases.fitting(epochs) as callback,
                warnings.catch_warnings(record=True) as seen,
            ):
                # The CLI reports a missed tolerance and missed targets itself (exit 3).
                warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
                warnings.simplefilter("always", l0calib.CoverageWarning)
                result = l0calib.calibrate(
                    em, target_records=target_records, lambda_l0=lambda_l0,
                    lambda_l2=lambda_l2, epochs=epochs, lr=lr, holdout=held, tol=tol,
                    seed=seed, device=device, callback=callback, log_path=log_tmp, dtype=dtype,
                    bounds=run.bounds, max_error=max_error, threads=threads,
                    exchange_rounds=exchange_rounds,
                )  # fmt: skip
            _say_warnings(seen)
            kept = apply_weights(households, result, weight_column=weight_column)
            with phases.phase("writing"):
                shown = _write_outputs(
                    tx, outs, kept, person_frame, entity_frames, result, em.n_targets,
                    microdata=microdata, persons=persons, id_column=id_column,
                    weight_column=weight_column,
                    person_household_column=person_household_column, em=em, tol=tol,
                )  # fmt: skip
    _finish(outs, shown, quiet, tol)


def _reweight_hdf5(
    microdata: Path, targets: Path, output: Path | None, report_dir: Path | None,
    log: Path | None, period: str | None, fit: dict, holdout: str | None,
    holdout_fraction: float | None, force: bool, quiet: bool,
) -> None:  # fmt: skip
    """`reweight` of a PolicyEngine HDF5 dataset: read one period, calibrate the households
    (person targets through person_household_id), write the pruned file and the report."""
    out = _hdf5_output(microdata, output, "reweighted")
    outs = _plan_outputs(microdata, targets, None, out, report_dir, log, force)
    with user_errors(), outs.plan.transaction() as tx, _Phases(quiet) as phases:
        log_tmp = tx.path("log") if log is not None else None
        data, em = _read_hdf5(microdata, targets, period, phases)
        held = _holdout_of(em, holdout, holdout_fraction, fit["seed"])
        check_options(em.n_records, **fit)
        phases.release()
        _warn_targets(em, quiet, exclude=held, target_records=fit["target_records"],
                      bounds=fit["bounds"])  # fmt: skip
        with phases.fitting(fit["epochs"]) as callback, warnings.catch_warnings():
            warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
            result = l0calib.calibrate(em, holdout=held, callback=callback, log_path=log_tmp,
                                       **fit)  # fmt: skip
        with phases.phase("writing"):
            shown = _write_hdf5_outputs(tx, outs, microdata, data.period, result.weights,
                                        result, em, tol=fit["tol"])  # fmt: skip
    _finish(outs, shown, quiet, fit["tol"])


_PE_NAMES = ("household_id", "household_weight", "person_household_id")


def _hdf5_refusals(not_applicable: str, given: bool, names: tuple[str, str, str]) -> None:
    """Refuse the options an HDF5 input answers itself: its persons and entities
    (``not_applicable`` names them, when ``given``) and PolicyEngine's column names."""
    if given:
        raise typer.BadParameter(
            f"an HDF5 dataset holds its persons and entities: {not_applicable}"
        )
    if names != _PE_NAMES:
        raise typer.BadParameter(
            "an HDF5 dataset uses PolicyEngine's names (household_id, household_weight, "
            "person_household_id): --id-column, --weight-column and "
            "--person-household-column do not apply"
        )


def _hdf5_output(microdata: Path, output: Path | None, suffix: str) -> Path:
    """The output of an HDF5 input: ``-o``, default ``<stem>_<suffix>.h5``, always HDF5."""
    out = output if output is not None else Path(f"{microdata.stem}_{suffix}.h5")
    if not is_hdf5(out):
        raise typer.BadParameter("an HDF5 input is written as HDF5: give a .h5 path",
                                 param_hint="-o")  # fmt: skip
    return out


def _read_hdf5(microdata: Path, targets: Path | None, period: str | None, phases: _Phases,
               **options):  # fmt: skip
    """One period of a PolicyEngine HDF5 dataset, and its matrix when ``targets`` are given
    (the households and persons tables; person targets through person_household_id)."""
    from l0calib.hdf5 import read_hdf5

    with phases.phase("reading", inputs=True) as step:
        data = read_hdf5(microdata, period=period)
        step.status = f"{len(data.households):,} households, {len(data.persons):,} persons"
    if targets is None:
        return data, None
    with phases.phase("building the matrix", inputs=True) as step:
        em = l0calib.build_estimate_matrix(data.households, targets, data.persons, **options)
        step.status = f"{em.n_targets:,} targets x {em.n_records:,} records"
    return data, em


def _write_hdf5_outputs(
    tx: Transaction, outs: _Outputs, microdata: Path, period: str | None, weights,
    result, em, *, tol: float | None = None, more: dict | None = None,
) -> dict | None:  # fmt: skip
    """The pruned copy of the HDF5 input (households with a non-zero weight) and, with a
    fit, the report; the figures shown after."""
    from l0calib.hdf5 import write_hdf5

    write_hdf5(microdata, tx.path("table"), weights, period=period)
    if result is None:
        return None
    extra = {**outs.report_extra(), **(more or {}), "period": period,
             "seconds_total": time.perf_counter() - outs.start}  # fmt: skip
    tx.write_report(lambda d: write_report_files(result, d, n_targets=em.n_targets,
                                                 extra=extra, matrix=em, tol=tol))  # fmt: skip
    return _shown(result, em.n_targets, extra)


def _no_period(period: str | None) -> None:
    if period is not None:
        raise typer.BadParameter("only for HDF5 input (.h5)", param_hint="--period")


def _torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (its environment variables), else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return None


def _parse_bounds(bounds: str | None) -> tuple[float, float] | None:
    if bounds is None:
        return None
    try:
        lo, hi = (float(x) for x in bounds.split(","))
    except ValueError:
        raise typer.BadParameter("expected two numbers: LO,HI", param_hint="--bounds") from None
    return lo, hi


def _say_warnings(seen: list) -> None:
    """Print the library's coverage warnings (recorded during a fit) on the terminal."""
    for w in seen:
        if issubclass(w.category, l0calib.CoverageWarning):
            _say(f"Warning: {w.message}")


def _exit_for(
    converged: bool,
    max_error: float,
    missed: list[str] | None = None,
    tol: float | None = None,
    reason: str | None = None,
    outside: list[str] | None = None,
) -> None:
    """Exit code 3 (with a warning) when the fit missed the requested tolerance (the
    targets ``outside`` it named), left fitted targets far off (named on the terminal) or
    its refit stopped short (``reason``)."""
    for names, what, key in (
        (outside, "outside the requested tolerance", "outside_tolerance"),
        (missed, "missed by far (at -100 % or beyond --max-error)", "missed_targets"),
    ):
        if names:
            _say(
                f"Warning: {len(names)} fitted target(s) {what}: {listed(names)}; see {key} "
                "in summary.json."
            )
    if not converged:
        parts = [reason] if reason else []
        if (not missed and not reason) or (tol is not None and max_error > tol):
            parts.append("missed the requested tolerance")
        if missed:
            parts.append("left fitted targets missed by far")
        _say(
            f"Warning: the fit finished but {' and '.join(parts)} (max abs rel error "
            f"{max_error:.3%}); outputs were written."
        )
        raise typer.Exit(code=EXIT_TOLERANCE)


@app.command("calibrate", cls=_Command, epilog=EXIT_CODES_HELP)
def calibrate_command(
    ctx: typer.Context,
    microdata: Path = MICRODATA,
    targets: Path = TARGETS,
    method: str = typer.Option("raking", "--method", help="raking, linear, logit or truncated."),
    bounds: str | None = typer.Option(
        None, "--bounds", help="LO,HI bounds on w / w0 (needed by logit and truncated)."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output table (.parquet or .csv). Default: <MICRODATA stem>_reweighted.parquet.",
    ),
    weight_column: str = WEIGHT_COLUMN,
    id_column: str = ID_COLUMN,
    persons: Path | None = PERSONS,
    person_household_column: str = PERSON_LINK,
    report_dir: Path | None = typer.Option(
        None, "--report-dir", help="Report directory. Default: <output stem>_report/."
    ),
    holdout: str | None = typer.Option(
        None, "--holdout", help="Comma-separated target names to report but not fit."
    ),
    max_iter: int = typer.Option(50, "--max-iter", help="Newton iterations."),
    entity: list[str] | None = ENTITY,
    entity_link: list[str] | None = ENTITY_LINK,
    period: str | None = typer.Option(
        None, "--period", help="HDF5 input: the period (e.g. 2024) to read and reweight."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
) -> None:
    """Exact classic calibration of all households: raking, linear, logit or truncated.

    Every fitted target is met exactly (Deville & Sarndal 1992, as R's survey::calibrate);
    fails with a clear message when targets are linearly dependent or infeasible. Writes
    the same files as `reweight`; a PolicyEngine HDF5 dataset (`.h5`) is read and written
    back as `reweight` does it (`--period`, `-o new.h5`).
    """
    parsed_bounds = _parse_bounds(bounds)
    if is_hdf5(microdata):
        _hdf5_refusals("--persons, --entity and --entity-link do not apply",
                       persons is not None or bool(entity or entity_link),
                       (id_column, weight_column, person_household_column))  # fmt: skip
        _calibrate_hdf5(ctx, microdata, targets, method, parsed_bounds, output, report_dir,
                        holdout, max_iter, period, force, quiet)  # fmt: skip
        return
    _no_period(period)
    outs = _plan_outputs(microdata, targets, persons, output, report_dir, None, force,
                         entity=entity, entity_link=entity_link,
                         options=ctx.params)  # fmt: skip
    with user_errors(), outs.plan.transaction() as tx, _Phases(quiet) as phases:
        households, person_frame, em = _load(
            microdata, targets, persons, id_column, weight_column, person_household_column,
            phases=phases,
        )  # fmt: skip
        entity_frames = read_entities(outs.entities, households, id_column)
        result = _fit_exact(em, holdout, method, parsed_bounds, max_iter, quiet, phases)
        kept = apply_weights(households, result, weight_column=weight_column)
        with phases.phase("writing"):
            shown = _write_outputs(
                tx, outs, kept, person_frame, entity_frames, result, em.n_targets,
                microdata=microdata, persons=persons, id_column=id_column,
                weight_column=weight_column, person_household_column=person_household_column,
                em=em, more={"bounds": list(parsed_bounds) if parsed_bounds else None},
            )  # fmt: skip
    _finish(outs, shown, quiet)


def _fit_exact(
    em: Any, holdout: str | None, method: str, bounds: tuple[float, float] | None,
    max_iter: int, quiet: bool, phases: _Phases,
) -> Any:  # fmt: skip
    """`calibrate`'s fit, for a table or an HDF5 dataset: the option check, the target
    check's findings, then :func:`l0calib.calibrate_exact`."""
    held = _holdout_of(em, holdout, None, 0)
    check_method(method, bounds)
    phases.release()
    _warn_targets(em, quiet, exclude=held, bounds=bounds)
    with phases.phase(f"calibrating ({method})"):
        return l0calib.calibrate_exact(
            em, method=method, bounds=bounds, holdout=held,  # type: ignore[arg-type]
            max_iter=max_iter,
        )  # fmt: skip


def _calibrate_hdf5(
    ctx: typer.Context, microdata: Path, targets: Path, method: str,
    bounds: tuple[float, float] | None, output: Path | None, report_dir: Path | None,
    holdout: str | None, max_iter: int, period: str | None, force: bool, quiet: bool,
) -> None:  # fmt: skip
    """`calibrate` of a PolicyEngine HDF5 dataset: every household of one period reweighted,
    written back in the file's layout (a household whose weight ends at 0 is dropped)."""
    out = _hdf5_output(microdata, output, "reweighted")
    outs = _plan_outputs(microdata, targets, None, out, report_dir, None, force,
                         options=ctx.params)  # fmt: skip
    with user_errors(), outs.plan.transaction() as tx, _Phases(quiet) as phases:
        data, em = _read_hdf5(microdata, targets, period, phases)
        result = _fit_exact(em, holdout, method, bounds, max_iter, quiet, phases)
        negative = int((result.weights < 0).sum())
        if negative:
            raise l0calib.DataError(
                f"{microdata}: method '{method}' gave {negative:,} negative weight(s); a "
                "PolicyEngine dataset needs weights >= 0: use --method raking, logit or "
                "truncated (with --bounds)"
            )
        with phases.phase("writing"):
            more = {"bounds": list(bounds) if bounds else None}
            shown = _write_hdf5_outputs(tx, outs, microdata, data.period, result.weights,
                                        result, em, more=more)  # fmt: skip
    _finish(outs, shown, quiet)


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def check(
    microdata: Path = MICRODATA,
    targets: Path = TARGETS,
    weight_column: str = WEIGHT_COLUMN,
    id_column: str = ID_COLUMN,
    persons: Path | None = PERSONS,
    person_household_column: str = PERSON_LINK,
    min_support: int = typer.Option(10, "--min-support", help="Flag targets with fewer records."),
    all_targets: bool = typer.Option(False, "--all", help="List every target, not only flagged."),
    target_records: int | None = typer.Option(
        None, "--target-records", help="Also flag targets at risk when only K households are kept."
    ),
    bounds: str | None = typer.Option(
        None,
        "--bounds",
        help="LO,HI bounds on final / initial weight; with --target-records, on final / "
        "inflated initial weight (as reweight reads them), e.g. 0.2,5.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    period: str | None = typer.Option(
        None, "--period", help="HDF5 input: the period (e.g. 2024) to read and check."
    ),
) -> None:
    """Validate microdata and targets without fitting: can the targets all be met?

    Shows each target's support (records contributing), initial estimate and error, and
    flags: zero support, tiny support, duplicate of or linear combination of other targets
    (and whether their values agree). Then whether non-negative weights (within `--bounds`)
    can meet every target within its tolerance; if not, the least change to the target
    values that would, and the smallest sets of targets that contradict each other. With
    `--target-records K`, the targets a K-record sample would likely miss. Exits with 1 when
    a target cannot be used, 3 when the targets cannot all be met, else 0. A PolicyEngine
    HDF5 dataset (`.h5`) is read as `reweight` reads it (`--period` choosing the period).
    """
    parsed_bounds = _parse_bounds(bounds)
    hdf5 = is_hdf5(microdata)
    if hdf5:
        _hdf5_refusals("--persons does not apply", persons is not None,
                       (id_column, weight_column, person_household_column))  # fmt: skip
    else:
        _no_period(period)
    with user_errors(json_output=json_output):
        if hdf5:
            _, em = _read_hdf5(microdata, targets, period, _Phases(quiet=True),
                               allow_zero_support=True)  # fmt: skip
        else:
            _, _, em = _load(
                microdata, targets, persons, id_column, weight_column,
                person_household_column, allow_zero_support=True,
            )  # fmt: skip
        diagnosis = diagnose_targets(em, bounds=parsed_bounds, target_records=target_records)
        table_rows = annotate_check(
            check_targets(em, min_support=min_support, dependencies=diagnosis.dependent_names()),
            diagnosis,
        )
    unusable = table_rows.loc[~table_rows["usable"], "name"].tolist()
    if json_output:
        out = {"targets_file": str(targets), **diagnosis.to_dict(),
               "targets": check_records(table_rows)}  # fmt: skip
        stdout.print_json(json.dumps(out, allow_nan=False))
    else:
        _show_check(targets, em, table_rows, diagnosis, all_targets)
    if unusable:
        _say(f"Error: {len(unusable)} target(s) cannot be used: {listed(unusable)}")
        raise typer.Exit(code=1)
    if not diagnosis.feasible:
        raise typer.Exit(code=EXIT_TOLERANCE)


def _show_check(targets: Path, em, table_rows, diagnosis, all_targets: bool) -> None:
    """The `check` tables: flagged targets, the least change, the conflicts, the risks."""
    shown = table_rows if all_targets else table_rows[table_rows["flags"] != ""]
    table = Table(title=f"{targets.name}: {em.n_targets} targets, {em.n_records:,} households")
    for col in ("target", "support", "initial estimate", "initial rel error"):
        table.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    table.add_column("flags", overflow="fold")
    for _, r in shown.iterrows():
        table.add_row(
            escape(str(r["name"])), f"{r['support']:,}", f"{r['initial_estimate']:,.0f}",
            f"{r['initial_rel_error']:+.2%}", escape(r["flags"]),
        )  # fmt: skip
    if len(shown):
        stdout.print(table)
    if diagnosis.changes:
        moves = Table(title="least change to the targets that makes them feasible")
        for col in ("target", "value", "required value", "change"):
            moves.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
        for c in diagnosis.changes:
            moves.add_row(escape(c.name), f"{c.value:,.0f}", f"{c.required_value:,.0f}",
                          f"{c.rel_change:+.3%}")  # fmt: skip
        stdout.print(moves)
    for i, c in enumerate(diagnosis.conflicts, start=1):
        stdout.print(f"conflict {i}: {escape(c.message)}", soft_wrap=True, highlight=False)
    if not diagnosis.conflicts_complete:
        stdout.print("the conflict search stopped early; more contradictions may remain")
    flagged = int((table_rows["flags"] != "").sum())
    unusable = int((~table_rows["usable"]).sum())
    verdict = (
        "all can be met"
        if diagnosis.feasible
        else f"they cannot all be met ({len(diagnosis.conflicts)} conflicts; least total "
        f"change {diagnosis.total_rel_change:.3%})"
    )
    stdout.print(
        f"{em.n_targets} targets checked, {flagged} flagged, {unusable} unusable; {verdict}."
    )


def _warn_targets(em, quiet: bool, **options) -> None:
    """`check`'s findings as warnings before a fit (they never stop it): the same search
    with the same budget as `l0calib check`, so both name the same conflicts."""
    if quiet:
        return
    diagnosis = diagnose_targets(em, **options)
    risks = diagnosis.pruning_risks
    # The engine keeps supporters of every fitted target (its coverage guarantee), so the
    # risk a uniform draw would run is one line here; `check` lists each target.
    for line in dataclasses.replace(diagnosis, pruning_risks=()).messages(limit=5):
        _say(f"Warning: {line}")
    if risks:
        rarest = min(risks, key=lambda r: r.support)
        k = options.get("target_records")
        _say(
            f"Note: {len(risks)} target(s) have so few supporting records that a uniform "
            f"draw of {k:,} of {em.n_records:,} would likely miss them (rarest: {rarest.name}, "
            f"{rarest.support} record{'s' if rarest.support != 1 else ''}); the selection "
            f"keeps supporters of every fitted target. `l0calib check --target-records {k}` "
            "lists them."
        )


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def select(
    ctx: typer.Context,
    microdata: Path = MICRODATA,
    target_records: int | None = typer.Option(
        None, "--target-records", help="Households to select (required).", show_default=False
    ),
    records: int | None = typer.Option(
        None, "--records", hidden=True, help="Deprecated alias of --target-records."
    ),
    targets: Path | None = typer.Option(
        None, "--targets", help="Targets file: the L0 part keeps these totals."
    ),
    l0_fraction: float | None = typer.Option(
        None,
        "--l0-fraction",
        help="Share chosen by the L0 engine. Default 1 with --targets, else 0.",
    ),
    random_fraction: float | None = typer.Option(
        None, "--random-fraction", help="Share drawn at random (PPS). Default: the rest."
    ),
    stratify: str | None = typer.Option(
        None, "--stratify", help="Column whose values stratify the random draw."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output table (.parquet or .csv). Default: <MICRODATA stem>_selected.parquet.",
    ),
    weight_column: str = WEIGHT_COLUMN,
    id_column: str = ID_COLUMN,
    persons: Path | None = PERSONS,
    person_household_column: str = PERSON_LINK,
    report_dir: Path | None = typer.Option(
        None,
        "--report-dir",
        help="Report directory (with --targets). Default: <output stem>_report/.",
    ),
    epochs: int = typer.Option(600, "--epochs", help="Training epochs of the L0 part."),
    holdout: str | None = typer.Option(
        None, "--holdout", help="Comma-separated target names to report but not fit."
    ),
    holdout_fraction: float | None = typer.Option(
        None, "--holdout-fraction", help="Hold out this fraction of targets, chosen by --seed."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random step."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    entity: list[str] | None = ENTITY,
    entity_link: list[str] | None = ENTITY_LINK,
    period: str | None = typer.Option(
        None, "--period", help="HDF5 input: the period (e.g. 2024) to read and select from."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
    max_error: float = typer.Option(
        0.5,
        "--max-error",
        help="With --targets: a fitted target off by more than this (relative), or at "
        "-100 %, is named as missed, and the run exits with 3.",
    ),
) -> None:
    """Select exactly N households: part chosen by the L0 engine, part drawn at random.

    With `--targets`, a HybridGate: the random part (probability proportional to weight,
    optionally stratified) is drawn first, the engine chooses the L0 part around it, and
    all selected weights are recalibrated (report directory as for `reweight`). Without
    targets, a random draw only, each household carrying its design weight (stratum weight
    total / households drawn from it). Writes the selected rows, in input order, with a
    `selection` column (`l0` or `random`). A PolicyEngine HDF5 dataset (`.h5`) is read as
    `reweight` reads it (`--period`) and written back pruned to the selected households
    with their weights (`-o small.h5`; the file has no `selection` variable).
    """
    if records is not None:
        if target_records is not None:
            raise typer.BadParameter("give --target-records only (--records is its old name)")
        _say("Warning: --records is deprecated; use --target-records.")
        target_records = records
    if target_records is None:
        raise typer.BadParameter("is required", param_hint="--target-records")
    if l0_fraction is None:
        l0_fraction = 0.0 if targets is None else 1.0 - (random_fraction or 0.0)
    if random_fraction is None:
        random_fraction = 1.0 - l0_fraction
    if targets is None and l0_fraction > 0:
        raise typer.BadParameter("the L0 part needs --targets", param_hint="--l0-fraction")
    _check_holdout(holdout, holdout_fraction)
    hdf5 = is_hdf5(microdata)
    if hdf5:
        _hdf5_refusals("--persons, --entity and --entity-link do not apply",
                       persons is not None or bool(entity or entity_link),
                       (id_column, weight_column, person_household_column))  # fmt: skip
        output = _hdf5_output(microdata, output, "selected")
    else:
        _no_period(period)
    outs = _plan_outputs(microdata, targets, persons, output, report_dir, None, force,
                         report=targets is not None, suffix="selected", entity=entity,
                         entity_link=entity_link, options=ctx.params)  # fmt: skip
    result = None
    n_targets = None
    em = None
    with user_errors(), outs.plan.transaction() as tx, _Phases(quiet) as phases:
        if hdf5:
            data, _ = _read_hdf5(microdata, None, period, phases)
            households, person_frame = data.households, data.persons
        else:
            with phases.phase("reading", inputs=True):
                households = read_table(microdata)
                # Refused before any work: columns the output would add.
                for added in ("selection", f"{weight_column}_initial"):
                    if added in households.columns:
                        raise l0calib.DataError(
                            f"{microdata}: column '{added}' already exists (the output adds "
                            "it); rename it"
                        )
                person_frame = read_table(persons) if persons is not None else None
        entity_frames = read_entities(outs.entities, households, id_column)
        strata = None
        if stratify is not None:
            if stratify not in households.columns:
                raise l0calib.DataError(
                    f"{microdata}: --stratify column '{stratify}' is not in the data"
                )
            strata = households[stratify].to_numpy()
        hybrid = l0calib.HybridGate(
            len(households), l0_fraction, random_fraction, target_records, seed=seed
        )
        if targets is None:
            if weight_column not in households.columns:
                raise l0calib.DataError(
                    f"{microdata}: weight column '{weight_column}' is not in the data "
                    "(name it with --weight-column)"
                )
            w0 = households[weight_column].to_numpy(dtype=float)
            with phases.phase("selecting"):
                idx, design = l0calib.pps_sample(w0, target_records, seed=seed, strata=strata)
            weights = np.zeros(len(households))
            weights[idx] = design
            types = np.full(idx.size, "random")
        else:
            with phases.phase("building the matrix", inputs=True):
                em = l0calib.build_estimate_matrix(
                    households, targets, person_frame, id_column=id_column,
                    weight_column=weight_column,
                    person_household_column=person_household_column,
                    table_names={"households": str(microdata),
                                 "persons": str(microdata if hdf5 else persons)},
                )  # fmt: skip
            n_targets = em.n_targets
            held = _holdout_of(em, holdout, holdout_fraction, seed)
            with ExitStack() as stack, warnings.catch_warnings():
                warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
                if hybrid.n_l0 == 0:  # the random draw, then only the refit runs
                    stack.enter_context(phases.phase("drawing and refitting"))
                    callback = None
                else:
                    callback = stack.enter_context(phases.fitting(epochs))
                hybrid.fit(em, holdout=held, strata=strata, epochs=epochs, device=device,
                           callback=callback, max_error=max_error)  # fmt: skip
            result, weights, types = hybrid.result_, hybrid.weights_, hybrid.types_
        kept = with_weights(households, weights, weight_column=weight_column)
        kept["selection"] = types
        more: dict = {"selection_split": {"l0": int((types == "l0").sum()),
                                          "random": int((types == "random").sum())}}  # fmt: skip
        if strata is not None:  # each stratum's records before and after, for the report
            before = pd.Series(strata).astype(str).value_counts()
            after = pd.Series(strata[weights != 0]).astype(str).value_counts()
            more["strata"] = {"column": stratify, "records_in": before.to_dict(),
                              "records_kept": after.reindex(before.index, fill_value=0)
                              .to_dict()}  # fmt: skip
        with phases.phase("writing"):
            if hdf5:
                shown = _write_hdf5_outputs(tx, outs, microdata, data.period, weights, result,
                                            em, more=more)  # fmt: skip
            else:
                shown = _write_outputs(
                    tx, outs, kept, person_frame, entity_frames, result, n_targets,
                    microdata=microdata, persons=persons, id_column=id_column,
                    weight_column=weight_column,
                    person_household_column=person_household_column, em=em, more=more,
                )  # fmt: skip
    _finish(outs, shown, quiet)


@app.command(cls=_Command)
def report(
    report_dir: Path = typer.Argument(
        ...,
        help="A report directory written by reweight, calibrate or select.",
        show_default=False,
    ),
    open_page: bool = typer.Option(False, "--open", help="Open the page in a web browser."),
) -> None:
    """Draw report.html again from a report directory's files.

    The page is drawn from targets.csv, history.csv, summary.json and weight_ratios.csv
    alone: one self-contained file (inline SVG plots, no network) that opens offline and
    prints. With `--open`, says which page it opened, or, where no browser can be
    started (a server without a display), where the page is. Exits with 1 when the
    directory is not a report directory.
    """
    from l0calib.report_html import render_html

    with user_errors():
        page = render_html(report_dir)
    stdout.print(f"wrote {page}", highlight=False)
    if open_page:
        import webbrowser

        uri = page.resolve().as_uri()
        try:
            opened = webbrowser.open(uri)
        except webbrowser.Error:
            opened = False
        if opened:
            stdout.print(f"opened {uri} in the web browser", highlight=False, soft_wrap=True)
        else:  # the page was written, so this is no failure: say where it is
            _say(f"Warning: could not open a web browser here; the report is at {page.resolve()}")


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def gate(
    n: int = typer.Option(10_000, "--n", help="Number of gates."),
    init_mean: float = typer.Option(0.5, help="Initial sigmoid(log_alpha), in (0, 1)."),
    temperature: float = typer.Option(
        2 / 3, help="Concrete temperature beta (> 0). Default: 2/3.", show_default=False
    ),
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
    """Console-script entry point (see :func:`l0calib_cli.run`)."""
    from l0calib_cli import run as entry

    entry()


if __name__ == "__main__":  # pragma: no cover
    run()
