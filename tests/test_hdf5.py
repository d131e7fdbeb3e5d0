"""PolicyEngine HDF5 datasets: `l0calib reweight data.h5 ... -o small.h5`, read_hdf5, write_hdf5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from l0calib import DataError, build_estimate_matrix
from l0calib.hdf5 import read_hdf5, write_hdf5
from l0calib_cli.main import app

h5py = pytest.importorskip("h5py", reason="h5py (the hdf5 extra) is not installed")
runner = CliRunner(env={"COLUMNS": "250"})
GROUPS = ("tax_unit", "spm_unit", "family", "marital_unit")


def _population(seed: int = 0) -> dict[str, np.ndarray]:
    """400 households in 3 states, 1-4 persons each, grouped into tax units (1-2 per
    household), SPM units (one per household, in household order: the same row count as
    households), families (1-2 per household) and marital units (pairs of persons)."""
    rng = np.random.default_rng(seed)
    n_hh = 400
    hh_id = 1000 + 7 * np.arange(n_hh)
    size = rng.integers(1, 5, n_hh)
    p_hh = np.repeat(hh_id, size)
    n_p = len(p_hh)
    first = np.repeat(np.cumsum(size) - size, size)
    rank = np.arange(n_p) - first  # position within the household
    split = np.repeat(rng.random(n_hh) < 0.4, size) & (rank >= 2)
    v: dict[str, np.ndarray] = {
        "household_id": hh_id,
        "household_weight": rng.uniform(50, 150, n_hh).astype(np.float32),
        "state_code": rng.choice(np.array([b"CA", b"NY", b"TX"]), n_hh),
        "household_vehicles_owned": rng.integers(0, 3, n_hh),
        "person_id": 50_000 + np.arange(n_p)[::-1],  # ids not in row order
        "person_household_id": p_hh,
        "age": rng.integers(0, 90, n_p),
        "employment_income": np.round(rng.exponential(30_000, n_p), 2),
        "is_male": rng.random(n_p) < 0.5,
    }
    v["person_tax_unit_id"] = p_hh * 10 + split
    v["person_family_id"] = p_hh * 10 + 5 + split
    v["person_spm_unit_id"] = p_hh * 10 + 7
    v["person_marital_unit_id"] = 900_000 + first + rank // 2
    for group in GROUPS:
        v[f"{group}_id"] = pd.unique(v[f"person_{group}_id"])
    v["tax_unit_is_joint"] = rng.random(len(v["tax_unit_id"])) < 0.5
    v["spm_unit_net_income"] = rng.uniform(0, 1e5, len(v["spm_unit_id"]))
    v["family_size_bonus"] = rng.integers(0, 5, len(v["family_id"]))
    v["marital_unit_count"] = np.ones(len(v["marital_unit_id"]), dtype=np.int8)
    v["person_weight"] = np.repeat(v["household_weight"], size)
    return v


def _write(path: Path, layout: str) -> dict[str, np.ndarray]:
    v = _population()
    with h5py.File(path, "w") as f:
        f.attrs["source"] = "l0calib test"
        for name, values in v.items():
            if layout == "flat":
                f.create_dataset(name, data=values, compression="gzip")
                continue
            f.create_dataset(f"{name}/2024", data=values, compression="gzip")
            earlier = values * 0.95 if values.dtype.kind == "f" else values
            f.create_dataset(f"{name}/2023", data=earlier.astype(values.dtype))
            f[name].attrs["unit"] = "test"
        if layout == "periods":
            f.create_dataset("age/2025", data=v["age"] + 1)  # a period without ids
    return v


def _targets(path: Path, v: dict[str, np.ndarray]) -> None:
    """Targets met exactly by known weights (the stored ones times a random factor)."""
    rng = np.random.default_rng(1)
    hh = pd.DataFrame({k: v[k] for k in ("household_id", "state_code")})
    hh["state_code"] = hh["state_code"].str.decode("utf-8")
    hh["household_weight"] = v["household_weight"] * rng.uniform(0.8, 1.2, len(hh))
    persons = pd.DataFrame({k: v[k] for k in ("person_household_id", "age",
                                              "employment_income")})  # fmt: skip
    rows = [("hh_" + s, None, f'state_code == "{s}"', "household") for s in ("CA", "NY", "TX")]
    rows += [("pop_" + s, None, f'state_code == "{s}"', "person") for s in ("CA", "NY", "TX")]
    rows += [("children", None, "age < 18", "person"),
             ("employment_income", "employment_income", None, "person")]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["name", "variable", "filter", "entity"])
    frame.insert(1, "value", 0.0)
    em = build_estimate_matrix(hh, frame, persons)
    frame["value"] = em.matrix @ hh["household_weight"].to_numpy()
    frame.to_csv(path, index=False)


def _datasets(f) -> dict[str, np.ndarray]:
    out = {}
    f.visititems(
        lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "dtype") else None
    )
    return out


def _kept_rows(v: dict[str, np.ndarray], kept_hh: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of each entity that belong to the kept households, computed independently."""
    person = np.isin(v["person_household_id"], kept_hh)
    rows = {"household": np.isin(v["household_id"], kept_hh), "person": person}
    for group in GROUPS:
        rows[group] = np.isin(v[f"{group}_id"], v[f"person_{group}_id"][person])
    return rows


