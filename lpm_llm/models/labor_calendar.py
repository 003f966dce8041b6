"""The labour model's calendar and inputs: New York City's policies and income support by date
(with their sources), and each monthly step's :class:`LaborInputs` from the bundled case counts.

Re-exported by :mod:`lpm_llm.models.labor`, which uses them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from lpm_llm.data.observed import load_covid
from lpm_llm.population import BOROUGHS
from lpm_llm.population.industry import WORKING_AGE_BANDS
from lpm_llm.resources import nyc_data_path

__all__ = [
    "INCOME_SUPPORT",
    "PAUSE_START",
    "REOPENING_PHASES",
    "RESIDUAL_RESTRICTIONS",
    "LaborInputs",
    "LaborPolicy",
    "borough_population",
    "income_support",
    "labor_period",
    "observed_labor_inputs",
    "policy_for_period",
    "residual_restriction",
]


# -- policy and income-support calendar (New York City) -------------------------------------------
PAUSE_START = date(2020, 3, 22)  # New York State on PAUSE, executive order 202.8
REOPENING_PHASES: tuple[date, ...] = (
    date(2020, 6, 8), date(2020, 6, 22), date(2020, 7, 6), date(2020, 7, 20),
)
"""Start of NYC reopening phases 1-4; PAUSE ends the day before phase 1."""

# Sources: NYS DOL maximum weekly benefit ($504 since October 2019); CARES Act (Pub. L. 116-136, sec. 2104);
# presidential memorandum of 8 August 2020 (LWA; New York paid weeks ending 2020-08-02 to 2020-09-06);
# Continued Assistance Act (Pub. L. 116-260, div. N); American Rescue Plan Act (Pub. L. 117-2, sec. 9013).
_NY_MAX_BENEFIT = "New York State unemployment insurance of up to $504 per week"
INCOME_SUPPORT: tuple[tuple[date, date, str], ...] = (
    (date(2020, 3, 27), date(2020, 7, 31),
     "federal Pandemic Unemployment Compensation adds $600 per week to unemployment benefits (CARES Act)"),
    (date(2020, 8, 1), date(2020, 9, 6),
     "federal Lost Wages Assistance adds $300 per week to unemployment benefits (FEMA, August 2020)"),
    (date(2020, 12, 27), date(2021, 9, 5),
     "federal Pandemic Unemployment Compensation adds $300 per week to unemployment benefits "
     "(Continued Assistance Act, extended by the American Rescue Plan Act)"),
)
"""(first day, last day, text) of each federal supplement to unemployment benefits."""


# Restrictions that stayed after NYC's phase 4 (2020-07-20): (first day, level, text). The level is the
# share of the economy closed on the scale of the reopening phases ((4 - phase) / 4; 1 = PAUSE), an
# assumption like the strengths in lpm_llm.core.interventions; the shock and hiring-freeze
# parameters are calibrated on top of it. Dates from the Governor's and the Mayor's announcements and
# executive orders: NYC phase 4 without indoor dining, malls, gyms, museums or cinemas (Governor,
# 2020-07-17; indoor dining postponed by the Mayor on 2020-07-01); museums at 25% capacity from
# 2020-08-24 and gyms at 33% from 2020-09-02 (Governor, 2020-08-14 and 2020-08-17); NYC indoor dining at
# 25% from 2020-09-30 (Governor, 2020-09-09); 10 pm closing of restaurants, bars and gyms from
# 2020-11-13 (Executive Order 202.74); NYC indoor dining closed again from 2020-12-14 (Governor,
# 2020-12-11); reopened at 25% from 2021-02-12, 35% from 2021-02-26, 50% from 2021-03-19, cinemas at 25%
# from 2021-03-05 (Governor, 2021-01-29, 2021-02-22, 2021-03-10, 2021-02-22); most capacity limits
# lifted on 2021-05-19 (Governor, 2021-05-03); the remaining state COVID-19 restrictions lifted on
# 2021-06-15 (Governor, 2021-06-15, 70% of adults with a first dose). The cluster zones of October -
# November 2020 (Executive Order 202.68) covered parts of Brooklyn and Queens only and are left out.
RESIDUAL_RESTRICTIONS: tuple[tuple[date, float, str], ...] = (
    (date(2020, 7, 20), 0.25, "indoor dining, malls, gyms, museums and cinemas still closed in New York City"),
    (date(2020, 8, 24), 0.2, "museums open at 25% and gyms at 33% capacity; indoor dining and cinemas closed"),
    (date(2020, 9, 30), 0.15, "indoor dining at 25% capacity; cinemas, theatres and large venues closed"),
    (date(2020, 11, 13), 0.175, "indoor dining at 25% capacity; restaurants, bars and gyms close at 10 pm; "
                                "cinemas and theatres closed"),
    (date(2020, 12, 14), 0.225, "indoor dining closed again; restaurants, bars and gyms close at 10 pm; "
                                "cinemas and theatres closed"),
    (date(2021, 2, 12), 0.175, "indoor dining at 25-35% capacity; restaurants close at 10-11 pm; "
                               "cinemas and theatres closed"),
    (date(2021, 3, 19), 0.125, "indoor dining at 50% capacity; cinemas at 25%; theatres closed"),
    (date(2021, 5, 19), 0.05, "most capacity limits lifted; distancing rules remain; Broadway closed"),
    (date(2021, 6, 15), 0.0, "state COVID-19 restrictions lifted"),
)
"""Levels of the restrictions that stayed after reopening phase 4, each in force until the next."""


def residual_restriction(day: date) -> tuple[float, str]:
    """(level, text) of the restrictions left after phase 4 on ``day`` ((0, "") before phase 4)."""
    level, text = 0.0, ""
    for first, value, words in RESIDUAL_RESTRICTIONS:
        if day >= first:
            level, text = value, words
    return level, text


def income_support(day: date) -> str:
    """The income support for the unemployed in force on ``day``, as one sentence for the prompt."""
    for first, last, text in INCOME_SUPPORT:
        if first <= day <= last:
            return f"{_NY_MAX_BENEFIT}; {text}"
    return f"{_NY_MAX_BENEFIT}; no federal supplement"


def labor_period(month: date | str) -> tuple[date, date]:
    """First and last day of the step ending in ``month``'s LAUS reference week: 12th of m-1 to 11th of m."""
    m = pd.Timestamp(month).date().replace(day=1)
    previous = (m - timedelta(days=1)).replace(day=12)
    return previous, m.replace(day=11)


