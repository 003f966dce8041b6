"""The epidemic as a model of a :class:`~lpm_llm.core.sim.Simulation`: :class:`Epidemic`.

Its dynamics (the SEIRM states, the daily step, the gradient estimator) are in
:mod:`lpm_llm.models.seirm`, its parameters with their sources in
:mod:`lpm_llm.models.epidemic_params`; both are re-exported here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lpm_llm.core.behavior import PerArchetype, change_text
from lpm_llm.core.model import DecisionUse
from lpm_llm.core.parameters import Bounded
from lpm_llm.models._segments import Horizon, run_segment
from lpm_llm.models.contacts import LAYERS, ContactLayers
from lpm_llm.models.epidemic_params import EpidemicParams, calibrated_specs
from lpm_llm.models.seirm import (
    STATES,
    EpidemicInputs,
    EpidemicModel,
    EpidemicState,
    duration_pmf,
    layer_rates,
)

__all__ = [
    "STATES",
    "Epidemic",
    "EpidemicInputs",
    "EpidemicModel",
    "EpidemicParams",
    "EpidemicState",
    "duration_pmf",
    "layer_rates",
]


def community_matrix(params: EpidemicParams, age_band: torch.Tensor, shard: Any = None) -> torch.Tensor:
    """(A, A) community contact matrix of `params` for a population with (N,) ``age_band`` codes:
    ``community_matrix`` if given, else ``community_contacts``, scaled to a mean row sum of 1 over the
    population's agents (:func:`~lpm_llm.models.contacts.normalised_contacts`; over the whole
    population's when `age_band` is the shard `shard` of it)."""
    from lpm_llm.models.contacts import default_community_matrix, normalised_contacts, prem_community_matrix

    n_age = len(params.susceptibility)
    if params.community_matrix is not None:
        matrix = torch.tensor(params.community_matrix, dtype=torch.get_default_dtype())
    elif params.community_contacts == "prem2017_usa":
        matrix = prem_community_matrix()
    else:
        matrix = default_community_matrix(n_age, params.community_assortativity)
    counts = torch.bincount(age_band.long().cpu(), minlength=n_age)
    if shard is not None:
        counts = shard.sum(counts.to(torch.get_default_dtype()))
    return normalised_contacts(matrix, counts)


