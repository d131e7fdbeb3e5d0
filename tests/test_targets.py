"""Targets file reading, the estimate matrix, and every error a user can act on."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from l0calib import (
    DataError,
    EstimateMatrix,
    ParameterError,
    Target,
    TargetError,
    as_estimate_matrix,
    build_estimate_matrix,
    read_targets,
)

from .conftest import FIXTURES

TINY = FIXTURES / "tiny"


def tiny(name: str) -> pd.DataFrame:
    return pd.read_csv(TINY / name)


# ---------------------------------------------------------------- the exact answer
def test_tiny_fixture_matrix_is_exact() -> None:
    em = build_estimate_matrix(
        TINY / "households.csv", TINY / "targets.csv", persons=TINY / "persons.csv"
    )
    assert em.names == (
        "households",
        "households_CA",
        "persons_65plus",
        "employment_income_CA",
        "snap_households",
        "children",
    )
    expected = np.array(
        [
            [1, 1, 1, 1, 1],  # every household
            [1, 1, 0, 0, 0],  # households in CA
            [0, 1, 0, 0, 0],  # persons aged 65+, summed per household
            [50_000, 0, 0, 0, 0],  # employment income in CA (state from the household)
            [0, 1, 0, 1, 0],  # snap > 0
            [1, 0, 0, 0, 0],  # persons under 18
        ],
        dtype=float,
    )
    assert sp.isspmatrix_csr(em.matrix) or isinstance(em.matrix, sp.csr_array)
    assert em.matrix.dtype == np.float64
    np.testing.assert_array_equal(em.matrix.toarray(), expected)
    np.testing.assert_array_equal(em.values, [600, 320, 210, 5_200_000, 260, 95])
    np.testing.assert_array_equal(em.importance, [1, 1, 2, 1, 1, 1])
    np.testing.assert_array_equal(em.tolerance, [0, 0, 0, 0.01, 0, 0])
    assert list(em.groups) == ["national", "state", "national", "state", None, None]
    np.testing.assert_array_equal(em.record_ids, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(em.weights, [100, 200, 150, 50, 80])
    # the initial estimates are A @ w0
    np.testing.assert_allclose(em.estimates(em.weights), [580, 300, 200, 5_000_000, 250, 100])
    np.testing.assert_array_equal(em.support(), [5, 2, 1, 1, 2, 1])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_formats_give_the_same_matrix(fmt: str, tmp_path: Path) -> None:
    hh, persons = tiny("households.csv"), tiny("persons.csv")
    hh.to_csv(tmp_path / "h.csv", index=False) if fmt == "csv" else hh.to_parquet(
        tmp_path / "h.parquet"
    )
    persons.to_csv(tmp_path / "p.csv", index=False) if fmt == "csv" else persons.to_parquet(
        tmp_path / "p.parquet"
    )
    em = build_estimate_matrix(tmp_path / f"h.{fmt}", TINY / "targets.csv", tmp_path / f"p.{fmt}")
    ref = build_estimate_matrix(hh, tiny("targets.csv"), persons)
    assert (em.matrix != ref.matrix).nnz == 0


def test_households_without_persons_and_row_order() -> None:
    hh = tiny("households.csv").iloc[::-1].reset_index(drop=True)
    em = build_estimate_matrix(hh, tiny("targets.csv"), tiny("persons.csv"))
    np.testing.assert_array_equal(em.record_ids, [5, 4, 3, 2, 1])
    # household 5 (no persons) contributes only to the household count
    assert em.matrix[:, 0].toarray().ravel().tolist() == [1, 0, 0, 0, 0, 0]


def test_person_variable_is_summed_per_household() -> None:
    targets = pd.DataFrame(
        {"name": ["earn", "adults"], "value": [1, 1], "variable": ["employment_income", None],
         "filter": [None, "age >= 18"], "entity": ["person", "person"]}
    )  # fmt: skip
    em = build_estimate_matrix(tiny("households.csv"), targets, tiny("persons.csv"))
    np.testing.assert_array_equal(em.matrix.toarray()[0], [50_000, 0, 80_000, 20_000, 0])
    np.testing.assert_array_equal(em.matrix.toarray()[1], [1, 1, 2, 1, 0])


def test_targets_from_objects_and_frames_agree() -> None:
    objs = [
        Target("hh", 1.0),
        Target("ca_income", 2.0, variable="income", filter='state == "CA"', group="g"),
    ]
    a = build_estimate_matrix(tiny("households.csv"), objs)
    b = build_estimate_matrix(
        tiny("households.csv"),
        pd.DataFrame({"name": ["hh", "ca_income"], "value": [1, 2],
                      "variable": ["", "income"], "filter": ["", 'state == "CA"'],
                      "group": ["", "g"]}),
    )  # fmt: skip
    assert (a.matrix != b.matrix).nnz == 0
    assert list(a.groups) == list(b.groups) == [None, "g"]


def test_select_targets_and_to_frame() -> None:
    em = build_estimate_matrix(TINY / "households.csv", TINY / "targets.csv", TINY / "persons.csv")
    sub = em.select_targets(["children", "households"])
    assert sub.names == ("households", "children")
    assert sub.matrix.shape == (2, 5)
    assert list(em.to_frame().columns) == [
        "name", "value", "group", "importance", "tolerance", "support"
    ]  # fmt: skip
    with pytest.raises(
        TargetError, match="unknown target name 'childen' \\(did you mean 'children'"
    ):
        em.select_targets(["childen"])


# ---------------------------------------------------------------- what pipelines have
def test_accepts_dense_records_by_targets_frame() -> None:
    frame = pd.DataFrame({"a": [1.0, 0.0, 2.0], "b": [0.0, 3.0, 0.0]})
    em = as_estimate_matrix(frame, {"b": 9.0, "a": 5.0}, weights=[1, 1, 1])
    assert em.names == ("a", "b")
    np.testing.assert_array_equal(em.matrix.toarray(), frame.to_numpy().T)
    np.testing.assert_array_equal(em.values, [5.0, 9.0])
    with pytest.raises(TargetError, match="no target value for estimate-matrix column 'b'"):
        as_estimate_matrix(frame, {"a": 1.0})


def test_accepts_sparse_targets_by_records_and_vector() -> None:
    m = sp.random(4, 50, density=0.2, random_state=0, format="coo")
    y = np.arange(4.0)
    em = as_estimate_matrix(m, y)
    assert em.shape == (4, 50)
    assert em.names[0] == "target_0"
    assert list(em.groups) == [None] * 4
    np.testing.assert_allclose(em.matrix.toarray(), m.toarray())
    assert as_estimate_matrix(em) is em


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: as_estimate_matrix(np.ones((2, 3))), "targets (the values to match) are required"),
        (lambda: as_estimate_matrix(np.ones((2, 3)), [1.0]), "targets has length 1, expected 2"),
        (lambda: as_estimate_matrix(np.ones(3), [1.0]), "matrix must be 2-dimensional"),
        (
            lambda: as_estimate_matrix(np.array([[np.nan, 1.0]]), [1.0]),
            "matrix has 1 non-finite (NaN or inf) entries",
        ),
        (lambda: as_estimate_matrix(np.ones((1, 2)), [np.inf]), "targets has 1 non-finite"),
    ],
)
def test_plain_matrix_errors(call, message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        call()


# ---------------------------------------------------------------- targets file errors
def _targets_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "targets.csv"
    path.write_text(text)
    return path


def test_every_row_problem_is_reported(tmp_path: Path) -> None:
    path = _targets_csv(
        tmp_path,
        "name,value,variable,filter,entity,importance,tolerance\n"
        "a,1,,,,,\n"
        "a,2,,,,,\n"  # duplicate
        ",3,,,,,\n"  # empty name
        "b,abc,,,,,\n"  # not a number
        "c,inf,,,,,\n"  # not finite
        "d,1,,,houshold,,\n"  # bad entity
        "e,1,,,,-1,\n"  # negative importance
        "f,1,,,,,-0.5\n"  # negative tolerance
        "g,1,x +,,,,\n"  # syntax error
        "h,1,,age >,,,\n"  # syntax error in filter
        "i,,,,,,\n",  # empty value
    )
    with pytest.raises(TargetError) as info:
        read_targets(path)
    problems = info.value.problems
    assert problems == [
        "data row 2 ('a'): duplicate target name (first used on data row 1)",
        "data row 3: column 'name' is empty",
        "data row 4 ('b'): column 'value': 'abc' is not a number",
        "data row 5 ('c'): column 'value' must be finite, got 'inf'",
        "data row 6 ('d'): column 'entity': unknown entity 'houshold'; expected one of "
        "household, person (did you mean 'household'?)",
        "data row 7 ('e'): column 'importance' must be >= 0, got -1",
        "data row 8 ('f'): column 'tolerance' must be >= 0, got -0.5",
        "data row 9 ('g'): column 'variable': syntax error at the end in 'x +': invalid syntax",
        "data row 10 ('h'): column 'filter': syntax error at the end in 'age >': invalid syntax",
        "data row 11 ('i'): column 'value' is empty",
    ]
    assert str(info.value).startswith(
        "targets.csv: 10 problems:\n  - data row 2 ('a'): duplicate target name"
    )


def test_missing_required_and_misspelt_columns(tmp_path: Path) -> None:
    path = _targets_csv(tmp_path, "nam,value,filtr\nx,1,\n")
    with pytest.raises(TargetError) as info:
        read_targets(path)
    assert info.value.problems == [
        "required column 'name' is missing (found 'nam': did you mean 'name'?); "
        "columns present: nam, value, filtr",
        "column 'nam' is not a targets column (did you mean 'name'?)",
        "column 'filtr' is not a targets column (did you mean 'filter'?)",
    ]


def test_extra_columns_are_allowed_and_names_keep_text(tmp_path: Path) -> None:
    path = _targets_csv(tmp_path, "name,value,source\n01,1_000,census\n")
    (t,) = read_targets(path)
    assert t.name == "01"
    assert t.value == 1000.0


def test_empty_targets_table(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"targets\.csv: the targets table has no rows"):
        read_targets(_targets_csv(tmp_path, "name,value\n"))


def test_unknown_column_type_error_and_missing_values_in_data(tmp_path: Path) -> None:
    hh = tiny("households.csv")
    hh.loc[1, "income"] = np.nan
    path = _targets_csv(
        tmp_path,
        "name,value,variable,filter,entity\n"
        "snap_CA,1,incme,,\n"
        "bad_cmp,1,,state == 3,\n"
        "nan_income,1,income,,\n"
        'nan_ok,1,income,state == "NY",\n'
        'handled,1,"where(isnull(income), 0, income)",,\n'
        "text_var,1,state,,\n"
        "num_filter,1,,income,\n"
        "persons_missing,1,,age > 3,person\n"
        "inf_var,1,income / 0,tenure == 'owner',\n",
    )
    with pytest.raises(TargetError) as info:
        build_estimate_matrix(hh, path)
    assert info.value.problems == [
        "data row 1 ('snap_CA'): column 'variable': column 'incme' is not in "
        "the data (did you mean 'income'?)",
        "data row 2 ('bad_cmp'): column 'filter': cannot compare text with a number "
        "using '==' (quote text values: state == \"CA\")",
        "data row 3 ('nan_income'): column 'variable': column 'income' has missing "
        "values in 1 row used by this expression (handle them with isnull() or where())",
        "data row 6 ('text_var'): column 'variable': a variable must be numeric, got text",
        "data row 7 ('num_filter'): column 'filter': a filter must be true/false, got a "
        "number (use a comparison such as x > 0)",
        "data row 8 ('persons_missing'): entity 'person' needs a persons table, and "
        "none was given (--persons FILE)",
        "data row 9 ('inf_var'): column 'variable': the variable gives non-finite "
        "values (inf or NaN) in 2 rows of households (data rows 1, 3)",
    ]


def test_zero_support_is_flagged_not_dropped(tmp_path: Path) -> None:
    path = _targets_csv(
        tmp_path,
        "name,value,variable,filter\n"
        'nobody,5,,state == "WA"\n'
        'zero_sum,5,snap,state == "NY" and snap == 0\n'
        "ok,1,,\n",
    )
    with pytest.raises(TargetError) as info:
        build_estimate_matrix(tiny("households.csv"), path)
    assert info.value.problems == [
        "data row 1 ('nobody'): zero support: its filter selects no record, so no "
        "weighting can reach 5 (fix the filter or remove the target)",
        "data row 2 ('zero_sum'): zero support: every contribution is 0, so no "
        "weighting can reach 5 (fix the filter or remove the target)",
    ]
    em = build_estimate_matrix(tiny("households.csv"), path, allow_zero_support=True)
    assert em.zero_support == ("nobody", "zero_sum")
    assert em.support().tolist() == [0, 0, 5]


# ---------------------------------------------------------------- microdata errors
def test_household_problems_are_all_reported() -> None:
    hh = tiny("households.csv")
    hh.loc[1, "household_id"] = 1  # duplicate of row 1
    hh.loc[2, "household_weight"] = -5
    hh.loc[3, "household_weight"] = np.nan
    with pytest.raises(DataError) as info:
        build_estimate_matrix(hh, TINY / "targets.csv")
    assert info.value.problems == [
        "column 'household_id' must be unique; 2 rows share an id (data rows 1, 2; ids 1)",
        "column 'household_weight' must be finite; missing or infinite in 1 row (data row 4)",
        "column 'household_weight' must be >= 0; negative in 1 row (data row 3)",
    ]
    assert str(info.value).startswith("households: 3 problems:")


def test_missing_id_and_weight_columns_suggest_names() -> None:
    hh = tiny("households.csv").rename(columns={"household_id": "householdid"})
    with pytest.raises(DataError, match=re.escape(
        "households: id column 'household_id' is not in the data (did you mean 'householdid'?)"
    )):  # fmt: skip
        build_estimate_matrix(hh, TINY / "targets.csv")
    with pytest.raises(DataError, match="weight column 'w' is not in the data"):
        build_estimate_matrix(tiny("households.csv"), TINY / "targets.csv", weight_column="w")


def test_non_numeric_weights() -> None:
    hh = tiny("households.csv").assign(household_weight=["a"] * 5)
    with pytest.raises(DataError, match="column 'household_weight' must be numeric, got"):
        build_estimate_matrix(hh, TINY / "targets.csv")


def test_persons_pointing_at_unknown_households() -> None:
    persons = tiny("persons.csv")
    persons.loc[[0, 4], "person_household_id"] = [99, 98]
    with pytest.raises(DataError) as info:
        build_estimate_matrix(tiny("households.csv"), TINY / "targets.csv", persons)
    assert str(info.value) == (
        "persons: 2 persons point at households not in households "
        "(column 'person_household_id', data rows 1, 5; ids 99, 98)"
    )
    with pytest.raises(DataError, match="household link column 'hh' is not in the data"):
        build_estimate_matrix(
            tiny("households.csv"), TINY / "targets.csv", tiny("persons.csv"),
            person_household_column="hh",
        )  # fmt: skip


def test_errors_name_the_file(tmp_path: Path) -> None:
    hh = tiny("households.csv")
    hh.loc[0, "household_weight"] = -1
    path = tmp_path / "cps.parquet"
    hh.to_parquet(path)
    with pytest.raises(DataError, match=r"^cps.parquet: column 'household_weight' must be >= 0"):
        build_estimate_matrix(path, TINY / "targets.csv")


def test_estimate_matrix_validates_lengths() -> None:
    with pytest.raises(ParameterError, match="values has length 1, expected 2"):
        EstimateMatrix(
            matrix=sp.csr_matrix(np.ones((2, 2))),
            names=("a", "b"),
            values=np.ones(1),
            groups=np.array([None, None]),
            importance=np.ones(2),
            tolerance=np.zeros(2),
        )


def test_fixture_survey_builds() -> None:
    survey = FIXTURES / "survey_5k"
    em = build_estimate_matrix(
        survey / "households.parquet", survey / "targets.csv", survey / "persons.parquet"
    )
    assert em.shape == (236, 5000)
    assert em.support().min() > 0


def test_missing_persons_table_is_one_line(tmp_path: Path) -> None:
    path = _targets_csv(
        tmp_path,
        "name,value,filter,entity\nkids,1,age < 18,person\nadults,1,age >= 18,person\n"
        "old,1,age > 80,person\n",
    )
    with pytest.raises(TargetError) as info:
        build_estimate_matrix(tiny("households.csv"), path)
    # One cause, one line naming its rows; every row's problem is kept for a program.
    assert str(info.value) == (
        "targets.csv: data rows 1-3 ('kids', 'adults', 'old'): entity 'person' needs a "
        "persons table, and none was given (--persons FILE)"
    )
    assert len(info.value.problems) == 3
    assert info.value.problems[2].startswith("data row 3 ('old'): entity 'person' needs")


def test_one_problem_in_many_rows_is_one_line(tmp_path: Path) -> None:
    """102 rows using a column the data lacks: the message is one line naming the rows
    (runs, the first names, how many more); ``problems`` keeps every row's problem."""
    rows = "".join(f"t{i},1,incme\n" for i in range(102))
    path = _targets_csv(tmp_path, "name,value,variable\n" + rows + "ok,1,income\n")
    with pytest.raises(TargetError) as info:
        build_estimate_matrix(tiny("households.csv"), path)
    assert str(info.value) == (
        "targets.csv: data rows 1-102 ('t0', 't1', 't2' and 99 more): column 'variable': "
        "column 'incme' is not in the data (did you mean 'income'?)"
    )
    assert info.value.where == "targets.csv"
    assert len(info.value.problems) == 102
    assert info.value.problems[0].startswith("data row 1 ('t0'): column 'variable'")


