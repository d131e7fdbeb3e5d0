"""PolicyEngine's HDF5 datasets: read them as entity tables, write a pruned copy back.

A PolicyEngine dataset file holds one HDF5 dataset per variable, either flat
(``f["employment_income"]``, one array) or per period (``f["employment_income"]["2024"]``,
one array per period; the layout policyengine-us-data writes). Entities are not declared;
they are recognised from their id variables, as PolicyEngine's data has them:

- ``household_id`` and ``person_id``;
- every ``X_id`` with a person link ``person_X_id`` (``tax_unit_id`` /
  ``person_tax_unit_id``, ``spm_unit_id``, ``family_id``, ``marital_unit_id``,
  ``benunit_id``...); persons link to households through ``person_household_id``.

A variable belongs to the entity whose row count it has (at its period). When two
entities have the same count, a name that starts with ``<entity>_`` decides; when the two
entities keep the same rows anyway the choice does not matter; otherwise the file is
ambiguous and :class:`DataError` says which variable and entities.

:func:`read_hdf5` returns the tables of one period (strings decoded). :func:`write_hdf5`
writes a copy that keeps only the households with a non-zero new weight and, through the
person table, exactly the persons and group units (tax units, SPM units...) inside them:
ids and every other value as they were, every period pruned the same way (by id), the new
``household_weight`` written for the chosen period, attributes and dtypes kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib.exceptions import DataError
from l0calib.io import atomic_path

__all__ = ["HDF5_SUFFIXES", "Hdf5Data", "is_hdf5", "read_hdf5", "write_hdf5"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_HOUSEHOLD, _PERSON = "household", "person"
_WEIGHT = "household_weight"


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s extension is an HDF5 one (``.h5``, ``.hdf5``, ``.hdf``)."""
    return Path(path).suffix.lower() in HDF5_SUFFIXES


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:  # pragma: no cover - the hdf5 extra is installed with dev
        raise DataError("HDF5 files need h5py: pip install 'l0calib[hdf5]'") from None
    return h5py


@dataclass(frozen=True)
class Hdf5Data:
    """One period of a PolicyEngine HDF5 dataset, as tables.

    Attributes
    ----------
    tables : dict of entity name -> DataFrame
        One row per unit, in file order; every variable of that entity at the period
        (byte strings decoded as UTF-8). ``tables["household"]`` and ``tables["person"]``
        always exist; the person table carries the links (``person_household_id``...).
    period : str or None
        The period read (None for a flat file).
    periods : tuple of str
        Every period in the file.
    """

    tables: dict[str, pd.DataFrame]
    period: str | None
    periods: tuple[str, ...]

    @property
    def households(self) -> pd.DataFrame:
        return self.tables[_HOUSEHOLD]

    @property
    def persons(self) -> pd.DataFrame:
        return self.tables[_PERSON]


class _Index:
    """Where each variable's array is: flat datasets and per-period groups."""

    def __init__(self, f: Any, label: str) -> None:
        h5py = _h5py()
        self.f, self.label = f, label
        self.flat: dict[str, Any] = {}
        self.by_period: dict[str, dict[str, Any]] = {}
        for name, item in f.items():
            if isinstance(item, h5py.Dataset):
                self.flat[name] = item
                continue
            for period, sub in item.items():
                if not isinstance(sub, h5py.Dataset):
                    raise DataError(
                        f"{label}: '{name}/{period}' is a group; expected one dataset per "
                        "variable, flat or per period (f[variable][period])"
                    )
                self.by_period.setdefault(str(period), {})[name] = sub
        self.periods = tuple(sorted(self.by_period))

    def choose(self, period: Any) -> str | None:
        if period is not None:
            period = str(period)
            if self.periods and period not in self.by_period:
                raise DataError(
                    f"{self.label}: no data for period {period}; the file has periods "
                    f"{', '.join(self.periods)}"
                )
            return period if self.periods else None
        if len(self.periods) > 1:
            raise DataError(
                f"{self.label}: the file has several periods ({', '.join(self.periods)}); "
                "choose one with --period"
            )
        return self.periods[0] if self.periods else None

    def variables(self, period: str | None) -> dict[str, Any]:
        """Every variable's dataset at ``period`` (per-period arrays over flat ones)."""
        return {**self.flat, **(self.by_period.get(period, {}) if period is not None else {})}


