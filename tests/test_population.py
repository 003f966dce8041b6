"""Synthetic NYC: marginals, IPF, integerisation, contact groups, determinism, IO and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from lpm_llm.population import AGE_BANDS, BOROUGHS, RACES, SEXES, Population
from lpm_llm.population.synthesis import (
    DEFAULT_HOUSEHOLD_SIZE_SHARES,
    HouseholdSettings,
    SchoolSettings,
    WorkplaceSettings,
    _power_law_alpha,
    default_employed_share,
    integerise,
    ipf,
    joint_table,
    load_marginals,
    synthesize_nyc,
)
from lpm_llm.resources import nyc_data_path

SCALE = 0.01
ADULT = AGE_BANDS.index("18-24")
PUBLISHED = pd.read_csv(nyc_data_path("population_marginals.csv"))


def published(borough: str, dimension: str, group: str) -> float:
    df = PUBLISHED
    row = df[(df.borough == borough) & (df.dimension == dimension) & (df.group == group)]
    return float(row.population.iloc[0])


def _np(pop: Population, name: str) -> np.ndarray:
    return pop[name].numpy().astype(np.int64)


def _group_spread(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group id (>= 0): min and max of `values` among members."""
    keep = groups >= 0
    g = torch.from_numpy(groups[keep])
    v = torch.from_numpy(values[keep])
    n = int(g.max()) + 1
    lo = torch.full((n,), 10**9, dtype=torch.int64).scatter_reduce(0, g, v, "amin")
    hi = torch.full((n,), -(10**9), dtype=torch.int64).scatter_reduce(0, g, v, "amax")
    return lo.numpy(), hi.numpy()


# -- marginals, IPF, integerisation -------------------------------------------------------------------


def test_reconciled_marginals_equal_published_ones():
    m = load_marginals()
    for i, b in enumerate(BOROUGHS):
        assert m.total[i] == published(b, "total", "Boroughwide")
        for j, a in enumerate(AGE_BANDS):
            assert m.age[i, j] == pytest.approx(published(b, "age", a), rel=1e-5)
        for j, s in enumerate(SEXES):
            assert m.sex[i, j] == pytest.approx(published(b, "sex", s), rel=1e-5)
        listed = sum(published(b, "race_ethnicity", r) for r in RACES[:-1])
        if listed <= m.total[i]:  # all boroughs but Manhattan: groups as published, other = remainder
            for j, r in enumerate(RACES[:-1]):
                assert m.race[i, j] == published(b, "race_ethnicity", r)
            assert m.race[i, -1] == pytest.approx(m.total[i] - listed)
        else:  # Manhattan: published groups exceed the total by 1.9%, scaled down, other = 0
            assert b == "Manhattan"
            assert m.race[i, -1] == 0
            assert m.race[i, :-1] == pytest.approx([published(b, "race_ethnicity", r) * m.total[i] / listed
                                                    for r in RACES[:-1]])
        for block in (m.age, m.sex, m.race):
            assert block[i].sum() == pytest.approx(m.total[i], rel=1e-12)