class Epidemic:
    """The SEIRM epidemic as a :class:`~lpm_llm.core.model.Model` of a
    :class:`~lpm_llm.core.sim.Simulation` (the dynamics are :class:`EpidemicModel`'s).

    Consumes the ``isolate`` decision (per-agent draws, weekly by default): an isolating agent's
    outside contacts are scaled by ``1 - isolation_compliance``. Reported cases isolate as well
    (``case_isolation_compliance``); area-level policies of the schedule (cluster zones) scale the
    outside contacts of their boroughs' residents. Records ``symptomatic_by_lineage`` (T, L) besides
    the (T, B, A) series (see :mod:`lpm_llm.models.lineages`). Reads ``working`` (agents with
    workplace contacts today), and ``susceptibility`` and ``severity`` ((N,) multipliers of the
    force of infection and of the severe outcomes, e.g. from vaccination), if a model publishes them.
    Observes ``cases_week``: (areas,) expected
    reported cases of the last 7 days per 100,000 agents. Contributes ``cases_week`` (the
    archetype's majority borough's reported cases of the last 7 days, shown as a count for the real
    borough) and ``cases_trend`` (the change on the week before) to the isolation prompt.

    Args:
        params: epidemic parameters (None: the defaults).
        tensors: parameters given as tensors (see ``TENSOR_PARAMS``), e.g. with requires_grad.
        initial_infected: (N,) bool agents infected on day 0, replacing the per-borough seeding.
        working: (N,) bool fixed mask of agents working (None: every agent with a workplace).
    """

    name = "epidemic"
    area_sharded = True  # see setup: the shard's contact layers and draws; series summed over ranks
    decisions = (DecisionUse("isolate", every_days=7),)
    observes = ("cases_week",)
    publishes = ()
    reads = ("working", "susceptibility", "severity")
    state = ("disease", "next_day", "flags", "threshold", "lineage", "onset_day")
    results = (
        "new_infections", "new_symptomatic", "reported_cases", "hospitalized", "deaths", *STATES, "isolating",
        "symptomatic_by_lineage",
    )

    def __init__(
        self,
        params: EpidemicParams | Mapping[str, Any] | None = None,
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
        initial_infected: torch.Tensor | None = None,
        working: torch.Tensor | None = None,
    ):
        self.params = params if isinstance(params, EpidemicParams) else EpidemicParams.model_validate(params or {})
        self.tensor_overrides = dict(tensors or {})
        self._initial_infected = initial_infected
        self._working = working
        self.sim: Any = None
        self.final_state: EpidemicState | None = None

    # -- declarations -----------------------------------------------------------------------------
    def parameters(self, *, seeding_by_borough: bool = True) -> dict[str, Bounded]:
        """The calibrated parameters (:func:`~lpm_llm.models.epidemic_params.calibrated_specs`)."""
        n_months = self.sim.month_index[-1] + 1 if self.sim is not None else 1
        n_areas = len(self.sim.areas) if self.sim is not None else len(self.params.initial_infections_per_100k)
        return calibrated_specs(self.params, n_months, n_areas, seeding_by_borough=seeding_by_borough)

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        """Calibrated values replace the parameters of the same name for the next runs."""
        self.tensor_overrides = dict(values)

    def set_variant_importation(self, rates: Sequence[float]) -> None:
        """Each variant's ``importation_per_100k`` (``params.variants`` order) for the next runs. Not
        a tensor parameter: the lineage of an infection is drawn without a score
        (``EpidemicModel._attribute_lineage``), so these rates are fitted to the lineage
        shares outside the gradient (:func:`lpm_llm.calibrate.period.update_variant_rates`)."""
        rates = [float(r) for r in rates]
        if len(rates) != len(self.params.variants) or any(r < 0 for r in rates):
            raise ValueError(f"need {len(self.params.variants)} rates >= 0 (one per variant), got {rates}")
        variants = tuple(v.model_copy(update={"importation_per_100k": r})
                         for v, r in zip(self.params.variants, rates, strict=True))
        self.params = self.params.model_copy(update={"variants": variants})
        if self.sim is not None:
            self.engine.set_params(self.params)

    def set_variant_transmissibility(self, values: Mapping[str, float]) -> None:
        """Lineage (Pango name) -> relative transmissibility of that variant, for the next runs (the
        others unchanged). Like the importation rates, fitted to the lineage shares outside the
        gradient (:func:`lpm_llm.calibrate.period.update_transmissibility`): an infection's lineage is
        drawn without a score."""
        known = {v.lineage for v in self.params.variants}
        unknown = sorted(set(values) - known)
        if unknown or any(not 0 < float(x) <= 10 for x in values.values()):
            raise ValueError(f"need transmissibilities in (0, 10] of the variants {sorted(known)}, got {dict(values)}")
        variants = tuple(v.model_copy(update={"transmissibility": float(values[v.lineage])}) if v.lineage in values
                         else v for v in self.params.variants)
        self.params = self.params.model_copy(update={"variants": variants})
        if self.sim is not None:
            self.engine.set_params(self.params)

    def cut_at(self, date: dt.date) -> None:
        """Use only what was known on `date` (a forecast as of it; call before the simulation is
        built): a variant introduced after `date` is not imported (its rate 0), so it never appears."""
        variants = tuple(v if v.introduced <= date else v.model_copy(update={"importation_per_100k": 0.0})
                         for v in self.params.variants)
        self.params = self.params.model_copy(update={"variants": variants})

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, sim: Any) -> None:
        self.sim = sim
        p = self.params
        population = sim.population
        shard = sim.shard  # None, or this rank's part of an area-sharded population
        matrix = community_matrix(p, population["age_band"], shard)
        self.contacts = ContactLayers.from_population(
            population, community_matrix=matrix, cross_borough_share=p.cross_borough_share, device=sim.device,
            shard=shard,
        )
        self.engine = EpidemicModel(p, self.contacts, population["age_band"], population["borough"],
                                    ids=None if shard is None else shard.ids)
        self.initial_infected = None if self._initial_infected is None else self._mask(
            self._initial_infected, "initial_infected")
        self.working = None if self._working is None else self._mask(self._working, "working")
        self.month_index = torch.tensor(sim.month_index, dtype=torch.int64, device=sim.device)

    def _mask(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        n = self.sim.population.n
        mask = torch.as_tensor(mask).to(self.sim.device)
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"{name} must be an ({n},) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def init(self, sim: Any) -> None:
        """Fresh state for a run: parameters as tensors, daily rates, the day-0 state."""
        engine, c = self.engine, self.contacts
        self.grad = torch.is_grad_enabled()
        self.theta = engine.tensors(self.tensor_overrides, n_months=int(self.month_index[-1]) + 1)
        self.theta["fatality_by_day"] = self.theta["fatality_scale"].index_select(0, self.month_index)  # (T,)
        multipliers = torch.tensor(
            [[day[layer] for layer in LAYERS] for day in sim.day_multipliers],
            dtype=torch.get_default_dtype(), device=sim.device,
        )
        self.rates = layer_rates(self.theta, multipliers, self.month_index)  # (T, 4)
        self.imports = (self.initial_infected.to(torch.get_default_dtype()) if self.initial_infected is not None
                        else engine.import_probability(self.theta))
        # continuous importation by lineage (T, L), None when nothing is ever imported
        importation = engine.importation_hazard(self.theta, sim.dates)
        given = self.tensor_overrides
        self.importation = importation if ("importation_per_100k" in given or bool((importation > 0).any())) else None
        # reported cases isolate: the share of each day's onsets that will be reported (T, B)
        compliance = self.theta["case_isolation_compliance"]
        self.report_rates = (engine.reporting_rate(self.theta, self.month_index)
                             if "case_isolation_compliance" in given or float(compliance) > 0 else None)
        self.state_ = engine.initial_state(self.theta, sim.seed, track_gradients=self.grad)
        self.reporting = engine.reporting_rate(self.theta, self.month_index).detach().cpu()  # (T, B)
        # area-level policies (cluster zones): (T, B) multipliers of outside-home contacts, None if none
        by_area = torch.tensor([sim.interventions.area_multipliers(d, list(sim.areas)) for d in sim.dates],
                               dtype=torch.get_default_dtype(), device=sim.device).reshape(len(sim.dates), -1)
        self.area_factor = by_area if bool((by_area != 1.0).any()) else None
        self.isolating: torch.Tensor | None = None
        self.isolating_cell = torch.zeros(c.shape, device=sim.device)
        self.daily: list[dict[str, torch.Tensor]] = []
        self.isolating_days: list[torch.Tensor] = []
        self.onsets: list[torch.Tensor] = []  # (B,) detached onsets per day, for contexts
        self.pending: list[tuple[int, EpidemicInputs]] = []  # days whose step has not run yet
        self.chunked = self.grad and sim.checkpoint_days is not None
        self.horizon = Horizon()  # who is infected by the end: what the segments' gradients score

    # -- the day ----------------------------------------------------------------------------------
    def _advance(self, state: EpidemicState, days: list[tuple[int, EpidemicInputs]]):
        outs = []
        for t, inputs in days:
            state, out = self.engine.step(state, t, inputs, self.theta)
            outs.append(out)
        return state, outs

    def _flush(self) -> None:
        """Run the pending days (in one checkpointed chunk with gradients and ``checkpoint_days``)."""
        if not self.pending:
            return
        days, self.pending = self.pending, []
        if self.chunked:
            self.state_, outs = run_segment(self.engine, self.state_, self.theta, days, self.horizon)
        else:
            self.state_, outs = self._advance(self.state_, days)
        for out in outs:
            self.daily.append(out)
            self.onsets.append(out["new_symptomatic"].detach().sum(1))

    def _reported(self, t: int) -> torch.Tensor:
        """(t, B) expected reported cases on days 0..t-1: onsets (B,) per day, delayed, times the
        (T, B) reporting rate (:meth:`EpidemicModel.reporting_rate`)."""
        self._flush()
        b, delay = self.contacts.shape[0], self.params.report_delay
        if t == 0:
            return torch.zeros(0, b)
        x = torch.stack(self.onsets).cpu()
        x = torch.cat([torch.zeros(delay, b), x])[:t] if delay else x
        return x * self.reporting[:t]

    def observe(self, day: int) -> dict[str, Any]:
        reported = self._reported(day)
        agents = self.contacts.cell_size.sum(1).cpu().clamp(min=1.0)
        week = reported[-7:].sum(0) if reported.numel() else torch.zeros_like(agents)
        return {"cases_week": (week / agents * 1e5).to(torch.get_default_dtype())}

    def context(self, decision: str, day: int, date: Any) -> dict[str, Any]:
        if decision != "isolate":
            return {}
        reported = self._reported(day)
        week = reported[-7:].sum(0) if reported.numel() else torch.zeros(self.contacts.shape[0])
        before = reported[-14:-7].sum(0) if reported.shape[0] > 7 else torch.zeros_like(week)
        counts = (week.double() * self.sim.persons_per_agent).tolist()
        change = [change_text(float(w), float(p)) for w, p in zip(week.tolist(), before.tolist(), strict=True)]
        home = self.sim.home
        return {
            "cases_week": PerArchetype(f"{round(counts[h]):,}" for h in home),
            "cases_trend": PerArchetype(change[h] for h in home),
        }

    def step(self, day: int, date: Any, inputs: Any) -> dict[str, Any]:
        c = self.contacts
        if "isolate" in inputs.decided:
            self.isolating = inputs.decisions["isolate"]
            b, a = c.shape
            isolating = torch.zeros(b * a, device=self.sim.device).index_add(0, c.cell, self.isolating).view(b, a)
            if c.reduce is not None:  # a shard: the city's, every cell from the rank holding it
                isolating = c.reduce(isolating)
            self.isolating_cell = isolating / c.cell_size.clamp(min=1.0)
        working = self.working
        if "working" in inputs.data:
            mask = self._mask(inputs.data["working"], "working")
            working = mask if working is None else working & mask
        self.pending.append((day, EpidemicInputs(
            rates=self.rates[day], seed=self.sim.seed, isolating=self.isolating, working=working,
            imports=self.imports if day == 0 else None,
            susceptibility=inputs.data.get("susceptibility"), severity=inputs.data.get("severity"),
            importation=None if self.importation is None else self.importation[day],
            report_rate=None if self.report_rates is None else self.report_rates[day],
            outside=self._area_outside(day),
        )))
        self.isolating_days.append(self.isolating_cell)
        if not self.chunked or len(self.pending) >= self.sim.checkpoint_days:
            self._flush()
        return {}

    def _area_outside(self, day: int) -> torch.Tensor | None:
        """(N,) today's multiplier of outside-home contacts from area-level policies, or None."""
        if self.area_factor is None or bool((self.area_factor[day] == 1.0).all()):
            return None
        return self.area_factor[day].index_select(0, self.engine.borough)

    def finish(self) -> dict[str, torch.Tensor]:
        self._flush()
        if self.chunked:
            self.horizon.close(self.state_)
        stacked = {k: torch.stack([d[k] for d in self.daily]) for k in self.daily[0]}
        series = self.engine.report(stacked, self.theta, self.month_index)
        series["isolating"] = torch.stack(self.isolating_days)
        self.final_state = self.state_
        return series
