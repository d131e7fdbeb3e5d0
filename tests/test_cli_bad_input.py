"""Bad input and unsafe outputs, table-driven: for every case the exit code, a message that
names the file (and row/column where there is one), no traceback, no file left behind and
every input byte-identical afterwards.

Each case runs in-process (CliRunner) in a fresh directory holding copies of the tiny
fixture; its ``setup`` writes whatever broken file the case needs before the snapshot.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from l0calib_cli.main import app

from .conftest import FIXTURES

runner = CliRunner(env={"COLUMNS": "250"})
TINY = FIXTURES / "tiny"

R = ["reweight", "households.csv", "targets.csv", "--persons", "persons.csv", "--epochs", "3"]
RNP = ["reweight", "households.csv", "targets.csv", "--epochs", "3"]  # no persons
C = ["calibrate", "households.csv", "targets.csv", "--persons", "persons.csv"]
S = ["select", "households.csv", "--target-records", "2"]


def _hh(**changes: object) -> Callable[[Path], None]:
    """Write h2.csv: the tiny households with some columns changed (None drops one)."""

    def setup(d: Path) -> None:
        frame = pd.read_csv(d / "households.csv")
        for column, value in changes.items():
            if value is None:
                frame = frame.drop(columns=column)
            else:
                frame[column] = value
        frame.to_csv(d / "h2.csv", index=False)

    return setup


def _text(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)  # type: ignore[operator]

    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).mkdir(parents=True)


def _tu(**changes: object) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        tu = pd.DataFrame({"tax_unit_id": [1, 2, 3, 4, 5],
                           "tax_unit_household_id": [1, 2, 3, 4, 5]})  # fmt: skip
        for column, value in changes.items():
            tu[column] = value
        tu.to_csv(d / "tu.csv", index=False)

    return setup


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)

    return setup


def _symlink(name: str, to: str) -> Callable[[Path], None]:
    return lambda d: (d / name).symlink_to(d / to)


def _parquet(name: str, **changes: object) -> Callable[[Path], None]:
    """Write ``name``: the tiny households as Parquet, some columns changed."""

    def setup(d: Path) -> None:
        pd.read_csv(d / "households.csv").assign(**changes).to_parquet(d / name)

    return setup


def _many_targets(n: int, variable: str) -> Callable[[Path], None]:
    rows = "".join(f"t{i},1,{variable}\n" for i in range(n))
    return _text("t2.csv", "name,value,variable\n" + rows)


@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    says: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    lines: int | None = None  # at most this many lines of output


T2 = ["reweight", "households.csv", "t2.csv", "--epochs", "3"]
CASES = [
    # -------------------------------------------------------------- outputs: collisions
    Case("output-is-microdata", [*R, "-o", "households.csv", "--force"], 1,
         ("households.csv: the output (-o) would replace the input MICRODATA",)),
    Case("output-is-targets", [*R, "-o", "targets.csv", "--force"], 1,
         ("targets.csv: the output (-o) would replace the input TARGETS",)),
    Case("output-is-persons", [*R, "-o", "persons.csv", "--force"], 1,
         ("persons.csv: the output (-o) would replace the input --persons",)),
    Case("output-link-to-input", [*R, "-o", "link.csv", "--force"], 1,
         ("link.csv: the output (-o) would replace the input MICRODATA",),
         _symlink("link.csv", "households.csv")),
    Case("persons-output-is-input", [*RNP, "--persons", "o_persons.csv", "-o", "o.csv",
                                     "--force"], 1,
         ("o_persons.csv: the persons output would replace the input --persons",),
         lambda d: shutil.copy(d / "persons.csv", d / "o_persons.csv")),
    Case("log-is-output", [*R, "-o", "o.csv", "--log", "o.csv"], 1,
         ("o.csv: would be written twice, as the output (-o) and as the log (--log)",)),
    Case("log-is-input", [*R, "--log", "targets.csv", "--force"], 1,
         ("targets.csv: the log (--log) would replace the input TARGETS",)),
    Case("log-is-persons-output", [*R, "-o", "o.csv", "--log", "o_persons.csv"], 1,
         ("o_persons.csv: would be written twice, as the persons output and as the log",)),
    Case("report-dir-is-output", [*R, "-o", "o.csv", "--report-dir", "o.csv"], 1,
         ("o.csv: is both the report directory and the output (-o)",)),
    Case("report-dir-is-input", [*R, "--report-dir", "households.csv", "--force"], 1,
         ("households.csv: the report directory is the input MICRODATA",)),
    Case("report-dir-is-a-file", [*R, "--report-dir", "notes.txt", "--force"], 1,
         ("notes.txt: exists and is not a directory (--report-dir)",),
         _text("notes.txt", "mine\n")),
    Case("report-dir-holds-input", [*R, "--report-dir", ".", "--force"], 1,
         ("targets.csv: the report file would replace the input TARGETS",)),
    Case("report-dir-foreign-file", [*R, "--report-dir", "res", "--force"], 1,
         ("res/summary.json: exists and was not written by l0calib",),
         _text("res/summary.json", "{}\n")),
    Case("report-file-is-a-dir", [*R, "--report-dir", "res", "--force"], 1,
         ("res/history.csv: exists and was not written by l0calib",), _mkdir("res/history.csv")),
    Case("entity-and-persons-same-name", [*R, "--entity", "persons=tu.csv"], 1,
         ("households_reweighted_persons.csv: would be written twice",), _tu()),
    Case("entity-name-is-a-path", [*R, "--entity", "../x=tu.csv"], 1,
         ("entity name '../x'",), _tu()),
    Case("entity-output-is-input", [*R, "-o", "tu.csv", "--entity", "t=tu.csv", "--force"], 1,
         ("tu.csv: the output (-o) would replace the input --entity t",), _tu()),
    # -------------------------------------------------------------- outputs: places
    Case("output-parent-is-a-file", [*R, "-o", "notes.txt/o.csv"], 1,
         ("notes.txt/o.csv: ", "notes.txt is not a directory"), _text("notes.txt", "x")),
    Case("report-parent-is-a-file", [*R, "--report-dir", "notes.txt/rep"], 1,
         ("notes.txt/rep: ", "notes.txt is not a directory"), _text("notes.txt", "x")),
    Case("log-parent-is-a-file", [*R, "--log", "notes.txt/log.csv"], 1,
         ("notes.txt/log.csv: ", "notes.txt is not a directory"), _text("notes.txt", "x")),
    Case("output-is-a-directory", [*R, "-o", "d.csv", "--force"], 1,
         ("d.csv: is a directory (the output (-o))",), _mkdir("d.csv")),
    Case("output-exists", [*R, "-o", "o.csv"], 1,
         ("o.csv: already exists (use --force to overwrite)",), _text("o.csv", "old\n")),
    Case("persons-output-exists", [*R, "-o", "o.csv"], 1,
         ("o_persons.csv: already exists",), _text("o_persons.csv", "old\n")),
    Case("log-exists", [*R, "--log", "log.csv"], 1,
         ("log.csv: already exists",), _text("log.csv", "old\n")),
    Case("output-bad-extension", [*R, "-o", "o.xlsx"], 1,
         ("o.xlsx: unsupported file extension '.xlsx'",)),
    Case("output-no-extension", [*R, "-o", "out"], 1,
         ("out: unsupported file extension '(none)'",)),
    Case("select-output-is-input", [*S, "-o", "households.csv", "--force"], 1,
         ("households.csv: the output (-o) would replace the input MICRODATA",)),
    Case("calibrate-output-exists", [*C, "-o", "o.parquet"], 1,
         ("o.parquet: already exists",), _text("o.parquet", "old")),
    # -------------------------------------------------------------- microdata
    Case("microdata-missing", ["reweight", "nope.csv", "targets.csv"], 1,
         ("nope.csv: file not found",)),
    Case("microdata-empty", ["reweight", "e.csv", "targets.csv"], 1,
         ("e.csv: file is empty",), _text("e.csv", "")),
    Case("microdata-blank-lines", ["reweight", "e.csv", "targets.csv"], 1,
         ("e.csv: file has no header row",), _text("e.csv", "\n\n")),
    Case("microdata-is-a-directory", ["reweight", "d.csv", "targets.csv"], 1,
         ("d.csv: is a directory",), _mkdir("d.csv")),
    Case("microdata-extension", ["reweight", "h.xlsx", "targets.csv"], 1,
         ("h.xlsx: unsupported file extension '.xlsx'",), _text("h.xlsx", "x")),
    Case("microdata-not-utf8", ["reweight", "h2.csv", "targets.csv"], 1,
         ("h2.csv: line 2: not valid UTF-8",),
         _text("h2.csv", "household_id,household_weight,state\n1,2,S\xe3o\n".encode("latin-1"))),
    Case("microdata-corrupt-parquet", ["reweight", "h.parquet", "targets.csv"], 1,
         ("h.parquet: cannot read parquet file",), _text("h.parquet", b"not parquet")),
    Case("microdata-header-only", ["reweight", "h2.csv", "targets.csv"], 1,
         ("h2.csv: the table has no rows",),
         _text("h2.csv", "household_id,household_weight,state\n")),
    Case("weight-column-missing", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: weight column 'household_weight' is not in the data", "--weight-column"),
         _hh(household_weight=None)),
    Case("weight-column-option", [*R, "--weight-column", "wt"], 1,
         ("households.csv: weight column 'wt' is not in the data", "--weight-column")),
    Case("id-column-missing", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: id column 'household_id' is not in the data", "--id-column"),
         _hh(household_id=None)),
    Case("duplicate-ids", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_id' must be unique; 2 rows share an id (data rows 1, 2; "
          "ids 1)",),
         _hh(household_id=[1, 1, 3, 4, 5])),
    Case("negative-weight", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight' must be >= 0; negative in 1 row (data row 2)",),
         _hh(household_weight=[1, -1, 2, 3, 4])),
    Case("missing-weight", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight' must be finite; missing or infinite in 1 row "
          "(data row 2)",),
         _hh(household_weight=[1, None, 2, 3, 4])),
    Case("zero-weights", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight' is 0 in every row",), _hh(household_weight=0)),
    Case("text-weights", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight' must be numeric",), _hh(household_weight="x")),
    Case("reserved-column", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight_initial' already exists",),
         _hh(household_weight_initial=1.0)),
    Case("reserved-column-select", ["select", "h2.csv", "--target-records", "2"], 1,
         ("h2.csv: column 'selection' already exists",), _hh(selection="x")),
    Case("microdata-parquet-negative-weight", ["reweight", "h2.parquet", "targets.csv"], 1,
         ("h2.parquet: column 'household_weight' must be >= 0; negative in 1 row (data row 2)",),
         _parquet("h2.parquet", household_weight=[1, -1, 2, 3, 4])),
    Case("microdata-many-bad-rows", [*R[:1], "h2.csv", *R[2:]], 1,
         ("h2.csv: column 'household_weight' must be >= 0; negative in 4 rows (data rows 1, 2, "
          "3, 4)",), _hh(household_weight=[-1, -1, -1, -1, 4])),
    Case("microdata-malformed-csv", ["reweight", "h2.csv", "targets.csv"], 1,
         ("h2.csv: line 3: 4 fields where the header has 3 (malformed CSV)",),
         _text("h2.csv", "household_id,household_weight,state\n1,2,CA\n2,3,NY,x\n")),
    Case("microdata-unclosed-quote", ["reweight", "h2.csv", "targets.csv"], 1,
         ("h2.csv: line 3: a quoted cell is never closed (malformed CSV)",),
         _text("h2.csv", 'household_id,household_weight,state\n1,2,CA\n2,3,"NY\n')),
    Case("stratify-missing", [*S, "--stratify", "county"], 1,
         ("households.csv: --stratify column 'county' is not in the data",)),
    # -------------------------------------------------------------- persons and entities
    Case("persons-missing-file", [*RNP, "--persons", "nope.csv"], 1,
         ("nope.csv: file not found",)),
    Case("persons-not-given", RNP, 1,
         ("targets.csv: data rows 3, 4, 6 ('persons_65plus', 'employment_income_CA', "
          "'children'): entity 'person' needs a persons table",)),
    Case("persons-link-missing", [*RNP, "--persons", "p2.csv"], 1,
         ("p2.csv: household link column 'person_household_id' is not in the data",
          "--person-household-column"),
         lambda d: pd.read_csv(d / "persons.csv").rename(
             columns={"person_household_id": "hh"}).to_csv(d / "p2.csv", index=False)),
    Case("persons-unknown-household", [*RNP, "--persons", "p2.csv"], 1,
         ("p2.csv: 1 person points at households not in households.csv",
          "(column 'person_household_id', data row 6; ids 99)"),
         lambda d: pd.read_csv(d / "persons.csv").assign(
             person_household_id=[1, 1, 2, 3, 3, 99]).to_csv(d / "p2.csv", index=False)),
    Case("entity-link-missing", [*R, "--entity", "tax_unit=tu.csv", "--entity-link",
                                 "tax_unit=hh"], 1,
         ("tu.csv: column 'hh' (the household id of tax_unit) is missing", "--entity-link"),
         _tu()),
    Case("entity-unknown-household", [*R, "--entity", "tax_unit=tu.csv"], 1,
         ("tu.csv: tax_unit table data row 3: tax_unit_household_id=77 is not a household id",),
         _tu(tax_unit_household_id=[1, 2, 77, 4, 5])),
    Case("entity-missing-file", [*R, "--entity", "tax_unit=nope.csv"], 1,
         ("nope.csv: file not found",)),
    Case("entity-link-unknown", [*R, "--entity-link", "x=y"], 2, ("no --entity named 'x'",)),
    Case("entity-no-equals", [*R, "--entity", "tax_unit"], 2, ("expected NAME=VALUE",)),
    # -------------------------------------------------------------- targets
    Case("targets-missing", ["reweight", "households.csv", "nope.csv"], 1,
         ("nope.csv: file not found",)),
    Case("targets-empty", T2, 1, ("t2.csv: file is empty",), _text("t2.csv", "")),
    Case("targets-no-value-column", T2, 1,
         ("t2.csv: required column 'value' is missing",), _text("t2.csv", "name,filter\na,\n")),
    Case("targets-not-a-number", T2, 1,
         ("t2.csv: data row 2 ('b'): column 'value': 'abc' is not a number",),
         _text("t2.csv", "name,value\na,1\nb,abc\n")),
    Case("targets-duplicate-name", T2, 1,
         ("t2.csv: data row 2 ('a'): duplicate target name (first used on data row 1)",),
         _text("t2.csv", "name,value\na,1\na,2\n")),
    Case("targets-unknown-column", T2, 1,
         ("t2.csv: data row 1 ('a'): column 'variable': column 'incme' is not in the data",
          "did you mean 'income'"),
         _text("t2.csv", "name,value,variable\na,1,incme\n")),
    Case("targets-code-injection", T2, 1,
         ("t2.csv: data row 1 ('a'): column 'filter':", "is not allowed"),
         _text("t2.csv", "name,value,filter\na,1,__import__('os').system('touch pwned')\n")),
    Case("targets-zero-support", T2, 1,
         ("t2.csv: data row 1 ('a'): zero support",),
         _text("t2.csv", "name,value,filter\na,1,state == 'WA'\n")),
    Case("targets-negative-count", T2, 1,
         ("t2.csv: data row 1 ('a'): column 'value': a count target (no 'variable') cannot be "
          "negative",), _text("t2.csv", "name,value,filter\na,-5,state == 'CA'\n")),
    Case("targets-nan-value", T2, 1,
         ("t2.csv: data row 1 ('a'): column 'value' must be finite, got 'nan'",),
         _text("t2.csv", "name,value,filter\na,nan,state == 'CA'\n")),
    Case("targets-zero-by-zero", T2, 1,
         ("t2.csv: data row 1 ('a'): column 'filter': '/' has no defined result (such as 0/0) in "
          "2 rows",), _text("t2.csv", "name,value,filter\na,5,income / income > 0\nb,3,\n")),
    Case("targets-empty-value", T2, 1, ("t2.csv: data row 1 ('a'): column 'value' is empty",),
         _text("t2.csv", "name,value,filter\na,,state == 'CA'\n")),
    Case("targets-long-name", T2, 1,
         ("t2.csv: data row 1 ('aaaa", "column 'name' is 5,000 characters long"),
         _text("t2.csv", "name,value\n" + "a" * 5000 + ",5\n")),
    Case("targets-unknown-entity", T2, 1, ("t2.csv: data row 1 ('a'): column 'entity'",),
         _text("t2.csv", "name,value,entity\na,5,house\n")),
    Case("targets-syntax", T2, 1, ("t2.csv: data row 1 ('a'): column 'filter': syntax error",),
         _text("t2.csv", "name,value,filter\na,5,state ==\n")),
    Case("targets-one-problem-in-many-rows", T2, 1,
         ("Error: t2.csv: data rows 1-102 ('t0', 't1', 't2' and 99 more): column 'variable': "
          "column 'incme' is not in the data (did you mean 'income'?)",),
         _many_targets(102, "incme"), lines=1),
    Case("targets-many-problems", T2, 1,
         ("t2.csv: 8 problems:\n  - data row 1 ('a'): column 'value': 'x' is not a number\n",
          "  - data row 5 ('e'): column 'value': 'x4' is not a number\n  - and 3 more\n"),
         _text("t2.csv", "name,value\n" + "".join(f"{c},x{i or ''}\n"
                                                  for i, c in enumerate("abcdefgh"))),
         lines=7),
    # -------------------------------------------------------------- options
    Case("target-records-zero", [*R, "--target-records", "0"], 1,
         ("target_records must be between 1 and the number of records (5), got 0",)),
    Case("target-records-too-many", [*R, "--target-records", "99"], 1,
         ("target_records must be between 1 and the number of records (5), got 99",)),
    Case("holdout-unknown", [*R, "--holdout", "nosuch"], 1, ("unknown target name 'nosuch'",)),
    Case("holdout-many-unknown", [*R, "--holdout", "a,b,c,d,e,f,g"], 1,
         ("7 unknown target names: 'a', 'b', 'c', 'd', 'e' and 2 more",), lines=1),
    Case("holdout-both", [*R, "--holdout", "households", "--holdout-fraction", "0.1"], 2,
         ("give --holdout or --holdout-fraction, not both",)),
    Case("holdout-fraction-range", [*R, "--holdout-fraction", "1.5"], 2,
         ("--holdout-fraction",)),
    Case("epochs-zero", [*R[:-1], "0"], 1, ("epochs must be a positive integer, got 0",)),
    Case("epochs-text", [*R[:-1], "many"], 2, ("--epochs",)),
    Case("lr-negative", [*R, "--lr", "-1"], 1, ("lr must be a finite number > 0",)),
    Case("dtype", [*R, "--dtype", "float16"], 1, ("dtype must be 'float32' or 'float64'",)),
    Case("device", [*R, "--device", "tpu"], 1, ("device must be 'cpu', 'cuda' or 'auto'",)),
    Case("resume-without-checkpoint", [*R, "--resume"], 2, ("needs --checkpoint DIR",)),
    Case("nproc-zero", [*R, "--nproc", "0"], 2, ("must be at least 1",)),
    Case("checkpoint-every-zero", [*R, "--checkpoint", "ck", "--checkpoint-every", "0"], 2,
         ("--checkpoint-every", "must be at least 1")),
    Case("calibrate-method", [*C, "--method", "foo"], 1,
         ("method must be one of linear, raking, logit, truncated, got 'foo'",)),
    Case("calibrate-bounds", [*C, "--bounds", "1"], 2, ("expected two numbers: LO,HI",)),
    Case("select-l0-without-targets", [*S, "--l0-fraction", "0.5"], 2,
         ("the L0 part needs --targets",)),
    Case("check-missing", ["check", "nope.csv", "targets.csv"], 1, ("nope.csv: file not found",)),
    Case("gate-init-mean", ["gate", "--init-mean", "2"], 1,
         ("init_mean must be strictly between 0 and 1",)),
]  # fmt: skip


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = f"link -> {p.readlink()}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("households.csv", "persons.csv", "targets.csv"):
        shutil.copy(TINY / name, tmp_path / name)
    if case.setup is not None:
        case.setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, case.args)
    assert result.exit_code == case.code, result.output
    for fragment in case.says:
        assert fragment in result.output, result.output
    if case.code == 1:
        assert result.output.lstrip().startswith("Error: "), result.output
        # The file is named once: never "t.csv: t.csv row 3".
        where, _, rest = result.output.strip().removeprefix("Error: ").partition(": ")
        assert not rest.startswith(where), result.output
    if case.lines is not None:
        assert len(result.output.strip().splitlines()) <= case.lines, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    assert _snapshot(tmp_path) == before  # nothing written, nothing left, inputs unchanged
    assert not (tmp_path / "pwned").exists()


def test_check_json_lists_every_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message shows one line for 102 rows with one problem; `check --json` gives every
    row's problem to a program, on stdout, still with exit code 1."""
    shutil.copy(TINY / "households.csv", tmp_path / "households.csv")
    _many_targets(102, "incme")(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner(env={"COLUMNS": "250"}).invoke(
        app, ["check", "households.csv", "t2.csv", "--json"]
    )
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["file"] == "t2.csv"
    assert out["error_type"] == "TargetError"
    assert out["error"].startswith("t2.csv: data rows 1-102 ('t0', 't1', 't2' and 99 more)")
    assert len(out["problems"]) == 102
    assert out["problems"][101] == (
        "data row 102 ('t101'): column 'variable': column 'incme' is not in the data "
        "(did you mean 'income'?)"
    )
    assert result.stderr.startswith("Error: t2.csv: data rows 1-102")
    assert len(result.stderr.strip().splitlines()) == 1
