"""The ``l0calib`` Typer application: parse options, call the library, render results.

Exit codes: 0 success; 1 bad input or data error; 2 usage error; 3 the fit finished but
missed the requested tolerance.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import l0calib  # light: its public names load on first use
from l0calib.exceptions import L0CalibError


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
check_targets = _lazy_function("l0calib.diagnostics", "check_targets")
atomic_path = _lazy_function("l0calib.io", "atomic_path")
count_rows = _lazy_function("l0calib.io", "count_rows")
read_table = _lazy_function("l0calib.io", "read_table")
table_format = _lazy_function("l0calib.io", "table_format")
write_frame = _lazy_function("l0calib.io", "write_frame")
prune_entities = _lazy_function("l0calib.policyengine", "prune_entities")
apply_weights = _lazy_function("l0calib.report", "apply_weights")
keep_linked_rows = _lazy_function("l0calib.report", "keep_linked_rows")
with_weights = _lazy_function("l0calib.report", "with_weights")
write_report = _lazy_function("l0calib.report", "write_report")

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 bad input or data error; 2 usage error; "
    "3 the fit finished but missed the requested tolerance."
)
EXIT_TOLERANCE = 3

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


def _say(message: str) -> None:
    """Print to stderr as plain text, unwrapped (messages are matched by scripts)."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into ``Error: ...`` on stderr and exit code 1."""
    try:
        yield
    except L0CalibError as exc:
        _say(f"Error: {exc}")
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
    help="NAME=PATH: another entity table (e.g. tax_unit=tu.parquet); "
    "its rows of kept households are written beside the output. Repeatable.",
)
ENTITY_LINK = typer.Option(
    None,
    "--entity-link",
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
):  # fmt: skip
    households = read_table(microdata)
    person_frame = read_table(persons) if persons is not None else None
    em = l0calib.build_estimate_matrix(
        households, targets, person_frame, id_column=id_column, weight_column=weight_column,
        person_household_column=person_household_column,
        allow_zero_support=allow_zero_support,
    )  # fmt: skip
    return households, person_frame, em


def _holdout(names: tuple[str, ...], holdout: str | None, fraction: float | None, seed: int):
    if holdout and fraction is not None:
        raise typer.BadParameter("give --holdout or --holdout-fraction, not both")
    if holdout:
        return [h.strip() for h in holdout.split(",") if h.strip()]
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise typer.BadParameter("must be in [0, 1)", param_hint="--holdout-fraction")
        # Its own stream (seed + 1): the holdout does not change when the gates' noise does.
        chosen = np.random.default_rng(seed + 1).random(len(names)) < fraction
        return [n for n, c in zip(names, chosen, strict=True) if c]
    return None