@dataclass
class _Entities:
    """The entities of one period: their ids, and which rows of each belong to which
    household (as a row of the household table)."""

    ids: dict[str, np.ndarray]
    household_row: dict[str, np.ndarray]

    def sizes(self) -> dict[str, int]:
        return {e: len(v) for e, v in self.ids.items()}

    def masks(self, kept_ids: np.ndarray) -> dict[str, np.ndarray]:
        keep = np.isin(self.ids[_HOUSEHOLD], kept_ids)
        return {e: keep[rows] for e, rows in self.household_row.items()}


def _where(period: str | None) -> str:
    return "" if period is None else f" (period {period})"


def _entities(variables: dict[str, Any], label: str, period: str | None) -> _Entities:
    at = _where(period)
    for name in ("household_id", "person_household_id"):
        if name not in variables:
            raise DataError(f"{label}{at}: variable '{name}' is missing; it identifies the "
                            "households and links persons to them")  # fmt: skip
    hh = variables["household_id"][()]
    link = variables["person_household_id"][()]
    n_people = len(link)
    person_ids = variables["person_id"][()] if "person_id" in variables else np.arange(n_people)
    if len(person_ids) != n_people:
        raise DataError(f"{label}{at}: person_id has {len(person_ids):,} rows but "
                        f"person_household_id has {n_people:,}")  # fmt: skip
    if len(pd.unique(hh)) != len(hh):
        raise DataError(f"{label}{at}: household_id has duplicate values")
    hh_row = pd.Index(hh).get_indexer(link)
    if (hh_row < 0).any():
        row = int(np.flatnonzero(hh_row < 0)[0])
        raise DataError(f"{label}{at}: person row {row}: person_household_id="
                        f"{_item(link[row])!r} is not a household_id")  # fmt: skip
    ids = {_HOUSEHOLD: hh, _PERSON: person_ids}
    rows = {_HOUSEHOLD: np.arange(len(hh)), _PERSON: hh_row}
    for name in sorted(variables):
        if not (name.startswith("person_") and name.endswith("_id")):
            continue
        entity = name[len("person_") : -len("_id")]
        if entity in (_HOUSEHOLD, _PERSON, ""):
            continue
        own = f"{entity}_id"
        if own not in variables:
            raise DataError(f"{label}{at}: '{name}' links persons to {entity} units but "
                            f"'{own}' is missing")  # fmt: skip
        unit_ids = variables[own][()]
        person_unit = variables[name][()]
        if len(person_unit) != n_people:
            raise DataError(f"{label}{at}: '{name}' has {len(person_unit):,} rows, expected "
                            f"one per person ({n_people:,})")  # fmt: skip
        unit_row = pd.Index(unit_ids).get_indexer(person_unit)
        if (unit_row < 0).any():
            row = int(np.flatnonzero(unit_row < 0)[0])
            raise DataError(f"{label}{at}: person row {row}: {name}="
                            f"{_item(person_unit[row])!r} is not a {own}")  # fmt: skip
        # Each unit's household, from its persons: exactly one, and at least one person.
        unit_hh = np.full(len(unit_ids), -1, dtype=np.int64)
        unit_hh[unit_row] = hh_row
        spread = pd.Series(hh_row).groupby(unit_row).nunique()
        if (spread > 1).any():
            first = int(spread.index[np.flatnonzero(spread.to_numpy() > 1)[0]])
            raise DataError(f"{label}{at}: {own}={_item(unit_ids[first])!r} has persons in "
                            f"{int(spread.loc[first])} households; a {entity} must sit inside "
                            "one household")  # fmt: skip
        if (unit_hh < 0).any():
            first = int(np.flatnonzero(unit_hh < 0)[0])
            raise DataError(
                f"{label}{at}: {own}={_item(unit_ids[first])!r} has no person ({name} never "
                "points at it), so its household is unknown"
            )
        ids[entity], rows[entity] = unit_ids, unit_hh
    return _Entities(ids, rows)


