"""Labour market: working-age agents move between employment, unemployment and out of the labour force.

A month here is the period between two LAUS reference weeks (the week that includes the 12th):
month m's state is what the survey measured around the 12th of m, and the step that produces it
covers the 12th of m-1 to the 11th of m. One step, in this order:

1. decision: each archetype's probability of wanting to work (LLM, through the calibrated
   :class:`~lpm_llm.core.behavior.AlignmentMap`), drawn per agent with :func:`~lpm_llm.core.behavior.broadcast`;
2. exits: an agent in the labour force who does not want to work leaves it (``exit_rate``);
3. separations: an employed agent who stays loses the job with probability ``1 - exp(-h)``,
   ``h = h0[borough] * (1 + shock[industry] * intensity[borough])``, where
   ``intensity = restriction + case_sensitivity * weekly cases per 100k / 100``;
4. matching: an unemployed agent who wants to work finds a job with probability
   ``job_finding * (u0 / u)^matching_elasticity * (1 - hiring_freeze * restriction)`` (u: the
   borough's unemployment rate last month, u0: at the start);
5. entry: an agent outside who wants to work enters (``entry0``); it starts employed with
   probability ``(1 - u0) * find / job_finding`` (the start share of the employed, scaled down
   like hiring), else unemployed;
6. recording: labour force, employed, unemployed and the rate by borough.

The baseline separation hazard ``h0`` and entry probability ``entry0`` are not free parameters:
the first step sets them per borough so that its own start state is an equilibrium in expectation,
without shocks, given that month's work probabilities. A run without shocks or changes in the
decisions therefore stays at its start unemployment rate. With ``hysteresis`` = h > 0 the equilibrium
rate moves each month towards the rate of the month before, ``u* <- u* + h (u - u*)``, and the
baseline flows are recomputed to make ``u*`` stationary (at the first step's work probabilities):
what a shock did then persists (unemployment hysteresis, Blanchard and Summers 1986) instead of
decaying back to the start month's rate. h = 0 (the default) keeps the start month's equilibrium.
Boroughs with more unemployment at the start thus have more job turnover, and shocks, which
multiply the hazard, hit them harder: this is what keeps the boroughs' rates roughly proportional
through 2020-2021, as LAUS shows.

Initial state, from LAUS (which counts residents aged 16+): the whole borough labour force is put
on the 18-64 agents, participation = LAUS labour force / population 18-64 (from the bundled
marginals), and the borough's LAUS unemployment rate applies to them. LAUS workers aged 16-17 and
65+ (about 7% of the labour force) are thus folded into 18-64, overstating participation there by a
few points. Exact counts are assigned per borough; agents with ``employed`` True in the population
are chosen first for employment.

Draws are Bernoulli: with gradients enabled, straight-through (forward 0/1, backward d/dp), so that
a loss on the recorded series has gradients for every parameter in :class:`LaborParams`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lpm_llm.core.behavior import DecisionSource, PerArchetype, broadcast, majority_area, trend_text
from lpm_llm.core.model import DecisionUse
from lpm_llm.core.parameters import Bounded
from lpm_llm.data.observed import load_unemployment
from lpm_llm.models.labor_calendar import (  # noqa: F401 - re-exported: the labour model's public names
    INCOME_SUPPORT,
    PAUSE_START,
    REOPENING_PHASES,
    RESIDUAL_RESTRICTIONS,
    LaborInputs,
    LaborPolicy,
    borough_population,
    income_support,
    labor_period,
    observed_labor_inputs,
    policy_for_period,
    residual_restriction,
)
from lpm_llm.population import BOROUGHS, Population
from lpm_llm.population.industry import INDUSTRIES, assign_industry, working_age_mask

log = logging.getLogger(__name__)

OUT_OF_LABOR_FORCE, EMPLOYED, UNEMPLOYED = 0, 1, 2
STATUS_LABELS: tuple[str, ...] = ("out_of_labor_force", "employed", "unemployed")
RESULTS: tuple[str, ...] = ("labor_force", "employed", "unemployed", "unemployment_rate")
_MIN_RATE = 0.005  # floor of the unemployment rate inside the matching function (a fraction)

# -- parameters ------------------------------------------------------------------------------------
DEFAULT_SHOCK: dict[str, float] = {
    "leisure_hospitality": 20.0, "retail_personal_services": 10.0, "professional_office": 2.0,
    "health_education": 3.0, "construction_manufacturing": 6.0, "transport_utilities": 4.0,
    "public_administration": 0.5,
}
_BOUNDS: dict[str, tuple[float, float]] = {
    "job_finding": (0.01, 0.95), "exit_rate": (1e-4, 0.5), "matching_elasticity": (0.0, 1.0),
    "hiring_freeze": (0.0, 1.0), "case_sensitivity": (0.0, 2.0), "shock": (0.0, 100.0),
    "hysteresis": (0.0, 1.0),
}


_SCALARS = ("job_finding", "exit_rate", "matching_elasticity", "hiring_freeze", "case_sensitivity", "hysteresis")


class LaborParams(BaseModel):
    """Parameters of :class:`LaborModel`, with units; all are calibrated. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    job_finding: float = Field(0.3, ge=0.01, le=0.95, description="monthly probability that an unemployed "
                               "agent who wants to work finds a job, at the start rate, without restriction")
    exit_rate: float = Field(0.05, ge=1e-4, le=0.5, description="monthly probability that an agent in "
                             "the labour force who does not want to work leaves it (1/month)")
    matching_elasticity: float = Field(0.5, ge=0.0, le=1.0, description="exponent of the fall of job "
                                       "finding with the unemployment rate: find ~ (u0/u)^e (unitless)")
    hiring_freeze: float = Field(0.5, ge=0.0, le=1.0,
                                 description="share of hiring stopped under a full stay-at-home order")
    case_sensitivity: float = Field(0.05, ge=0.0, le=2.0, description="restriction-equivalent of 100 "
                                    "weekly cases per 100,000 residents, in the separation shock")
    hysteresis: float = Field(0.0, ge=0.0, le=1.0, description="share of the gap between last month's "
                              "unemployment rate and the equilibrium rate that the equilibrium closes each "
                              "month (0: the equilibrium stays at the start month's rate; 1: last month's rate)")
    shock: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SHOCK), description="industry -> "
                                    "relative rise of the separation hazard at full restriction (unitless)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"alignment_a", "alignment_b"} & set(data)):
            raise ValueError("labor.alignment_a / alignment_b moved to the work decision: "
                             "decisions: {work: {prompt: work.yaml, alignment: [a, b]}}")
        return data

    @field_validator("shock")
    @classmethod
    def _known_industries(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(INDUSTRIES))
        if unknown:
            raise ValueError(f"unknown industry(ies) {unknown}; known: {', '.join(INDUSTRIES)}")
        lo, hi = _BOUNDS["shock"]
        bad = {k: x for k, x in v.items() if not lo <= x <= hi}
        if bad:
            raise ValueError(f"shock sizes must lie in [{lo}, {hi}], got {bad}")
        return {**DEFAULT_SHOCK, **v}


