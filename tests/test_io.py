"""Table reading and writing: formats, clear errors, atomic writes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from l0calib import DataError, read_table, write_table
from l0calib.io import atomic_path, count_rows, table_format

FRAME = pd.DataFrame({"household_id": [1, 2], "state": ["CA", None], "w": [1.5, 2.0]})


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "t.pq", "t.csv.gz", "T.CSV"])
def test_round_trip(name: str, tmp_path: Path) -> None:
    path = write_table(FRAME, tmp_path / name)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, FRAME, check_dtype=False)
    assert oct(os.stat(path).st_mode & 0o777) != "0o600"  # not mkstemp's private mode


def test_format_from_extension() -> None:
    assert table_format("a/b.csv.bz2") == "csv"
    assert table_format("x.parquet") == "parquet"
    with pytest.raises(DataError, match=re.escape(
        "data.xlsx: unsupported file extension '.xlsx'; expected .csv"
    )):  # fmt: skip
        table_format("data.xlsx")
    with pytest.raises(DataError, match=r"unsupported file extension '\(none\)'"):
        table_format("data")


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.csv: file not found$"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: file is empty$"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.csv: file has no header row"):
        read_table(tmp_path / "blank.csv")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DataError, match=r"d.csv: is a directory"):
        read_table(tmp_path / "d.csv")


def test_encoding_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("name,value\nok,1\nS\xe3o Paulo,2\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(
        "latin.csv: line 3: not valid UTF-8 (byte 0xe3 at offset 17); save the file as UTF-8"
    )):  # fmt: skip
        read_table(path)


def test_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffname,value\na,1\n".encode())
    assert list(read_table(path).columns) == ["name", "value"]


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"^.*bad.parquet: cannot read parquet file") as info:
        read_table(path)
    assert str(info.value).count("bad.parquet") == 1  # pyarrow's own mention is dropped
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a,b\n1,2\n3,4,5\n", "bad.csv: line 3: 3 fields where the header has 2 (malformed CSV)"),
        ('a,b\n1,2\n3,"x\n5,6\n', "bad.csv: line 3: a quoted cell is never closed (malformed CSV)"),
    ],
)
def test_malformed_csv_names_the_line(tmp_path: Path, text: str, says: str) -> None:
    """Problems of the file's text are counted in lines of the file, the header line 1."""
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: {says.removeprefix('bad.csv: ')}"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_columns_are_named_once(tmp_path: Path, fmt: str) -> None:
    path = write_table(FRAME, tmp_path / f"t.{fmt}")
    with pytest.raises(DataError) as info:
        read_table(path, columns=["household_id", "incme"])
    assert str(info.value) == f"{path}: column 'incme' is not in the file"
    with pytest.raises(DataError) as info:
        read_table(path, columns=[f"c{i}" for i in range(8)])
    assert str(info.value) == (
        f"{path}: columns 'c0', 'c1', 'c2', 'c3', 'c4' and 3 more are not in the file"
    )
    with pytest.raises(DataError, match="column 'hh' is not in the file"):
        read_table(path, where=("hh", [1]))
    with pytest.raises(DataError, match="column 'x' is not in the file"):
        read_table(path, rows=(0, 1), columns=["x"])


def test_file_system_error_names_the_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.csv"
    path.write_text("a\n1\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pd, "read_csv", refuse)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: cannot read csv file: Permission denied"


def test_text_columns_keep_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("name,value\n007,1\n")
    assert read_table(path, text_columns=True)["name"].tolist() == ["007"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old")

    def interrupted_write() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        interrupted_write()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_read_a_share_of_rows_and_linked_rows(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"id": range(1000), "hh": np.arange(1000) // 3, "x": np.arange(1000.0)})
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False, row_group_size=128)  # several row groups
    assert count_rows(path) == 1000
    part = read_table(path, rows=(250, 612))
    assert part["id"].tolist() == list(range(250, 612))
    assert read_table(path, rows=(990, 1000))["id"].tolist() == list(range(990, 1000))
    linked = read_table(path, where=("hh", [2, 300]))
    assert linked["id"].tolist() == [6, 7, 8, 900, 901, 902]
