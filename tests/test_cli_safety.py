"""Nothing lost, nothing overwritten: report directories, full disks, signals, orphaned
workers, checkpoint fingerprints and data given back as it came in.

Signals and worker deaths are real: a real child process is started and signalled.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from l0calib_cli.main import app

from .conftest import FIXTURES

runner = CliRunner(env={"COLUMNS": "250"})
TINY = FIXTURES / "tiny"
CLI = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'l0calib'; from l0calib_cli import run; run()",
]


def _tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}  # fmt: skip


def _inputs(d: Path) -> list[str]:
    (d / "in").mkdir()
    for name in ("households.csv", "persons.csv", "targets.csv"):
        shutil.copy(TINY / name, d / "in" / name)
    return ["reweight", "in/households.csv", "in/targets.csv", "--persons", "in/persons.csv",
            "--epochs", "3", "--quiet"]  # fmt: skip


# ---------------------------------------------------------------------------- defect 1
def test_report_dir_dot_with_force_keeps_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = _inputs(tmp_path)
    (tmp_path / "results" / "old_run").mkdir(parents=True)
    (tmp_path / "results" / "old_run" / "weights.csv").write_text("precious\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    before = _tree(tmp_path)
    for _ in range(2):  # the second run replaces the first run's report files only
        result = runner.invoke(app, [*args, "-o", "out/o.csv", "--report-dir", ".", "--force"])
        assert result.exit_code == 0, result.output
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [
        ".l0calib-report.json", "history.csv", "out", "out/o.csv", "out/o_persons.csv",
        "report.html", "summary.json", "targets.csv", "weight_ratios.csv",
    ]  # fmt: skip
    result = runner.invoke(app, [*args, "-o", "o2.csv", "--report-dir", "results", "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "old_run" / "weights.csv").read_text() == "precious\n"
    assert (tmp_path / "results" / "summary.json").exists()


# ---------------------------------------------------------------------------- defects 2-4
@pytest.mark.parametrize(
    ("writer", "err", "where"),
    [
        ("to_parquet", errno.ENOSPC, "o.parquet"),  # the main table
        ("to_csv", errno.ENOSPC, "o_persons.csv"),  # persons (CSV), written first
        ("to_parquet", errno.EROFS, "o.parquet"),
    ],
)
def test_os_errors_are_one_line_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, err: int, where: str
) -> None:
    """The real write call fails part-way through, as on a full disk."""
    monkeypatch.chdir(tmp_path)
    args = _inputs(tmp_path)
    (tmp_path / "o.parquet").write_bytes(b"an earlier output")
    before = _tree(tmp_path)
    real = getattr(pd.DataFrame, writer)

    def failing(self: pd.DataFrame, path: object = None, *a: object, **kw: object) -> object:
        if isinstance(path, (str, os.PathLike)) and Path(path).name.startswith(f".{where}."):
            real(self.head(1), path, *a, **kw)
            raise OSError(err, os.strerror(err), str(path))
        return real(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, writer, failing)
    result = runner.invoke(app, [*args, "-o", "o.parquet", "--persons", "in/persons.csv",
                                 "--force"])  # fmt: skip
    assert result.exit_code == 1
    assert result.output == f"Error: {where}: {os.strerror(err)}\n"
    assert _tree(tmp_path) == before


def test_a_report_that_cannot_be_written_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = _inputs(tmp_path)
    before = _tree(tmp_path)

    def full(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("l0calib.report.json.dump", full)
    result = runner.invoke(app, [*args, "-o", "o.csv"])
    assert result.exit_code == 1
    assert result.output == "Error: o_report: No space left on device\n"
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------- defect 6
@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-rank torchrun environment: the sharded path runs in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():  # fmt: skip
        monkeypatch.setenv(k, v)


@pytest.mark.usefixtures("one_rank")
def test_resume_refuses_other_inputs_or_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [*_inputs(tmp_path), "--checkpoint", "ck", "--checkpoint-every", "2"]
    first = runner.invoke(app, [*args, "-o", "a.csv", "--target-records", "3"])
    assert first.exit_code == 0, first.output
    resume = [*args, "--resume", "-o", "b.csv"]
    result = runner.invoke(app, [*resume, "--target-records", "4"])
    assert result.exit_code == 1
    assert "ck/rank0.pt: the checkpoint was written for other inputs or options: " in (
        result.output
    )
    assert "--target-records (checkpoint: 3, now: 4)" in result.output
    result = runner.invoke(app, [*resume, "--target-records", "3", "--dtype", "float64"])
    assert "--dtype (checkpoint: float32, now: float64)" in result.output
    with open(tmp_path / "in" / "targets.csv", "a") as f:
        f.write("extra,100,,,household,,,\n")
    result = runner.invoke(app, [*resume, "--target-records", "3"])
    assert "file targets (its contents changed)" in result.output
    shutil.copy(TINY / "targets.csv", tmp_path / "in" / "targets.csv")
    ok = runner.invoke(app, [*resume, "--target-records", "3"])
    assert ok.exit_code == 0, ok.output
    data = (tmp_path / "ck" / "rank0.pt").read_bytes()
    (tmp_path / "ck" / "rank0.pt").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, [*resume, "--target-records", "3", "--force"])
    assert result.exit_code == 1
    assert "ck/rank0.pt: cannot resume from this checkpoint (truncated" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "b_persons.csv").read_bytes() != b""  # the good resume's output


# ---------------------------------------------------------------------------- defects 5, 7
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _long_run(tmp_path: Path, *extra: str) -> list[str]:
    """A run that fits for minutes (a million epochs of the tiny fixture)."""
    return [*CLI, "reweight", str(TINY / "households.csv"), str(TINY / "targets.csv"),
            "--persons", str(TINY / "persons.csv"), "--target-records", "3",
            "--epochs", "1000000", "-o", str(tmp_path / "o.parquet"), "--log",
            str(tmp_path / "log.csv"), "--quiet", *extra]  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent_and_write_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen(_long_run(tmp_path, "--nproc", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        workers: list[int] = []

        def started() -> bool:
            workers[:] = [c for c in _children(proc.pid) if _running(c)]
            return len(workers) >= 2

        assert _wait_for(started, 60), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(2)  # the workers are importing or fitting
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: not any(_running(w) for w in workers), 15)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == []  # no output from a worker, now or later


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGTERM, 143, "Terminated; no output was written."),
    (signal.SIGINT, 130, "Interrupted; no output was written."),
])  # fmt: skip
def test_a_signal_during_the_fit_cleans_up(
    tmp_path: Path, signum: int, code: int, line: str
) -> None:
    proc = subprocess.Popen(_long_run(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        # The log's temporary file appears once the outputs are planned, before the fit.
        assert _wait_for(lambda: any(tmp_path.iterdir()), 60), proc.communicate()
        time.sleep(1.0)  # fitting now
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip() == line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_start_up_prints_one_line(tmp_path: Path) -> None:
    # `--help` no longer imports torch (it answers in a fraction of a second), so the
    # signal is sent while a `reweight` imports what the fit needs.
    args = _inputs(tmp_path)
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)  # fmt: skip
    time.sleep(0.3)  # importing
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130
    assert err.strip() == "Interrupted; no output was written."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_stale_partials_of_a_killed_run_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = _inputs(tmp_path)
    stale = [".o.csv.999999999-0badf00d.l0calib.partial",
             ".o_persons.csv.999999999-0badf00d.l0calib.partial",
             ".o_report.999999999-0badf00d.l0calib.partial"]  # fmt: skip
    for name in stale[:2]:
        (tmp_path / name).write_text("half")
    (tmp_path / stale[2]).mkdir()
    keep = [".o.csv.swp", f".o.csv.{os.getpid()}-0badf00d.l0calib.partial", "o.csv.partial"]
    for name in keep:
        (tmp_path / name).write_text("not ours to remove")
    result = runner.invoke(app, [*args, "-o", "o.csv"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(stale)
    assert set(keep) <= names


# ---------------------------------------------------------------------------- defect 8
def _fidelity_frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "household_id": [f"{i:014d}" for i in rng.choice(10**13, n, replace=False)],
        "household_weight": rng.uniform(50, 150, n).round(3),
        "fips": rng.choice(["06", "01", "36", "48"], n),
        "zip": [f"{z:05d}" for z in rng.integers(0, 3000, n)],
        "region": pd.Categorical(rng.choice(["Nord", "Süd", "Ōsaka"], n)),
        "interviewed": pd.date_range("2024-01-01", periods=n, freq="D"),
        "persons": pd.array(rng.integers(1, 6, n), dtype="Int64"),
        "city": rng.choice(["São Paulo", "東京", "Zürich", ""], n),
        "income": rng.uniform(0, 1e5, n).round(2),
    })  # fmt: skip
    frame.loc[3, "persons"] = pd.NA
    frame.loc[0, "household_id"] = "01612596057020"
    return frame


FIDELITY_TARGETS = (
    "name,value,variable,filter\nn,4000,,\nca,1100,,fips == '06'\nincome,200000000,income,\n"
)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("command", ["calibrate", "reweight", "reweight-sharded"])
def test_round_trip_gives_the_data_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    frame = _fidelity_frame()
    path = tmp_path / f"in.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    (tmp_path / "t.csv").write_text(FIDELITY_TARGETS)
    args = {
        "calibrate": ["calibrate", "--method", "linear"],
        "reweight": ["reweight", "--target-records", "25", "--epochs", "20"],
        "reweight-sharded": ["reweight", "--target-records", "25", "--epochs", "20"],
    }
    if command == "reweight-sharded":
        monkeypatch.setenv("LOCAL_RANK", "0")  # one rank under torchrun, in this process
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    out = tmp_path / f"out.{fmt}"
    result = runner.invoke(app, [args[command][0], str(path), "t.csv", *args[command][1:],
                                 "-o", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    weights = ["household_weight", "household_weight_initial"]
    if fmt == "csv":
        given = pd.read_csv(path, dtype=str, keep_default_na=False)
        back = pd.read_csv(out, dtype=str, keep_default_na=False)
        rows = given["household_id"].isin(back["household_id"])
        assert rows.sum() == len(back) == (40 if command == "calibrate" else 25)
        pd.testing.assert_frame_equal(back.drop(columns=weights).reset_index(drop=True),
                                      given[rows].drop(columns="household_weight")
                                      .reset_index(drop=True))  # fmt: skip
        # The initial weight is the input's, to the digit.
        assert (back["household_weight_initial"].astype(float).to_numpy()
                == given.loc[rows, "household_weight"].astype(float).to_numpy()).all()  # fmt: skip
    else:
        back = pd.read_parquet(out)
        rows = frame["household_id"].isin(back["household_id"])
        assert list(back.columns) == [*frame.columns[:2], "household_weight_initial",
                                      *frame.columns[2:]]  # fmt: skip
        pd.testing.assert_frame_equal(back.drop(columns=weights).reset_index(drop=True),
                                      frame[rows].drop(columns="household_weight")
                                      .reset_index(drop=True))  # fmt: skip


def test_csv_ids_with_leading_zeros_survive_csv_to_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    frame = _fidelity_frame()
    frame.to_csv("in.csv", index=False)
    (tmp_path / "t.csv").write_text(FIDELITY_TARGETS)
    result = runner.invoke(app, ["calibrate", "in.csv", "t.csv", "--method", "linear",
                                 "-o", "out.parquet", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    back = pd.read_parquet("out.parquet")
    assert back["household_id"].tolist() == frame["household_id"].tolist()
    assert back["fips"].tolist() == frame["fips"].tolist()
    assert back["zip"].tolist() == frame["zip"].tolist()


def test_r_apistrat_comes_back_as_it_went_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R's apistrat (its own text: quoted cells, 44.2099990844727-style weights)."""
    monkeypatch.chdir(tmp_path)
    r_dir = FIXTURES / "r_survey"
    result = runner.invoke(app, [
        "calibrate", str(r_dir / "apistrat.csv"), str(r_dir / "targets_stype_schwide_api99.csv"),
        "--id-column", "snum", "--weight-column", "pw", "--method", "logit", "--bounds",
        "0.7,1.7", "-o", "cal.csv", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    given = pd.read_csv(r_dir / "apistrat.csv", dtype=str, keep_default_na=False)
    back = pd.read_csv("cal.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(back.drop(columns=["pw", "pw_initial"]),
                                  given.drop(columns=["pw"]))  # fmt: skip
    assert (back["pw_initial"].astype(float) == given["pw"].astype(float)).all()


def test_warnings_print_one_line_without_source_paths(tmp_path: Path) -> None:
    """A library warning during a command: its message, not the warning code's path."""
    code = (
        "import sys, warnings, l0calib\n"
        "original = l0calib.HardConcrete.__init__\n"
        "def init(self, *a, **k):\n"
        "    warnings.warn('the weights are tiny', UserWarning)\n"
        "    original(self, *a, **k)\n"
        "l0calib.HardConcrete.__init__ = init\n"
        "sys.argv = ['l0calib', 'gate', '--n', '10', '--draws', '1']\n"
        "from l0calib_cli import run\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "Warning: the weights are tiny\n"