def _item(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return value.decode() if isinstance(value, bytes) else value


def _entity_of(
    name: str, length: int | None, ents: _Entities, label: str, period: str | None,
    kept_ids: np.ndarray | None = None,
) -> str | None:  # fmt: skip
    """The entity a variable's array belongs to, or None when its length matches none."""
    if length is None:
        return None
    if name in (f"{e}_id" for e in ents.ids) and name[:-3] in ents.ids:
        return name[:-3]
    if name.startswith("person_") and name.endswith("_id"):
        return _PERSON
    cands = [e for e, n in ents.sizes().items() if n == length]
    if len(cands) <= 1:
        return cands[0] if cands else None
    named = [e for e in cands if name.startswith(f"{e}_")]
    if named:
        return max(named, key=len)  # "tax_unit_" over a hypothetical "tax_"
    if kept_ids is not None:
        masks = ents.masks(kept_ids)
        if all(np.array_equal(masks[c], masks[cands[0]]) for c in cands[1:]):
            return cands[0]
    elif all(np.array_equal(ents.household_row[c], ents.household_row[cands[0]])
             for c in cands[1:]):  # fmt: skip
        return cands[0]
    raise DataError(
        f"{label}{_where(period)}: variable '{name}' has {length:,} rows, as many as "
        f"{' and '.join(cands)} units, and its name does not say which it belongs to"
    )


def _length(ds: Any) -> int | None:
    return int(ds.shape[0]) if ds.ndim == 1 else None


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S" or (
        values.dtype == object and len(values) and isinstance(values[0], bytes)
    ):
        return np.array([v.decode("utf-8") for v in values], dtype=object)
    return values


def read_hdf5(path: str | os.PathLike[str], *, period: Any = None) -> Hdf5Data:
    """Read one period of a PolicyEngine HDF5 dataset as one table per entity.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5`` file (flat or per-period layout, see the module docstring).
    period : str or int, optional
        The period to read (e.g. 2024). Needed when the file has several; ignored by a
        flat file, whose arrays are for the one period it was made for.

    Returns
    -------
    Hdf5Data

    Raises
    ------
    DataError
        The file is missing or not HDF5, a period is missing or not chosen, an id or link
        variable is missing, a person links to an unknown unit, a group unit spans two
        households or has no person, or a variable's entity is ambiguous.

    Example
    -------
    >>> import h5py, numpy as np, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "data.h5")
    >>> with h5py.File(path, "w") as f:
    ...     f["household_id/2024"] = np.array([1, 2])
    ...     f["household_weight/2024"] = np.array([10.0, 20.0])
    ...     f["person_id/2024"] = np.array([1, 2, 3])
    ...     f["person_household_id/2024"] = np.array([1, 1, 2])
    ...     f["age/2024"] = np.array([40, 9, 70])
    >>> data = read_hdf5(path, period=2024)
    >>> data.households.columns.tolist(), data.persons["age"].tolist()
    (['household_id', 'household_weight'], [40, 9, 70])
    """
    h5py = _h5py()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"{p}: cannot read HDF5 file: {exc}") from None
    with f:
        index = _Index(f, str(p))
        chosen = index.choose(period)
        variables = index.variables(chosen)
        ents = _entities(variables, str(p), chosen)
        columns: dict[str, dict[str, np.ndarray]] = {e: {} for e in ents.ids}
        for name, ds in variables.items():
            entity = _entity_of(name, _length(ds), ents, str(p), chosen)
            if entity is not None:
                columns[entity][name] = _decode(ds[()])
    tables = {e: pd.DataFrame(cols, copy=False) for e, cols in columns.items()}
    if "person_id" not in tables[_PERSON].columns:
        tables[_PERSON].insert(0, "person_id", ents.ids[_PERSON])
    return Hdf5Data(tables=tables, period=chosen, periods=index.periods)


