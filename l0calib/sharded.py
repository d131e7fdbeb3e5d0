"""A whole calibration run from files on several processes (what ``--nproc`` runs).

:mod:`l0calib.distributed` fits one block of records per rank; this module runs the rest
of a run around it: each rank reads only its block of the households file and those
households' persons and entity rows, checks the links (a row linked to no household at
all is found by counting rows over the ranks), fits, and rank 0 gathers the kept rows and
writes them into the temporary files of an :class:`l0calib.outputs.OutputPlan`'s
transaction. Only the process that made the plan moves them into place: a worker never
makes an output visible, and a worker whose parent died stops (on Linux it is killed with
its parent, ``PR_SET_PDEATHSIG``; elsewhere it checks before writing).

Under ``torchrun`` every rank calls :func:`run_rank` itself; otherwise
:func:`run_sharded` starts ``nproc`` local workers.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib.exceptions import ConvergenceWarning, DataError, L0CalibError, ParameterError
from l0calib.io import count_rows, read_table, write_frame

__all__ = [
    "ShardedRun",
    "check_links",
    "fingerprint",
    "holdout_names",
    "read_entities",
    "run_rank",
    "run_sharded",
]

# progress(show, epochs) -> (context manager or None, callback or None); picklable.
ProgressFactory = Callable[[bool, int], tuple[Any, Any]]


@dataclass
class ShardedRun:
    """Everything a worker of a sharded run needs (picklable).

    ``temp_tables`` maps an output role to ``(temporary path, final path)``: rank 0 writes
    each table to the temporary path in the final path's format; ``report_temp`` is the
    directory rank 0 fills with the report's files; ``log`` the temporary log path.
    """

    microdata: Path
    targets: Path
    persons: Path | None = None
    id_column: str = "household_id"
    weight_column: str = "household_weight"
    person_household_column: str = "person_household_id"
    entities: list[tuple[str, Path, str]] = field(default_factory=list)  # name, path, link
    target_records: int | None = None
    lambda_l0: float | None = None
    lambda_l2: float | None = None
    epochs: int = 600
    lr: float = 0.05
    holdout: str | None = None
    holdout_fraction: float | None = None
    tol: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    log: Path | None = None
    checkpoint: Path | None = None
    checkpoint_every: int = 100
    resume: bool = False
    quiet: bool = False
    temp_tables: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    report_temp: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)
    progress: ProgressFactory | None = None
    bounds: tuple[float, float] | None = None
    max_error: float | None = 0.5
    threads: int | None = None


def holdout_names(
    names: tuple[str, ...] | list[str], holdout: str | None, fraction: float | None, seed: int
) -> list[str] | None:
    """Targets held out: the comma-separated ``holdout``, or a ``fraction`` drawn with
    its own stream (``seed + 1``, so the holdout does not change when the gates' noise
    does), or None."""
    if holdout and fraction is not None:
        raise ParameterError("give a holdout list or a holdout fraction, not both")
    if holdout:
        return [h.strip() for h in holdout.split(",") if h.strip()]
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise ParameterError(f"the holdout fraction must be in [0, 1), got {fraction}")
        chosen = np.random.default_rng(seed + 1).random(len(names)) < fraction
        return [n for n, c in zip(names, chosen, strict=True) if c]
    return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(run: ShardedRun, world_size: int) -> dict[str, str]:
    """What a checkpoint of ``run`` depends on: a hash of each input file's contents and
    every option that changes the trajectory (not ``epochs``: a run may be extended)."""
    out = {"file microdata": _file_hash(run.microdata), "file targets": _file_hash(run.targets)}
    if run.persons is not None:
        out["file --persons"] = _file_hash(run.persons)
    for name, path, _ in run.entities:
        out[f"file --entity {name}"] = _file_hash(path)
    options = {
        "--target-records": run.target_records, "--lambda-l0": run.lambda_l0,
        "--lambda-l2": run.lambda_l2, "--lr": run.lr, "--holdout": run.holdout,
        "--holdout-fraction": run.holdout_fraction, "--tol": run.tol, "--seed": run.seed,
        "--dtype": run.dtype, "--nproc": world_size, "--id-column": run.id_column,
        "--weight-column": run.weight_column,
        "--person-household-column": run.person_household_column,
    }  # fmt: skip
    out.update({k: str(v) for k, v in options.items()})
    return out


def check_links(path: Path, name: str, link: str, households: pd.DataFrame, id_column: str,
                frame: pd.DataFrame) -> None:  # fmt: skip
    """Every row of ``frame`` must link to a household of ``households``
    (:func:`l0calib.policyengine.prune_entities` checks it); the message names ``path``."""
    from l0calib.policyengine import prune_entities

    try:
        prune_entities({"household": households, name: frame},
                       households[id_column].to_numpy(),
                       links={"household": id_column, name: link})  # fmt: skip
    except L0CalibError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def read_entities(
    entities: list[tuple[str, Path, str]],
    households: pd.DataFrame,
    id_column: str,
    *,
    block: bool = False,
) -> list[pd.DataFrame]:
    """Read every entity table ``(name, path, link column)`` and check its links.

    With ``block``, only the rows of ``households`` (one process's share) are read; a row
    linked to no household at all is then found by :func:`run_rank`'s row count.
    """
    frames = []
    for name, path, link in entities:
        if block:
            if link not in read_table(path, rows=(0, 0)).columns:
                frame = pd.DataFrame()  # reported just below
            else:
                frame = read_table(path, where=(link, households[id_column].to_numpy()))
        else:
            frame = read_table(path)
        if link not in frame.columns:
            raise DataError(
                f"{path}: column '{link}' (the household id of {name}) is missing; name "
                f"the right one with --entity-link {name}=COLUMN"
            )
        check_links(path, name, link, households, id_column, frame)
        frames.append(frame)
    return frames


def _check_unlinked_rows(run: ShardedRun, person_frame: Any, entity_frames: list) -> None:
    """Each rank reads only the persons and entity rows of its own households, so a row
    linked to no household at all is read by no rank. Counting the rows read (summed over
    the ranks) against the rows in each file finds them; only then are the link column and
    the household ids read (those two columns only) to name the first such row."""
    import torch
    import torch.distributed as dist

    tables = [(run.persons, run.person_household_column, "person", person_frame)]
    tables += [(path, link, name, frame)
               for (name, path, link), frame in zip(run.entities, entity_frames,
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
        ids = read_table(run.microdata, columns=[run.id_column])
        check_links(path, name, link, ids, run.id_column, read_table(path, columns=[link]))
        raise DataError(
            f"{path}: the worker processes read {int(n_read):,} of its {total:,} {name} rows"
        )


def run_rank(rank: int, world: int, run: ShardedRun) -> dict[str, Any] | None:
    """One rank of a sharded run, in an initialised (or about to be) process group.

    Returns, on rank 0, ``{"summary": <summary.json figures>, "worst": [[name,
    rel_error], ...]}`` after writing every output to its temporary path; None elsewhere.
    """
    import torch.distributed as dist

    from l0calib.distributed import calibrate_shard, load_shard
    from l0calib.report import (
        apply_weights,
        check_added_columns,
        keep_linked_rows,
        summary,
        write_report_files,
    )

    backend = "nccl" if run.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))  # fmt: skip
    try:
        households, person_frame, em, offset, n_total = load_shard(
            run.microdata, run.targets, run.persons, rank=rank, world_size=world,
            id_column=run.id_column, weight_column=run.weight_column,
            person_household_column=run.person_household_column,
        )  # fmt: skip
        check_added_columns(households, run.microdata, run.weight_column)
        entity_frames = read_entities(run.entities, households, run.id_column, block=True)
        _check_unlinked_rows(run, person_frame, entity_frames)
        held = holdout_names(em.names, run.holdout, run.holdout_fraction, run.seed)
        bar, callback = (None, None)
        if run.progress is not None:
            bar, callback = run.progress(rank == 0 and not run.quiet, run.epochs)
        with bar if bar is not None else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = calibrate_shard(
                em, offset=offset, n_total=n_total, target_records=run.target_records,
                lambda_l0=run.lambda_l0, lambda_l2=run.lambda_l2, epochs=run.epochs,
                lr=run.lr, holdout=held, tol=run.tol, seed=run.seed, device=run.device,
                dtype=run.dtype, callback=callback, log_path=run.log,
                checkpoint_dir=run.checkpoint, checkpoint_every=run.checkpoint_every,
                resume=run.resume, fingerprint=run.fingerprint, bounds=run.bounds,
                max_error=run.max_error, threads=run.threads,
            )  # fmt: skip
        kept = apply_weights(households, result, weight_column=run.weight_column)
        kept.index = kept.index + offset  # global row positions (for the text of CSV cells)
        ids = kept[run.id_column]
        kept_persons = None
        if person_frame is not None:
            kept_persons = keep_linked_rows(person_frame, run.person_household_column, ids)
        kept_entities = [keep_linked_rows(frame, link, ids)
                         for (_, _, link), frame in zip(run.entities, entity_frames,
                                                        strict=True)]  # fmt: skip
        facts, ratio_counts = _report_facts(em, result)  # on every rank: collective
        parts: list = [None] * world
        dist.all_gather_object(parts, (kept, kept_persons, kept_entities))
        if rank != 0:
            return None
        frames: dict[str, pd.DataFrame] = {"table": pd.concat([p[0] for p in parts])}
        if person_frame is not None:
            frames["persons"] = pd.concat([p[1] for p in parts])
        for j, (name, _, _) in enumerate(run.entities):
            frames[f"entity:{name}"] = pd.concat([p[2][j] for p in parts])
        sources = {"table": run.microdata, "persons": run.persons}
        sources.update({f"entity:{name}": path for name, path, _ in run.entities})
        _parent_alive_or_exit()
        for role, (tmp, dest) in run.temp_tables.items():
            frame = frames[role]
            if role == "table":
                computed = {run.weight_column, f"{run.weight_column}_initial"}
            else:
                computed = set()
            write_frame(frame, tmp, like=dest, source=sources.get(role), computed=computed)
        # The whole report is on every rank; the diagnostics are reduced over the ranks.
        if run.report_temp is not None:
            write_report_files(result, run.report_temp, n_targets=em.n_targets, extra=run.extra,
                               facts=facts, ratio_counts=ratio_counts, tol=run.tol)  # fmt: skip
        figures = summary(result, n_targets=em.n_targets, extra=run.extra)
        fitted = result.report[~result.report["holdout"]].nlargest(5, "abs_rel_error")
        worst = [[str(n), float(e)] for n, e in zip(fitted["name"], fitted["rel_error"],
                                                    strict=True)]  # fmt: skip
        return {"summary": figures, "worst": worst}
    finally:
        dist.destroy_process_group()


def _report_facts(em: Any, result: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """The report's per-target facts and weight-ratio counts, summed over the ranks (each
    rank holds a block of the records; all of these add up)."""
    import torch
    import torch.distributed as dist

    from l0calib.report import ratio_histogram, target_facts

    facts = target_facts(em, result.weights, structure=False)
    counts = ratio_histogram(result.weights, em.weights)
    k = em.n_targets
    sums = torch.tensor(np.concatenate([facts["initial_estimate"].to_numpy(),
                                        facts["support"].to_numpy(),
                                        facts["kept_support"].to_numpy(), counts]),
                        dtype=torch.float64)  # fmt: skip
    dist.all_reduce(sums)
    totals = sums.numpy()
    facts["initial_estimate"] = totals[:k]
    facts["support"] = totals[k : 2 * k].round().astype(np.int64)
    facts["kept_support"] = totals[2 * k : 3 * k].round().astype(np.int64)
    tiny = np.where(facts["support"] < 10, "tiny support (< 10 records)", "")
    facts["flags"] = np.where(facts["support"] == 0, "zero support", tiny)
    return facts, totals[3 * k :].round().astype(np.int64)


# The first lines a worker runs, before any heavy import: die with the parent (Linux:
# PR_SET_PDEATHSIG, kept across exec), stop at once if it is already gone, leave Ctrl-C to
# the parent (a terminal sends it to the whole process group).
_BOOT = """
import os, signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.path and sys.path[0] == "":
    del sys.path[0]  # the current directory must not shadow the installed l0calib
