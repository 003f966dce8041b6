"""The simulation loop: one population, the epidemic model, decisions, interventions; and its Results.

Example::

    sim = Simulation(population, EpidemicParams(), archetypes=arch,
                     decisions={"isolate": LLMDecision(...)}, interventions=nyc_2020(),
                     start_date="2020-03-01", days=120, seed=1)
    with torch.no_grad():          # the fast path; leave gradients on to calibrate
        results = sim.run()
    results.by_area()              # one row per day and borough, plus "NYC"
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.utils.checkpoint

from lpm_llm.core.behavior import AlignmentMap, DecisionSource, PerArchetype, broadcast
from lpm_llm.core.interventions import InterventionSchedule
from lpm_llm.models.contacts import LAYERS, ContactLayers
from lpm_llm.models.epidemic import (
    STATES,
    EpidemicModel,
    EpidemicParams,
    EpidemicState,
    StepInputs,
    day_generator,
    layer_rates,
)
from lpm_llm.population import Population
from lpm_llm.resources import nyc_data_path

__all__ = ["Coupling", "Results", "Simulation"]

log = logging.getLogger(__name__)

_COUNT_COLUMNS = ("new_infections", "new_symptomatic", "reported_cases", "hospitalized", "deaths", *STATES)


@runtime_checkable
class Coupling(Protocol):
    """A model coupled to the epidemic (for example the labour market). Provisional interface.

    ``decisions`` names the decision sources it consumes; ``context`` adds variables to the
    decision context (e.g. ``unemployment_rate``); ``step`` runs once per day after the decisions
    and may return an (N,) bool ``working`` mask (agents with workplace contacts that day) or None.
    ``epidemic`` holds ``cases_week`` (B,) reported cases per 100,000 in the last 7 days by borough.
    """

    decisions: tuple[str, ...]

    def context(self, day: int, date: dt.date) -> Mapping[str, Any]: ...

    def step(
        self,
        day: int,
        date: dt.date,
        decisions: Mapping[str, torch.Tensor],
        epidemic: Mapping[str, torch.Tensor],
    ) -> torch.Tensor | None: ...


@dataclass
class Results:
    """What a run records.

    Attributes:
        daily: long DataFrame, one row per day x area (borough) x age band: ``date``
            (datetime64), ``area``, ``age_band``, ``population`` (agents in the cell), the counts
            ``new_infections, new_symptomatic, reported_cases, hospitalized, deaths`` (events that day),
            ``S, E, I, R, M`` (agents at the end of the day), ``isolating`` (fraction of the cell).
        series: name -> (T, B, A) float32 tensors of the same quantities; they keep the autograd
            graph when parameters require grad.
        decisions: DataFrame ``step, date, decision, archetype, probability, aligned`` (probability
            from the source, and after the alignment map).
        timings: seconds spent per phase (``decisions``, ``step``, ``record``, ``total``).
        final_state: the epidemic state after the last day.
        contexts: the decision context given at each decision step.
    """

    daily: pd.DataFrame
    series: dict[str, torch.Tensor]
    decisions: pd.DataFrame
    timings: dict[str, float]
    final_state: EpidemicState
    contexts: list[dict[str, Any]] = field(default_factory=list)

    def by_area(self) -> pd.DataFrame:
        """Age bands summed; one row per day x area, plus area ``NYC`` (all areas)."""
        d = self.daily.assign(_iso=self.daily["isolating"] * self.daily["population"])
        cols = ["population", *_COUNT_COLUMNS, "_iso"]
        per_area = d.groupby(["date", "area"], sort=False, observed=True)[cols].sum().reset_index()
        city = d.groupby("date", sort=False)[cols].sum().reset_index().assign(area="NYC")
        out = pd.concat([per_area, city], ignore_index=True)
        out["isolating"] = out["_iso"] / out["population"].clip(lower=1)
        out["area"] = out["area"].astype(str)
        return out.drop(columns="_iso").sort_values(["date", "area"], kind="stable").reset_index(drop=True)


class Simulation:
    """A daily simulation of one population.

    Each day t (date ``start_date + t``), in this order:

    1. context: if t is a decision day (``t % decision_every == 0``), build the context ``step``,
       ``date`` (ISO), ``cases_week`` and ``cases_trend`` (per archetype: its majority borough's
       reported cases over the last 7 days, shown as a count for the real borough, and the change
       on the week before), ``policies`` (active policies' text, or "none"), plus what couplings add;
    2. decisions: on decision days each source gives (K,) probabilities; they pass through the
       alignment map (if any) and are drawn per agent with :func:`lpm_llm.core.behavior.broadcast`
       (straight-through when gradients are on); decisions hold until the next decision day;
       couplings then step and may set who is working;
    3. interventions: the day's per-layer multipliers scale the transmission rates;
    4. transmission and 5. progression: :meth:`EpidemicModel.step`;
    6. recording: the day's counts by borough and age band; reported cases and admissions with
       their delays are assembled at the end (:meth:`EpidemicModel.report`).

    Args:
        population: columns ``borough``, ``age_band``, ``household`` (and ``school``,
            ``workplace`` if present).
        params: epidemic parameters (None: the defaults).
        archetypes: has ``.index`` (N,) and ``.k``; needed when `decisions` are given.
        decisions: decision name -> source; the epidemic uses ``"isolate"``; couplings declare theirs.
        decision_every: days between decision steps.
        interventions: policy schedule (None: none).
        start_date: ISO date of day 0.
        days: number of days T.
        seed: base seed of every draw (day t uses ``day_generator(seed, t)``); or
        generator: a torch.Generator from which the base seed is drawn (not both).
        device: where the state lives (None: the population's device).
        alignment: an AlignmentMap applied to every decision, or decision name -> map.
        tensors: epidemic parameters given as tensors (see ``TENSOR_PARAMS``), e.g. with requires_grad.
        initial_infected: (N,) bool agents infected on day 0, replacing the per-borough seeding.
        working: (N,) bool fixed mask of agents working (None: every agent with a workplace).
        couplings: coupled models (see :class:`Coupling`).
        persons_per_agent: (B,) residents represented by one agent, for the case counts shown in
            prompts (None: real NYC borough populations / agents, when the boroughs are NYC's; else 1).
        on_day: called as ``on_day(t, days)`` after each day (progress bars live in the runner).
        checkpoint_days: with gradients on, run the epidemic steps in chunks of up to this many days
            under ``torch.utils.checkpoint`` (activations recomputed in the backward pass, so memory
            holds one chunk's plus the state at chunk boundaries); chunks also end before decision
            days. None: keep every activation.
    """

    def __init__(
        self,
        population: Population,
        params: EpidemicParams | Mapping[str, Any] | None = None,
        *,
        archetypes: Any = None,
        decisions: Mapping[str, DecisionSource] | None = None,
        decision_every: int = 7,
        interventions: InterventionSchedule | None = None,
        start_date: str | dt.date = "2020-03-01",
        days: int = 100,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        alignment: AlignmentMap | Mapping[str, AlignmentMap] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        initial_infected: torch.Tensor | None = None,
        working: torch.Tensor | None = None,
        couplings: Sequence[Coupling] = (),
        persons_per_agent: Sequence[float] | None = None,
        on_day: Callable[[int, int], None] | None = None,
        checkpoint_days: int | None = None,
    ):
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.seed = 0 if seed is None else int(seed)
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        if decision_every < 1:
            raise ValueError(f"decision_every must be >= 1, got {decision_every}")
        self.params = (
            params if isinstance(params, EpidemicParams) else EpidemicParams.model_validate(params or {})
        )
        self.device = torch.device(device) if device is not None else population.device
        self.population = population
        self.days = int(days)
        self.decision_every = int(decision_every)
        self.start_date = (
            start_date if isinstance(start_date, dt.date) else dt.date.fromisoformat(str(start_date))
        )
        self.dates = [self.start_date + dt.timedelta(days=t) for t in range(self.days)]
        self.interventions = interventions or InterventionSchedule()
        self.couplings = tuple(couplings)
        self.on_day = on_day
        if checkpoint_days is not None and checkpoint_days < 1:
            raise ValueError(f"checkpoint_days must be >= 1 or None, got {checkpoint_days}")
        self.checkpoint_days = checkpoint_days
        self.tensor_overrides = dict(tensors or {})

        self.contacts = ContactLayers.from_population(
            population,
            community_matrix=self._community_matrix(),
            cross_borough_share=self.params.cross_borough_share,
            device=self.device,
        )
        self.model = EpidemicModel(self.params, self.contacts, population["age_band"], population["borough"])
        self.areas = (
            population.labels("borough")
            if "borough" in population.codebooks
            else tuple(str(i) for i in range(self.contacts.shape[0]))
        )
        self.age_bands = (
            population.labels("age_band")
            if "age_band" in population.codebooks
            else tuple(str(i) for i in range(self.contacts.shape[1]))
        )

        self.decisions = dict(decisions or {})
        known = set(EpidemicModel.decisions).union(*(c.decisions for c in self.couplings))
        for name in self.decisions:
            if name not in known:
                raise KeyError(f"unknown decision {name!r}; known: {', '.join(sorted(known))}")
        if self.decisions and archetypes is None:
            raise ValueError("decisions need archetypes (an object with .index (N,) and .k)")
        self.archetypes = archetypes
        if isinstance(alignment, AlignmentMap):
            alignment = dict.fromkeys(self.decisions, alignment)
        self.alignment = dict(alignment or {})
        for name in self.alignment:
            if name not in self.decisions:
                raise KeyError(
                    f"alignment for {name!r} but no such decision; decisions: {', '.join(self.decisions)}"
                )
        if archetypes is not None:
            self._index = archetypes.index.to(self.device)
            if self._index.shape != (population.n,):
                raise ValueError(
                    f"archetypes.index must have shape ({population.n},), got {tuple(self._index.shape)}"
                )
            self._home = self._majority_area(self._index, int(archetypes.k))

        self.initial_infected = None
        if initial_infected is not None:
            self.initial_infected = self._mask(initial_infected, "initial_infected")
        self.working = None if working is None else self._mask(working, "working")
        self._persons_per_agent = self._resolve_persons_per_agent(persons_per_agent)

    # -- set-up helpers -------------------------------------------------------------------------
    def _community_matrix(self) -> torch.Tensor | None:
        p = self.params
        if p.community_matrix is not None:
            return torch.tensor(p.community_matrix, dtype=torch.float32)
        from lpm_llm.models.contacts import default_community_matrix

        return default_community_matrix(len(p.susceptibility), p.community_assortativity)

    def _mask(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        mask = torch.as_tensor(mask).to(self.device)
        if mask.dtype != torch.bool or mask.shape != (self.population.n,):
            raise ValueError(
                f"{name} must be an ({self.population.n},) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask

    def _majority_area(self, index: torch.Tensor, k: int) -> list[int]:
        """(K,) the borough where most members of each archetype live (computed once, bincount)."""
        b = self.contacts.shape[0]
        borough = self.model.borough.to(torch.int64)
        cells = torch.bincount(index.to(torch.int64) * b + borough, minlength=k * b).view(k, b)
        return cells.argmax(dim=1).tolist()

    def _resolve_persons_per_agent(self, given: Sequence[float] | None) -> torch.Tensor:
        agents = self.contacts.cell_size.sum(1).double().cpu()
        if given is not None:
            out = torch.as_tensor(given, dtype=torch.float64)
            if out.shape != agents.shape:
                raise ValueError(
                    f"persons_per_agent needs one value per borough ({agents.numel()}), got {out.numel()}"
                )
            return out
        marginals = pd.read_csv(nyc_data_path("population_marginals.csv"))
        totals = marginals[marginals["dimension"] == "total"].set_index("borough")["population"]
        if not set(self.areas) <= set(totals.index):
            return torch.ones_like(agents)
        real = torch.tensor([float(totals[a]) for a in self.areas], dtype=torch.float64)
        return real / agents.clamp(min=1.0)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Results:
        """Run all days; see the class docstring for the order of a day."""
        t_start = time.perf_counter()
        timings = dict.fromkeys(("decisions", "step", "record"), 0.0)
        grad = torch.is_grad_enabled()
        model, c = self.model, self.contacts
        b, a = c.shape
        months = [(d.year - self.start_date.year) * 12 + d.month - self.start_date.month for d in self.dates]
        month_index = torch.tensor(months, dtype=torch.int64, device=self.device)
        theta = model.tensors(self.tensor_overrides, n_months=months[-1] + 1)
        multipliers = torch.tensor(
            [[self.interventions.multipliers(d)[layer] for layer in LAYERS] for d in self.dates],
            dtype=torch.float32,
            device=self.device,
        )
        rates = layer_rates(theta, multipliers, month_index)  # (T, 4)
        imports = (
            self.initial_infected.to(torch.float32)
            if self.initial_infected is not None
            else model.import_probability(theta)
        )
        state = model.initial_state(theta, self.seed, track_gradients=grad)
        held: dict[str, torch.Tensor] = {}
        isolating_cell = torch.zeros(b, a, device=self.device)
        daily: list[dict[str, torch.Tensor]] = []
        isolating_days: list[torch.Tensor] = []
        onsets_area: list[torch.Tensor] = []  # (B,) detached onsets per day, for the context
        decision_rows: list[tuple] = []
        contexts: list[dict[str, Any]] = []
        reporting = model.reporting_rate(theta, month_index).detach().cpu()  # (T, B)
        delay = self.params.report_delay
        chunked = grad and self.checkpoint_days is not None
        pending: list[tuple[int, StepInputs]] = []  # days whose step has not run yet

        def advance(state: EpidemicState, days: list[tuple[int, StepInputs]]):
            outs = []
            for t, inputs in days:
                state, out = model.step(state, t, inputs, theta)
                outs.append(out)
            return state, outs

        def flush(state: EpidemicState) -> EpidemicState:
            # 3-5. interventions, transmission, progression of the pending days; 6. recording
            t1 = time.perf_counter()
            days = list(pending)
            pending.clear()
            if chunked:
                state, outs = torch.utils.checkpoint.checkpoint(advance, state, days, use_reentrant=False)
            else:
                state, outs = advance(state, days)
            t2 = time.perf_counter()
            for (t, _), out in zip(days, outs, strict=True):
                daily.append(out)
                onsets_area.append(out["new_symptomatic"].detach().sum(1))
                if self.on_day is not None:
                    self.on_day(t, self.days)
            timings["step"] += t2 - t1
            timings["record"] += time.perf_counter() - t2
            return state

        for t, date in enumerate(self.dates):
            # 1-2. context and decisions (they read the cases of every day before)
            t0 = time.perf_counter()
            if pending and (self.couplings or (self.decisions and t % self.decision_every == 0)):
                state = flush(state)
                t0 = time.perf_counter()
            if self.decisions and t % self.decision_every == 0:
                reported = self._reported_by_area(onsets_area, reporting, delay, t)
                context = self._context(t, date, reported)
                contexts.append(context)
                for name, source in self.decisions.items():
                    held[name] = self._decide(name, source, context, t, date, decision_rows)
                if "isolate" in held:
                    iso = held["isolate"]
                    isolating_cell = torch.zeros(b * a, device=self.device).index_add(0, c.cell, iso).view(
                        b, a
                    ) / c.cell_size.clamp(min=1.0)
            working = self.working
            if self.couplings:
                reported = self._reported_by_area(onsets_area, reporting, delay, t)
                epi = {"cases_week": self._per_100k(reported[-7:].sum(0) if reported.numel() else None)}
                for coupling in self.couplings:
                    mask = coupling.step(t, date, held, epi)
                    if mask is not None:
                        mask = self._mask(mask, f"working from {type(coupling).__name__}")
                        working = mask if working is None else working & mask
            timings["decisions"] += time.perf_counter() - t0
            inputs = StepInputs(
                rates=rates[t],
                seed=self.seed,
                isolating=held.get("isolate"),
                working=working,
                imports=imports if t == 0 else None,
            )
            pending.append((t, inputs))
            isolating_days.append(isolating_cell)
            if not chunked or len(pending) >= self.checkpoint_days:
                state = flush(state)
        if pending:
            state = flush(state)

        t3 = time.perf_counter()
        stacked = {k: torch.stack([d[k] for d in daily]) for k in daily[0]}
        series = model.report(stacked, theta, month_index)
        series["isolating"] = torch.stack(isolating_days)
        frame = self._frame(series)
        timings["record"] += time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t_start
        decisions = pd.DataFrame(
            decision_rows, columns=["step", "date", "decision", "archetype", "probability", "aligned"]
        )
        return Results(frame, series, decisions, timings, state, contexts)

    # -- per-day helpers ------------------------------------------------------------------------
    def _reported_by_area(
        self, onsets: list[torch.Tensor], reporting: torch.Tensor, delay: int, t: int
    ) -> torch.Tensor:
        """(t, B) expected reported cases on days 0..t-1: onsets (B,) per day, delayed, times the
        (T, B) reporting rate (:meth:`EpidemicModel.reporting_rate`)."""
        b = self.contacts.shape[0]
        if t == 0:
            return torch.zeros(0, b)
        x = torch.stack(onsets).cpu()
        x = torch.cat([torch.zeros(delay, b), x])[:t] if delay else x
        return x * reporting[:t]

    def _per_100k(self, cases: torch.Tensor | None) -> torch.Tensor:
        b = self.contacts.shape[0]
        if cases is None:
            return torch.zeros(b)
        agents = self.contacts.cell_size.sum(1).cpu().clamp(min=1.0)
        return (cases / agents * 1e5).to(torch.float32)

    def _context(self, t: int, date: dt.date, reported: torch.Tensor) -> dict[str, Any]:
        week = reported[-7:].sum(0) if reported.numel() else torch.zeros(self.contacts.shape[0])
        before = reported[-14:-7].sum(0) if reported.shape[0] > 7 else torch.zeros_like(week)
        counts = (week.double() * self._persons_per_agent).tolist()
        change = [_trend(float(w), float(p)) for w, p in zip(week.tolist(), before.tolist(), strict=True)]
        policies = self.interventions.active(date)
        context: dict[str, Any] = {
            "step": t,
            "date": date.isoformat(),
            "cases_week": PerArchetype(f"{round(counts[h]):,}" for h in self._home),
            "cases_trend": PerArchetype(change[h] for h in self._home),
            "policies": "; ".join(policies) if policies else "none",
        }
        for coupling in self.couplings:
            extra = dict(coupling.context(t, date))
            clash = set(extra) & set(context)
            if clash:
                raise ValueError(f"{type(coupling).__name__}.context redefines {sorted(clash)}")
            context.update(extra)
        return context

    def _decide(
        self, name: str, source: DecisionSource, context: Mapping[str, Any], t: int, date: dt.date, rows: list
    ) -> torch.Tensor:
        probs = torch.as_tensor(source.probabilities(context), dtype=torch.float32).to(self.device)
        k = int(self.archetypes.k)
        if probs.shape != (k,):
            raise ValueError(f"decision source {name!r} returned shape {tuple(probs.shape)}, expected ({k},)")
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError(f"decision source {name!r} returned probabilities outside [0, 1]")
        aligned = self.alignment[name](probs) if name in self.alignment else probs
        gen = day_generator(self.seed ^ zlib.crc32(name.encode()), t, self.device)
        drawn = broadcast(aligned, self._index, generator=gen, straight_through=torch.is_grad_enabled())
        p_list, a_list = probs.detach().cpu().tolist(), aligned.detach().cpu().tolist()
        rows.extend((t, date, name, i, p_list[i], a_list[i]) for i in range(k))
        return drawn

    def _frame(self, series: Mapping[str, torch.Tensor]) -> pd.DataFrame:
        b, a = self.contacts.shape
        t = self.days
        data: dict[str, Any] = {
            "date": np.repeat(np.array(self.dates, dtype="datetime64[ns]"), b * a),
            "area": pd.Categorical.from_codes(
                np.tile(np.repeat(np.arange(b), a), t), categories=list(self.areas)
            ),
            "age_band": pd.Categorical.from_codes(
                np.tile(np.arange(a), t * b), categories=list(self.age_bands)
            ),
            "population": np.tile(self.contacts.cell_size.reshape(-1).cpu().numpy(), t),
        }
        for name in (*_COUNT_COLUMNS, "isolating"):
            data[name] = series[name].detach().reshape(-1).cpu().numpy()
        return pd.DataFrame(data)


def _trend(week: float, before: float) -> str:
    """Text for the change of weekly cases on the week before."""
    if before <= 0:
        return "no cases the week before" if week > 0 else "no change"
    percent = 100.0 * (week - before) / before
    if abs(percent) < 5:
        return "about the same as the week before"
    return f"{'up' if percent > 0 else 'down'} {abs(round(percent))}% on the week before"
