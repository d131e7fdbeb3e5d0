"""The synthetic survey: determinism, shape, and targets close to (not exactly) consistent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from l0calib import ParameterError, build_estimate_matrix, synthetic_survey
from l0calib.datasets import STATES


def test_same_seed_same_data_other_seed_differs() -> None:
    a, b, c = (
        synthetic_survey(1000, seed=3),
        synthetic_survey(1000, seed=3),
        synthetic_survey(1000, seed=4),
    )
    pd.testing.assert_frame_equal(a.households, b.households)
    pd.testing.assert_frame_equal(a.persons, b.persons)
    pd.testing.assert_frame_equal(a.targets, b.targets)
    assert not a.households["household_weight"].equals(c.households["household_weight"])


def test_shape_and_links() -> None:
    s = synthetic_survey(2000, seed=0)
    hh, persons = s.households, s.persons
    assert len(hh) == 2000
    assert hh["household_id"].is_unique
    assert persons["person_household_id"].isin(hh["household_id"]).all()
    sizes = persons.groupby("person_household_id").size()
    np.testing.assert_array_equal(sizes.to_numpy(), hh["household_size"].to_numpy())
    assert set(hh["state"]) <= set(s.targets["name"].str.removeprefix("hh_"))
    assert (hh["household_weight"] > 0).all()
    assert len(s.targets) == 236
    assert len(synthetic_survey(2000, seed=0, state_age_targets=True).targets) == 491
    # realistic zeros and skew
    assert 0.05 < (hh["snap"] > 0).mean() < 0.4
    emp = persons["employment_income"]
    assert (emp == 0).mean() > 0.3
    assert emp[emp > 0].mean() > emp[emp > 0].median()


def test_targets_are_close_but_not_exact() -> None:
    s = synthetic_survey(5000, seed=0, perturbation=0.0)
    em = build_estimate_matrix(s.households, s.targets, s.persons)
    rel = np.abs(em.estimates(em.weights) / em.values - 1)
    # initial weights are biased and noisy: totals are off, but by tens of percent, not more
    assert 0.03 < np.median(rel) < 0.3
    # with no perturbation, national age-by-sex cells sum to the national population
    # implied by the state totals, up to the population draw's own noise (well under 1%)
    age_sex = em.values[[n.startswith("pop_F_") or n.startswith("pop_M_") for n in em.names]]
    states = em.values[[n.startswith("pop_") and len(n) == 6 for n in em.names]]
    assert age_sex.sum() == pytest.approx(states.sum(), rel=1e-9)


def test_bad_arguments() -> None:
    with pytest.raises(ParameterError, match="n_households must be an integer >= 100"):
        synthetic_survey(10)
    with pytest.raises(ParameterError, match="perturbation must be finite and >= 0"):
        synthetic_survey(1000, perturbation=-1.0)


def test_rare_targets_are_rare_and_leave_the_default_survey_unchanged() -> None:
    plain = synthetic_survey(2_000, seed=4)
    rare = synthetic_survey(2_000, seed=4, rare_targets=True, disagreement=0.02)
    pd.testing.assert_frame_equal(plain.targets, rare.targets.iloc[: len(plain.targets)])
    pd.testing.assert_frame_equal(plain.persons, rare.persons)
    assert len(rare.targets) == len(plain.targets) + 7 + 2
    em = build_estimate_matrix(rare.households, rare.targets, rare.persons)
    support = dict(zip(em.names, em.support(), strict=True))
    assert 5 <= support["cg_top_households"] <= 30
    assert 5 <= support["housing_aid_households"] <= 40
    est = dict(zip(em.names, em.estimates(em.weights), strict=True))
    value = dict(zip(em.names, em.values, strict=True))
    # The top band is under-represented: its target is well above the sample's total.
    assert value["cg_top_households"] > 1.3 * est["cg_top_households"]
    # Second-source totals disagree with the sum of the state targets.
    states = sum(value[f"hh_{s}"] for s in STATES)
    assert abs(value["households_total_admin"] / states - 1) > 0.005