@pytest.mark.parametrize("layout", ["periods", "flat"])
def test_reweight_hdf5_writes_the_pruned_file_in_the_same_layout(
    tmp_path: Path, layout: str
) -> None:
    data, targets, out = tmp_path / "data.h5", tmp_path / "targets.csv", tmp_path / "small.h5"
    v = _write(data, layout)
    _targets(targets, v)
    result = runner.invoke(app, [
        "reweight", str(data), str(targets), "--period", "2024", "--target-records", "150",
        "--epochs", "150", "-o", str(out), "--quiet",
    ])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    summary = json.loads((tmp_path / "small_report" / "summary.json").read_text())
    assert summary["n_records_out"] == 150
    assert summary["mean_abs_rel_error"] < 0.02

    with h5py.File(data, "r") as f_in, h5py.File(out, "r") as f_out:
        before, after = _datasets(f_in), _datasets(f_out)
        assert sorted(after) == sorted(before)  # same variables, same periods
        assert f_out.attrs["source"] == "l0calib test"
        if layout == "periods":
            assert f_out["age"].attrs["unit"] == "test"
            assert f_out["age/2024"].compression == "gzip"
    at = "/2024" if layout == "periods" else ""
    weights = after[f"household_weight{at}"]
    assert weights.dtype == np.float32
    assert len(weights) == 150
    assert (weights > 0).all()
    kept_hh = after[f"household_id{at}"]
    rows = _kept_rows(v, kept_hh)
    assert int(rows["household"].sum()) == 150
    entity_of = {"household_id": "household", "household_weight": "household",
                 "state_code": "household", "household_vehicles_owned": "household",
                 "tax_unit_is_joint": "tax_unit", "spm_unit_net_income": "spm_unit",
                 "family_size_bonus": "family", "marital_unit_count": "marital_unit"}  # fmt: skip
    entity_of |= {f"{g}_id": g for g in GROUPS}
    for name in v:
        entity = entity_of.get(name, "person")
        for key in [name] if layout == "flat" else [f"{name}/2024", f"{name}/2023"]:
            expected = before[key][rows[entity]]
            if key in (f"household_weight{at}", f"person_weight{at}"):
                continue  # the new weights, checked below
            assert after[key].dtype == before[key].dtype, key
            assert np.array_equal(after[key], expected), key  # ids and values intact
    # Every entity's rows belong to kept households; links point at kept units.
    person_hh = after[f"person_household_id{at}"]
    assert np.isin(person_hh, kept_hh).all()
    for group in GROUPS:
        assert set(after[f"person_{group}_id{at}"]) == set(after[f"{group}_id{at}"])
    # person_weight follows the household's new weight; 2023 weights are untouched.
    new_of_hh = dict(zip(kept_hh.tolist(), weights.tolist(), strict=True))
    assert np.allclose(after[f"person_weight{at}"], [new_of_hh[h] for h in person_hh])
    if layout == "periods":
        assert np.array_equal(after["household_weight/2023"],
                              before["household_weight/2023"][rows["household"]])  # fmt: skip
        assert np.array_equal(after["age/2025"], before["age/2025"][rows["person"]])

    # The file loads again: the report's totals from the written file, and a rewrite with
    # the same weights reproduces it.
    back = read_hdf5(out, period=2024)
    assert len(back.households) == 150
    assert back.households["state_code"].isin(["CA", "NY", "TX"]).all()
    em = build_estimate_matrix(back.households, targets, back.persons)
    report = pd.read_csv(tmp_path / "small_report" / "targets.csv")
    assert np.allclose(em.matrix @ em.weights, report["estimate"].to_numpy(), rtol=1e-5)
    again = tmp_path / "again.h5"
    counts = write_hdf5(out, again, back.households["household_weight"].to_numpy(), period=2024)
    assert counts["household"] == 150
    assert counts["person"] == int(rows["person"].sum())
    with h5py.File(again, "r") as f_again:
        rewritten = _datasets(f_again)
    assert sorted(rewritten) == sorted(after)
    assert all(np.array_equal(rewritten[k], after[k]) for k in after)