from l0calib.sharded import _worker_main
_worker_main(*sys.argv[1:])
"""


def _worker_main(parent: str, handoff: str, rank: str, world: str, port: str) -> None:
    """A local worker: read the run its parent pickled into ``handoff`` (a private
    directory it made), fit this rank, hand back the figures (rank 0) or the error."""
    import pickle

    global _PARENT_PID
    _PARENT_PID = int(parent)
    directory = Path(handoff)
    with open(directory / "run.pickle", "rb") as f:
        run = pickle.load(f)  # written by our own parent process, in its 0700 directory
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    try:
        out = run_rank(int(rank), int(world), run)
    except L0CalibError as exc:
        # The whole message (it may list several problems) for the parent to show.
        (directory / f"error-rank{rank}.txt").write_text(str(exc))
        _exit_now(1)
    if int(rank) == 0:
        (directory / "result.json").write_text(json.dumps(out))
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End a worker whose files are written and closed without running the interpreter's
    and the C++ runtime's shutdown: a torch.distributed (gloo) thread still alive there
    could abort the process ("terminate called without an active exception", exit -6),
    which the parent would have to report as a failed worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PARENT_PID: int | None = None


def _parent_alive_or_exit() -> None:
    """A worker whose parent died never writes anything (where PR_SET_PDEATHSIG is not)."""
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        os._exit(1)


def run_sharded(run: ShardedRun, nproc: int) -> dict[str, Any]:
    """Run ``run`` on ``nproc`` local worker processes; rank 0's figures when all finish.

    The workers are started with the ``python`` running this function; each dies with its
    parent. If one fails, the others are stopped; if this function is interrupted (Ctrl-C,
    SIGTERM raising in the main thread), every worker is killed before it returns.

    Raises
    ------
    L0CalibError
        ``"a worker process failed: <its message>"`` when any worker fails.
    """
    import pickle
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handoff = Path(tempfile.mkdtemp(prefix="l0calib-"))
    procs: list[subprocess.Popen] = []
    try:
        with open(handoff / "run.pickle", "wb") as f:
            pickle.dump(run, f)
        for rank in range(nproc):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(os.getpid()), str(handoff), str(rank),
                 str(nproc), str(port)],
                stdin=subprocess.DEVNULL,
            ))  # fmt: skip
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                errors = sorted(handoff.glob("error-rank*.txt"))
                if errors:
                    message = errors[0].read_text()
                else:
                    bad = next(r for r, c in enumerate(codes) if c not in (None, 0))
                    message = f"worker {bad} exited with code {codes[bad]}"
                raise L0CalibError(f"a worker process failed: {message}")
            if all(c == 0 for c in codes):
                return json.loads((handoff / "result.json").read_text())
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        shutil.rmtree(handoff, ignore_errors=True)