def test_ipf_joint_table_reproduces_marginals():
    m = load_marginals()
    joint = joint_table(m)
    assert joint.shape == (len(BOROUGHS), len(AGE_BANDS), len(SEXES), len(RACES))
    np.testing.assert_allclose(joint.sum(axis=(2, 3)), m.age, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(joint.sum(axis=(1, 3)), m.sex, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(joint.sum(axis=(1, 2)), m.race, rtol=1e-9, atol=1e-6)
    # with one-way margins and a uniform seed IPF's answer is the independence table
    t = m.total[:, None, None, None]
    indep = m.age[:, :, None, None] * m.sex[:, None, :, None] * m.race[:, None, None, :] / t**2
    np.testing.assert_allclose(joint, indep, rtol=1e-9)


def test_ipf_keeps_the_seed_odds_ratios_and_fits_two_way_margins():
    rng = np.random.default_rng(3)
    seed = rng.uniform(0.2, 5.0, size=(4, 3, 5))
    target_ab = rng.uniform(10, 100, size=(4, 3))
    target_ab *= 1000 / target_ab.sum()
    target_c = rng.uniform(10, 100, size=5)
    target_c *= 1000 / target_c.sum()
    fitted = ipf(seed, [((0, 1), target_ab), ((2,), target_c)], tol=1e-12)
    np.testing.assert_allclose(fitted.sum(axis=2), target_ab, rtol=1e-9)
    np.testing.assert_allclose(fitted.sum(axis=(0, 1)), target_c, rtol=1e-9)
    # IPF only multiplies by margin factors, so every (ab) x (c) cross-ratio of the seed survives
    def cross(t):
        return t[0, 0, 0] * t[1, 2, 3] / (t[0, 0, 3] * t[1, 2, 0])

    assert cross(fitted) == pytest.approx(cross(seed), rel=1e-9)


def test_ipf_rejects_structural_zeros_and_bad_shapes():
    seed = np.ones((2, 2))
    seed[0, :] = 0
    with pytest.raises(ValueError, match="structural zeros"):
        ipf(seed, [((0,), np.array([1.0, 1.0])), ((1,), np.array([1.0, 1.0]))])
    with pytest.raises(ValueError, match="shape"):
        ipf(np.ones((2, 2)), [((0,), np.array([1.0, 1.0, 1.0]))])


@pytest.mark.parametrize("case", range(20))
def test_integerise_matches_every_one_way_margin_within_one(case):
    rng = np.random.default_rng(case)
    shape = tuple(rng.integers(2, 7, size=3))
    expected = rng.gamma(0.7, 1.0, size=shape)
    expected[rng.random(shape) < 0.1] = 0.0  # structural zeros stay zero
    n = int(rng.integers(1, 400))
    counts = integerise(expected, n)
    x = expected * n / expected.sum()
    assert counts.dtype == np.int64 and counts.sum() == n and (counts >= 0).all()
    assert (counts[expected == 0] == 0).all()
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        assert np.abs(counts.sum(axis=other) - x.sum(axis=other)).max() < 1.0
    np.testing.assert_array_equal(counts, integerise(expected, n))  # deterministic


def test_population_reproduces_marginals_at_scale_001(small_nyc):
    m = load_marginals()
    b, a, s, r = (_np(small_nyc, c) for c in ("borough", "age_band", "sex", "race"))
    for i, name in enumerate(BOROUGHS):
        here = b == i
        assert abs(here.sum() - SCALE * published(name, "total", "Boroughwide")) <= 0.5
        for col, block in ((a, m.age), (s, m.sex), (r, m.race)):
            got = np.bincount(col[here], minlength=block.shape[1])
            want = SCALE * block[i]
            assert np.abs(got - want).max() < 1.5  # the integerisation's guarantee
            assert (np.abs(got - want) <= 0.005 * want).all(), (name, got, want)


def test_columns_dtypes_and_codebooks(small_nyc):
    dtypes = {c: small_nyc[c].dtype for c in small_nyc.columns}
    assert dtypes == {
        "borough": torch.int8, "age_band": torch.int8, "sex": torch.int8, "race": torch.int8,
        "household": torch.int32, "school": torch.int32, "workplace": torch.int32, "employed": torch.bool,
    }
    assert small_nyc.codebooks == {"borough": BOROUGHS, "age_band": AGE_BANDS, "sex": SEXES, "race": RACES}
    assert small_nyc.nbytes() / small_nyc.n == 17
    assert small_nyc.device == torch.device("cpu")


# -- determinism and IO -------------------------------------------------------------------------------


def test_same_seed_same_population_other_seed_differs():
    one, two, other = (synthesize_nyc(0.002, seed=s) for s in (5, 5, 6))
    for c in one.columns:
        assert torch.equal(one[c], two[c]), c
    assert not torch.equal(one["household"], other["household"])
    assert not torch.equal(one["age_band"], other["age_band"])  # shuffled differently
    # ... but the cell counts (the integerised joint table) do not depend on the seed
    def key(p):
        code = _np(p, "borough") * 1000 + _np(p, "age_band") * 100 + _np(p, "sex") * 10 + _np(p, "race")
        return np.sort(code)

    np.testing.assert_array_equal(key(one), key(other))


def test_agent_order_is_shuffled(small_nyc):
    b = _np(small_nyc, "borough")
    assert (np.diff(b) != 0).mean() > 0.5  # sorted order would change borough only 4 times


def test_parquet_round_trip(small_nyc, tmp_path):
    path = tmp_path / "nyc.parquet"
    small_nyc.to_parquet(path)
    back = Population.from_parquet(path)
    assert back.codebooks == small_nyc.codebooks
    assert list(back.columns) == list(small_nyc.columns)
    for c in small_nyc.columns:
        assert back[c].dtype == small_nyc[c].dtype, c
        assert torch.equal(back[c], small_nyc[c]), c


# -- contact groups -----------------------------------------------------------------------------------


def test_households_every_agent_once_and_an_adult_in_each(small_nyc):
    hh, age, b = _np(small_nyc, "household"), _np(small_nyc, "age_band"), _np(small_nyc, "borough")
    assert hh.min() == 0
    sizes = np.bincount(hh)
    assert (sizes > 0).all()  # ids contiguous 0..H-1
    adults = np.bincount(hh, weights=(age >= ADULT).astype(float))
    children = sizes - adults
    assert (adults >= 1).all()
    assert children.sum() == (age < ADULT).sum() > 0
    lo, hi = _group_spread(hh, b)
    assert (lo == hi).all()  # a household never crosses boroughs
    # children prefer larger households (child_size_preference = 1)
    assert sizes[hh[age < ADULT]].mean() > sizes[hh[age >= ADULT]].mean()


def test_household_sizes_follow_the_borough_distribution(small_nyc):
    hh, b = _np(small_nyc, "household"), _np(small_nyc, "borough")
    sizes = np.bincount(hh)
    hh_borough = np.zeros(sizes.size, dtype=np.int64)
    hh_borough[hh] = b
    for i, name in enumerate(BOROUGHS):
        shares = np.asarray(DEFAULT_HOUSEHOLD_SIZE_SHARES[name])
        shares = shares / shares.sum()
        mine = sizes[hh_borough == i]
        want_mean = float((np.arange(1, 8) * shares).sum())
        assert mine.mean() == pytest.approx(want_mean, rel=0.05), name
        share_1 = (mine == 1).mean()
        assert abs(share_1 - shares[0]) < 4 * math.sqrt(shares[0] * (1 - shares[0]) / mine.size) + 1e-3


def test_household_settings_override_and_infeasible_sizes():
    pop = synthesize_nyc(0.002, seed=0, households=HouseholdSettings(size_shares={"Queens": [0, 0, 0, 1]}))
    hh, b = _np(pop, "household"), _np(pop, "borough")
    queens_sizes = np.bincount(hh)[np.unique(hh[b == BOROUGHS.index("Queens")])]
    assert (queens_sizes[:-1] == 4).all() and 1 <= queens_sizes[-1] <= 4  # the last takes the rest
    with pytest.raises(ValueError, match="needs .* households but has only .* adults"):
        synthesize_nyc(0.002, households=HouseholdSettings(size_shares={"Bronx": [1.0]}))


def test_classrooms_ages_5_to_17_within_borough_and_age_band(small_nyc):
    school, age, b = _np(small_nyc, "school"), _np(small_nyc, "age_band"), _np(small_nyc, "borough")
    school_age = (age == AGE_BANDS.index("5-12")) | (age == AGE_BANDS.index("13-17"))
    np.testing.assert_array_equal(school >= 0, school_age)  # enrolled_share = 1
    sizes = np.bincount(school[school >= 0])
    assert (sizes > 0).all() and sizes.max() <= 25
    for col in (b, age):
        lo, hi = _group_spread(school, col)
        assert (lo == hi).all()
    for i in range(len(BOROUGHS)):
        for a in (1, 2):
            n = ((b == i) & (age == a)).sum()
            classes = np.unique(school[(b == i) & (age == a)])
            assert classes.size == math.ceil(n / 25)


def test_school_settings():
    pop = synthesize_nyc(0.002, seed=1, schools=SchoolSettings(class_size=10, enrolled_share=0.5))
    school, age = _np(pop, "school"), _np(pop, "age_band")
    school_age = (age == 1) | (age == 2)
    assert not (school[~school_age] >= 0).any()
    assert abs((school >= 0).sum() - 0.5 * school_age.sum()) <= 10  # rounding per borough and band
    assert np.bincount(school[school >= 0]).max() <= 10
    with pytest.raises(ValidationError):
        SchoolSettings(class_size=0)


def test_workplaces_only_employed_adults_18_64_within_borough(small_nyc):
    wp, emp = _np(small_nyc, "workplace"), small_nyc["employed"].numpy()
    age, b = _np(small_nyc, "age_band"), _np(small_nyc, "borough")
    np.testing.assert_array_equal(wp >= 0, emp)
    assert ((age[emp] >= ADULT) & (age[emp] <= AGE_BANDS.index("55-64"))).all()
    sizes = np.bincount(wp[wp >= 0])
    assert (sizes > 0).all() and sizes.max() <= 500
    lo, hi = _group_spread(wp, b)
    assert (lo == hi).all()
    share = default_employed_share(WorkplaceSettings(), load_marginals())
    working = (age >= ADULT) & (age <= AGE_BANDS.index("55-64"))
    for i, name in enumerate(BOROUGHS):
        n_working = (working & (b == i)).sum()
        assert abs(emp[b == i].sum() - share[name] * n_working) <= 0.5


def test_default_employed_share_from_labour_data():
    share = default_employed_share(WorkplaceSettings(), load_marginals())
    # Feb 2020 Manhattan: 939,000 employed residents; 18-64 population from the marginals
    working = sum(published("Manhattan", "age", a) for a in AGE_BANDS[3:8])
    assert share["Manhattan"] == pytest.approx(939_000 / working)
    assert all(0 < v <= 1 for v in share.values())


def test_workplace_size_distribution_mean_and_override():
    for mean, top in ((15.0, 500), (4.0, 50)):
        alpha = _power_law_alpha(mean, top)
        k = np.arange(1, top + 1, dtype=float)
        w = k**-alpha
        assert (k * w).sum() / w.sum() == pytest.approx(mean, rel=1e-9)
    pop = synthesize_nyc(0.01, seed=2, workplaces=WorkplaceSettings(employed_share={"Bronx": 0.0},
                                                                  mean_size=40, max_size=2000))
    emp, b, wp = pop["employed"].numpy(), _np(pop, "borough"), _np(pop, "workplace")
    assert not emp[b == 0].any() and emp[b != 0].any()
    sizes = np.bincount(wp[wp >= 0])
    assert sizes.mean() > 15  # heavier than the default mean of 15
    with pytest.raises(ValueError, match="mean_size"):
        synthesize_nyc(0.001, workplaces=WorkplaceSettings(mean_size=600, max_size=500))


# -- errors -------------------------------------------------------------------------------------------


@pytest.fixture
def marginals_csv(tmp_path):
    """Write a modified copy of the bundled marginals and return its path."""

    def write(edit) -> Path:
        df = PUBLISHED.astype({"population": float})
        df = edit(df)
        path = tmp_path / "marginals.csv"
        df.to_csv(path, index=False)
        return path

    return write


@pytest.mark.parametrize("scale", [0, -0.5, float("nan"), float("inf")])
def test_scale_must_be_positive(scale):
    with pytest.raises(ValueError, match="scale must be a positive number"):
        synthesize_nyc(scale)


def test_scale_too_small_for_any_agent():
    with pytest.raises(ValueError, match="gives no agents"):
        synthesize_nyc(1e-8)


def test_missing_marginals_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        synthesize_nyc(0.001, marginals=tmp_path / "nope.csv")


def test_marginals_missing_column(marginals_csv):
    path = marginals_csv(lambda df: df.drop(columns=["group"]))
    with pytest.raises(ValueError, match=r"marginals.csv lacks column\(s\) \['group'\]"):
        load_marginals(path)


def test_marginals_non_numeric_population(marginals_csv):
    def edit(df):
        df["population"] = df["population"].astype(object)
        df.loc[7, "population"] = "12,4OO"
        return df

    with pytest.raises(ValueError, match=r"marginals.csv, line 9, field 'population': '12,4OO'"):
        load_marginals(marginals_csv(edit))


def test_marginals_unknown_dimension_borough_and_group(marginals_csv):
    def edit_dim(df):
        df.loc[3, "dimension"] = "income"
        return df

    with pytest.raises(ValueError, match=r"'dimension': unknown value\(s\) \['income'\]; known: total, age"):
        load_marginals(marginals_csv(edit_dim))

    def edit_borough(df):
        df.loc[3, "borough"] = "Jersey City"
        return df

    with pytest.raises(ValueError, match=r"field 'borough': unknown value\(s\) \['Jersey City'\]"):
        load_marginals(marginals_csv(edit_borough))

    def edit_group(df):
        df.loc[df.group == "75+", "group"] = "75-84"
        return df

    with pytest.raises(ValueError, match=r"field 'group' of dimension 'age': unknown value\(s\) \['75-84'\]"):
        load_marginals(marginals_csv(edit_group))


def test_marginals_missing_rows(marginals_csv):
    path = marginals_csv(lambda df: df[~((df.borough == "Queens") & (df.group == "Male"))])
    with pytest.raises(ValueError, match="dimension 'sex' lacks rows for Queens/Male"):
        load_marginals(path)


def test_marginals_that_disagree_with_the_total(marginals_csv):
    def edit(df):
        df.loc[(df.borough == "Brooklyn") & (df.group == "Female"), "population"] *= 1.05
        return df

    pattern = r"marginals.csv: the 'sex' groups of Brooklyn sum to .* off its total .* \(tolerance 1%\)"
    with pytest.raises(ValueError, match=pattern):
        synthesize_nyc(0.001, marginals=marginals_csv(edit))

    def slight(df):  # within 1%: accepted and scaled to the total
        df.loc[(df.borough == "Brooklyn") & (df.group == "Female"), "population"] *= 1.005
        return df

    m = load_marginals(marginals_csv(slight))
    assert m.sex[1].sum() == pytest.approx(m.total[1])

    def race(df):
        df.loc[(df.borough == "Queens") & (df.group == "White"), "population"] *= 1.3
        return df

    with pytest.raises(ValueError, match="'race_ethnicity' groups of Queens sum to .* above its total"):
        load_marginals(marginals_csv(race))


def test_settings_reject_unknown_keys_and_boroughs():
    with pytest.raises(ValidationError, match="extra"):
        HouseholdSettings(sizes=[1, 2])
    with pytest.raises(ValidationError, match="unknown borough"):
        HouseholdSettings(size_shares={"Hoboken": [1.0]})
    with pytest.raises(ValidationError, match=r"employed_share\['Bronx'\] = 1.5"):
        WorkplaceSettings(employed_share={"Bronx": 1.5})
    with pytest.raises(ValidationError, match="extra"):
        WorkplaceSettings(mean=3)
