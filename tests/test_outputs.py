"""OutputPlan: every output of a run checked first, then committed all together or not at all."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from l0calib.exceptions import OutputError
from l0calib.io import partial_path, write_table
from l0calib.outputs import REPORT_MANIFEST, OutputPlan, output_names

FRAME = pd.DataFrame({"id": [1, 2], "w": [1.0, 2.0]})


def _files(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}  # fmt: skip


def _report(d: Path) -> None:
    (d / "targets.csv").write_text("name\n")
    (d / "summary.json").write_text("{}\n")


def test_names_follow_the_output_and_keep_each_input_format() -> None:
    names = output_names("data/hh.csv.gz", "out/run.csv", persons="p.parquet",
                         entities={"tax_unit": "tu.csv.gz", "spm": "spm.pq"})  # fmt: skip
    assert names == {
        "table": Path("out/run.csv"),
        "persons": Path("out/run_persons.parquet"),
        "entity:tax_unit": Path("out/run_tax_unit.csv.gz"),
        "entity:spm": Path("out/run_spm.pq"),
        "report": Path("out/run_report"),
    }
    assert output_names("data/hh.csv.gz")["table"] == Path("hh_reweighted.parquet")
    with pytest.raises(ValueError, match=r"entity name '\.\./x'"):
        output_names("hh.csv", entities={"../x": "tu.csv"})


def test_collisions_are_refused_links_resolved(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id\n1\n")
    (tmp_path / "link.csv").symlink_to(inp)
    with pytest.raises(OutputError, match="would replace the input microdata"):
        OutputPlan({"table": tmp_path / "link.csv"}, inputs={"microdata": inp}, force=True)
    with pytest.raises(OutputError, match="would be written twice"):
        OutputPlan({"table": tmp_path / "a.csv", "persons": tmp_path / "sub/../a.csv"})
    with pytest.raises(OutputError, match="would be written twice"):
        OutputPlan({"table": tmp_path / "a.csv"}, log=tmp_path / "a.csv")
    with pytest.raises(OutputError, match="is both the report directory"):
        OutputPlan({"table": tmp_path / "a.csv"}, report_dir=tmp_path / "a.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "link.csv"]


def test_report_dir_is_never_removed_only_its_own_files_replaced(tmp_path: Path) -> None:
    d = tmp_path / "results"
    (d / "old_run").mkdir(parents=True)
    (d / "old_run" / "weights.csv").write_text("precious\n")
    (d / "notes.txt").write_text("mine\n")
    plan = OutputPlan(report_dir=d, force=True)
    with plan.transaction() as tx:
        tx.write_report(_report)
    assert (d / "old_run" / "weights.csv").read_text() == "precious\n"
    assert (d / "notes.txt").read_text() == "mine\n"
    manifest = json.loads((d / REPORT_MANIFEST).read_text())
    assert manifest["files"] == ["summary.json", "targets.csv"]
    # Again with force: the listed files are replaced, nothing else is touched.
    with OutputPlan(report_dir=d, force=True).transaction() as tx:
        tx.write_report(lambda p: (p / "targets.csv").write_text("new\n"))
    assert (d / "targets.csv").read_text() == "new\n"
    assert not (d / "summary.json").exists()  # listed by the last run, not written now
    assert (d / "old_run" / "weights.csv").read_text() == "precious\n"
    # Without force, a file of ours is not replaced.
    with pytest.raises(OutputError, match=r"targets\.csv: already exists"):
        OutputPlan(report_dir=d)


def test_a_file_l0calib_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"mine": 1}\n')
    with pytest.raises(OutputError, match="was not written by l0calib"):
        OutputPlan(report_dir=tmp_path, force=True)
    # ...not even when it appears while the run writes.
    (tmp_path / "summary.json").unlink()
    plan = OutputPlan(report_dir=tmp_path, force=True)
    with pytest.raises(OutputError, match="was not written by l0calib"), plan.transaction() as tx:  # noqa: PT012
        tx.write_report(_report)
        (tmp_path / "summary.json").write_text('{"mine": 2}\n')
    assert _files(tmp_path) == {"summary.json": b'{"mine": 2}\n'}


def test_a_failed_commit_puts_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, persons, report = tmp_path / "o.csv", tmp_path / "o_persons.csv", tmp_path / "rep"
    table.write_text("old table\n")
    persons.write_text("old persons\n")
    with OutputPlan(report_dir=report).transaction() as tx:
        tx.write_report(_report)
    before = _files(tmp_path)
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if (
            Path(dst) == table
            and ".l0calib.partial" in Path(src).name
            and "old" not in str(Path(src).read_bytes())
        ):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    plan = OutputPlan({"table": table, "persons": persons}, report_dir=report, force=True)
    with pytest.raises(OutputError, match=r"o\.csv: Input/output error"), plan.transaction() as tx:  # noqa: PT012
        tx.write_table("persons", FRAME)
        tx.write_table("table", FRAME)
        tx.write_report(_report)
    assert _files(tmp_path) == before  # persons and report restored, no temporary file


@pytest.mark.parametrize("writer", ["to_csv", "to_parquet"])
def test_full_disk_names_the_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The write itself fails part-way (as on a full disk): ENOSPC from the real call."""
    real = getattr(pd.DataFrame, writer)

    def full(self: pd.DataFrame, path: str | os.PathLike[str], *args: object, **kw: object):
        real(self.head(1), path, *args, **kw)  # part of the file is on disk...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, writer, full)
    out = tmp_path / ("o.csv" if writer == "to_csv" else "o.parquet")
    with pytest.raises(OutputError) as info:
        write_table(FRAME, out)
    assert str(info.value) == f"{out}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_killed_runs_are_removed_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    dead = tmp_path / ".o.csv.999999999-deadbeef.l0calib.partial"
    alive = partial_path(out)  # this process: a run still going
    other = tmp_path / ".p.csv.999999999-deadbeef.l0calib.partial"
    unrelated = tmp_path / ".o.csv.tmp"
    for p in (dead, alive, other, unrelated):
        p.write_text("x")
    with OutputPlan({"table": out}).transaction() as tx:
        tx.write_table("table", FRAME)
    assert not dead.exists()
    assert alive.exists() and other.exists() and unrelated.exists()  # noqa: PT018


def test_parent_that_is_a_file_and_directory_outputs(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"f/o.csv: .*f is not a directory"):
        OutputPlan({"table": tmp_path / "f" / "o.csv"})
    with pytest.raises(OutputError, match="f: exists and is not a directory"):
        OutputPlan(report_dir=tmp_path / "f", force=True)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(OutputError, match=r"d\.csv: is a directory"):
        OutputPlan({"table": tmp_path / "d.csv"}, force=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            OutputPlan({"table": ro / "o.csv"})
    finally:
        ro.chmod(0o755)


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    out, persons = tmp_path / "o.csv", tmp_path / "o_persons.csv"
    plan = OutputPlan({"table": out, "persons": persons})
    with pytest.raises(OutputError, match=r"o\.csv: already exists"), plan.transaction() as tx:  # noqa: PT012
        tx.write_table("persons", FRAME)
        tx.write_table("table", FRAME)
        out.write_text("written by someone else meanwhile\n")
    assert _files(tmp_path) == {"o.csv": b"written by someone else meanwhile\n"}
