"""The labour market coupled to the epidemic (a :class:`lpm_llm.core.sim.Coupling`).

Inside the epidemic's daily loop, on the first day of every month after the start, the labour model
takes one monthly step: the work decision is asked with the month's context (the epidemic's own
reported cases and their trend per borough, the policies in force, last month's simulated
unemployment rate, the income support in force), then separations, hiring, exits and entries are
drawn. Every day, only employed agents keep their workplace contacts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from lpm_llm.core.behavior import DecisionSource
from lpm_llm.models.labor import (
    RESULTS,
    LaborInputs,
    LaborModel,
    LaborParams,
    _monthly_frame,
    labor_period,
    policy_for_period,
    work_context,
)
from lpm_llm.population import Population


class LaborCoupling:
    """Runs :class:`LaborModel` monthly inside :class:`lpm_llm.core.sim.Simulation`.

    Args:
        population: agents with ``borough``, ``age_band`` and ``industry`` columns.
        params: labour parameters.
        work_decision: gives (K,) probabilities of wanting to work, asked once per month.
        archetypes: ``.index`` (N,) and ``.k``.
        start: the simulation's first day; the labour state starts in its month.
        seed: seeds the labour model's draws (independent of the epidemic's).
        persons_per_agent: scale of the counts in :attr:`monthly` (1 / population scale).
    """

    decisions: tuple[str, ...] = ()  # asks its own work decision, monthly

    def __init__(
        self,
        population: Population,
        params: LaborParams,
        work_decision: DecisionSource,
        archetypes: Any,
        start: dt.date,
        *,
        seed: int = 0,
        persons_per_agent: float = 1.0,
    ):
        self.population = population
        self.model = LaborModel(params)
        self.work_decision = work_decision
        self.archetypes = archetypes
        self.index = archetypes.index.to(population.device)
        self.persons_per_agent = persons_per_agent
        self.generator = torch.Generator(device=population.device).manual_seed(int(seed) + 7919)
        self.state = self.model.init_state(population, start.replace(day=1), self.generator)
        self.records = [self.state.by_borough()]
        self.dates = [start.replace(day=1)]
        self._cases: list[torch.Tensor] = []  # (B,) cases in the last 7 days per 100k, one per day

    def context(self, day: int, date: dt.date) -> Mapping[str, Any]:
        return {}

    def step(
        self, day: int, date: dt.date, decisions: Mapping[str, torch.Tensor], epidemic: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """(N,) bool: agents at work today (employed); takes the monthly step on the 1st of a month."""
        self._cases.append(epidemic["cases_week"].detach().cpu().to(torch.float32))
        if date.day == 1 and day > 0:
            week = self._cases[-1]
            before = self._cases[-8] if len(self._cases) > 7 else torch.zeros_like(week)
            trend = torch.where(before > 0, 100.0 * (week - before) / before.clamp(min=1e-9), torch.zeros_like(week))
            inputs = LaborInputs(month=date, policy=policy_for_period(*labor_period(date)), cases_week=week,
                                 cases_trend=trend)
            rate = self.records[-1]["unemployment_rate"].detach()
            context = work_context(inputs, rate, self.archetypes, self.population["borough"])
            p = torch.as_tensor(self.work_decision.probabilities(context), dtype=torch.float32)
            self.state, out = self.model.step(self.state, inputs, p, self.index, self.generator)
            self.records.append(out)
            self.dates.append(date)
        return LaborModel.working(self.state)

    @property
    def monthly(self) -> pd.DataFrame:
        """Unemployment rate and labour force by borough per simulated month (as in ``simulate_labor``)."""
        series = {name: torch.stack([r[name] for r in self.records]) for name in RESULTS}
        return _monthly_frame(series, self.dates, self.persons_per_agent)
