"""Observed COVID-19 vaccination of New York City residents (``nyc/vaccination_daily.csv``: NYC
Department of Health and Mental Hygiene, repository ``nychealth/covid-vaccine-data``, files
``people/trends-byboro.csv`` and ``people/trends-byage.csv``, commit 14ef626, January 2024).

Cumulative residents with at least one dose (``people_1plus``) and fully vaccinated
(``people_fully``), daily from 2020-12-14, by borough (and ``NYC``) and by age band.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from lpm_llm.population import AGE_BANDS, BOROUGHS
from lpm_llm.resources import nyc_data_path

__all__ = ["AGE_GROUPS", "city_first_doses", "load_vaccination", "observed_cases_per_100k"]

AGE_GROUPS: dict[str, str] = {"75up": "75+"}
"""The source's age group labels that differ from the population's ``AGE_BANDS``."""

_COLUMNS = ("date", "dimension", "group", "people_1plus", "people_fully")


def load_vaccination(path: str | Path | None = None) -> pd.DataFrame:
    """The bundled table: ``date`` (datetime64), ``dimension`` (``borough`` or ``age``), ``group``
    (borough label or ``NYC``; age band as in ``AGE_BANDS``), ``people_1plus``, ``people_fully``
    (suppressed counts under 10 read as 0)."""
    p = Path(path) if path else nyc_data_path("vaccination_daily.csv")
    if not p.exists():
        raise FileNotFoundError(f"data file {p} does not exist")
    df = pd.read_csv(p)
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; found {list(df.columns)}")
    df = df[list(_COLUMNS)].copy()
    df["date"] = pd.to_datetime(df["date"])
    df["group"] = df["group"].replace(AGE_GROUPS)
    for c in ("people_1plus", "people_fully"):
        df[c] = df[c].fillna(0).astype(float)
    known = {"borough": {"NYC", *BOROUGHS}, "age": set(AGE_BANDS)}
    bad = [(d, g) for d, g in df[["dimension", "group"]].drop_duplicates().itertuples(index=False)
           if g not in known.get(d, ())]
    if bad:
        raise ValueError(f"{p}: unknown dimension/group pair(s) {bad[:5]}")
    return df


def city_first_doses(start: dt.date, days: int, table: pd.DataFrame | None = None,
                     as_of: dt.date | None = None) -> list[float]:
    """(days,) residents given a first dose on each day ``start + t`` city-wide: the daily increase of
    ``people_1plus`` for ``NYC`` (0 before the data begin and after they end; never negative).

    `as_of` (a forecast's date): rows dated after it are not read; every later day gets the mean of
    the last 7 known days (a supply held at its last week's rate; 0 when nothing is known yet)."""
    t = load_vaccination() if table is None else table
    city = t[(t["dimension"] == "borough") & (t["group"] == "NYC")].set_index("date")["people_1plus"].sort_index()
    if as_of is not None:
        city = city[city.index <= pd.Timestamp(as_of)]
    dates = pd.date_range(pd.Timestamp(start), periods=days)
    if city.empty:
        return [0.0] * days
    full = pd.date_range(city.index.min() - pd.Timedelta(days=1), city.index.max())
    city = city.reindex(full).ffill().fillna(0.0)
    daily = city.diff().clip(lower=0.0)
    out = daily.reindex(dates).fillna(0.0)
    if as_of is not None:
        out[out.index > pd.Timestamp(as_of)] = float(daily.iloc[-7:].fillna(0.0).mean())
    return [float(x) for x in out.tolist()]


def observed_cases_per_100k(date: dt.date, residents: dict[str, float]) -> dict[str, float]:
    """Borough -> reported cases (cases + probable) of the 7 days before `date` per 100,000
    residents, from the bundled ``covid_daily.csv`` (the context of a vaccination decision in a run
    without an epidemic model)."""
    from lpm_llm.data.observed import load_covid

    end = pd.Timestamp(date) - pd.Timedelta(days=1)
    week = load_covid(start=str((end - pd.Timedelta(days=6)).date()), end=str(end.date()))
    sums = week.assign(c=week["cases"] + week["probable_cases"]).groupby("area")["c"].sum()
    return {b: float(sums.get(b, 0.0)) / residents[b] * 1e5 for b in residents}