class LaborPolicy(BaseModel):
    """Policies over one step, as the model reads them.

    ``stay_at_home``: share of the step's days under the stay-at-home order, in [0, 1].
    ``reopening_phase``: mean NYC reopening phase (1-4) over the step's days after the order ended;
    0 when no day of the step was in reopening.
    ``residual``: mean over the step's days of the level of the restrictions left after phase 4
    (:data:`RESIDUAL_RESTRICTIONS`; 0 on days before phase 4).
    ``measures``: those restrictions on the step's last day, as text (empty before phase 4).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    stay_at_home: float = Field(0.0, ge=0.0, le=1.0)
    reopening_phase: float = Field(0.0, ge=0.0, le=4.0)
    residual: float = Field(0.0, ge=0.0, le=1.0)
    measures: str = ""

    @property
    def restriction(self) -> float:
        """Share of the economy closed, in [0, 1]: 1 under the order, (4 - phase) / 4 in phases 1-3,
        the residual level of :data:`RESIDUAL_RESTRICTIONS` in phase 4 and after (mean over the days)."""
        if self.reopening_phase <= 0:
            return min(1.0, self.stay_at_home + self.residual)
        reopened = self.stay_at_home + (1.0 - self.stay_at_home) * (4.0 - self.reopening_phase) / 4.0
        return min(1.0, reopened + self.residual)

    def describe(self) -> str:
        """One line for the prompt."""
        parts = []
        if self.stay_at_home > 0:
            parts.append(f"New York State on PAUSE (stay-at-home order, non-essential businesses closed) "
                         f"for {round(100 * self.stay_at_home)}% of the month")
        if self.reopening_phase > 0:
            parts.append(f"New York City reopening, phase {math.floor(self.reopening_phase + 1e-9)} of 4")
        if self.measures:
            parts.append(self.measures)
        return "; ".join(parts) if parts else "no stay-at-home order"


def policy_for_period(first: date, last: date) -> LaborPolicy:
    """Stay-at-home share and mean reopening phase over the days ``first`` .. ``last`` (inclusive)."""
    if last < first:
        raise ValueError(f"period ends ({last}) before it starts ({first})")
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    pause = [PAUSE_START <= d < REOPENING_PHASES[0] for d in days]
    phases = [sum(d >= p for p in REOPENING_PHASES) for d in days]
    reopening = [p for p in phases if p > 0]
    residual = [residual_restriction(d)[0] for d in days]
    return LaborPolicy(stay_at_home=sum(pause) / len(days),
                       reopening_phase=sum(reopening) / len(reopening) if reopening else 0.0,
                       residual=sum(residual) / len(days), measures=residual_restriction(last)[1])


# -- inputs of one step ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaborInputs:
    """What the outside world (the epidemic, the policy calendar) gives one monthly step.

    Attributes:
        month: the month whose state the step produces (first of the month).
        policy: policies over the step.
        cases_week: (areas,) float32 cases in the last 7 days per 100,000 residents, by borough.
        cases_trend: (areas,) float32 percent change on the 7 days before.
    """

    month: date
    policy: LaborPolicy
    cases_week: torch.Tensor
    cases_trend: torch.Tensor


def borough_population() -> dict[str, tuple[float, float]]:
    """Borough -> (total population, population aged 18-64) from the bundled marginals."""
    return dict(_borough_population())


@functools.cache
def _borough_population() -> dict[str, tuple[float, float]]:
    df = pd.read_csv(nyc_data_path("population_marginals.csv"))
    out = {}
    for b in BOROUGHS:
        rows = df[df["borough"] == b]
        total = float(rows.loc[rows["dimension"] == "total", "population"].sum())
        ages = rows[(rows["dimension"] == "age") & rows["group"].isin(WORKING_AGE_BANDS)]
        if total <= 0 or len(ages) != len(WORKING_AGE_BANDS):
            raise ValueError(f"population_marginals.csv: borough {b} lacks a total or an 18-64 age band")
        out[b] = (total, float(ages["population"].sum()))
    return out


def observed_labor_inputs(
    months: Sequence[date | str], device: torch.device | str = "cpu"
) -> list[LaborInputs]:
    """Inputs for each month from the calendar and the bundled NYC case counts (DOHMH, by diagnosis date)."""
    covid = load_covid()
    covid = covid[covid["area"].isin(BOROUGHS)].pivot_table(index="date", columns="area", values="cases")
    covid = covid.reindex(columns=list(BOROUGHS))
    per_100k = torch.tensor([1e5 / borough_population()[b][0] for b in BOROUGHS])
    out = []
    for month in months:
        first, last = labor_period(month)
        end = pd.Timestamp(last)
        week = covid.loc[end - pd.Timedelta(days=6): end].sum()
        before = covid.loc[end - pd.Timedelta(days=13): end - pd.Timedelta(days=7)].sum()
        cases = torch.tensor(week.to_numpy(dtype=float), dtype=torch.float32)
        prior = torch.tensor(before.to_numpy(dtype=float), dtype=torch.float32)
        out.append(LaborInputs(
            month=pd.Timestamp(month).date().replace(day=1),
            policy=policy_for_period(first, last),
            cases_week=(cases * per_100k).to(device),
            cases_trend=(100.0 * ((cases + 1.0) / (prior + 1.0) - 1.0)).to(device),
        ))
    return out