def write_hdf5(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    weights: np.ndarray,
    *,
    period: Any = None,
    weight_variable: str = _WEIGHT,
) -> dict[str, int]:
    """Write ``source`` to ``target`` keeping only the households with a non-zero weight.

    Every entity loses the rows of dropped households (persons by ``person_household_id``,
    group units through their persons), in every period (matched by id) and in every
    variable; ids and all other values are copied as they are, with their dtypes,
    attributes and compression. For ``period``, ``weight_variable`` becomes ``weights``
    of the kept households (created if the file lacks it), and a stored
    ``<entity>_weight`` (``person_weight``, ``tax_unit_weight``...) becomes the new weight
    of each unit's household, as PolicyEngine defines those weights. Arrays that match no
    entity's row count (scalars, metadata) are copied unchanged. The write is atomic.

    Parameters
    ----------
    source, target : str or os.PathLike
        The original file and the file to write (never the same).
    weights : array of shape (n_households,)
        New weight of every household of ``period``, in file order; 0 drops it.
    period : str or int, optional
        As for :func:`read_hdf5`.
    weight_variable : str, default "household_weight"

    Returns
    -------
    dict of entity name -> rows kept (at ``period``)

    Raises
    ------
    DataError
        As :func:`read_hdf5`; also when ``weights`` has the wrong length or is negative or
        not finite.
    """
    h5py = _h5py()
    src, dst = Path(source), Path(target)
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: the output would overwrite the input; choose another path")
    weights = np.asarray(weights, dtype=np.float64)
    try:
        f = h5py.File(src, "r")
    except OSError as exc:
        raise DataError(f"{src}: cannot read HDF5 file: {exc}") from None
    with f, atomic_path(dst) as tmp:
        label = str(src)
        index = _Index(f, label)
        chosen = index.choose(period)
        ents = _entities(index.variables(chosen), label, chosen)
        n_hh = len(ents.ids[_HOUSEHOLD])
        if weights.shape != (n_hh,):
            raise DataError(f"{label}: {n_hh:,} households but {weights.size:,} weights")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise DataError("the new weights must be finite and >= 0")
        kept_ids = ents.ids[_HOUSEHOLD][weights != 0]
        masks = ents.masks(kept_ids)
        new = {_HOUSEHOLD: weights[weights != 0]}
        for e, rows in ents.household_row.items():
            if e != _HOUSEHOLD:
                new[e] = weights[rows][masks[e]]
        # Entities and masks of every other period that has its own ids.
        per_period: dict[str | None, _Entities] = {chosen: ents}
        for q in index.periods:
            if q != chosen and "household_id" in index.by_period[q]:
                per_period[q] = _entities(index.variables(q), label, q)

        period_masks = {q: e.masks(kept_ids) for q, e in per_period.items()}

        def pruned(name: str, ds: Any, q: str | None) -> np.ndarray:
            e_q = per_period.get(q, ents)
            entity = _entity_of(name, _length(ds), e_q, label, q, kept_ids)
            values = ds[()]
            if entity is None:
                return values
            if q == chosen and (name == weight_variable or name == f"{entity}_weight"):
                return new[entity].astype(values.dtype if values.dtype.kind == "f" else float)
            return values[period_masks.get(q, masks)[entity]]

        with h5py.File(tmp, "w") as out:
            out.attrs.update(dict(f.attrs))
            for name, ds in index.flat.items():
                _copy(out, name, ds, pruned(name, ds, chosen))
            for name in f:
                if name in index.flat:
                    continue
                group = out.create_group(name)
                group.attrs.update(dict(f[name].attrs))
                for q, ds in f[name].items():
                    _copy(group, q, ds, pruned(name, ds, str(q)))
            if weight_variable not in f:
                where = weight_variable if chosen is None else f"{weight_variable}/{chosen}"
                out.create_dataset(where, data=new[_HOUSEHOLD])
            elif chosen is not None and weight_variable not in index.by_period[chosen]:
                out[weight_variable].create_dataset(chosen, data=new[_HOUSEHOLD])
    return {e: int(m.sum()) for e, m in masks.items()}


def _copy(parent: Any, name: str, ds: Any, values: np.ndarray) -> None:
    options: dict[str, Any] = {}
    if ds.compression is not None and np.ndim(values) > 0 and np.size(values) > 0:
        options = {"compression": ds.compression, "compression_opts": ds.compression_opts,
                   "shuffle": ds.shuffle}  # fmt: skip
    new = parent.create_dataset(name, data=values, dtype=ds.dtype, **options)
    new.attrs.update(dict(ds.attrs))
