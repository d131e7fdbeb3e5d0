"""Synthetic, CPS-like survey data with a targets file, for examples, tests and benchmarks.

:func:`synthetic_survey` draws a household sample (with a linked person table and initial
weights) from a simple model of the US population, and builds targets from a larger,
independent draw of the *population* model, each perturbed by a few percent. As in real
work:

- the sample's respondents differ a little from the population (more employed, fewer SNAP
  recipients, more home owners), so the initial weights give biased totals;
- the initial weights are noisy design weights, so even unbiased totals are off;
- the targets are close to, but not exactly, consistent with each other (state age bands
  do not add up exactly to the state totals).

State population counts are the 2020 Census apportionment figures, rounded; everything
else is invented.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from l0calib.exceptions import ParameterError
from l0calib.io import write_table
from l0calib.targets import build_estimate_matrix

__all__ = ["STATES", "SyntheticSurvey", "synthetic_survey"]

# 2020 Census resident population, millions (rounded), by state and DC.
_STATE_POP = {
    "AL": 5.02, "AK": 0.73, "AZ": 7.15, "AR": 3.01, "CA": 39.54, "CO": 5.77, "CT": 3.61,
    "DE": 0.99, "DC": 0.69, "FL": 21.54, "GA": 10.71, "HI": 1.46, "ID": 1.84, "IL": 12.81,
    "IN": 6.79, "IA": 3.19, "KS": 2.94, "KY": 4.51, "LA": 4.66, "ME": 1.36, "MD": 6.18,
    "MA": 7.03, "MI": 10.08, "MN": 5.71, "MS": 2.96, "MO": 6.15, "MT": 1.08, "NE": 1.96,
    "NV": 3.10, "NH": 1.38, "NJ": 9.29, "NM": 2.12, "NY": 20.20, "NC": 10.44, "ND": 0.78,
    "OH": 11.80, "OK": 3.96, "OR": 4.24, "PA": 13.00, "RI": 1.10, "SC": 5.12, "SD": 0.89,
    "TN": 6.91, "TX": 29.15, "UT": 3.27, "VT": 0.64, "VA": 8.63, "WA": 7.71, "WV": 1.79,
    "WI": 5.89, "WY": 0.58,
}  # fmt: skip
STATES: tuple[str, ...] = tuple(_STATE_POP)
_TOTAL_HOUSEHOLDS = 128.5e6  # about 331M persons / 2.58 persons per household
_AGE_BANDS = ((0, 17), (18, 34), (35, 54), (55, 64), (65, 200))
_AGI_EDGES = (0.0, 10e3, 25e3, 50e3, 75e3, 100e3, 200e3, 500e3)


@dataclass(frozen=True)
class SyntheticSurvey:
    """A synthetic survey: households, persons and a targets table.

    Attributes
    ----------
    households : pandas.DataFrame
        ``household_id``, ``household_weight`` (initial weight), ``state``, ``tenure``,
        ``household_size``, ``snap`` (annual SNAP benefit, $), ``capital_income``, ``agi``.
    persons : pandas.DataFrame
        ``person_id``, ``person_household_id``, ``state``, ``age``, ``sex``,
        ``employment_income``, ``self_employment_income``.
    targets : pandas.DataFrame
        A targets table in the file format of ``docs/targets.md``.
    seed : int
    """

    households: pd.DataFrame
    persons: pd.DataFrame
    targets: pd.DataFrame
    seed: int

    def write(self, directory: str | os.PathLike[str], *, fmt: str = "parquet") -> dict[str, Path]:
        """Write ``households.<fmt>``, ``persons.<fmt>`` and ``targets.csv`` into ``directory``.

        Returns the three paths, keyed ``households``, ``persons``, ``targets``.
        """
        if fmt not in ("parquet", "csv"):
            raise ParameterError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        return {
            "households": write_table(self.households, d / f"households.{fmt}"),
            "persons": write_table(self.persons, d / f"persons.{fmt}"),
            "targets": write_table(self.targets, d / "targets.csv"),
        }


def _draw(
    rng: np.random.Generator, n: int, state_income: np.ndarray, *, respondents: bool
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Draw ``n`` households. ``respondents`` shifts the model the way survey response does."""
    pop = np.array(list(_STATE_POP.values()))
    share = pop / pop.sum()
    # Like the CPS, small states are over-sampled in the survey.
    p_state = share**0.6 / (share**0.6).sum() if respondents else share
    state_idx = rng.choice(len(STATES), size=n, p=p_state)
    design_weight = (share[state_idx] / p_state[state_idx]) * (_TOTAL_HOUSEHOLDS / n)
    income_level = state_income[state_idx]

    size = np.minimum(1 + rng.poisson(1.55, size=n), 9)
    hh_of_person = np.repeat(np.arange(n), size)
    m = len(hh_of_person)
    first = np.r_[True, hh_of_person[1:] != hh_of_person[:-1]]
    age = np.where(
        first,
        rng.integers(18, 91, size=m),
        np.where(rng.random(m) < 0.55, rng.integers(0, 18, size=m), rng.integers(18, 86, size=m)),
    )
    sex = np.where(rng.random(m) < 0.51, "F", "M")
    working_age = (age >= 18) & (age <= 66)
    p_emp = 0.70 + (0.04 if respondents else 0.0)
    employed = working_age & (rng.random(m) < p_emp)
    emp = np.where(
        employed, rng.lognormal(10.6, 0.9, size=m) * income_level[hh_of_person], 0.0
    ).round(0)
    self_emp = np.where(
        (age >= 18) & (rng.random(m) < 0.08), rng.lognormal(9.8, 1.3, size=m), 0.0
    ).round(0)

    hh_earned = np.bincount(hh_of_person, weights=emp + self_emp, minlength=n)
    capital = np.where(rng.random(n) < 0.3, rng.lognormal(7.5, 2.2, size=n), 0.0).round(0)
    agi = hh_earned + capital
    low_income = agi < 25_000 * np.sqrt(size)
    p_snap = np.where(low_income, 0.45, 0.03) - (0.04 if respondents else 0.0)
    snap = np.where(
        rng.random(n) < np.clip(p_snap, 0, 1), (rng.gamma(4.0, 60.0, size=n) * 12 * size), 0.0
    ).round(0)
    p_own = np.clip(0.35 + 0.25 * (agi > 60_000) + (0.04 if respondents else 0.0), 0, 1)
    u = rng.random(n)
    tenure = np.where(u < p_own, "owner", np.where(u < p_own + 0.03, "other", "renter"))

    households = pd.DataFrame(
        {
            "household_id": np.arange(1, n + 1),
            "household_weight": 0.0,
            "state": np.array(STATES)[state_idx],
            "tenure": tenure,
            "household_size": size,
            "snap": snap,
            "capital_income": capital,
            "agi": agi,
        }
    )
    persons = pd.DataFrame(
        {
            "person_id": np.arange(1, m + 1),
            "person_household_id": hh_of_person + 1,
            "state": households["state"].to_numpy()[hh_of_person],
            "age": age,
            "sex": sex,
            "employment_income": emp,
            "self_employment_income": self_emp,
        }
    )
    return households, persons, design_weight