def test_read_hdf5_tables_and_entities(tmp_path: Path) -> None:
    path = tmp_path / "data.h5"
    v = _write(path, "periods")
    data = read_hdf5(path, period="2023")
    assert data.period == "2023"
    assert data.periods == ("2023", "2024", "2025")
    assert sorted(data.tables) == ["family", "household", "marital_unit", "person", "spm_unit",
                                   "tax_unit"]  # fmt: skip
    assert data.households["state_code"].tolist()[:3] == [s.decode() for s in v["state_code"][:3]]
    assert np.allclose(data.persons["employment_income"], v["employment_income"] * 0.95)
    assert "spm_unit_net_income" in data.tables["spm_unit"].columns
    assert "spm_unit_net_income" not in data.households.columns


def test_hdf5_errors(tmp_path: Path) -> None:
    data, targets = tmp_path / "data.h5", tmp_path / "targets.csv"
    v = _write(data, "periods")
    _targets(targets, v)
    cases = [
        (["--period", "2030"], 1, "no data for period 2030; the file has periods 2023, 2024, 2025"),
        ([], 1, "several periods (2023, 2024, 2025); choose one with --period"),
        (["--period", "2024", "-o", str(tmp_path / "x.parquet")], 2, "give a .h5 path"),
        (["--period", "2024", "--persons", "p.csv"], 2, "--persons, --entity"),
    ]
    for extra, code, message in cases:
        result = runner.invoke(app, ["reweight", str(data), str(targets), "--epochs", "5",
                                     "-o", str(tmp_path / "o.h5"), *extra])  # fmt: skip
        assert result.exit_code == code, result.output
        assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o.h5").exists()
    # A unit with persons in two households, a link to a unit that does not exist.
    for name, change, message in (
        ("person_tax_unit_id", lambda a: np.where(np.arange(len(a)) == 1, a[0] + 10**6, a),
         "is not a tax_unit_id"),
        ("person_spm_unit_id", lambda a: np.where(np.arange(len(a)) == len(a) - 1, a[0], a),
         "has persons in 2 households; a spm_unit must sit inside one household"),
    ):  # fmt: skip
        bad = tmp_path / f"bad_{name}.h5"
        _write(bad, "flat")
        with h5py.File(bad, "r+") as f:
            values = f[name][()]
            del f[name]
            f[name] = change(values)
        with pytest.raises(DataError, match=message):
            read_hdf5(bad)
    with pytest.raises(DataError, match="the output would overwrite the input"):
        write_hdf5(data, data, np.ones(400), period=2024)


