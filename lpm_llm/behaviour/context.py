"""Values of the prompts' context variables outside a simulation: a few levels of each (the probe)
and the observed values on a date in a borough (fidelity).

Known variables (the bundled prompts'): ``date``, ``month``, ``policies``, ``cases_week``,
``cases_trend``, ``unemployment_rate``, ``income_support``. Profile fields (``description``,
``borough``, ``age_band``, ...) come from the person or archetype asked, never from here.
A prompt with another variable has no levels here (:func:`context_levels` names it).

A prompt that declares ``month`` is monthly (the labour model's work decision): its ``policies``
are the labour model's monthly description of the restrictions, else the dated schedule's text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lpm_llm.core.behavior import change_text, trend_text

#: weekly reported cases in one borough: none to the first wave's peak (Queens, about 10,000 a week)
CASES_LEVELS = (0, 100, 1000, 3000, 10000)
CASES_TYPICAL = 1000
TREND_LEVELS = (-50.0, 0.0, 50.0, 200.0)
UNEMPLOYMENT_LEVELS = (4.0, 8.0, 12.0, 20.0)
KNOWN = ("date", "month", "policies", "cases_week", "cases_trend", "unemployment_rate", "income_support")


@dataclass(frozen=True)
class Levels:
    """The levels a probe moves one variable across, and the one held while others move."""

    values: tuple[str, ...]
    typical: int  # index of the held value in ``values``

    @property
    def held(self) -> str:
        return self.values[self.typical]


def cases_text(count: float) -> str:
    """A weekly count as the prompts show it: ``1,234``."""
    return f"{round(count):,}"


def _window_days(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def _distinct(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def policies_text(date: dt.date, schedule: Any, monthly: bool) -> str:
    """The ``policies`` variable on ``date``: the schedule's active policies, or the labour model's
    monthly description of the month ending at ``date``'s reference week."""
    if monthly:
        from lpm_llm.models.labor import labor_period, policy_for_period

        return policy_for_period(*labor_period(date.replace(day=1))).describe()
    active = schedule.active(date)
    return "; ".join(active) if active else "none"


def _spread(values: list[str], n: int) -> list[str]:
    """At most ``n`` of ``values``, evenly spread, first and last included."""
    if len(values) <= n:
        return values
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def context_levels(variables: Sequence[str], start: dt.date, end: dt.date, schedule: Any,
                   n_dates: int = 4) -> dict[str, Levels]:
    """Levels of each known context variable among ``variables`` over the window ``start`` .. ``end``.

    Held values: the middle of the window for date-like variables (date, month, policies, income
    support), 1,000 weekly cases, "about the same as the week before", 8% unemployment.
    Raises ``ValueError`` naming a variable with no levels.
    """
    unknown = [v for v in variables if v not in KNOWN]
    if unknown:
        raise ValueError(f"no probe levels for context variable(s) {unknown}; the probe knows {', '.join(KNOWN)}")
    monthly = "month" in variables
    days = _window_days(start, end)
    middle = start + (end - start) / 2
    out: dict[str, Levels] = {}
    for v in variables:
        if v == "date":
            values = _distinct([d.isoformat() for d in _spread(days, n_dates)] + [middle.isoformat()])
            values.sort()
            out[v] = Levels(tuple(values), values.index(middle.isoformat()))
        elif v == "month":
            months = _distinct([d.replace(day=1) for d in days])
            picked = sorted(set(_spread(months, n_dates)) | {middle.replace(day=1)})
            out[v] = Levels(tuple(f"{m:%B %Y}" for m in picked), picked.index(middle.replace(day=1)))
        elif v == "policies":
            sample = days if not monthly else _distinct([d.replace(day=1) for d in days])
            values = _distinct([policies_text(d, schedule, monthly) for d in sample])
            out[v] = Levels(tuple(values), values.index(policies_text(middle, schedule, monthly)))
        elif v == "income_support":
            from lpm_llm.models.labor import income_support

            values = _distinct([income_support(d) for d in days])
            out[v] = Levels(tuple(values), values.index(income_support(middle)))
        elif v == "cases_week":
            out[v] = Levels(tuple(cases_text(c) for c in CASES_LEVELS), CASES_LEVELS.index(CASES_TYPICAL))
        elif v == "cases_trend":
            out[v] = Levels(tuple(trend_text(p) for p in TREND_LEVELS), TREND_LEVELS.index(0.0))
        else:  # unemployment_rate
            out[v] = Levels(tuple(f"{u:.1f}" for u in UNEMPLOYMENT_LEVELS), 1)
    return out


def observed_context(variables: Sequence[str], date: dt.date, borough: str, schedule: Any,
                     covid: Any = None, unemployment: Any = None) -> dict[str, str]:
    """The known context variables among ``variables`` as they were on ``date`` in ``borough``:
    New York's reported cases of the 7 days before ``date`` and their change on the 7 days before
    those (bundled DOHMH data), the policies, last month's unemployment rate (bundled LAUS data).

    ``covid`` / ``unemployment``: the loaded tables (:func:`~lpm_llm.data.observed.load_covid`,
    ``load_unemployment``), to load them once for many calls.
    """
    import pandas as pd

    from lpm_llm.data.observed import load_covid, load_unemployment

    unknown = [v for v in variables if v not in KNOWN]
    if unknown:
        raise ValueError(f"no observed values for context variable(s) {unknown}; known: {', '.join(KNOWN)}")
    monthly = "month" in variables
    out: dict[str, str] = {}
    if "cases_week" in variables or "cases_trend" in variables:
        covid = load_covid() if covid is None else covid
        rows = covid[covid["area"] == borough]
        t = pd.Timestamp(date)
        week = float(rows[(rows["date"] < t) & (rows["date"] >= t - pd.Timedelta(days=7))]["cases"].sum())
        before = float(rows[(rows["date"] < t - pd.Timedelta(days=7))
                            & (rows["date"] >= t - pd.Timedelta(days=14))]["cases"].sum())
        out["cases_week"] = cases_text(week)
        out["cases_trend"] = (trend_text(100.0 * (week - before) / before) if monthly and before > 0
                              else change_text(week, before))
    if "unemployment_rate" in variables:
        unemployment = load_unemployment() if unemployment is None else unemployment
        last = pd.Timestamp(date.replace(day=1)) - pd.offsets.MonthBegin(1)
        row = unemployment[(unemployment["area"] == borough) & (unemployment["date"] == last)]
        if row.empty:
            raise ValueError(f"no bundled unemployment rate for {borough} in {last:%B %Y}")
        out["unemployment_rate"] = f"{float(row['unemployment_rate'].iloc[0]):.1f}"
    if "income_support" in variables:
        from lpm_llm.models.labor import income_support

        out["income_support"] = income_support(date)
    if "policies" in variables:
        out["policies"] = policies_text(date, schedule, monthly)
    if "date" in variables:
        out["date"] = date.isoformat()
    if "month" in variables:
        out["month"] = f"{date:%B %Y}"
    return {v: out[v] for v in variables}