def _rare_columns(
    rng: np.random.Generator, households: pd.DataFrame, n_sample: int, *, respondents: bool
) -> None:
    """Add ``capital_gains`` and ``housing_aid`` (in place): rare by construction.

    About 15 sample households (at any sample size) have capital gains above $500,000,
    and the population has twice as many per household (the rich respond less), so that
    band's targets are about twice its design-weighted total in the sample; about 20
    sample households receive housing aid (under-reported by 10 %).
    """
    n = len(households)
    p_top = 15.0 / n_sample * (1.0 if respondents else 2.0)
    top = rng.random(n) < p_top
    gains = np.where(top, 500_000 + rng.lognormal(13.0, 0.6, size=n), 0.0)
    small = rng.random(n) < 0.05
    gains = np.where(~top & small, rng.lognormal(8.0, 1.5, size=n), gains).round(0)
    p_aid = 20.0 / n_sample * (1.0 if respondents else 1.1)
    aid = np.where(rng.random(n) < p_aid, rng.gamma(3.0, 2_000.0, size=n), 0.0).round(0)
    households["capital_gains"] = gains
    households["housing_aid"] = aid


def _rare_rows(disagreement: float, full: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    def add(name: str, variable: str, filt: str, entity: str, group: str) -> None:
        rows.append(
            {"name": name, "variable": variable, "filter": filt, "entity": entity, "group": group}
        )

    add("cg_top_households", "", "capital_gains > 500000", "household", "top_capital_gains")
    add("cg_top_amount", "capital_gains", "capital_gains > 500000", "household",
        "top_capital_gains")  # fmt: skip
    add("housing_aid_households", "", "housing_aid > 0", "household", "housing_aid")
    add("housing_aid_amount", "housing_aid", "housing_aid > 0", "household", "housing_aid")
    for s in ("WY", "VT", "DC") if not full else ():  # else among the state x age targets
        add(f"pop_{s}_65plus", "", f'state == "{s}" and age >= 65', "person", "small_states")
    if disagreement:
        # Second sources for national totals: they disagree with the state sums.
        add("households_total_admin", "", "", "household", "admin_totals")
        add("persons_total_admin", "", "", "person", "admin_totals")
    return rows


def _target_rows(full: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    def add(name: str, variable: str, filt: str, entity: str, group: str) -> None:
        rows.append(
            {"name": name, "variable": variable, "filter": filt, "entity": entity, "group": group}
        )

    for s in STATES:
        add(f"hh_{s}", "", f'state == "{s}"', "household", "households_by_state")
        add(f"pop_{s}", "", f'state == "{s}"', "person", "persons_by_state")
        add(f"snap_hh_{s}", "", f'state == "{s}" and snap > 0', "household", "snap_by_state")
        add(
            f"emp_income_{s}",
            "employment_income",
            f'state == "{s}"',
            "person",
            "employment_income_by_state",
        )
        if full:
            for lo, hi in _AGE_BANDS:
                band = f"{lo}plus" if hi >= 200 else f"{lo}_{hi}"
                cond = f"age >= {lo}" if hi >= 200 else f"{lo} <= age <= {hi}"
                add(f"pop_{s}_{band}", "", f'state == "{s}" and {cond}', "person", "age_by_state")
    for sex in ("F", "M"):
        for lo in range(0, 90, 10):
            cond = "age >= 80" if lo == 80 else f"{lo} <= age < {lo + 10}"
            band = "80plus" if lo == 80 else f"{lo}_{lo + 9}"
            add(f"pop_{sex}_{band}", "", f'sex == "{sex}" and {cond}', "person", "age_by_sex")
    edges = (-np.inf, *_AGI_EDGES, np.inf)
    for lo, hi in itertools.pairwise(edges):
        if lo == -np.inf:
            name, cond = "agi_le_0", "agi <= 0"
        elif hi == np.inf:
            name, cond = f"agi_gt_{int(lo)}", f"agi > {int(lo)}"
        else:
            name, cond = f"agi_{int(lo)}_{int(hi)}", f"{int(lo)} < agi <= {int(hi)}"
        add(name, "", cond, "household", "agi_bands")
    for t in ("owner", "renter", "other"):
        add(f"tenure_{t}", "", f'tenure == "{t}"', "household", "tenure")
    add("self_employment_income", "self_employment_income", "", "person", "national_totals")
    add("snap_total", "snap", "", "household", "national_totals")
    return rows


def synthetic_survey(
    n_households: int = 5_000,
    seed: int = 0,
    *,
    state_age_targets: bool | None = None,
    perturbation: float = 0.02,
    rare_targets: bool = False,
    disagreement: float = 0.0,
) -> SyntheticSurvey:
    """Draw a CPS-like synthetic survey with persons, initial weights and targets.

    Parameters
    ----------
    n_households : int, default 5000
        Households in the sample (persons are about 2.5 per household).
    seed : int, default 0
        Seeds every random step; the same seed gives the same data on every run (with the
        same numpy version).
    state_age_targets : bool, optional
        Add persons by state x 5 age bands (255 targets). Default: only when
        ``n_households >= 20_000``, where every cell has enough records. Without them there
        are 236 targets; with them, 491.
    perturbation : float, default 0.02
        Relative standard deviation of the noise applied to each population total.
    rare_targets : bool, default False
        Add targets few records support, as in real target sets: households with capital
        gains above $500,000 (count and amount; about 15 sample households at any size,
        the target about twice their design-weighted total), a small benefit program
        (``housing_aid``: count and amount, about 20 households), and persons aged 65+ in
        the three smallest states (9 more targets; columns ``capital_gains`` and
        ``housing_aid``).
    disagreement : float, default 0.0
        With ``rare_targets``: add second-source national totals of households and persons
        whose values are ``1 + disagreement`` and ``1 - disagreement`` times the population
        totals, so they disagree slightly with the state targets (2 more targets).

    Returns
    -------
    SyntheticSurvey

    Example
    -------
    >>> s = synthetic_survey(2_000, seed=1)
    >>> len(s.households), len(s.targets)
    (2000, 236)
    """
    if isinstance(n_households, bool) or not isinstance(n_households, int) or n_households < 100:
        raise ParameterError(f"n_households must be an integer >= 100, got {n_households!r}")
    if perturbation < 0 or not np.isfinite(perturbation):
        raise ParameterError(f"perturbation must be finite and >= 0, got {perturbation!r}")
    full = n_households >= 20_000 if state_age_targets is None else bool(state_age_targets)
    if disagreement and not rare_targets:
        raise ParameterError("disagreement needs rare_targets=True")
    seq = np.random.SeedSequence(seed)
    # The sixth stream (rare targets) leaves the first five, and so the default survey,
    # unchanged.
    children = seq.spawn(6)
    state_rng, sample_rng, pop_rng, weight_rng, target_rng, rare_rng = (
        np.random.default_rng(s) for s in children
    )
    # Relative income level of each state, shared by the sample and the population.
    state_income = np.exp(np.linspace(-0.15, 0.15, len(STATES))[state_rng.permutation(len(STATES))])

    households, persons, design = _draw(sample_rng, n_households, state_income, respondents=True)
    # Noisy design weights: nonresponse adjustment cells we do not model.
    households["household_weight"] = (design * weight_rng.lognormal(0.0, 0.25, n_households)).round(
        2
    )

    n_pop = max(3 * n_households, 50_000)
    pop_hh, pop_persons, pop_w = _draw(pop_rng, n_pop, state_income, respondents=False)

    rows = _target_rows(full)
    if rare_targets:
        _rare_columns(rare_rng, households, n_households, respondents=True)
        _rare_columns(rare_rng, pop_hh, n_households, respondents=False)
        rows += _rare_rows(disagreement, full)
    spec = pd.DataFrame(rows).assign(value=1.0)
    pop_hh["household_weight"] = pop_w
    totals = build_estimate_matrix(pop_hh, spec, pop_persons).estimates(pop_w)
    noise = target_rng.normal(0.0, perturbation, size=len(rows))
    values = totals * (1.0 + noise)
    if disagreement:
        names = [r["name"] for r in rows]
        values[names.index("households_total_admin")] = totals[
            names.index("households_total_admin")
        ] * (1 + disagreement)
        values[names.index("persons_total_admin")] = totals[names.index("persons_total_admin")] * (
            1 - disagreement
        )
    targets = pd.DataFrame(rows)
    targets.insert(1, "value", np.round(values, 0))
    targets = targets[["name", "value", "variable", "filter", "entity", "group"]]
    return SyntheticSurvey(households=households, persons=persons, targets=targets, seed=seed)
