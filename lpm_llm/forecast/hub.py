"""The COVID-19 Forecast Hub's conventions: 23 quantile levels, target names, the long CSV format.

A forecast is a long table, one row per (forecast_date, target, target_end_date, location, type,
quantile): ``type`` is ``quantile`` (23 rows, levels :data:`HUB_LEVELS`) or ``point`` (the median,
``quantile`` empty). Targets are ``"{h} wk ahead inc case"``, ``"... inc hosp"``, ``"... inc
death"``: weekly incident counts, week h after the last complete week of the data. Locations are
county FIPS codes for the five boroughs (the Hub's county level) and ``NYC`` for the city (the Hub
has no city level).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lpm_llm.population import BOROUGHS

__all__ = [
    "COLUMNS", "HUB_LEVELS", "LOCATION_OF", "TARGET_NAME", "area_of", "check_hub_frame", "hub_frame",
    "parse_target", "weekly_truth",
]

HUB_LEVELS: tuple[float, ...] = (0.01, 0.025, *[round(0.05 * i, 2) for i in range(1, 20)], 0.975, 0.99)
"""The Hub's 23 quantile levels: 0.01, 0.025, 0.05, 0.10, ..., 0.95, 0.975, 0.99."""
COLUMNS = ("forecast_date", "target", "target_end_date", "location", "type", "quantile", "value")
TARGET_NAME: dict[str, str] = {"cases": "inc case", "hospitalized": "inc hosp", "deaths": "inc death"}
"""Our target -> the Hub's name (weekly incident counts)."""
LOCATION_OF: dict[str, str] = {"Bronx": "36005", "Brooklyn": "36047", "Manhattan": "36061",
                               "Queens": "36081", "Staten Island": "36085", "NYC": "NYC"}
"""Area -> location code: county FIPS (Bronx, Kings, New York, Queens, Richmond) and NYC."""
_AREA_OF = {v: k for k, v in LOCATION_OF.items()}
_TARGET_OF = {v: k for k, v in TARGET_NAME.items()}


def area_of(location: str) -> str:
    """Location code -> area label."""
    return _AREA_OF[str(location)]


def parse_target(target: str) -> tuple[int, str]:
    """``"2 wk ahead inc death"`` -> (2, "deaths")."""
    h, rest = target.split(" wk ahead ")
    return int(h), _TARGET_OF[rest]


def hub_frame(
    samples: Mapping[str, np.ndarray],
    forecast_date: dt.date,
    week_ends: Sequence[dt.date],
    areas: Sequence[str] = (*BOROUGHS, "NYC"),
) -> pd.DataFrame:
    """Quantiles of predictive samples in the Hub's long format.

    Args:
        samples: target -> (S, H, L) samples of weekly counts, L = len(areas).
        forecast_date: the as-of date.
        week_ends: (H,) last day of each forecast week.
    """
    rows = []
    for target, x in samples.items():
        x = np.asarray(x, dtype=float)
        q = np.quantile(x, HUB_LEVELS, axis=0)  # (23, H, L), monotone in the level
        q = np.maximum.accumulate(q, axis=0)  # guard against float ties breaking monotonicity
        med = np.quantile(x, 0.5, axis=0)
        for h, end in enumerate(week_ends):
            name = f"{h + 1} wk ahead {TARGET_NAME[target]}"
            for j, area in enumerate(areas):
                base = (forecast_date.isoformat(), name, end.isoformat(), LOCATION_OF[area])
                rows.append((*base, "point", np.nan, float(med[h, j])))
                rows.extend((*base, "quantile", lvl, float(q[i, h, j])) for i, lvl in enumerate(HUB_LEVELS))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def check_hub_frame(df: pd.DataFrame) -> None:
    """ValueError unless `df` is a valid Hub forecast: the columns, 23 levels and a point per
    (target, location, date), quantiles non-decreasing in the level, values >= 0."""
    if tuple(df.columns) != COLUMNS:
        raise ValueError(f"columns must be {COLUMNS}, got {tuple(df.columns)}")
    if (df["value"] < 0).any() or df["value"].isna().any():
        raise ValueError("forecast values must be >= 0 and present")
    keys = ["forecast_date", "target", "target_end_date", "location"]
    q = df[df["type"] == "quantile"]
    for key, g in q.groupby(keys):
        levels = tuple(np.round(g["quantile"].to_numpy(), 4))
        if sorted(levels) != sorted(HUB_LEVELS) or len(levels) != len(HUB_LEVELS):
            raise ValueError(f"{key}: quantile levels {levels} are not the Hub's 23")
        v = g.sort_values("quantile")["value"].to_numpy()
        if (np.diff(v) < 0).any():
            raise ValueError(f"{key}: quantiles decrease with the level")
    points = df[df["type"] == "point"].groupby(keys).size()
    if len(points) != q.groupby(keys).ngroups or (points != 1).any():
        raise ValueError("every (target, location, date) needs exactly one point row")


def weekly_truth(observed: pd.DataFrame, start: str | dt.date, targets: Sequence[str]) -> pd.DataFrame:
    """Observed weekly counts on the forecast week grid (7-day weeks from `start`, complete weeks only),
    boroughs and the city: columns target, target_end_date (ISO), location, value."""
    from lpm_llm.calibrate.targets import OBSERVED_COLUMN
    from lpm_llm.data.observed import weekly

    d = observed[observed["area"].isin(BOROUGHS)].copy()
    city = d.groupby("date", as_index=False)[[OBSERVED_COLUMN[t] for t in targets]].sum().assign(area="NYC")
    d = pd.concat([d, city], ignore_index=True)
    cols = [OBSERVED_COLUMN[t] for t in targets]
    w = weekly(d, cols, pd.Timestamp(start))
    frames = []
    for t, c in zip(targets, cols, strict=True):
        frames.append(pd.DataFrame({
            "target": t, "target_end_date": (w["date"] + pd.Timedelta(days=6)).dt.date.astype(str),
            "location": w["area"].map(LOCATION_OF), "value": w[c].astype(float)}))
    return pd.concat(frames, ignore_index=True)