def _fit_progress(quiet: bool, epochs: int):
    """A rich progress bar and the callback that drives it (None, None when quiet)."""
    if quiet:
        return None, None
    bar = Progress(
        TextColumn("[bold]fitting"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task("fit", total=epochs, status="")

    def callback(p: l0calib.Progress) -> None:
        status = f"loss {p.loss:.3g}  mean err {p.mean_abs_rel_error:.2%}"
        if p.goal is not None:
            status += f"  survivors {p.expected_survivors:,.0f}"
        bar.update(task, completed=p.epoch, status=status)

    return bar, callback


def _output_paths(microdata: Path, output: Path | None, report_dir: Path | None):
    out = output if output is not None else Path(f"{microdata.stem}_reweighted.parquet")
    with user_errors():
        table_format(out)
    report = report_dir if report_dir is not None else out.with_name(f"{out.stem}_report")
    return out, report


def _final_table(result: l0calib.CalibrationResult) -> Table:
    d, info = result.diagnostics, result.info
    table = Table(title=f"l0calib ({result.method})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("records in / out", f"{d.n_records:,} / {d.n_kept:,}")
    errors = f"{info['mean_abs_rel_error']:.3%} / {info['max_abs_rel_error']:.3%}"
    table.add_row("fitted targets: mean / max abs rel error", errors)
    if info.get("holdout_mean_abs_rel_error") is not None:
        table.add_row("holdout targets: mean abs rel error",
                      f"{info['holdout_mean_abs_rel_error']:.3%}")  # fmt: skip
    table.add_row("effective sample size (Kish)", f"{d.effective_sample_size:,.0f}")
    table.add_row("time", f"{result.seconds:.1f} s")
    worst = result.report[~result.report["holdout"]].nlargest(5, "abs_rel_error")
    for _, row in worst.iterrows():
        table.add_row(escape(f"worst: {row['name']}"), f"{row['rel_error']:+.3%}")
    return table


@app.command(epilog=EXIT_CODES_HELP)
def reweight(
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
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
) -> None:
    """Calibrate household weights to the targets, optionally keeping exactly N households.

    Writes the kept households with their new weights (the initial weight kept as
    `<weight column>_initial`), the kept households' persons with `--persons`, and a
    report directory (targets.csv, summary.json, history.csv).
    """
    job = _Job.plan(microdata, targets, persons, output, report_dir, log, force,
                    entity=entity, entity_link=entity_link)  # fmt: skip
    if resume and checkpoint is None:
        raise typer.BadParameter("needs --checkpoint DIR", param_hint="--resume")
    if nproc < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--nproc")
    launched = _torchrun_rank()
    if nproc > 1 or checkpoint is not None or launched is not None:
        params = _ShardedRun(
            microdata=microdata, targets=targets, persons=persons, id_column=id_column,
            weight_column=weight_column, person_household_column=person_household_column,
            target_records=target_records, lambda_l0=lambda_l0, lambda_l2=lambda_l2,
            epochs=epochs, lr=lr, holdout=holdout, holdout_fraction=holdout_fraction,
            tol=tol, seed=seed, device=device, dtype=dtype, log=log, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, resume=resume, quiet=quiet, job=job,
            threads=threads,
        )  # fmt: skip
        summary = _run_sharded(params, nproc, launched)
        if summary is not None:  # rank 0 under torchrun, or the parent of local workers
            _exit_for(summary["converged"], summary["max_abs_rel_error"])
        return
    with user_errors():
        households, person_frame, em = _load(
            microdata, targets, persons, id_column, weight_column, person_household_column
        )
        entity_frames = job.read_entities(households, id_column)
        held = _holdout(em.names, holdout, holdout_fraction, seed)
        bar, callback = _fit_progress(quiet, epochs)
        with bar if bar is not None else ExitStack(), warnings.catch_warnings():
            # The CLI reports a missed tolerance itself (exit code 3).
            warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
            result = l0calib.calibrate(
                em, target_records=target_records, lambda_l0=lambda_l0,
                lambda_l2=lambda_l2, epochs=epochs, lr=lr, holdout=held, tol=tol,
                seed=seed, device=device, callback=callback, log_path=log, dtype=dtype,
                threads=threads,
            )  # fmt: skip
        kept = apply_weights(households, result, weight_column=weight_column)
        job.write(kept, person_frame, em.n_targets, result, id_column, person_household_column,
                  entity_frames)  # fmt: skip
    job.finish(result, quiet)


@dataclass
class _ShardedRun:
    """Everything a worker of a sharded `reweight` needs (picklable)."""

    microdata: Path
    targets: Path
    persons: Path | None
    id_column: str
    weight_column: str
    person_household_column: str
    target_records: int | None
    lambda_l0: float | None
    lambda_l2: float | None
    epochs: int
    lr: float
    holdout: str | None
    holdout_fraction: float | None
    tol: float | None
    seed: int
    device: str
    dtype: str
    log: Path | None
    checkpoint: Path | None
    checkpoint_every: int
    resume: bool
    quiet: bool
    job: _Job
    threads: int | None = None


def _torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (its environment variables), else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return None


def _run_sharded(params: _ShardedRun, nproc: int, launched: tuple[int, int] | None):
    """Run the sharded fit: in this process under torchrun, else on nproc local workers.

    Returns ``{"converged", "max_abs_rel_error"}`` on rank 0 under torchrun and in the
    parent of local workers, None elsewhere. Rank 0 writes the outputs and prints the
    summary table.
    """
    import torch.multiprocessing as mp

    if launched is not None:
        rank, world = launched
        return _sharded_worker(rank, world, None, params, from_torchrun=True)
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handoff = Path(tempfile.mkdtemp(prefix="l0calib-")) / "summary.json"
    try:
        mp.spawn(_spawned_worker, args=(nproc, port, params, str(handoff)), nprocs=nproc)
    except Exception as exc:  # a worker failed: its message, no traceback, no output
        message = str(exc).strip().splitlines()
        _say(f"Error: a worker process failed: {message[-1] if message else exc}")
        raise typer.Exit(code=1) from None
    return json.loads(handoff.read_text())


def _check_unlinked_rows(params: _ShardedRun, person_frame, entity_frames: list) -> None:
    """Each rank reads only the persons and entity rows of its own households, so a row
    linked to no household at all is read by no rank. Counting the rows read (summed over
    the ranks) against the rows in each file finds them; only then are the link column and
    the household ids read (those two columns only) to name the first such row."""
    import torch.distributed as dist

    tables = [(params.persons, params.person_household_column, "person", person_frame)]
    tables += [(path, link, name, frame)
               for (name, path, _, link), frame in zip(params.job.entities, entity_frames,
                                                       strict=True)]  # fmt: skip
    tables = [t for t in tables if t[0] is not None and t[3] is not None]
    if not tables:
        return
    read = torch.tensor([float(len(t[3])) for t in tables], dtype=torch.float64)
    dist.all_reduce(read)
    for (path, link, name, _), n_read in zip(tables, read.tolist(), strict=True):
        total = count_rows(path)
        if int(n_read) == total:
            continue
        ids = read_table(params.microdata, columns=[params.id_column])
        _check_links(path, name, link, ids, params.id_column, read_table(path, columns=[link]))
        raise l0calib.DataError(
            f"{path}: the worker processes read {int(n_read):,} of its {total:,} {name} rows"
        )


def _check_links(path: Path, name: str, link: str, households, id_column: str, frame) -> None:
    """Every row of ``frame`` must link to a household of ``households``
    (:func:`l0calib.policyengine.prune_entities` checks it); the message names ``path``."""
    try:
        prune_entities({"household": households, name: frame},
                       households[id_column].to_numpy(),
                       links={"household": id_column, name: link})  # fmt: skip
    except L0CalibError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _spawned_worker(rank: int, world: int, port: int, params: _ShardedRun, handoff: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    summary = _sharded_worker(rank, world, port, params, from_torchrun=False)
    if rank == 0:
        Path(handoff).write_text(json.dumps(summary))


def _sharded_worker(rank: int, world: int, port: int | None, params: _ShardedRun, *,
                    from_torchrun: bool):  # fmt: skip
    import datetime

    import torch.distributed as dist

    from l0calib.distributed import calibrate_shard, load_shard

    backend = "nccl" if params.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))  # fmt: skip
    try:
        try:
            households, person_frame, em, offset, n_total = load_shard(
                params.microdata, params.targets, params.persons, rank=rank,
                world_size=world, id_column=params.id_column,
                weight_column=params.weight_column,
                person_household_column=params.person_household_column,
            )  # fmt: skip
            entity_frames = params.job.read_entities(households, params.id_column, block=True)
            _check_unlinked_rows(params, person_frame, entity_frames)
            held = _holdout(em.names, params.holdout, params.holdout_fraction, params.seed)
            show = rank == 0 and not params.quiet
            bar, callback = _fit_progress(not show, params.epochs)
            with bar if bar is not None else ExitStack(), warnings.catch_warnings():
                warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
                result = calibrate_shard(
                    em, offset=offset, n_total=n_total, target_records=params.target_records,
                    lambda_l0=params.lambda_l0, lambda_l2=params.lambda_l2,
                    epochs=params.epochs, lr=params.lr, holdout=held, tol=params.tol,
                    seed=params.seed, device=params.device, dtype=params.dtype,
                    callback=callback, log_path=params.log,
                    checkpoint_dir=params.checkpoint, checkpoint_every=params.checkpoint_every,
                    resume=params.resume, threads=params.threads,
                )  # fmt: skip
            kept = apply_weights(households, result, weight_column=params.weight_column)
            kept_persons = None
            if person_frame is not None:
                kept_persons = keep_linked_rows(
                    person_frame, params.person_household_column, kept[params.id_column]
                )
            kept_entities = [
                keep_linked_rows(frame, link, kept[params.id_column])
                for (_, _, _, link), frame in zip(params.job.entities, entity_frames, strict=True)
            ]
        except L0CalibError as exc:
            if from_torchrun:
                _say(f"Error (rank {rank}): {exc}")
                raise typer.Exit(code=1) from None
            raise RuntimeError(str(exc)) from None
        parts: list = [None] * world
        dist.all_gather_object(parts, (kept, kept_persons, kept_entities))
        if rank != 0:
            return None
        all_kept = pd.concat([p[0] for p in parts])
        persons_out = None
        if person_frame is not None:
            persons_out = pd.concat([p[1] for p in parts])
        # The whole report is on every rank; the diagnostics are reduced over the ranks.
        entities_out = [pd.concat([p[2][j] for p in parts])
                        for j in range(len(params.job.entities))]  # fmt: skip
        params.job.write(all_kept, persons_out, em.n_targets, result, params.id_column,
                         params.person_household_column, entities_out)  # fmt: skip
        params.job.show(result, params.quiet)
        return {"converged": result.converged,
                "max_abs_rel_error": result.info["max_abs_rel_error"]}  # fmt: skip
    finally:
        dist.destroy_process_group()


@dataclass
class _Job:
    """Output paths of a fitting command, and the all-or-nothing writing of them."""

    out: Path
    report: Path
    persons_out: Path | None
    entities: list[tuple[str, Path, Path, str]]  # name, input, output, link column
    force: bool
    start: float
    command: str
    microdata: Path
    targets: Path

    @classmethod
    def plan(
        cls, microdata: Path, targets: Path, persons: Path | None, output: Path | None,
        report_dir: Path | None, log: Path | None, force: bool, *, check_report: bool = True,
        suffix: str = "reweighted", entity: list[str] | None = None,
        entity_link: list[str] | None = None,
    ) -> _Job:  # fmt: skip
        out, report = _output_paths(microdata, output, report_dir)
        persons_out = None
        if persons is not None:
            persons_out = out.with_name(f"{persons.stem}_{suffix}{out.suffix}")
        entities = []
        links = _pairs(entity_link or [], "--entity-link")
        for name, path in _pairs(entity or [], "--entity").items():
            p = Path(path)
            link = links.get(name, f"{name}_household_id")
            entities.append((name, p, out.with_name(f"{p.stem}_{suffix}{out.suffix}"), link))
        unknown = set(links) - {e[0] for e in entities}
        if unknown:
            raise typer.BadParameter(f"no --entity named {sorted(unknown)[0]!r}",
                                     param_hint="--entity-link")  # fmt: skip
        if not force:
            for p in (out, report if check_report else None, persons_out, log,
                      *(e[2] for e in entities)):  # fmt: skip
                if p is not None and p.exists():
                    _say(f"Error: {p} already exists (use --force to overwrite)")
                    raise typer.Exit(code=1)
        return cls(
            out=out, report=report, persons_out=persons_out, entities=entities, force=force,
            start=time.perf_counter(), command=" ".join(["l0calib", *sys.argv[1:]]),
            microdata=microdata, targets=targets,
        )  # fmt: skip

    def read_entities(self, households, id_column: str, *, block: bool = False) -> list:
        """Read every --entity table and check its links before any fitting.

        With ``block``, only the rows of ``households`` (one process's share) are read; a
        row linked to no household at all is found by ``_check_unlinked_rows``.
        """
        frames = []
        for name, path, _, link in self.entities:
            if block:
                if link not in read_table(path, rows=(0, 0)).columns:
                    frame = pd.DataFrame()  # reported just below
                else:
                    frame = read_table(path, where=(link, households[id_column].to_numpy()))
            else:
                frame = read_table(path)
            if link not in frame.columns:
                raise l0calib.DataError(
                    f"{path}: column '{link}' (the household id of {name}) is missing; name "
                    f"the right one with --entity-link {name}=COLUMN"
                )
            _check_links(path, name, link, households, id_column, frame)
            frames.append(frame)
        return frames

    def write(
        self, kept, person_frame, n_targets: int | None, result, id_column: str,
        person_household_column: str, entity_frames: list | None = None,
    ) -> None:  # fmt: skip
        """Write the kept rows, their persons and (with a result) the report directory."""
        extra = {
            "command": self.command,
            "microdata": str(self.microdata),
            "targets": str(self.targets),
            "output": str(self.out),
            "seconds_total": time.perf_counter() - self.start,
        }
        # Tables first (each atomic), then the report: a failure leaves no partial file.
        with ExitStack() as stack:
            tmp_out = stack.enter_context(atomic_path(self.out))
            write_frame(kept, tmp_out, like=self.out)
            if self.persons_out is not None and person_frame is not None:
                tmp_p = stack.enter_context(atomic_path(self.persons_out))
                linked = keep_linked_rows(
                    person_frame, person_household_column, kept[id_column].to_numpy()
                )
                write_frame(linked, tmp_p, like=self.persons_out)
            kept_ids = kept[id_column].to_numpy()
            for (name, _, path, link), frame in zip(self.entities, entity_frames or [],
                                                    strict=True):  # fmt: skip
                pruned = prune_entities({name: frame}, kept_ids, links={name: link})[name]
                write_frame(pruned, stack.enter_context(atomic_path(path)), like=path)
            if result is not None:
                write_report(
                    result, self.report, n_targets=n_targets, extra=extra, overwrite=self.force
                )

    def finish(self, result: l0calib.CalibrationResult | None, quiet: bool) -> None:
        self.show(result, quiet)
        if result is not None:
            refit_ok = result.info.get("refit_converged", True)
            reason = (
                None
                if refit_ok
                else f"the refit did not converge ({result.info.get('refit_message')})"
            )
            _exit_for(result.converged, result.info["max_abs_rel_error"], reason)

    def show(self, result: l0calib.CalibrationResult | None, quiet: bool) -> None:
        """The summary table and the list of files written."""
        if not quiet:
            if result is not None:
                stdout.print(_final_table(result))
            written = [str(self.out), str(self.persons_out) if self.persons_out else None]
            written += [str(e[2]) for e in self.entities]
            if result is not None:
                written.append(f"{self.report}/")
            stdout.print(f"wrote {', '.join(w for w in written if w)}")


def _exit_for(converged: bool, max_error: float, reason: str | None = None) -> None:
    """Exit code 3 (with a warning) when the fit missed the requested tolerance or its
    refit stopped short (``reason``)."""
    if not converged:
        what = reason or "missed the requested tolerance"
        _say(
            f"Warning: the fit finished but {what} (max abs rel error {max_error:.3%}); "
            "outputs were written."
        )
        raise typer.Exit(code=EXIT_TOLERANCE)


@app.command("calibrate", epilog=EXIT_CODES_HELP)
def calibrate_command(
    microdata: Path = MICRODATA,
    targets: Path = TARGETS,
    method: str = typer.Option("raking", "--method", help="raking, linear, logit or truncated."),
    bounds: str | None = typer.Option(
        None, "--bounds", help="L,U bounds on w / w0 (needed by logit and truncated)."
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
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
) -> None:
    """Exact classic calibration of all households: raking, linear, logit or truncated.

    Every fitted target is met exactly (Deville & Sarndal 1992, as R's survey::calibrate);
    fails with a clear message when targets are linearly dependent or infeasible. Writes
    the same files as `reweight`.
    """
    parsed_bounds = None
    if bounds is not None:
        try:
            lo, hi = (float(x) for x in bounds.split(","))
        except ValueError:
            raise typer.BadParameter("expected two numbers: L,U", param_hint="--bounds") from None
        parsed_bounds = (lo, hi)
    job = _Job.plan(microdata, targets, persons, output, report_dir, None, force,
                    entity=entity, entity_link=entity_link)  # fmt: skip
    with user_errors():
        households, person_frame, em = _load(
            microdata, targets, persons, id_column, weight_column, person_household_column
        )
        entity_frames = job.read_entities(households, id_column)
        held = _holdout(em.names, holdout, None, 0)
        result = l0calib.calibrate_exact(
            em, method=method, bounds=parsed_bounds, holdout=held,  # type: ignore[arg-type]
            max_iter=max_iter,
        )  # fmt: skip
        kept = apply_weights(households, result, weight_column=weight_column)
        job.write(kept, person_frame, em.n_targets, result, id_column, person_household_column,
                  entity_frames)  # fmt: skip
    job.finish(result, quiet)


@app.command(epilog=EXIT_CODES_HELP)
def check(
    microdata: Path = MICRODATA,
    targets: Path = TARGETS,
    weight_column: str = WEIGHT_COLUMN,
    id_column: str = ID_COLUMN,
    persons: Path | None = PERSONS,
    person_household_column: str = PERSON_LINK,
    min_support: int = typer.Option(10, "--min-support", help="Flag targets with fewer records."),
    all_targets: bool = typer.Option(False, "--all", help="List every target, not only flagged."),
) -> None:
    """Validate microdata and targets without fitting; print a table per target.

    Shows each target's support (records contributing), initial estimate and error, and
    flags: zero support, tiny support, duplicate of or linear combination of other targets.
    Exits with 1 when a target cannot be used.
    """
    with user_errors():
        _, _, em = _load(
            microdata, targets, persons, id_column, weight_column, person_household_column,
            allow_zero_support=True,
        )  # fmt: skip
        table_rows = check_targets(em, min_support=min_support)
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
    flagged = int((table_rows["flags"] != "").sum())
    unusable = table_rows.loc[~table_rows["usable"], "name"].tolist()
    stdout.print(f"{em.n_targets} targets checked, {flagged} flagged, {len(unusable)} unusable.")
    if unusable:
        _say(f"Error: {len(unusable)} target(s) cannot be used: {', '.join(unusable[:10])}")
        raise typer.Exit(code=1)


@app.command(epilog=EXIT_CODES_HELP)
def select(
    microdata: Path = MICRODATA,
    records: int = typer.Option(..., "--records", help="Households to select.", show_default=False),
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
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
) -> None:
    """Select exactly N households: part chosen by the L0 engine, part drawn at random.

    With `--targets`, a HybridGate: the random part (probability proportional to weight,
    optionally stratified) is drawn first, the engine chooses the L0 part around it, and
    all selected weights are recalibrated (report directory as for `reweight`). Without
    targets, a random draw only, each household carrying its design weight (stratum weight
    total / households drawn from it). Writes the selected rows, in input order, with a
    `selection` column (`l0` or `random`).
    """
    if l0_fraction is None:
        l0_fraction = 0.0 if targets is None else 1.0 - (random_fraction or 0.0)
    if random_fraction is None:
        random_fraction = 1.0 - l0_fraction
    if targets is None and l0_fraction > 0:
        raise typer.BadParameter("the L0 part needs --targets", param_hint="--l0-fraction")
    if output is None:
        output = Path(f"{microdata.stem}_selected.parquet")
    job = _Job.plan(microdata, targets or microdata, persons, output,
                    report_dir if targets is not None else None, None, force,
                    check_report=targets is not None, suffix="selected",
                    entity=entity, entity_link=entity_link)  # fmt: skip
    result = None
    with user_errors():
        households = read_table(microdata)
        person_frame = read_table(persons) if persons is not None else None
        entity_frames = job.read_entities(households, id_column)
        strata = None
        if stratify is not None:
            if stratify not in households.columns:
                raise l0calib.DataError(
                    f"{microdata}: --stratify column '{stratify}' is not in the data"
                )
            strata = households[stratify].to_numpy()
        hybrid = l0calib.HybridGate(
            len(households), l0_fraction, random_fraction, records, seed=seed
        )
        if targets is None:
            if weight_column not in households.columns:
                raise l0calib.DataError(
                    f"{microdata}: weight column '{weight_column}' is not in the data"
                )
            w0 = households[weight_column].to_numpy(dtype=float)
            idx, design = l0calib.pps_sample(w0, records, seed=seed, strata=strata)
            weights = np.zeros(len(households))
            weights[idx] = design
            types = np.full(idx.size, "random")
        else:
            em = l0calib.build_estimate_matrix(
                households, targets, person_frame, id_column=id_column,
                weight_column=weight_column, person_household_column=person_household_column,
            )  # fmt: skip
            held = _holdout(em.names, holdout, holdout_fraction, seed)
            bar, callback = _fit_progress(quiet or hybrid.n_l0 == 0, epochs)
            with bar if bar is not None else ExitStack(), warnings.catch_warnings():
                warnings.simplefilter("ignore", l0calib.ConvergenceWarning)
                hybrid.fit(em, holdout=held, strata=strata, epochs=epochs, device=device,
                           callback=callback)  # fmt: skip
            result, weights, types = hybrid.result_, hybrid.weights_, hybrid.types_
        if "selection" in households.columns:
            raise l0calib.DataError(f"{microdata}: column 'selection' already exists")
        kept = with_weights(households, weights, weight_column=weight_column)
        kept["selection"] = types
        job.write(kept, person_frame, None if result is None else em.n_targets, result,
                  id_column, person_household_column, entity_frames)  # fmt: skip
    job.finish(result, quiet)


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
    try:
        app(prog_name="l0calib")
    except KeyboardInterrupt:
        _say("Interrupted; no output was written.")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    run()