def test_many_problems_are_listed_up_to_five(tmp_path: Path) -> None:
    bad = "".join(f"n{i},v{i}\n" for i in range(7))  # 7 different problems
    scattered = "".join(f"x{i},1,incme\n" if i % 2 else f"y{i},1\n" for i in range(6))
    path = _targets_csv(tmp_path, "name,value,variable\n" + bad.replace("\n", ",\n") + scattered)
    with pytest.raises(TargetError) as info:
        build_estimate_matrix(tiny("households.csv"), path)
    message = str(info.value)
    assert message.startswith("targets.csv: 10 problems:\n  - data row 1 ('n0'): column 'value'")
    assert message.endswith("  - and 3 more")  # 8 lines: 7 rows' own problems, 1 shared
    assert len(message.splitlines()) == 7
    assert len(info.value.problems) == 10
    assert info.value.problems[-1].startswith("data row 13 ('x5'): column 'variable'")


def test_rows_sharing_a_problem_are_named_as_runs(tmp_path: Path) -> None:
    rows = "".join(
        f"t{i},1,{'incme' if i in (0, 1, 3, 4, 5, 9) else 'income'}\n" for i in range(10)
    )
    path = _targets_csv(tmp_path, "name,value,variable\n" + rows)
    with pytest.raises(TargetError, match=re.escape(
        "targets.csv: data rows 1, 2, 4-6, 10 ('t0', 't1', 't3' and 3 more): column 'variable'"
    )):  # fmt: skip
        build_estimate_matrix(tiny("households.csv"), path)


def test_listed_and_from_problems_cap_long_lists() -> None:
    from l0calib.exceptions import listed

    assert listed(["a", "b"]) == "a, b"
    assert listed([str(i) for i in range(102)]) == "0, 1, 2, 3, 4 and 97 more"
    error = DataError.from_problems("h.csv", [f"problem {i}" for i in range(9)])
    assert str(error) == (
        "h.csv: 9 problems:\n  - problem 0\n  - problem 1\n  - problem 2\n  - problem 3\n"
        "  - problem 4\n  - and 4 more"
    )
    assert error.where == "h.csv"
    assert len(error.problems) == 9
    assert str(DataError.from_problems("h.csv", ["only"])) == "h.csv: only"
