"""Data as of a date: what a forecaster could know on that date, and nothing after it.

Three things are cut at the as-of date D:

- **observations**: daily rows dated after the cut-off (D, or D minus ``reporting_lag_days``) are
  dropped (:func:`observed_as_of`);
- **the incomplete week**: only 7-day weeks (counted from the simulation's start) whose last day is
  on or before the cut-off enter a fit; a partial last week is *dropped*, not nowcast
  (:func:`complete_weeks`). The bundled file is one late revision of the NYC series (by date of
  diagnosis, admission and death), so the backfill a real-time forecaster sees in the last days is
  not in it; ``reporting_lag_days`` treats that many last days as not yet reported, which moves
  the cut-off back (and so drops the week they fall in);
- **the policies' future**: a policy that starts after D is removed, and a policy in force on D is
  held open-ended (its announced or actual end after D is not known on D); a user scenario for
  the future is added on top (:func:`schedule_as_of`).

- **data a model reads itself**: a model with a ``cut_at(date)`` method is told D before each
  simulation is built (:meth:`~lpm_llm.forecast.engine.Forecaster._simulation`): the vaccination
  model reads the city's observed first doses (its weekly supply) up to D and holds them at the mean
  of the last 7 known days after it, and knows only the eligibility steps dated on or before D (so
  they are also all that its prompt names); the epidemic does not import a variant introduced after
  D. The sequenced lineage shares (``variants_4weekly.csv``) are not read by a forecast at all
  (the variants' importation rates are the experiment's).

What the LLM is shown in a decision context is simulated (the model's own reported cases and
vaccination coverage), the date, the eligibility known on D and the policies of the cut schedule,
so it carries nothing from after D either.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pandas as pd

from lpm_llm.core.interventions import InterventionSchedule, Policy
from lpm_llm.data.observed import load_covid

__all__ = ["as_date", "complete_weeks", "cutoff_date", "observed_as_of", "schedule_as_of"]


def as_date(value: str | dt.date | pd.Timestamp) -> dt.date:
    """An ISO string, date or Timestamp as a ``datetime.date``."""
    if isinstance(value, pd.Timestamp):
        return value.date()
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"date {value!r} is not an ISO date (YYYY-MM-DD)") from None


def cutoff_date(as_of: str | dt.date, reporting_lag_days: int = 0) -> dt.date:
    """The last day whose data count as reported on `as_of` (``as_of - reporting_lag_days``)."""
    if reporting_lag_days < 0:
        raise ValueError(f"reporting_lag_days must be >= 0, got {reporting_lag_days}")
    return as_date(as_of) - dt.timedelta(days=int(reporting_lag_days))


def complete_weeks(start: str | dt.date, cutoff: str | dt.date) -> int:
    """Weeks of 7 days from `start` whose last day is on or before `cutoff` (a partial week is dropped)."""
    return max(0, ((as_date(cutoff) - as_date(start)).days + 1) // 7)


def observed_as_of(as_of: str | dt.date, observed: pd.DataFrame | None = None) -> pd.DataFrame:
    """Daily observations (``date``, ``area``, counts) dated on or before `as_of`.

    `observed`: daily rows to cut (default: the bundled NYC series, :func:`load_covid`).
    """
    if observed is None:
        return load_covid(as_of=as_of)
    d = observed.copy()
    d["date"] = pd.to_datetime(d["date"])
    return d[d["date"] <= pd.Timestamp(as_date(as_of))].reset_index(drop=True)


def schedule_as_of(
    schedule: InterventionSchedule, as_of: str | dt.date, scenario: Sequence[Policy] = ()
) -> InterventionSchedule:
    """The schedule as known on `as_of`, held at its state on that date, plus a scenario
    (:meth:`InterventionSchedule.as_of`)."""
    return schedule.as_of(as_date(as_of), tuple(scenario))