def _export(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The 2024 households and persons of ``data`` as Parquet tables (the same records)."""
    back = read_hdf5(data, period=2024)
    hh, persons = tmp_path / "households.parquet", tmp_path / "persons.parquet"
    back.households.to_parquet(hh)
    back.persons.to_parquet(persons)
    return hh, persons


def test_check_reads_hdf5_as_reweight_does(tmp_path: Path) -> None:
    data, targets = tmp_path / "data.h5", tmp_path / "targets.csv"
    v = _write(data, "periods")
    _targets(targets, v)
    frame = pd.read_csv(targets)
    # Every household has a person: fewer persons than households in CA cannot hold.
    hh_ca = frame.loc[frame["name"] == "hh_CA", "value"].item()
    frame.loc[frame["name"] == "pop_CA", "value"] = 0.9 * hh_ca
    frame.to_csv(targets, index=False)
    result = runner.invoke(app, ["check", str(data), str(targets), "--period", "2024",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 3, result.output
    found = json.loads(result.stdout)
    assert found["n_records"] == 400
    assert found["n_targets"] == 8
    assert not found["feasible"]
    # The same findings as from the same records written as tables.
    hh, persons = _export(data, tmp_path)
    tables = runner.invoke(app, ["check", str(hh), str(targets), "--persons", str(persons),
                                 "--json"])  # fmt: skip
    assert tables.exit_code == 3, tables.output
    same = json.loads(tables.stdout)
    for key in ("feasible", "total_rel_change", "changes", "conflicts", "targets"):
        assert found[key] == same[key], key
    # 2023 is another period: other values, other answer.
    earlier = runner.invoke(app, ["check", str(data), str(targets), "--period", "2023",
                                  "--json"])  # fmt: skip
    assert json.loads(earlier.stdout)["total_rel_change"] != found["total_rel_change"]
    cases = [
        ([str(data), str(targets)], 1,
         "several periods (2023, 2024, 2025); choose one with --period"),
        ([str(data), str(targets), "--period", "2030"], 1, "no data for period 2030"),
        ([str(data), str(targets), "--period", "2024", "--persons", str(persons)], 2,
         "an HDF5 dataset holds its persons and entities: --persons does not apply"),
        ([str(data), str(targets), "--period", "2024", "--weight-column", "w"], 2,
         "an HDF5 dataset uses PolicyEngine's names"),
        ([str(hh), str(targets), "--period", "2024"], 2, "only for HDF5 input (.h5)"),
    ]  # fmt: skip
    for args, code, message in cases:
        result = runner.invoke(app, ["check", *args])
        assert result.exit_code == code, result.output
        assert message in " ".join(result.output.split()), result.output


def test_calibrate_hdf5_writes_every_household_back(tmp_path: Path) -> None:
    data, targets, out = tmp_path / "data.h5", tmp_path / "targets.csv", tmp_path / "cal.h5"
    v = _write(data, "periods")
    _targets(targets, v)
    result = runner.invoke(app, ["calibrate", str(data), str(targets), "--period", "2024",
                                 "-o", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cal_report" / "summary.json").read_text())
    assert summary["period"] == "2024"
    assert summary["method"] == "raking"
    back = read_hdf5(out, period=2024)
    assert back.households["household_id"].tolist() == v["household_id"].tolist()
    # The written weights meet every target (raking meets them exactly).
    em = build_estimate_matrix(back.households, targets, back.persons)
    assert np.allclose(em.matrix @ em.weights, em.values, rtol=1e-5)
    assert not np.allclose(back.households["household_weight"], v["household_weight"])
    # The same weights as calibrate on the same records written as tables.
    hh, persons = _export(data, tmp_path)
    table_out = tmp_path / "cal_tables.parquet"
    tables = runner.invoke(app, ["calibrate", str(hh), str(targets), "--persons", str(persons),
                                 "-o", str(table_out), "--quiet"])  # fmt: skip
    assert tables.exit_code == 0, tables.output
    expected = pd.read_parquet(table_out)["household_weight"].to_numpy()
    assert np.allclose(back.households["household_weight"], expected, rtol=1e-6)  # float32
    with h5py.File(data, "r") as f_in, h5py.File(out, "r") as f_out:
        before, after = _datasets(f_in), _datasets(f_out)
    assert sorted(after) == sorted(before)
    assert np.array_equal(after["household_weight/2023"], before["household_weight/2023"])
    assert np.array_equal(after["age/2024"], before["age/2024"])
    new_of_hh = dict(zip(after["household_id/2024"].tolist(),
                         after["household_weight/2024"].tolist(), strict=True))  # fmt: skip
    assert np.allclose(after["person_weight/2024"],
                       [new_of_hh[h] for h in after["person_household_id/2024"]])  # fmt: skip
    for extra, message in (
        (["-o", str(tmp_path / "x.parquet")], "give a .h5 path"),
        (["--entity", "t=t.csv"], "--entity and --entity-link do not apply"),
    ):
        result = runner.invoke(app, ["calibrate", str(data), str(targets), "--period", "2024",
                                     *extra])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
    # GREG (linear) weights below 0 cannot go into a PolicyEngine dataset: refused, no file.
    frame = pd.read_csv(targets)
    frame.loc[frame["name"] == "hh_CA", "value"] *= 0.05
    far = tmp_path / "far.csv"
    frame.to_csv(far, index=False)
    neg = tmp_path / "neg.h5"
    result = runner.invoke(app, ["calibrate", str(data), str(far), "--period", "2024",
                                 "--method", "linear", "-o", str(neg), "--quiet"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "method 'linear' gave" in result.output
    assert "negative weight(s); a PolicyEngine dataset needs weights >= 0" in result.output
    assert not neg.exists()
    assert not (tmp_path / "neg_report").exists()


def test_reweight_hdf5_honours_bounds_and_max_error(tmp_path: Path) -> None:
    data, targets, out = tmp_path / "data.h5", tmp_path / "targets.csv", tmp_path / "small.h5"
    v = _write(data, "flat")
    _targets(targets, v)
    result = runner.invoke(app, [
        "reweight", str(data), str(targets), "--target-records", "150", "--epochs", "150",
        "--bounds", "0.75,1.5", "--max-error", "0.00001", "-o", str(out), "--quiet",
    ])  # fmt: skip
    summary = json.loads((tmp_path / "small_report" / "summary.json").read_text())
    # Without --bounds this run's ratios to the inflated weight span about 0.69 to 1.39.
    ratio = summary["inflated_weight_ratio"]
    assert ratio["min"] >= 0.75 - 1e-6
    assert ratio["max"] <= 1.5 + 1e-6
    assert summary["mean_abs_rel_error"] < 0.01
    # Off by more than --max-error 1e-5 (the default 0.5 would name none): exit 3.
    assert summary["missed_targets"]
    assert result.exit_code == 3, result.output


def test_select_hdf5_writes_the_selected_households(tmp_path: Path) -> None:
    data, targets = tmp_path / "data.h5", tmp_path / "targets.csv"
    v = _write(data, "flat")
    _targets(targets, v)
    hh, _ = _export(data, tmp_path)
    # A random draw only: the same households and design weights as from the tables.
    out = tmp_path / "drawn.h5"
    result = runner.invoke(app, ["select", str(data), "--target-records", "100", "--stratify",
                                 "state_code", "-o", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    tables = runner.invoke(app, ["select", str(hh), "--target-records", "100", "--stratify",
                                 "state_code", "-o", str(tmp_path / "drawn.csv"),
                                 "--quiet"])  # fmt: skip
    assert tables.exit_code == 0, tables.output
    expected = pd.read_csv(tmp_path / "drawn.csv")
    with h5py.File(out, "r") as f:
        after = _datasets(f)
    assert after["household_id"].tolist() == expected["household_id"].tolist()
    assert np.allclose(after["household_weight"], expected["household_weight"], rtol=1e-6)
    rows = _kept_rows(v, after["household_id"])
    assert np.array_equal(after["age"], v["age"][rows["person"]])
    assert np.array_equal(after["tax_unit_id"], v["tax_unit_id"][rows["tax_unit"]])
    assert "selection" not in after  # no such variable in a PolicyEngine dataset
    # With targets: the L0 part and the report, as for a table.
    out = tmp_path / "small.h5"
    result = runner.invoke(app, ["select", str(data), "--target-records", "150", "--targets",
                                 str(targets), "--epochs", "150", "-o", str(out),
                                 "--quiet"])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    summary = json.loads((tmp_path / "small_report" / "summary.json").read_text())
    assert summary["n_records_out"] == 150
    assert summary["selection_split"] == {"l0": 150, "random": 0}
    assert summary["period"] is None  # a flat file
    back = read_hdf5(out)
    assert len(back.households) == 150
    em = build_estimate_matrix(back.households, targets, back.persons)
    report = pd.read_csv(tmp_path / "small_report" / "targets.csv")
    assert np.allclose(em.matrix @ em.weights, report["estimate"].to_numpy(), rtol=1e-5)
    result = runner.invoke(app, ["select", str(hh), "--target-records", "10", "--period",
                                 "2024"])  # fmt: skip
    assert result.exit_code == 2
    assert "only for HDF5 input (.h5)" in result.output
