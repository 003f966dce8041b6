"""Observed New York City series from the bundled data: COVID-19 by day and unemployment by month.

Every loader returns a tidy DataFrame with a ``date`` column (datetime64) and an ``area`` column
(borough label, or ``NYC`` for the city total), so that simulated and observed series join on
``(date, area)``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lpm_llm.population import BOROUGHS
from lpm_llm.resources import nyc_data_path

COVID_COLUMNS = ("cases", "probable_cases", "hospitalized", "deaths")
UNEMPLOYMENT_COLUMNS = ("labor_force", "employed", "unemployed", "unemployment_rate")


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    df = pd.read_csv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def load_covid(
    start: str | None = None,
    end: str | None = None,
    *,
    path: str | Path | None = None,
    as_of: str | pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Daily cases, probable cases, hospitalizations and deaths by area, ``start`` <= date <= ``end``.

    Columns: date, area, cases, probable_cases, hospitalized, deaths. Source: NYC DOHMH
    (see lpm_llm/data/nyc/README.md).

    ``as_of``: the data as they could be known on that date: every row dated after it is cut
    (whatever ``end`` says). The bundled file is one late revision, not the data as published
    day by day, so the last days' reporting delays are not in it; a forecast that wants them
    handled moves its cut-off earlier (:func:`lpm_llm.forecast.asof.cutoff_date`).
    """
    p = Path(path) if path else nyc_data_path("covid_daily.csv")
    df = _read_csv(p, ("date", "area", *COVID_COLUMNS))
    df["date"] = pd.to_datetime(df["date"])
    if start is not None:
        df = df[df["date"] >= pd.Timestamp(start)]
    if end is not None:
        df = df[df["date"] <= pd.Timestamp(end)]
    if as_of is not None:
        df = df[df["date"] <= pd.Timestamp(as_of)]
    return df.reset_index(drop=True)


def weekly(df: pd.DataFrame, columns: tuple[str, ...] | list[str], start: str | pd.Timestamp) -> pd.DataFrame:
    """Sum daily series into 7-day weeks counted from ``start`` (week 0 = start .. start+6).

    Only complete weeks are kept. Returns columns: week, date (first day of the week), area, *columns.
    """
    start = pd.Timestamp(start)
    d = df.copy()
    d["week"] = ((d["date"] - start).dt.days // 7).astype(int)
    d = d[d["week"] >= 0]
    out = d.groupby(["week", "area"], as_index=False)[list(columns)].sum()
    days = d.groupby(["week", "area"])["date"].nunique().rename("ndays").reset_index()
    out = out.merge(days, on=["week", "area"])
    out = out[out["ndays"] == 7].drop(columns="ndays")
    out["date"] = start + pd.to_timedelta(out["week"] * 7, unit="D")
    return out[["week", "date", "area", *columns]].sort_values(["area", "week"]).reset_index(drop=True)


def load_unemployment(
    start: str | None = None, end: str | None = None, *, path: str | Path | None = None
) -> pd.DataFrame:
    """Monthly labour force, employed, unemployed and rate (percent) by borough, plus an ``NYC`` total.

    Columns: date (first of the month), area, labor_force, employed, unemployed, unemployment_rate.
    Source: New York State Department of Labor, LAUS (see lpm_llm/data/nyc/README.md).
    """
    p = Path(path) if path else nyc_data_path("unemployment_monthly.csv")
    df = _read_csv(p, ("borough", "year", "month", *UNEMPLOYMENT_COLUMNS))
    unknown = sorted(set(df["borough"]) - set(BOROUGHS))
    if unknown:
        raise ValueError(f"{p}: unknown borough(s) {unknown}; known: {', '.join(BOROUGHS)}")
    df["date"] = pd.to_datetime(dict(year=df["year"], month=df["month"], day=1))
    df = df.rename(columns={"borough": "area"})[["date", "area", *UNEMPLOYMENT_COLUMNS]]
    city = df.groupby("date", as_index=False)[["labor_force", "employed", "unemployed"]].sum()
    city["unemployment_rate"] = 100.0 * city["unemployed"] / city["labor_force"]
    city["area"] = "NYC"
    df = pd.concat([df, city[df.columns]], ignore_index=True)
    if start is not None:
        df = df[df["date"] >= pd.Timestamp(start)]
    if end is not None:
        df = df[df["date"] <= pd.Timestamp(end)]
    return df.sort_values(["area", "date"]).reset_index(drop=True)
