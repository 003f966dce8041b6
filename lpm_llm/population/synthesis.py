"""Synthetic New York City: a Population drawn from published marginals, with contact groups.

The recipe, in order:

1. ``load_marginals`` reads borough totals and per-borough marginals by age band, sex and
   race/ethnicity (bundled: ``lpm_llm/data/nyc/population_marginals.csv``) and reconciles them to
   the borough total.
2. ``joint_table`` fits the (borough, age band, sex, race) joint table by iterative proportional
   fitting (IPF). With one-way marginals only and no prior, IPF's answer is the independence table
   (it converges after one sweep); a prior from microdata (e.g. PUMS) carries associations.
3. ``integerise`` turns the expected counts at scale s into whole agents per cell with
   N_b = round(s * total_b) per borough and every one-way marginal matched to within one agent.
4. Households, classrooms and workplaces are built per borough (groups never cross boroughs) with
   vectorised numpy; the agent order is then shuffled with the seed.

All randomness comes from ``numpy.random.SeedSequence(seed)``, one independent stream per stage,
so the result does not depend on the device and changing, say, the school settings leaves the
households unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lpm_llm.population.table import AGE_BANDS, BOROUGHS, RACES, SEXES, Population
from lpm_llm.resources import nyc_data_path

__all__ = [
    "HouseholdSettings",
    "Marginals",
    "SchoolSettings",
    "WorkplaceSettings",
    "default_employed_share",
    "integerise",
    "ipf",
    "joint_table",
    "load_marginals",
    "synthesize_nyc",
]

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()  # (marginals file, borough) already warned about

#: relative disagreement allowed between a complete partition (age, sex) and the borough total
TOTAL_TOLERANCE = 0.01
#: relative excess of the four published race groups over the total that is reconciled (with a
#: warning) by scaling them down and setting ``other`` to 0; beyond it the file is rejected.
RACE_EXCESS_TOLERANCE = 0.05

_ADULT_MIN_CODE = AGE_BANDS.index("18-24")  # codes >= this are adults (18+)
_SCHOOL_CODES = (AGE_BANDS.index("5-12"), AGE_BANDS.index("13-17"))
_WORKING_CODES = tuple(range(AGE_BANDS.index("18-24"), AGE_BANDS.index("55-64") + 1))  # 18-64
_MARGINAL_COLUMNS = ("borough", "dimension", "group", "population")
_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "total": ("Boroughwide",),
    "age": AGE_BANDS,
    "sex": SEXES,
    "race_ethnicity": RACES,  # "other" may be given; if absent it is the remainder
}

# -- settings ---------------------------------------------------------------------------------------

# Share of households of size 1, 2, ..., 6, 7-or-more per borough. Approximate shares after
# American Community Survey 2015-2019 5-year estimates, table B11016 "Household type by household
# size", one column per county (Bronx = Bronx County, Brooklyn = Kings, Manhattan = New York,
# Queens = Queens, Staten Island = Richmond). Rounded by hand so that the mean household size
# matches the published ACS 2015-2019 average household size of each borough to about 0.05
# (Bronx ~2.7, Brooklyn ~2.6-2.7, Manhattan ~2.0-2.1, Queens ~2.8, Staten Island ~2.7-2.8).
# They have not been re-checked cell by cell against the table: override them for exact work.
DEFAULT_HOUSEHOLD_SIZE_SHARES: dict[str, tuple[float, ...]] = {
    "Bronx": (0.28, 0.25, 0.18, 0.14, 0.08, 0.04, 0.03),
    "Brooklyn": (0.29, 0.28, 0.17, 0.13, 0.07, 0.03, 0.03),
    "Manhattan": (0.43, 0.32, 0.12, 0.08, 0.03, 0.01, 0.01),
    "Queens": (0.24, 0.28, 0.18, 0.15, 0.08, 0.04, 0.03),
    "Staten Island": (0.24, 0.28, 0.18, 0.17, 0.08, 0.03, 0.02),
}


def _check_borough_keys(value: dict[str, object] | None, field: str) -> None:
    if value is None:
        return
    unknown = sorted(set(value) - set(BOROUGHS))
    if unknown:
        raise ValueError(f"{field}: unknown borough(s) {unknown}; known: {', '.join(BOROUGHS)}")


class HouseholdSettings(BaseModel):
    """How agents are grouped into households (every agent in exactly one).

    Household sizes are drawn i.i.d. from the borough's size distribution until the borough's
    agents are used up (the last household takes the remainder). The largest size stands for
    "that size or more" and is used as that size. Every household gets one adult (18+) first; the
    other places are filled with the remaining adults and the children, so no child lives without
    an adult. Children go preferentially to larger households: a non-head place in a household of
    size k has weight ``(k - 1) ** child_size_preference`` (0 = no preference). Everybody,
    including people in group quarters, lives in a household.

    Args:
        size_shares: borough -> shares of households of size 1, 2, ...; boroughs left out use
            ``DEFAULT_HOUSEHOLD_SIZE_SHARES`` (ACS 2015-2019 table B11016, approximate).
        child_size_preference: exponent of the preference of children for larger households.
    """

    model_config = ConfigDict(extra="forbid")

    size_shares: dict[str, list[float]] | None = None
    child_size_preference: float = Field(1.0, ge=0.0)

    @field_validator("size_shares")
    @classmethod
    def _valid_shares(cls, v: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        _check_borough_keys(v, "households.size_shares")
        for b, shares in (v or {}).items():
            if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
                raise ValueError(f"households.size_shares[{b!r}] must be non-negative with a positive sum")
        return v

    def shares_for(self, borough: str) -> np.ndarray:
        """Normalised (sizes,) float64 shares of household sizes 1..len for `borough`."""
        shares = (self.size_shares or {}).get(borough, DEFAULT_HOUSEHOLD_SIZE_SHARES[borough])
        arr = np.asarray(shares, dtype=np.float64)
        return arr / arr.sum()


class SchoolSettings(BaseModel):
    """Classrooms for agents aged 5-17 (age bands 5-12 and 13-17).

    Enrolled children of a borough are split, per age band, into the fewest classrooms of at most
    ``class_size`` pupils, with sizes as equal as possible; classmates share borough and age band.

    Args:
        class_size: largest classroom; ~25 is the order of the average class sizes that the NYC
            Department of Education reports for 2019-20 (roughly 20-27 depending on grade).
        enrolled_share: share of 5-17 year olds who attend (1.0 = all).
    """

    model_config = ConfigDict(extra="forbid")

    class_size: int = Field(25, ge=1)
    enrolled_share: float = Field(1.0, ge=0.0, le=1.0)


class WorkplaceSettings(BaseModel):
    """Workplaces for employed adults aged 18-64, within their borough.

    The employed share of a borough's 18-64 year olds defaults to (employed residents in the
    reference month, from the bundled New York State Department of Labor LAUS series
    ``unemployment_monthly.csv``) / (the borough's 18-64 population in the marginals), capped at 1.
    Employed residents include people over 64 and the borough of residence is not the borough of
    work, so this is an approximation: all employed agents are 18-64 and work where they live.

    Workplace sizes follow a discrete power law P(size = k) ~ k^-alpha on 1..max_size, with alpha
    solved so that the mean is ``mean_size``. Establishment sizes are heavy-tailed (US Census Bureau
    County Business Patterns, establishments by employment-size class; Axtell 2001, Science
    293:1818, "Zipf distribution of U.S. firm sizes"); CBP 2019 has about 17 employees per
    establishment nationally. The shape is this modelling choice, not a fit to NYC.

    Args:
        employed_share: borough -> share of 18-64 year olds employed; boroughs left out use the
            default above.
        reference_year, reference_month: month of the labour series for the default share.
        mean_size: mean workplace size.
        max_size: largest workplace.
    """

    model_config = ConfigDict(extra="forbid")

    employed_share: dict[str, float] | None = None
    reference_year: int = 2020
    reference_month: int = Field(2, ge=1, le=12)
    mean_size: float = Field(15.0, gt=1.0)
    max_size: int = Field(500, ge=2)

    @field_validator("employed_share")
    @classmethod
    def _valid_share(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        _check_borough_keys(v, "workplaces.employed_share")
        for b, s in (v or {}).items():
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"workplaces.employed_share[{b!r}] = {s} must lie in [0, 1]")
        return v


# -- marginals --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marginals:
    """Published marginals reconciled to the borough totals (float64 persons).

    Attributes:
        total: (boroughs,) borough totals, order ``BOROUGHS``.
        age: (boroughs, age bands), rows sum to ``total``.
        sex: (boroughs, sexes), rows sum to ``total``.
        race: (boroughs, races), ``other`` last, rows sum to ``total``.
        source: file they were read from.
    """

    total: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    race: np.ndarray
    source: Path


def _read_marginals_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"marginals file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"marginals file {path} is not a readable CSV: {e}") from e
    missing = [c for c in _MARGINAL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"marginals file {path} lacks column(s) {missing}; "
            f"expected columns: {', '.join(_MARGINAL_COLUMNS)}"
        )
    df = df[list(_MARGINAL_COLUMNS)].apply(lambda s: s.str.strip())
    pop = pd.to_numeric(df["population"], errors="coerce")
    bad = pop.isna() | ~np.isfinite(pop) | (pop < 0)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"marginals file {path}, line {i + 2}, field 'population': {df['population'].iloc[i]!r} "
            "is not a non-negative number"
        )
    df = df.assign(population=pop.astype(np.float64))
    unknown_dim = sorted(set(df["dimension"]) - set(_DIMENSIONS))
    if unknown_dim:
        raise ValueError(
            f"marginals file {path}, field 'dimension': unknown value(s) {unknown_dim}; "
            f"known: {', '.join(_DIMENSIONS)}"
        )
    unknown_b = sorted(set(df["borough"]) - set(BOROUGHS))
    if unknown_b:
        raise ValueError(
            f"marginals file {path}, field 'borough': unknown value(s) {unknown_b}; "
            f"known: {', '.join(BOROUGHS)}"
        )
    for dim, groups in _DIMENSIONS.items():
        sub = df[df["dimension"] == dim]
        unknown_g = sorted(set(sub["group"]) - set(groups))
        if unknown_g:
            raise ValueError(
                f"marginals file {path}, field 'group' of dimension {dim!r}: unknown value(s) {unknown_g}; "
                f"known: {', '.join(groups)}"
            )
    dup = df.duplicated(["borough", "dimension", "group"])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(
            f"marginals file {path}: duplicate row for {r['borough']}, {r['dimension']}, {r['group']}"
        )
    return df


def load_marginals(path: str | Path | None = None) -> Marginals:
    """Read and reconcile a marginals CSV (columns ``borough, dimension, group, population``).

    Dimensions: ``total`` (group ``Boroughwide``), ``age`` (``AGE_BANDS``), ``sex`` (``SEXES``) and
    ``race_ethnicity`` (``RACES``; ``other`` is optional and, when absent, is the total less the
    listed groups). Every borough needs every age band, sex and listed race group.

    Reconciliation: age and sex must sum to the total within ``TOTAL_TOLERANCE`` (1%) and are then
    scaled to it exactly. If the listed race groups exceed the total by at most
    ``RACE_EXCESS_TOLERANCE`` (5%) they are scaled down to it and ``other`` is 0, with a warning
    (the bundled file needs this for Manhattan: +1.9%, its race denominators come from a different
    estimate than the total); beyond that the file is rejected.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed file or inconsistent marginals; the message names file and field.
    """
    path = Path(path) if path is not None else nyc_data_path("population_marginals.csv")
    df = _read_marginals_frame(path)
    table = df.set_index(["dimension", "borough", "group"])["population"]

    def block(dim: str, groups: tuple[str, ...]) -> np.ndarray:
        out = np.zeros((len(BOROUGHS), len(groups)))
        missing = []
        for i, b in enumerate(BOROUGHS):
            for j, g in enumerate(groups):
                try:
                    out[i, j] = table[(dim, b, g)]
                except KeyError:
                    missing.append(f"{b}/{g}")
        if missing:
            raise ValueError(
                f"marginals file {path}: dimension {dim!r} lacks rows for {', '.join(missing[:8])}"
            )
        return out

    total = block("total", ("Boroughwide",))[:, 0]
    if (total <= 0).any():
        b = BOROUGHS[int(np.flatnonzero(total <= 0)[0])]
        raise ValueError(f"marginals file {path}: borough {b!r} has a total population of 0")
    out: dict[str, np.ndarray] = {}
    for dim, name in (("age", "age"), ("sex", "sex")):
        m = block(dim, _DIMENSIONS[dim])
        rel = m.sum(1) / total - 1.0
        worst = int(np.argmax(np.abs(rel)))
        if abs(rel[worst]) > TOTAL_TOLERANCE:
            raise ValueError(
                f"marginals file {path}: the {dim!r} groups of {BOROUGHS[worst]} sum to "
                f"{m[worst].sum():.0f}, {rel[worst]:+.2%} off its total {total[worst]:.0f} "
                f"(tolerance {TOTAL_TOLERANCE:.0%})"
            )
        out[name] = m * (total / m.sum(1))[:, None]

    has_other = bool(((df["dimension"] == "race_ethnicity") & (df["group"] == "other")).any())
    race = block("race_ethnicity", RACES if has_other else RACES[:-1])
    if not has_other:
        race = np.concatenate([race, np.zeros((len(BOROUGHS), 1))], axis=1)
    listed = race[:, :-1].sum(1)
    for i, b in enumerate(BOROUGHS):
        if has_other:
            rel = race[i].sum() / total[i] - 1.0
            if abs(rel) > TOTAL_TOLERANCE:
                raise ValueError(
                    f"marginals file {path}: the 'race_ethnicity' groups of {b} sum to {race[i].sum():.0f}, "
                    f"{rel:+.2%} off its total {total[i]:.0f} (tolerance {TOTAL_TOLERANCE:.0%})"
                )
            race[i] *= total[i] / race[i].sum()
            continue
        excess = listed[i] / total[i] - 1.0
        if excess > RACE_EXCESS_TOLERANCE:
            raise ValueError(
                f"marginals file {path}: the 'race_ethnicity' groups of {b} sum to {listed[i]:.0f}, "
                f"{excess:+.2%} above its total {total[i]:.0f} (tolerance {RACE_EXCESS_TOLERANCE:.0%})"
            )
        if excess > 0:
            # Known in the bundled data (Manhattan, +1.90%): said once per process, not on every build.
            (log.info if (str(path), b) in _WARNED else log.warning)(
                "marginals file %s: race groups of %s exceed its total by %.2f%%; scaled down, 'other' = 0",
                path, b, 100 * excess,
            )
            _WARNED.add((str(path), b))
            race[i, :-1] *= total[i] / listed[i]
            race[i, -1] = 0.0
        else:
            race[i, -1] = total[i] - listed[i]
    return Marginals(total=total, age=out["age"], sex=out["sex"], race=race, source=path)


# -- IPF and integerisation -------------------------------------------------------------------------


def ipf(
    seed: np.ndarray,
    margins: list[tuple[tuple[int, ...], np.ndarray]],
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> np.ndarray:
    """Iterative proportional fitting of `seed` to the given margins.

    Args:
        seed: prior table (any shape), non-negative; its interactions (odds ratios) are kept.
        margins: ``(axes, target)`` pairs; ``target`` has the shape of ``seed`` summed over every
            axis not in ``axes`` (``axes`` ascending). All targets must have the same total.
        tol: stop when every margin is matched to this relative error (of the largest target).
        max_iter: sweeps before giving up.

    Returns:
        Fitted table, float64, shape of `seed`.

    Raises:
        ValueError: a positive target whose seed cells are all 0, or no convergence.
    """
    table = np.asarray(seed, dtype=np.float64).copy()
    if (table < 0).any():
        raise ValueError("ipf: seed table has negative cells")
    all_axes = tuple(range(table.ndim))
    prepared = []
    for axes, target in margins:
        target = np.asarray(target, dtype=np.float64)
        other = tuple(a for a in all_axes if a not in axes)
        if table.sum(axis=other).shape != target.shape:
            raise ValueError(f"ipf: margin on axes {axes} has shape {target.shape}, expected "
                             f"{table.sum(axis=other).shape}")
        shape = [table.shape[a] if a in axes else 1 for a in all_axes]
        prepared.append((other, target, shape, max(float(np.abs(target).max()), 1e-300)))
    for _ in range(max_iter):
        for other, target, shape, _scale in prepared:
            current = table.sum(axis=other)
            if ((current == 0) & (target > 0)).any():
                raise ValueError("ipf: a positive margin target has only zero seed cells (structural zeros)")
            factor = np.divide(target, current, out=np.zeros_like(target), where=current > 0)
            table *= factor.reshape(shape)
        err = max(float(np.abs(table.sum(axis=o) - t).max()) / s for o, t, _, s in prepared)
        if err <= tol:
            return table
    raise ValueError(f"ipf did not converge in {max_iter} sweeps (largest relative margin error {err:.3g})")


def joint_table(marginals: Marginals, prior: np.ndarray | None = None) -> np.ndarray:
    """(boroughs, age bands, sexes, races) expected persons fitted by IPF to `marginals`.

    `prior` (same shape, e.g. from microdata) carries associations between attributes; without
    it the seed is uniform and the result is the independence table within each borough.
    """
    shape = (len(BOROUGHS), len(AGE_BANDS), len(SEXES), len(RACES))
    seed = np.ones(shape) if prior is None else np.asarray(prior, dtype=np.float64)
    if seed.shape != shape:
        raise ValueError(
            f"prior has shape {seed.shape}, expected {shape} (boroughs, age bands, sexes, races)"
        )
    return ipf(seed, [((0, 1), marginals.age), ((0, 2), marginals.sex), ((0, 3), marginals.race)])


def _largest_remainder(x: np.ndarray, n: int) -> np.ndarray:
    """Integers summing to `n`, each floor or ceil of ``x * n / x.sum()`` (Hamilton's method)."""
    x = np.asarray(x, dtype=np.float64)
    q = x * (n / x.sum()) if x.sum() > 0 else np.zeros_like(x)
    base = np.floor(q).astype(np.int64)
    short = n - int(base.sum())
    if short > 0:
        order = np.lexsort((np.arange(q.size), -(q - base)))  # ties: lower index first (deterministic)
        base[order[:short]] += 1
    return base


def integerise(expected: np.ndarray, n: int) -> np.ndarray:
    """Whole counts for a table of expected counts, summing to `n`, matching every one-way margin.

    Each one-way margin of the result is the largest-remainder rounding of the expected margin
    (within one person of it). Cells start at the floor of their expectation; the remaining units
    go one at a time to the cell whose row, column, ... margins all still lack units, preferring the
    largest remaining fraction. Where cells expected at 0 (which stay 0) leave no such cell, a
    repair pass moves units between cells that differ along one axis only, which fixes that axis's
    margins without touching the others. Deterministic (ties by position).

    Args:
        expected: non-negative table of any shape.
        n: total count wanted.

    Returns:
        int64 table, same shape.
    """
    x = np.asarray(expected, dtype=np.float64)
    if n == 0 or x.sum() <= 0:
        return np.zeros(x.shape, dtype=np.int64)
    x = x * (n / x.sum())
    counts = np.floor(x).astype(np.int64)
    axes = range(x.ndim)
    deficits = []
    for a in axes:
        other = tuple(o for o in axes if o != a)
        target = _largest_remainder(x.sum(axis=other), n)
        deficits.append(target - counts.sum(axis=other))
    flat_x, flat_c = x.ravel(), counts.ravel()
    cell_index = np.unravel_index(np.arange(x.size), x.shape)
    allowed = flat_x > 0
    for _ in range(n - int(counts.sum())):
        positive = sum((d[idx] > 0).astype(np.int64) for d, idx in zip(deficits, cell_index, strict=True))
        score = np.where(allowed, positive * 4.0 + np.clip(flat_x - flat_c, -2.0, 1.0), -np.inf)
        c = int(np.argmax(score))
        flat_c[c] += 1
        for d, idx in zip(deficits, cell_index, strict=True):
            d[idx[c]] -= 1
    counts = flat_c.reshape(x.shape)
    for a, d in enumerate(deficits):
        _repair_axis(counts, x, a, d)
    return counts


def _repair_axis(counts: np.ndarray, x: np.ndarray, axis: int, deficit: np.ndarray) -> None:
    """Move units along `axis` (in place) from slices with a surplus to slices with a deficit."""
    while (deficit < 0).any() and (deficit > 0).any():
        i, j = int(np.flatnonzero(deficit < 0)[0]), int(np.flatnonzero(deficit > 0)[0])
        c_i, c_j = np.take(counts, i, axis=axis), np.take(counts, j, axis=axis)
        x_i, x_j = np.take(x, i, axis=axis), np.take(x, j, axis=axis)
        gain = np.where((c_i > 0) & (x_j > 0), (x_j - c_j) - (x_i - c_i), -np.inf)
        best = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not np.isfinite(gain[best]):
            log.warning("integerise: zero cells leave margin %d of axis %d off by %d", j, axis, deficit[j])
            return
        src = (*best[:axis], i, *best[axis:])
        dst = (*best[:axis], j, *best[axis:])
        counts[src] -= 1
        counts[dst] += 1
        deficit[i] += 1
        deficit[j] -= 1


# -- contact groups ---------------------------------------------------------------------------------


def _draw_sizes(rng: np.random.Generator, shares: np.ndarray, total: int) -> np.ndarray:
    """Group sizes (1-based, ``shares[k-1]`` = P(size k)) drawn until they cover `total` exactly."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    cdf = np.cumsum(shares)
    cdf /= cdf[-1]
    mean = float((np.arange(1, len(shares) + 1) * shares).sum())
    sizes = np.zeros(0, dtype=np.int64)
    while sizes.sum() < total:
        extra = int(1.1 * (total - sizes.sum()) / mean) + 16
        sizes = np.concatenate([sizes, np.searchsorted(cdf, rng.random(extra), side="right") + 1])
    ends = np.cumsum(sizes)
    h = int(np.searchsorted(ends, total)) + 1  # first group reaching the total
    sizes = sizes[:h].copy()
    sizes[-1] -= int(ends[h - 1]) - total
    return sizes


def _households(
    age: np.ndarray, bounds: np.ndarray, settings: HouseholdSettings, rng: np.random.Generator
) -> np.ndarray:
    """(N,) int32 household ids for agents sorted by borough (``bounds``: borough slice edges)."""
    household = np.empty(age.shape[0], dtype=np.int32)
    offset = 0
    for i, borough in enumerate(BOROUGHS):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if hi == lo:
            continue
        is_adult = age[lo:hi] >= _ADULT_MIN_CODE
        adults = lo + rng.permutation(np.flatnonzero(is_adult))
        children = lo + rng.permutation(np.flatnonzero(~is_adult))
        sizes = _draw_sizes(rng, settings.shares_for(borough), hi - lo)
        h = sizes.shape[0]
        if h > adults.shape[0]:
            raise ValueError(
                f"households: {borough} needs {h} households but has only {adults.shape[0]} adults to "
                "head them; raise the share of larger households in households.size_shares"
            )
        ids = np.arange(offset, offset + h, dtype=np.int64)
        household[adults[:h]] = ids  # one adult heads each household
        slot_household = np.repeat(ids, sizes - 1)  # the other places
        weight = np.repeat(sizes - 1, sizes - 1).astype(np.float64) ** settings.child_size_preference
        # Efraimidis-Spirakis weighted order: children take the places with the largest log(u)/w
        key = np.log(rng.random(slot_household.shape[0])) / weight
        order = np.argsort(-key, kind="stable")
        n_child = children.shape[0]
        household[children] = slot_household[order[:n_child]]
        household[adults[h:]] = slot_household[order[n_child:]]
        offset += h
    return household


def _schools(
    borough: np.ndarray, age: np.ndarray, settings: SchoolSettings, rng: np.random.Generator
) -> np.ndarray:
    """(N,) int32 classroom ids (-1 = none), per borough and school age band."""
    school = np.full(age.shape[0], -1, dtype=np.int32)
    offset = 0
    for b in range(len(BOROUGHS)):
        for a in _SCHOOL_CODES:
            pupils = np.flatnonzero((borough == b) & (age == a))
            n = int(round(settings.enrolled_share * pupils.shape[0]))
            if n == 0:
                continue
            pupils = rng.permutation(pupils)[:n]
            n_classes = math.ceil(n / settings.class_size)
            school[pupils] = offset + np.arange(n) % n_classes
            offset += n_classes
    return school


def _power_law_alpha(mean: float, max_size: int) -> float:
    """Exponent of P(k) ~ k^-alpha on 1..max_size with the given mean (bisection)."""
    k = np.arange(1, max_size + 1, dtype=np.float64)

    def mean_of(alpha: float) -> float:
        w = k ** -alpha
        return float((k * w).sum() / w.sum())

    if not 1.0 < mean < mean_of(0.0):
        raise ValueError(
            f"workplaces.mean_size {mean} must lie in (1, {mean_of(0.0):.1f}) for max_size {max_size}"
        )
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_of(mid) > mean else (lo, mid)
    return 0.5 * (lo + hi)


def default_employed_share(settings: WorkplaceSettings, marginals: Marginals) -> dict[str, float]:
    """Borough -> employed residents (labour series, reference month) / 18-64 population, capped at 1."""
    path = nyc_data_path("unemployment_monthly.csv")
    df = pd.read_csv(path)
    rows = df[(df["year"] == settings.reference_year) & (df["month"] == settings.reference_month)]
    working = marginals.age[:, list(_WORKING_CODES)].sum(1)
    out = {}
    for i, b in enumerate(BOROUGHS):
        employed = rows.loc[rows["borough"] == b, "employed"]
        if employed.shape[0] != 1:
            raise ValueError(
                f"labour file {path}: no single row for borough {b!r} in "
                f"{settings.reference_year}-{settings.reference_month:02d} (workplaces.reference_year/month)"
            )
        out[b] = min(1.0, float(employed.iloc[0]) / working[i])
    return out


def _workplaces(
    borough: np.ndarray,
    age: np.ndarray,
    share: dict[str, float],
    settings: WorkplaceSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int32 workplace ids (-1 = none) and (N,) bool employed."""
    workplace = np.full(age.shape[0], -1, dtype=np.int32)
    employed = np.zeros(age.shape[0], dtype=bool)
    alpha = _power_law_alpha(settings.mean_size, settings.max_size)
    k = np.arange(1, settings.max_size + 1, dtype=np.float64)
    shares = k ** -alpha
    working = (age >= _WORKING_CODES[0]) & (age <= _WORKING_CODES[-1])
    offset = 0
    for b, name in enumerate(BOROUGHS):
        candidates = np.flatnonzero((borough == b) & working)
        n = int(round(share[name] * candidates.shape[0]))
        if n == 0:
            continue
        workers = rng.permutation(candidates)[:n]
        sizes = _draw_sizes(rng, shares, n)
        employed[workers] = True
        workplace[workers] = offset + np.repeat(np.arange(sizes.shape[0]), sizes)
        offset += sizes.shape[0]
    return workplace, employed


# -- the whole recipe -------------------------------------------------------------------------------


def synthesize_nyc(
    scale: float = 1.0,
    seed: int = 0,
    *,
    marginals: str | Path | None = None,
    households: HouseholdSettings | None = None,
    schools: SchoolSettings | None = None,
    workplaces: WorkplaceSettings | None = None,
    device: torch.device | str = "cpu",
) -> Population:
    """A synthetic New York City of about ``scale * 8,336,817`` agents.

    Args:
        scale: fraction of the real population (> 0); borough b gets round(scale * total_b) agents.
        seed: seeds every random choice (households, classrooms, workplaces, agent order).
        marginals: marginals CSV; default the bundled ``population_marginals.csv``.
        households, schools, workplaces: settings (defaults documented on each class).
        device: where the columns are placed (everything is computed on the CPU first).

    Returns:
        Population with the columns documented in :mod:`lpm_llm.population`, in shuffled order.
    """
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    households = households or HouseholdSettings()
    schools = schools or SchoolSettings()
    workplaces = workplaces or WorkplaceSettings()
    m = load_marginals(marginals)
    joint = joint_table(m)
    n_b = np.rint(scale * m.total).astype(np.int64)
    if n_b.sum() == 0:
        raise ValueError(f"scale {scale} gives no agents at all (city total {m.total.sum():.0f})")
    cells = np.stack([integerise(joint[b], int(n_b[b])) for b in range(len(BOROUGHS))])  # (B, A, S, R)

    # One agent per unit of a cell, borough-major order (so boroughs are contiguous slices).
    counts = cells.ravel()
    codes = np.unravel_index(np.arange(counts.size), cells.shape)
    borough, age, sex, race = (np.repeat(c.astype(np.int8), counts) for c in codes)
    bounds = np.concatenate([[0], np.cumsum(n_b)])

    streams = np.random.SeedSequence(seed).spawn(4)
    household = _households(age, bounds, households, np.random.default_rng(streams[0]))
    school = _schools(borough, age, schools, np.random.default_rng(streams[1]))
    share = {**default_employed_share(workplaces, m), **(workplaces.employed_share or {})}
    workplace, employed = _workplaces(borough, age, share, workplaces, np.random.default_rng(streams[2]))

    order = np.random.default_rng(streams[3]).permutation(borough.shape[0])
    columns = {
        "borough": borough, "age_band": age, "sex": sex, "race": race,
        "household": household, "school": school, "workplace": workplace, "employed": employed,
    }
    tensors = {name: torch.from_numpy(arr[order]).to(device) for name, arr in columns.items()}
    books = {"borough": BOROUGHS, "age_band": AGE_BANDS, "sex": SEXES, "race": RACES}
    log.info("synthesized %d agents (scale %g, seed %d) from %s", borough.shape[0], scale, seed, m.source)
    return Population(tensors, books, scale=scale, residents=[float(x) for x in m.total])