# -- state -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Baseline:
    hazard0: torch.Tensor  # (areas,) monthly separation hazard without shock
    entry0: torch.Tensor  # (areas,) monthly entry probability of an agent outside who wants to work
    rate0: torch.Tensor  # (areas,) unemployment rate (fraction) at the baseline (the equilibrium's)
    wants: torch.Tensor | None = None  # (3, areas) first step's mean work probability of E, U, outside


@dataclass(frozen=True)
class LaborState:
    """Labour status of the M working-age agents (18-64) among N; float 0/1 so that it carries gradients.

    Attributes:
        month: the month this state describes.
        agents: (M,) int64 positions of the working-age agents in the population.
        n: N, the population size.
        employed, unemployed: (M,) float32, 1.0 where the agent is in that status.
        borough, industry: (M,) int64 codes.
        baseline: equilibrium flows, set by the first step.
    """

    month: date
    agents: torch.Tensor
    n: int
    employed: torch.Tensor
    unemployed: torch.Tensor
    borough: torch.Tensor
    industry: torch.Tensor
    baseline: _Baseline | None = None

    @property
    def status(self) -> torch.Tensor:
        """(N,) int8: 0 out of the labour force (or outside 18-64), 1 employed, 2 unemployed."""
        code = self.employed.detach().round() * EMPLOYED + self.unemployed.detach().round() * UNEMPLOYED
        out = torch.zeros(self.n, dtype=torch.int8, device=self.agents.device)
        return out.index_put_((self.agents,), code.to(torch.int8))

    def by_borough(self) -> dict[str, torch.Tensor]:
        """(areas,) float32 ``labor_force``, ``employed``, ``unemployed`` (agents), and the rate (%)."""
        zeros = torch.zeros(len(BOROUGHS), device=self.employed.device)
        employed = zeros.index_add(0, self.borough, self.employed)
        unemployed = zeros.index_add(0, self.borough, self.unemployed)
        force = employed + unemployed
        return {"labor_force": force, "employed": employed, "unemployed": unemployed,
                "unemployment_rate": 100.0 * unemployed / force.clamp(min=1.0)}


