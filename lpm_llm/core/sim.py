"""The simulation: one population, a list of models, their decisions, the policy calendar; and its Results.

Example::

    sim = Simulation(population, [Epidemic(EpidemicParams())], archetypes=arch,
                     decisions={"isolate": LLMDecision(...)}, interventions=nyc_2020(),
                     start_date="2020-03-01", days=120, seed=1)
    with torch.no_grad():          # the fast path; leave gradients on to calibrate
        results = sim.run()
    results.by_area()              # one row per day and borough, plus "NYC"

Models (:class:`~lpm_llm.core.model.Model`) are modules: the simulation owns the calendar, the
decision steps, the interventions, recording and the order of a day; a model owns its state and
dynamics. Coupling is data: what one model publishes, another reads.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm_llm.core.behavior import (
    AlignmentMap,
    DecisionSource,
    align,
    broadcast,
    broadcast_persistent,
    majority_area,
)
from lpm_llm.core.interventions import InterventionSchedule
from lpm_llm.core.model import DecisionUse, Model, StepInputs, decision_day
from lpm_llm.core.parameters import Bounded
from lpm_llm.core.rng import stream_key, uniform
from lpm_llm.population import Population

__all__ = ["Results", "Simulation", "alignment_specs", "months_between"]

log = logging.getLogger(__name__)


def alignment_specs(decision: str, a: float = 1.0, b: float = 0.0, label: str | None = None) -> dict[str, Bounded]:
    """``<decision>_alignment_a`` (slope, 0.25-4, log) and ``_b`` (shift of the logit, -4-4) of a
    decision's alignment map ``logit(p') = a * logit(p) + b``, starting at (a, b) clipped into range."""
    label = label or decision
    return {
        f"{decision}_alignment_a": Bounded(0.25, 4.0, min(max(float(a), 0.25), 4.0), log=True,
                                           doc=f"slope of the {label} alignment map"),
        f"{decision}_alignment_b": Bounded(-4.0, 4.0, min(max(float(b), -4.0), 4.0),
                                           doc=f"shift (logit) of the {label} alignment map"),
    }


def months_between(start: dt.date, date: dt.date) -> int:
    """Calendar months from `start`'s month to `date`'s (0 in the same month)."""
    return (date.year - start.year) * 12 + date.month - start.month


@dataclass
class Results:
    """What a run records.

    Attributes:
        daily: long DataFrame, one row per day x area (borough) x age band: ``date``
            (datetime64), ``area``, ``age_band``, ``population`` (agents in the cell), and every
            (days, areas, age bands) series of the models (for the epidemic: the counts
            ``new_infections, new_symptomatic, reported_cases, hospitalized, deaths``, the states
            ``S, E, I, R, M`` at the end of the day, and ``isolating``, the fraction of the cell).
        series: name -> tensors of every model's result series; they keep the autograd graph when
            parameters require grad.
        decisions: DataFrame ``step, date, decision, archetype, probability, aligned`` (probability
            from the source, and after the alignment map).
        timings: seconds spent per phase (``decisions``, ``step``, ``record``, ``total``).
        final_state: the state of the first model after the last day (``states`` has every model's).
        contexts: the decision context given at each decision step.
        tables: model name -> its own result table (for example the labour model's monthly table).
        states: model name -> its state after the last day.
    """

    daily: pd.DataFrame
    series: dict[str, torch.Tensor]
    decisions: pd.DataFrame
    timings: dict[str, float]
    final_state: Any
    contexts: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)

    def by_area(self) -> pd.DataFrame:
        """Age bands summed; one row per day x area, plus area ``NYC`` (all areas)."""
        d = self.daily
        counts = [c for c in d.columns if c not in ("date", "area", "age_band", "population", "isolating")]
        if "isolating" in d:
            d = d.assign(_iso=d["isolating"] * d["population"])
        cols = ["population", *counts, *(["_iso"] if "_iso" in d else [])]
        per_area = d.groupby(["date", "area"], sort=False, observed=True)[cols].sum().reset_index()
        city = d.groupby("date", sort=False)[cols].sum().reset_index().assign(area="NYC")
        out = pd.concat([per_area, city], ignore_index=True)
        if "_iso" in out:
            out["isolating"] = out["_iso"] / out["population"].clip(lower=1)
            out = out.drop(columns="_iso")
        out["area"] = out["area"].astype(str)
        return out.sort_values(["date", "area"], kind="stable").reset_index(drop=True)


class Simulation:
    """A daily simulation of one population by a list of models.

    Each day t (date ``start_date + t``), in this order:

    1. observe: every model that observes what another reads gives its start-of-day data (from
       the days before; for the epidemic the reported cases of the last 7 days per area);
    2. decisions: for each decision due today (its :class:`~lpm_llm.core.model.DecisionUse`
       cadence), the context is built (``step``, ``date`` (ISO), ``policies`` (active policies'
       text, or "none"), then what every model contributes, the consuming model's last), the
       source gives (K,) probabilities, the alignment map (if any) is applied, and they are drawn
       per agent with :func:`~lpm_llm.core.behavior.broadcast` (straight-through when gradients are
       on; agent i's draw of decision ``name`` on day t is the counter-based uniform of
       (seed ^ crc32(name), t, stream 0, i), :mod:`lpm_llm.core.rng`), or handed to
       the model as probabilities; decisions hold until the decision's next day;
    3. step: the models step in an order where a model that publishes something in its step comes
       before those that read it (else the given order), each with the held decisions, the data
       observed and published so far today and the day's intervention multipliers;
    4. recording: each model records its own series; :meth:`run` collects them at the end.

    Args:
        population: the agents (areas from the ``borough`` codebook, age bands from ``age_band``).
        models: the models (for example ``[Epidemic(params)]``), each with a unique ``name``.
        archetypes: has ``.index`` (N,) and ``.k``; needed when `decisions` are given.
        decisions: decision name -> source; every decision must be consumed by a model.
        decision_every: days between the steps of the decisions taken every n days: one value for
            all, or decision name -> days (default: the models' declarations).
        interventions: policy schedule (None: none).
        start_date: ISO date of day 0.
        days: number of days T.
        seed: base seed of every draw; or
        generator: a torch.Generator from which the base seed is drawn (not both).
        device: where the state lives (None: the population's device).
        alignment: an AlignmentMap applied to every decision, or decision name -> map (or function).
        on_day: called as ``on_day(t, days)`` after each day (progress bars live in the runner).
        checkpoint_days: with gradients on, models that support it run their steps in chunks of up
            to this many days, recomputed in the backward pass (the epidemic: a compact state saved per
            segment, :mod:`lpm_llm.models._segments`). None: keep every activation.
        persistence: decision name -> week-to-week correlation in [0, 1) of each agent's latent
            propensity (:func:`~lpm_llm.core.behavior.broadcast_persistent`); 0 or absent: a fresh
            independent draw at every step (:func:`~lpm_llm.core.behavior.broadcast`).
        shard: None, or this rank's :class:`~lpm_llm.distributed.shard.AreaShard` when `population`
            is the part of an area-sharded population that this rank holds: models that support it
            sum their cross-area quantities and series over ranks (the epidemic does; a model that
            does not raises), and the recorded results are the whole population's on every rank.
    """

    def __init__(
        self,
        population: Population,
        models: Sequence[Model],
        *,
        archetypes: Any = None,
        decisions: Mapping[str, DecisionSource] | None = None,
        decision_every: int | Mapping[str, int] | None = None,
        interventions: InterventionSchedule | None = None,
        start_date: str | dt.date = "2020-03-01",
        days: int = 100,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        alignment: AlignmentMap | Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        on_day: Callable[[int, int], None] | None = None,
        checkpoint_days: int | None = None,
        persistence: Mapping[str, float] | None = None,
        shard: Any = None,
    ):
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.seed = 0 if seed is None else int(seed)
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        if checkpoint_days is not None and checkpoint_days < 1:
            raise ValueError(f"checkpoint_days must be >= 1 or None, got {checkpoint_days}")
        self.models: list[Model] = list(models or [])
        if not self.models:
            raise ValueError("a Simulation needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self.population = population
        self.shard = shard
        if shard is not None:
            if shard.ids.shape != (population.n,):
                raise ValueError(f"shard.ids must have shape ({population.n},), got {tuple(shard.ids.shape)}")
            if getattr(shard, "city_sum", None) is not None and decisions:
                raise ValueError("data holders who keep their areas' series to themselves cannot take decisions: "
                                 "the decision contexts show every area's cases to the coordinator")
            unsupported = [m.name for m in self.models if not getattr(m, "area_sharded", False)]
            if unsupported:
                raise ValueError(f"model(s) {unsupported} cannot run on an area-sharded population; "
                                 "use distributed.shard: seed")
        self.device = torch.device(device) if device is not None else population.device
        self.days = int(days)
        self.start_date = (
            start_date if isinstance(start_date, dt.date) else dt.date.fromisoformat(str(start_date))
        )
        self.dates = [self.start_date + dt.timedelta(days=t) for t in range(self.days)]
        self.month_index = [months_between(self.start_date, d) for d in self.dates]
        self.interventions = interventions or InterventionSchedule()
        self.on_day = on_day
        self.checkpoint_days = checkpoint_days

        self.areas = population.labels("borough") if "borough" in population.codebooks else ("all",)
        self.age_bands = population.labels("age_band") if "age_band" in population.codebooks else ("all",)
        self.persons_per_agent = population.persons_per_agent(
            None if shard is None or "borough" not in population
            else shard.sum(torch.bincount(population["borough"].long().cpu(), minlength=len(self.areas))))
        self.uses = self._decision_uses(decisions, decision_every)
        self.decisions = dict(decisions or {})
        if self.decisions and archetypes is None:
            raise ValueError("decisions need archetypes (an object with .index (N,) and .k)")
        self.archetypes = archetypes
        if isinstance(alignment, AlignmentMap):
            alignment = dict.fromkeys(self.decisions, alignment)
        self.alignment: dict[str, Callable[[torch.Tensor], torch.Tensor]] = dict(alignment or {})
        for name in self.alignment:
            if name not in self.decisions:
                raise KeyError(
                    f"alignment for {name!r} but no such decision; decisions: {', '.join(self.decisions)}"
                )
        self.persistence = {k: float(v) for k, v in (persistence or {}).items() if float(v) != 0.0}
        for name, r in self.persistence.items():
            if name not in self.decisions:
                raise KeyError(f"persistence for {name!r} but no such decision; "
                               f"decisions: {', '.join(self.decisions)}")
            if not 0.0 < r < 1.0:
                raise ValueError(f"persistence of {name!r} must lie in [0, 1), got {r}")
        self._latent: dict[str, torch.Tensor] = {}
        self.day_multipliers: list[Mapping[str, float]] = []
        self.index: torch.Tensor | None = None
        self.home: list[int] = []
        if archetypes is not None:
            self.index = archetypes.index.to(self.device)
            if self.index.shape != (population.n,):
                raise ValueError(
                    f"archetypes.index must have shape ({population.n},), got {tuple(self.index.shape)}"
                )
            if "borough" in population:
                self.home = majority_area(self.index, population["borough"], int(archetypes.k), len(self.areas),
                                          None if shard is None else shard.sum)
        self.order = self._step_order()
        self._consumes = [(m, frozenset(u.name for u in m.decisions)) for m in self.order]
        self.data: dict[str, Any] = {}
        self._sizes: torch.Tensor | None = None
        self._cell_sizes()
        self._observers = [m for m in self.models if set(m.observes) & self._read_by_others(m)]
        for model in self.models:
            model.setup(self)

    # -- set-up helpers -------------------------------------------------------------------------
    def _decision_uses(
        self, decisions: Mapping[str, DecisionSource] | None, every: int | Mapping[str, int] | None
    ) -> dict[str, tuple[DecisionUse, list[Model]]]:
        """decision name -> (its use, as declared by the first model that consumes it; the consumers)."""
        declared: dict[str, tuple[DecisionUse, list[Model]]] = {}
        for model in self.models:
            for use in model.decisions:
                if use.name in declared:
                    declared[use.name][1].append(model)
                else:
                    declared[use.name] = (use, [model])
        for name, (use, consumers) in declared.items():
            if use.required and name not in (decisions or {}):
                raise ValueError(f"model {consumers[0].name!r} needs the {name!r} decision")
        for name in decisions or {}:
            if name not in declared:
                consumed = ", ".join(sorted(declared)) or "none"
                raise KeyError(f"unknown decision {name!r}; the models consume: {consumed}")
        if every is not None:
            per = every if isinstance(every, Mapping) else {n: every for n, (u, _) in declared.items()
                                                            if u.cadence == "days"}
            for name, days in per.items():
                if name not in declared:
                    raise KeyError(f"decision_every for {name!r}, which no model consumes")
                if days < 1:
                    raise ValueError(f"decision_every must be >= 1, got {days} for {name!r}")
                use, consumers = declared[name]
                declared[name] = (DecisionUse(name, int(days), use.cadence, use.as_draws, use.required, use.first),
                                  consumers)
        return {n: declared[n] for n in decisions or {}}

    def _read_by_others(self, model: Model) -> set[str]:
        return set().union(*(set(m.reads) for m in self.models if m is not model))

    def _step_order(self) -> list[Model]:
        """Publishers before their readers (stable: otherwise the given order)."""
        left, order = list(self.models), []
        while left:
            for m in left:
                if not any(set(o.publishes) & set(m.reads) for o in left if o is not m):
                    break
            else:
                m = left[0]  # a cycle: the given order decides
            order.append(m)
            left.remove(m)
        return order

    def model(self, name: str) -> Model:
        """The model called `name`."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r}; models: {', '.join(m.name for m in self.models)}")

    # -- parameters -----------------------------------------------------------------------------
    def parameters(self, alignment: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Bounded]:
        """Every calibratable parameter: the models' declarations and :func:`alignment_specs` for
        each decision (starting at the identity, or at ``alignment[decision]``)."""
        out: dict[str, Bounded] = {}
        for model in self.models:
            for name, spec in model.parameters().items():
                if name in out:
                    raise ValueError(f"parameter {name!r} is declared by two models")
                out[name] = spec
        for name in self.decisions:
            out.update(alignment_specs(name, *(alignment or {}).get(name, (1.0, 0.0))))
        return out

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        """Give calibrated values (as from a ParameterSpace) to the models and alignment maps that
        declare them; an unknown name is an error."""
        values = dict(values)
        for name in self.decisions:
            a, b = values.pop(f"{name}_alignment_a", None), values.pop(f"{name}_alignment_b", None)
            if (a is None) != (b is None):
                raise KeyError(f"give both {name}_alignment_a and {name}_alignment_b, or neither")
            if a is not None:
                self.alignment[name] = lambda p, a=a, b=b: align(p, a, b)
        for model in self.models:
            declared = model.parameters()
            mine = {k: values.pop(k) for k in list(values) if k in declared}
            if mine:
                model.set_parameters(mine)
        if values:
            raise KeyError(f"unknown parameter(s) {sorted(values)}; known: {', '.join(self.parameters())}")

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Results:
        """Run all days; see the class docstring for the order of a day."""
        t_start = time.perf_counter()
        # the policy calendar of this run, once: layer -> contact multiplier, per day
        self.day_multipliers = [self.interventions.multipliers(d) for d in self.dates]
        for model in self.models:
            model.init(self)
        self._latent = {}
        timings = dict.fromkeys(("decisions", "step", "record"), 0.0)
        held: dict[str, torch.Tensor] = {}
        rows: list[tuple] = []
        contexts: list[dict[str, Any]] = []
        for t, date in enumerate(self.dates):
            t0 = time.perf_counter()
            data: dict[str, Any] = {}
            self.data = data  # what the models published today (models read it in their contexts)
            for model in self._observers:  # 1. observe
                data.update(model.observe(t))
            due = [name for name, (use, _) in self.uses.items() if decision_day(use, t, date)]
            for name in due:  # 2. decisions
                context = self._context(name, t, date)
                contexts.append(context)
                held[name] = self._decide(name, context, t, date, rows)
            t1 = time.perf_counter()
            timings["decisions"] += t1 - t0
            multipliers = self.day_multipliers[t]
            for model, mine in self._consumes:  # 3. step
                inputs = StepInputs(
                    decisions={k: v for k, v in held.items() if k in mine},
                    decided=frozenset(n for n in due if n in mine),
                    data=data,
                    multipliers=multipliers,
                )
                data.update(model.step(t, date, inputs) or {})
            timings["step"] += time.perf_counter() - t1
            if self.on_day is not None:
                self.on_day(t, self.days)

        t2 = time.perf_counter()
        series: dict[str, torch.Tensor] = {}
        tables: dict[str, pd.DataFrame] = {}
        states: dict[str, Any] = {}
        for model in self.models:  # 4. recording
            out = model.finish()
            if set(out) != set(model.results):
                raise ValueError(f"model {model.name!r} recorded {sorted(out)}, "
                                 f"but declares results {sorted(model.results)}")
            clash = set(out) & set(series)
            if clash:
                raise ValueError(f"series {sorted(clash)} recorded by two models")
            series.update(out)
            if hasattr(model, "table"):
                tables[model.name] = model.table()
            states[model.name] = getattr(model, "final_state", None)
        frame = self._frame(series)
        timings["record"] += time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t_start
        decisions = pd.DataFrame(rows, columns=["step", "date", "decision", "archetype", "probability", "aligned"])
        first = states[self.models[0].name]
        return Results(frame, series, decisions, timings, first, contexts, tables, states)

    # -- per-day helpers ------------------------------------------------------------------------
    def _context(self, name: str, t: int, date: dt.date) -> dict[str, Any]:
        """The decision's context: common variables, what every model contributes, the consumer's last."""
        policies = self.interventions.active(date)
        context: dict[str, Any] = {
            "step": t,
            "date": date.isoformat(),
            "policies": "; ".join(policies) if policies else "none",
        }
        consumers = self.uses[name][1]
        for model in self.models:
            if model in consumers:
                continue
            extra = dict(model.context(name, t, date))
            clash = set(extra) & set(context)
            if clash:
                raise ValueError(f"model {model.name!r} redefines context variable(s) {sorted(clash)}")
            context.update(extra)
        for model in consumers:
            context.update(model.context(name, t, date))
        return context

    def _decide(self, name: str, context: Mapping[str, Any], t: int, date: dt.date, rows: list) -> torch.Tensor:
        probs = torch.as_tensor(self.decisions[name].probabilities(context), dtype=torch.get_default_dtype())
        probs = probs.to(self.device)
        k = int(self.archetypes.k)
        if probs.shape != (k,):
            raise ValueError(f"decision source {name!r} returned shape {tuple(probs.shape)}, expected ({k},)")
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError(f"decision source {name!r} returned probabilities outside [0, 1]")
        aligned = self.alignment[name](probs) if name in self.alignment else probs
        p_list, a_list = probs.detach().cpu().tolist(), aligned.detach().cpu().tolist()
        rows.extend((t, date, name, i, p_list[i], a_list[i]) for i in range(k))
        if not self.uses[name][0].as_draws:
            return aligned
        ids = self.shard.ids if self.shard is not None else torch.arange(self.population.n, device=self.device)
        u = uniform(stream_key(self.seed ^ zlib.crc32(name.encode()), t, 0), ids)
        del ids
        if name in self.persistence:
            drawn, self._latent[name] = broadcast_persistent(
                aligned, self.index, self._latent.get(name), self.persistence[name], uniforms=u,
                straight_through=torch.is_grad_enabled())
            return drawn
        return broadcast(aligned, self.index, uniforms=u, straight_through=torch.is_grad_enabled())

    def _cell_sizes(self) -> torch.Tensor:
        """(areas x age bands,) float32 agents per cell (computed once)."""
        if getattr(self, "_sizes", None) is None:
            pop, a = self.population, len(self.age_bands)
            area = pop["borough"].long().cpu() if "borough" in pop else torch.zeros(pop.n, dtype=torch.long)
            band = pop["age_band"].long().cpu() if "age_band" in pop else torch.zeros_like(area)
            self._sizes = torch.bincount(area * a + band, minlength=len(self.areas) * a).to(torch.get_default_dtype())
            if self.shard is not None:  # the whole population's
                self._sizes = self.shard.sum(self._sizes)
        return self._sizes

    def _frame(self, series: Mapping[str, torch.Tensor]) -> pd.DataFrame:
        """The (days, areas, age bands) series as one long table."""
        b, a, t = len(self.areas), len(self.age_bands), self.days
        cells = [k for k, v in series.items() if tuple(v.shape) == (t, b, a)]
        size = self._cell_sizes()
        data: dict[str, Any] = {
            "date": np.repeat(np.array(self.dates, dtype="datetime64[ns]"), b * a),
            "area": pd.Categorical.from_codes(np.tile(np.repeat(np.arange(b), a), t), categories=list(self.areas)),
            "age_band": pd.Categorical.from_codes(np.tile(np.arange(a), t * b), categories=list(self.age_bands)),
            "population": np.tile(size.numpy(), t),
        }
        for name in cells:
            data[name] = series[name].detach().reshape(-1).cpu().numpy()
        return pd.DataFrame(data)