def _bernoulli(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 draws ``u < p`` from uniforms ``u``; straight-through gradient of ``p`` with grad enabled."""
    hard = (u < p).to(torch.float32)
    if torch.is_grad_enabled() and p.requires_grad:
        return hard + (p - p.detach())
    return hard


# -- model -----------------------------------------------------------------------------------------
def labor_specs(params: LaborParams) -> dict[str, Bounded]:
    """The labour model's calibrated parameters, initialised from `params` (ranges: ``_BOUNDS``)."""
    specs = {name: Bounded(*_BOUNDS[name], getattr(params, name), doc=LaborParams.model_fields[name].description or "")
             for name in _SCALARS}
    specs["shock"] = Bounded(*_BOUNDS["shock"], [params.shock[g] for g in INDUSTRIES], (len(INDUSTRIES),),
                             doc="relative rise of the separation hazard at full restriction, by industry "
                                 f"({', '.join(INDUSTRIES)})")
    return specs


class LaborModel:
    """Monthly labour-market dynamics of working-age agents; see the module docstring for the step.

    Args:
        params: the parameters.
        tensors: name -> tensor values replacing those of `params` (calibration: differentiable).
    """

    def __init__(self, params: LaborParams | None = None, tensors: Mapping[str, torch.Tensor] | None = None):
        p = params or LaborParams()
        self.values: dict[str, torch.Tensor] = {name: torch.tensor(getattr(p, name)) for name in _SCALARS}
        self.values["shock"] = torch.tensor([p.shock[g] for g in INDUSTRIES])
        for name, value in (tensors or {}).items():
            if name not in self.values:
                raise KeyError(f"unknown labour parameter {name!r}; known: {', '.join(self.values)}")
            self.values[name] = value
        self._warned = False

    @property
    def params(self) -> LaborParams:
        """Current values of the parameters (detached)."""
        scalars = {name: float(self.values[name].detach()) for name in _SCALARS}
        shock = self.values["shock"].detach().cpu().tolist()
        return LaborParams(**scalars, shock=dict(zip(INDUSTRIES, shock, strict=True)))

    # -- initial state ---------------------------------------------------------------------------
    def init_state(
        self,
        population: Population,
        start: date | str,
        generator: torch.Generator,
        observed: pd.DataFrame | None = None,
    ) -> LaborState:
        """Labour status in month ``start`` from LAUS participation and unemployment (module docstring).

        Args:
            population: needs ``borough``, ``age_band`` and ``industry`` (see
                :func:`lpm_llm.population.industry.assign_industry`); an ``employed`` column, if present, is
                preferred when choosing who is employed.
            start: the start month; ``observed`` must have it for every borough.
            generator: randomness for who is chosen, on the population's device.
            observed: LAUS frame as from :func:`lpm_llm.data.observed.load_unemployment` (default: bundled).
        """
        if population.labels("borough") != BOROUGHS:
            raise ValueError(f"borough codebook must be {BOROUGHS}, got {population.labels('borough')}")
        if "industry" not in population:
            raise KeyError("the labour model needs an 'industry' column; add it with "
                           "lpm_llm.population.industry.assign_industry(population, generator)")
        month = pd.Timestamp(start).date().replace(day=1)
        obs = load_unemployment() if observed is None else observed
        rows = obs[(obs["date"] == pd.Timestamp(month)) & obs["area"].isin(BOROUGHS)].set_index("area")
        missing = [b for b in BOROUGHS if b not in rows.index]
        if missing:
            raise ValueError(f"unemployment data has no row for {month:%Y-%m} in {missing}; "
                             f"months available: {obs['date'].min():%Y-%m} to {obs['date'].max():%Y-%m}")
        pops = borough_population()
        participation = torch.tensor(
            [min(0.99, rows.loc[b, "labor_force"] / pops[b][1]) for b in BOROUGHS], dtype=torch.float64)
        rate = torch.tensor([rows.loc[b, "unemployment_rate"] / 100.0 for b in BOROUGHS], dtype=torch.float64)

        device = population.device
        agents = torch.nonzero(working_age_mask(population)).squeeze(1)
        borough = population["borough"].long()[agents]
        industry = population["industry"].long()[agents]
        if bool((industry < 0).any()):
            raise ValueError("agents aged 18-64 with industry -1; rebuild the column with assign_industry")
        # rank agents within their borough: synthesized-employed first, then at random
        preferred = population["employed"][agents].to(torch.float64) if "employed" in population else 0.0
        key = torch.rand(agents.shape, generator=generator, device=device, dtype=torch.float64)
        order = torch.argsort(key + 2.0 * (1.0 - preferred) + 4.0 * borough)
        counts = torch.bincount(borough, minlength=len(BOROUGHS))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(agents.shape[0], device=device) - starts[borough[order]]
        n_force = torch.round(participation * counts.cpu()).long().to(device)
        n_employed = torch.round(participation * (1.0 - rate) * counts.cpu()).long().to(device)
        employed = rank < n_employed[borough]
        return LaborState(
            month=month, agents=agents, n=population.n,
            employed=employed.to(torch.float32),
            unemployed=((rank < n_force[borough]) & ~employed).to(torch.float32),
            borough=borough, industry=industry,
        )

    # -- one month -------------------------------------------------------------------------------
    def _equilibrium(self, state: LaborState, p: torch.Tensor) -> _Baseline:
        """Baseline separation hazard and entry that make ``state`` stationary in expectation (no shock).

        Per borough, with f = job_finding, quits = exit_rate x (agents in a status who do not want
        to work): entry0 = (quits_E + quits_U) / P_O makes the outside stationary, and the employed
        are stationary when s (E - quits_E) + quits_E = f P_U + (1 - u0) entry0 P_O, P_X being the
        expected number in status X who want to work. With equal work probabilities in every status
        this gives s (E - quits_E) = f P_U, positive whatever the exits.
        """
        def total(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(BOROUGHS), device=x.device).index_add(0, state.borough, x)

        e, u = state.employed, state.unemployed
        o = 1.0 - e - u
        f, x = self.values["job_finding"], self.values["exit_rate"]
        e_quit, u_quit = total(e * (1 - p)) * x, total(u * (1 - p)) * x
        entry0 = (e_quit + u_quit) / total(o * p).clamp(min=1e-6)
        rate0 = total(u) / total(e + u).clamp(min=1.0)
        hires = f * total(u * p) + (1 - rate0) * (e_quit + u_quit)  # expected inflow into employment
        s = (hires - e_quit) / (total(e) - e_quit).clamp(min=1e-6)
        if not self._warned and (bool((s <= 0).any()) or bool((s >= 1).any()) or bool((entry0 > 1).any())):
            self._warned = True  # once per model: calibration would repeat it every iteration
            log.warning("baseline separation %s or entry %s outside (0, 1); clipped, so the start state "
                        "is not an equilibrium (exits of agents who do not want to work outweigh hiring)",
                        s.detach().cpu().tolist(), entry0.detach().cpu().tolist())
        hazard0 = -torch.log1p(-s.clamp(1e-5, 0.99))
        wants = torch.stack([total(e * p) / total(e).clamp(min=1e-6), total(u * p) / total(u).clamp(min=1e-6),
                             total(o * p) / total(o).clamp(min=1e-6)]).detach()
        return _Baseline(hazard0=hazard0, entry0=entry0.clamp(0, 1), rate0=rate0.detach(), wants=wants)

    def _reanchored(self, state: LaborState, baseline: _Baseline, anchor: torch.Tensor) -> _Baseline:
        """The baseline flows that make the unemployment rate ``anchor`` (areas,) stationary in
        expectation, at the first step's work probabilities (``baseline.wants``) and today's labour
        force and outside population: :meth:`_equilibrium` with E = (1 - u*) L and U = u* L."""
        def total(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(BOROUGHS), device=x.device).index_add(0, state.borough, x)

        e, u = state.employed.detach(), state.unemployed.detach()
        force, outside = total(e + u), total(1.0 - e - u)
        p_e, p_u, p_o = baseline.wants
        f, x = self.values["job_finding"], self.values["exit_rate"]
        employed, unemployed = (1.0 - anchor) * force, anchor * force
        e_quit, u_quit = x * employed * (1.0 - p_e), x * unemployed * (1.0 - p_u)
        entry0 = (e_quit + u_quit) / (outside * p_o).clamp(min=1e-6)
        hires = f * unemployed * p_u + (1.0 - anchor) * (e_quit + u_quit)
        s = (hires - e_quit) / (employed - e_quit).clamp(min=1e-6)
        return _Baseline(hazard0=-torch.log1p(-s.clamp(1e-5, 0.99)), entry0=entry0.clamp(0, 1),
                         rate0=anchor, wants=baseline.wants)

    def step(
        self,
        state: LaborState,
        inputs: LaborInputs,
        work_probability: torch.Tensor,
        archetype_index: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[LaborState, dict[str, torch.Tensor]]:
        """Advance one month: ``(state, inputs, p) -> (new state, outputs)``.

        Args:
            state: the state of the previous month.
            inputs: policies and cases over the step, for the month ``inputs.month``.
            work_probability: (K,) archetype probabilities of wanting to work (after the decision's
                alignment map).
            archetype_index: (N,) archetype of each agent.
            generator: randomness, on the population's device.

        Returns:
            The new state and its :meth:`LaborState.by_borough` outputs, each (areas,).
        """
        if work_probability.dim() != 1:
            raise ValueError(f"work_probability must have shape (K,), got {tuple(work_probability.shape)}")
        aligned = work_probability.to(state.employed.device, torch.float32)
        index = archetype_index.long()[state.agents]
        baseline = state.baseline or self._equilibrium(state, aligned[index])
        h = self.values["hysteresis"]
        if state.baseline is not None and (h.requires_grad or float(h) > 0):
            rate_then = (state.by_borough()["unemployment_rate"] / 100.0).detach()
            baseline = self._reanchored(state, baseline, baseline.rate0 + h * (rate_then - baseline.rate0))
        want = broadcast(aligned, index, generator=generator, straight_through=torch.is_grad_enabled())

        e, u = state.employed, state.unemployed
        o = 1.0 - e - u
        b = state.borough
        restriction = inputs.policy.restriction
        intensity = restriction + self.values["case_sensitivity"] * inputs.cases_week.to(e.device) / 100.0  # (areas,)
        hazard = baseline.hazard0[b] * (1.0 + self.values["shock"].to(e.device)[state.industry] * intensity[b])
        rate = (state.by_borough()["unemployment_rate"] / 100.0).clamp(min=_MIN_RATE)
        slowdown = (baseline.rate0.clamp(min=_MIN_RATE) / rate) ** self.values["matching_elasticity"]
        slowdown = slowdown * (1.0 - self.values["hiring_freeze"] * restriction)
        find = (self.values["job_finding"] * slowdown).clamp(0.0, 1.0)  # (areas,)
        hired = ((1.0 - baseline.rate0) * slowdown).clamp(0.0, 1.0)  # (areas,) entrants starting employed

        draws = torch.rand((5, e.shape[0]), generator=generator, device=e.device)
        quits = _bernoulli(self.values["exit_rate"].expand_as(e), draws[0]) * (1.0 - want)
        losses = _bernoulli(-torch.expm1(-hazard), draws[1])
        finds = _bernoulli(find[b], draws[2]) * want
        entries = _bernoulli(baseline.entry0[b], draws[3]) * want
        starts = _bernoulli(hired[b], draws[4])
        e_quit = e * quits
        e_lose = (e - e_quit) * losses
        u_find = u * finds
        u_quit = u * quits
        o_enter = o * entries
        new = replace(
            state,
            month=inputs.month,
            employed=e - e_quit - e_lose + u_find + o_enter * starts,
            unemployed=u + e_lose - u_find - u_quit + o_enter * (1.0 - starts),
            baseline=baseline,
        )
        return new, new.by_borough()

    @staticmethod
    def working(state: LaborState) -> torch.Tensor:
        """(N,) bool: agents employed (the epidemic keeps workplace contacts only for these)."""
        return state.status == EMPLOYED

    @staticmethod
    def to_columns(state: LaborState) -> dict[str, torch.Tensor]:
        """The columns this model writes: ``labor_status`` (int8) and ``employed`` (bool)."""
        return {"labor_status": state.status, "employed": LaborModel.working(state)}


# -- prompt context --------------------------------------------------------------------------------
def work_context(
    inputs: LaborInputs,
    unemployment_rate: torch.Tensor | Sequence[float],
    archetypes: Any,
    borough: torch.Tensor,
) -> dict[str, Any]:
    """The work prompt's context variables for one step.

    Args:
        inputs: the step's policies and cases (cases are shown as counts for the real borough).
        unemployment_rate: (areas,) last month's unemployment rate by borough, percent.
        archetypes: has ``.index`` (N,) and ``.k``; each archetype gets its majority borough's values.
        borough: (N,) borough code of each agent.

    Returns:
        ``date`` (ISO first of the month, for the records), ``month`` ("April 2020"), ``policies``,
        ``income_support`` (plain strings) and
        ``unemployment_rate``, ``cases_week``, ``cases_trend`` (:class:`PerArchetype`).
    """
    rate = torch.as_tensor(unemployment_rate, dtype=torch.float32).detach().cpu()
    if rate.shape != (len(BOROUGHS),):
        raise ValueError(f"unemployment_rate must have shape ({len(BOROUGHS)},) in {BOROUGHS} order, "
                         f"got {tuple(rate.shape)}")
    home = majority_area(archetypes.index, borough, archetypes.k, len(BOROUGHS))
    pops = borough_population()
    counts = [float(inputs.cases_week[i]) * pops[b][0] / 1e5 for i, b in enumerate(BOROUGHS)]
    trends = inputs.cases_trend.detach().cpu().tolist()
    first, last = labor_period(inputs.month)
    return {
        "date": inputs.month.isoformat(),  # recorded with each answer (decisions.csv); not in the prompt
        "month": f"{inputs.month:%B %Y}",
        "policies": inputs.policy.describe(),
        "income_support": income_support(first + (last - first) / 2),
        "unemployment_rate": PerArchetype(f"{float(rate[h]):.1f}" for h in home),
        "cases_week": PerArchetype(f"{round(counts[h]):,}" for h in home),
        "cases_trend": PerArchetype(trend_text(trends[h]) for h in home),
    }


# -- the coupling with the epidemic -----------------------------------------------------------------------
EMPLOYMENT_REFERENCE = date(2020, 2, 1)
"""The month whose employment the policy schedule's workplace reductions are relative to (the
mobility baseline of Google's reports, 3 January - 6 February 2020, is pre-pandemic)."""


class EmploymentAdjustedSchedule:
    """A policy schedule whose workplace reductions leave out the part that job losses explain.

    The schedule's workplace multiplier m (for example 0.4 under PAUSE: workplace visits down 60% in
    the mobility reports) measures all workplace contact, including that of the people who lost their
    jobs. When a labour model removes the workplace contacts of the unemployed, applying m to those
    still employed as well removes the job losses twice. Here, on a day of month t when a policy
    reduces workplace contact (m < 1), the multiplier is ``min(1, m / r_t)``, with r_t the city's
    observed employment in month t relative to :data:`EMPLOYMENT_REFERENCE` (LAUS): the employed keep
    m / r_t of their workplace contact, so that workplace contact in all is m times the reference's when
    the simulated job losses match the observed ones, as in the uncoupled fit. Other layers, and days
    without a workplace policy, are unchanged. Everything else (``active``, ``policies``) is the
    wrapped schedule's.
    """

    def __init__(self, schedule: Any, observed: pd.DataFrame | None = None):
        self.schedule = schedule
        obs = load_unemployment() if observed is None else observed
        city = obs[obs["area"].isin(BOROUGHS)].groupby("date")["employed"].sum()
        reference = pd.Timestamp(EMPLOYMENT_REFERENCE)
        if reference not in city.index:
            raise ValueError(f"unemployment data lacks the reference month {reference:%Y-%m} for the coupling")
        self.ratio = (city / city.loc[reference]).to_dict()

    def employment_ratio(self, day: date) -> float:
        """Observed city employment in ``day``'s month relative to the reference (1 where unknown)."""
        return float(self.ratio.get(pd.Timestamp(day).replace(day=1), 1.0))

    def multipliers(self, day: Any) -> dict[str, float]:
        out = dict(self.schedule.multipliers(day))
        m, r = out.get("workplace", 1.0), self.employment_ratio(pd.Timestamp(day).date())
        if m < 1.0 and 0.0 < r < 1.0:
            out["workplace"] = min(1.0, m / r)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.schedule, name)


# -- the model in a simulation ------------------------------------------------------------------------
class Labor:
    """The labour market as a :class:`~lpm_llm.core.model.Model` of a :class:`~lpm_llm.core.sim.Simulation`.

    Steps on the first day of every month after day 0 (the ``work`` decision's cadence): the work
    decision's aligned (K,) probabilities in, separations, hiring, exits and entries drawn with the
    model's own generator (seeded ``seed + stream``, 7919 by default, independent of the epidemic's). Publishes
    ``working`` (agents employed) every day; reads ``cases_week`` (reported cases of the last 7 days
    per 100,000 by borough) when another model publishes it, else uses the bundled observed cases
    (:func:`observed_labor_inputs`).

    Args:
        params: labour parameters.
        context_rates: unemployment rate shown in the work prompt: the simulated one of last month,
            or the observed one (up to ``observed_until``, simulated after); observed rates keep the
            prompts, hence the answers, the same across calibration iterations.
        observed: LAUS frame for the start state and observed rates (default: bundled).
        observed_until: last month whose observed rate may be shown (a forecast sees no later one).
        inputs: one :class:`LaborInputs` per monthly step (default: from the calendar and the cases).
        persons_per_agent: scale of the counts in :meth:`table` (default: 1 / population scale).
        stream: the model's generator is seeded ``seed + stream`` (independent of the epidemic's draws).
        adjust_schedule: when another model reads ``working`` (the epidemic drops the workplace contacts
            of agents out of work), wrap the simulation's policy schedule in
            :class:`EmploymentAdjustedSchedule` so that job losses are not removed twice (once by the
            schedule's workplace multiplier, measured on all workers, once by the coupling).
    """

    name = "labor"
    decisions = (DecisionUse("work", cadence="monthly", as_draws=False, required=True),)
    observes = ()
    publishes = ("working",)
    reads = ("cases_week",)
    state = ("labor_status", "employed")
    results = tuple(f"labor_{r}" for r in RESULTS)

    def __init__(
        self,
        params: LaborParams | None = None,
        *,
        context_rates: Literal["simulated", "observed"] = "simulated",
        observed: pd.DataFrame | None = None,
        observed_until: date | str | None = None,
        inputs: Sequence[LaborInputs] | None = None,
        persons_per_agent: float | None = None,
        stream: int = 7919,
        adjust_schedule: bool = True,
    ):
        if context_rates not in ("simulated", "observed"):
            raise ValueError(f"context_rates must be 'simulated' or 'observed', got {context_rates!r}")
        self.params = params or LaborParams()
        self.tensor_overrides: dict[str, torch.Tensor] = {}
        self.context_rates = context_rates
        self.observed = observed
        self.observed_until = pd.Timestamp(observed_until) if observed_until is not None else pd.Timestamp.max
        self._inputs = list(inputs) if inputs is not None else None
        self._persons_per_agent = persons_per_agent
        self.stream = int(stream)
        self.adjust_schedule = bool(adjust_schedule)
        self.final_state: LaborState | None = None

    def parameters(self) -> dict[str, Bounded]:
        return labor_specs(self.params)

    @staticmethod
    def prepare_population(population: Population, seed: int) -> Population:
        """The population with the ``industry`` column this model reads (drawn with `seed`)."""
        generator = torch.Generator(device=population.device).manual_seed(seed)
        return assign_industry(population, generator)

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        self.tensor_overrides = dict(values)

    def setup(self, sim: Any) -> None:
        population = sim.population
        if population.labels("borough") != BOROUGHS:
            raise ValueError(f"borough codebook must be {BOROUGHS}, got {population.labels('borough')}")
        if "industry" not in population:
            raise KeyError("the labour model needs an 'industry' column; add it with "
                           "lpm_llm.population.industry.assign_industry(population, generator)")
        if sim.archetypes is None:
            raise ValueError("the labour model needs archetypes (its work decision is asked per archetype)")
        self.sim = sim
        self.obs = load_unemployment() if self.observed is None else self.observed
        self.obs_rate = rate_table(self.obs)
        self.months = month_range(sim.start_date, sim.month_index[-1] + 1)
        self.coupled = any("cases_week" in m.observes for m in sim.models if m is not self)
        if self.adjust_schedule and any("working" in m.reads for m in sim.models if m is not self) \
                and not isinstance(sim.interventions, EmploymentAdjustedSchedule):
            # the epidemic drops the workplace contacts of the unemployed: the schedule must not drop them too
            sim.interventions = EmploymentAdjustedSchedule(sim.interventions, self.observed)
        if self._inputs is not None and len(self._inputs) != len(self.months) - 1:
            raise ValueError(f"inputs has {len(self._inputs)} months; {len(self.months)} months need "
                             f"{len(self.months) - 1} (one per step)")
        if self._inputs is None and not self.coupled:
            self._inputs = observed_labor_inputs(self.months[1:], device=sim.device)
        scale = population.scale
        self.persons_per_agent = (self._persons_per_agent if self._persons_per_agent is not None
                                  else 1.0 / scale if scale else 1.0)

    def init(self, sim: Any) -> None:
        self.model = LaborModel(self.params, self.tensor_overrides)
        self.generator = torch.Generator(device=sim.device).manual_seed(sim.seed + self.stream)
        self.state_ = self.model.init_state(sim.population, self.months[0], self.generator, observed=self.obs)
        self.records = [self.state_.by_borough()]
        self.dates = [self.months[0]]
        self.cases: list[torch.Tensor] = []  # (B,) cases of the last 7 days per 100k, one per day (coupled)
        self.working = LaborModel.working(self.state_)
        self.step_inputs: LaborInputs | None = None

    def observe(self, day: int) -> dict[str, Any]:
        return {}

    def context(self, decision: str, day: int, date: date) -> dict[str, Any]:
        if decision != "work":
            return {}
        if self.coupled:
            week = self.sim.data["cases_week"].detach().cpu().to(torch.float32)
            before = self.cases[-7] if len(self.cases) >= 7 else torch.zeros_like(week)
            trend = torch.where(before > 0, 100.0 * (week - before) / before.clamp(min=1e-9), torch.zeros_like(week))
            self.step_inputs = LaborInputs(month=date, policy=policy_for_period(*labor_period(date)),
                                           cases_week=week, cases_trend=trend)
        else:
            self.step_inputs = self._inputs[len(self.dates) - 1]
        last = pd.Timestamp(self.dates[-1])
        if self.context_rates == "observed" and last <= self.observed_until and last in self.obs_rate.index:
            rate = torch.tensor(self.obs_rate.loc[last, list(BOROUGHS)].to_numpy(dtype=float), dtype=torch.float32)
        else:
            rate = self.records[-1]["unemployment_rate"].detach()
        return work_context(self.step_inputs, rate, self.sim.archetypes, self.sim.population["borough"])

    def step(self, day: int, date: date, inputs: Any) -> dict[str, Any]:
        if self.coupled:
            self.cases.append(inputs.data["cases_week"].detach().cpu().to(torch.float32))
        if "work" in inputs.decided:
            p = inputs.decisions["work"]
            self.state_, out = self.model.step(self.state_, self.step_inputs, p, self.sim.index, self.generator)
            self.records.append(out)
            self.dates.append(date.replace(day=1))
            self.working = LaborModel.working(self.state_)
        return {"working": self.working}

    def finish(self) -> dict[str, torch.Tensor]:
        self.final_state = self.state_
        self.series = {name: torch.stack([r[name] for r in self.records]) for name in RESULTS}
        return {f"labor_{name}": x for name, x in self.series.items()}

    def table(self) -> pd.DataFrame:
        """``date, area, labor_force, employed, unemployed, unemployment_rate`` (%) by month and
        borough, counts in persons."""
        return _monthly_frame(self.series, self.dates, self.persons_per_agent)


@dataclass
class LaborResult:
    """A labour-only run (:func:`simulate_labor`).

    Attributes:
        monthly: DataFrame ``date, area, labor_force, employed, unemployed, unemployment_rate`` (%),
            counts in persons (agents x ``persons_per_agent``), one row per month and borough.
        series: name -> (T, areas) tensors of :data:`RESULTS` (agent counts), with grad if enabled.
        work_probability: (T-1, K) probabilities of wanting to work, before alignment.
        contexts: the T-1 contexts given to the decision source.
        final_state: the state of the last month.
    """

    monthly: pd.DataFrame
    series: dict[str, torch.Tensor]
    work_probability: torch.Tensor
    contexts: list[dict[str, Any]]
    final_state: LaborState


def month_range(start: date | str, months: int) -> list[date]:
    """``months`` consecutive month starts from ``start``."""
    if months < 1:
        raise ValueError(f"months must be at least 1, got {months}")
    return [d.date() for d in pd.date_range(pd.Timestamp(start).replace(day=1), periods=months, freq="MS")]


def simulate_labor(
    population: Population,
    params: LaborParams | None,
    work_decision: DecisionSource,
    archetypes: Any,
    months: int,
    start: date | str,
    *,
    seed: int = 0,
    alignment: Any = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    **labor: Any,
) -> LaborResult:
    """Run the labour model alone for ``months`` months from ``start``'s month (included): a
    :class:`~lpm_llm.core.sim.Simulation` of one :class:`Labor` model from the first of that month.

    `alignment` is the work decision's alignment map (None: the answers as they are); `tensors`
    replace parameters (for example differentiable values from a ParameterSpace); `labor` goes
    to :class:`Labor` (``context_rates``, ``observed``, ``observed_until``, ``inputs``,
    ``persons_per_agent``).
    """
    from lpm_llm.core.sim import Simulation

    dates = month_range(start, months)
    days = (dates[-1] - dates[0]).days + 1
    model = Labor(params, **labor)
    model.set_parameters(tensors or {})
    sim = Simulation(population, [model], archetypes=archetypes, decisions={"work": work_decision},
                     alignment={"work": alignment} if alignment is not None else None,
                     start_date=dates[0], days=days, seed=seed)
    results = sim.run()
    model = sim.model("labor")
    frame = results.decisions
    probabilities = torch.tensor(frame["probability"].to_numpy(), dtype=torch.float32).view(-1, archetypes.k)
    return LaborResult(monthly=model.table(), series=model.series, work_probability=probabilities,
                       contexts=results.contexts, final_state=model.final_state)


def _monthly_frame(series: Mapping[str, torch.Tensor], dates: Sequence[date], scale: float) -> pd.DataFrame:
    frames = []
    for i, area in enumerate(BOROUGHS):
        frame = {"date": pd.to_datetime(list(dates)), "area": area}
        for name in RESULTS:
            values = series[name][:, i].detach().cpu().numpy().astype(float)
            frame[name] = values if name == "unemployment_rate" else values * scale
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True).sort_values(["area", "date"]).reset_index(drop=True)

def rate_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Observed unemployment rate (%) with one row per month and one column per borough."""
    rows = obs[obs["area"].isin(BOROUGHS)]
    return rows.pivot_table(index="date", columns="area", values="unemployment_rate")
