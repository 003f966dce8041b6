"""The ``Model`` protocol: one domain (an epidemic, a labour market, vaccination) as a module that a
:class:`~lpm_llm.core.sim.Simulation` runs beside others.

A model declares what it is made of, and the simulation uses the declarations:

- ``parameters()``: its calibrated parameters (:class:`~lpm_llm.core.parameters.Bounded`: range,
  transform, initial value, meaning), collected by the calibration into one parameter space;
- ``state``: the per-agent columns it keeps; ``results``: the series it records;
- ``decisions``: the decisions it consumes (:class:`DecisionUse`: how often, and as per-agent draws
  or as archetype probabilities), with the context variables it contributes to their prompts;
- ``observes`` / ``publishes`` / ``reads``: the data it gives to the other models at the start of
  a day (from the days before) and in its daily step, and the data it takes from them (the
  coupling: the labour model publishes ``working``, the epidemic reads it; the epidemic observes
  ``cases_week``, the labour model reads it).

It implements ``setup(sim)`` (once, when the simulation is built: check the population, build
what does not change between runs), ``init(sim)`` (at the start of every run: fresh state, drawn
from the run's seed), ``context(decision, day, date)`` (variables for the prompt of a decision it consumes),
``observe(day)`` (what it publishes at the start of a day, from the days before), ``step(day, date,
inputs)`` (one day: decisions and the other models' data in, its own publications out) and
``finish()`` (its result series). See :class:`~lpm_llm.models.epidemic.Epidemic` and
:class:`~lpm_llm.models.labor.Labor`, and ``tests/test_toy_model.py`` for a model written outside
the library.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

from lpm_llm.core.parameters import Bounded

if TYPE_CHECKING:
    from lpm_llm.core.sim import Simulation

__all__ = ["DecisionUse", "Model", "StepInputs", "decision_day"]


@dataclass(frozen=True)
class DecisionUse:
    """How a model consumes one decision.

    Attributes:
        name: the decision's name (the key of ``Simulation(decisions=...)``).
        every_days: asked on days 0, n, 2n, ... (``cadence="days"``).
        cadence: ``"days"`` (every ``every_days`` days from day 0) or ``"monthly"`` (on the first
            day of every month after day 0).
        as_draws: True: the simulation draws each agent's (N,) 0/1 decision from its archetype's
            probability (:func:`~lpm_llm.core.behavior.broadcast`); False: the model receives the
            (K,) archetype probabilities and draws itself.
        required: the model cannot run without this decision.
        first: the decision is not taken before this date (None: from day 0); the cadence still
            counts from day 0. The vaccination model's question is not asked months before anyone
            can be vaccinated.
    """

    name: str
    every_days: int = 7
    cadence: Literal["days", "monthly"] = "days"
    as_draws: bool = True
    required: bool = False
    first: dt.date | None = None

    def __post_init__(self) -> None:
        if self.every_days < 1:
            raise ValueError(f"decision {self.name!r}: every_days must be >= 1, got {self.every_days}")
        if self.cadence not in ("days", "monthly"):
            raise ValueError(f"decision {self.name!r}: cadence must be 'days' or 'monthly', got {self.cadence!r}")


def decision_day(use: DecisionUse, day: int, date: dt.date) -> bool:
    """Whether `use`'s decision is taken on `day` (date `date`)."""
    if use.first is not None and date < use.first:
        return False
    if use.cadence == "monthly":
        return day > 0 and date.day == 1
    return day % use.every_days == 0


@dataclass
class StepInputs:
    """What the simulation gives a model's daily step.

    Attributes:
        decisions: decision name -> the held decision: (N,) float32 draws (``as_draws``) or (K,)
            aligned probabilities; a decision not yet taken is absent.
        decided: names of the decisions taken today (for models that act only then).
        data: name -> what other models published today (see ``Model.publishes``).
        multipliers: layer -> the intervention schedule's contact multiplier today.
    """

    decisions: dict[str, torch.Tensor] = field(default_factory=dict)
    decided: frozenset[str] = frozenset()
    data: dict[str, Any] = field(default_factory=dict)
    multipliers: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Model(Protocol):
    """One domain model run by :class:`~lpm_llm.core.sim.Simulation` (see the module docstring).

    Attributes:
        name: unique within a simulation (``"epidemic"``, ``"labor"``).
        decisions: the decisions it consumes.
        observes: names of what ``observe`` gives at the start of a day.
        publishes: names of what ``step`` gives (models that read it step after this one).
        reads: names of what it reads from other models (optional: absent when nobody publishes it).
        state: the per-agent columns it keeps (documentation; ``setup`` allocates them).
        results: the series ``finish`` returns.
        area_sharded: optional, True for a model that runs on one rank's shard of an area-sharded
            population (``sim.shard``): it sums what crosses areas and its series over ranks, so that
            every rank records the whole population's (absent: False, and a sharded run refuses it).
    """

    name: str
    decisions: tuple[DecisionUse, ...]
    observes: tuple[str, ...]
    publishes: tuple[str, ...]
    reads: tuple[str, ...]
    state: tuple[str, ...]
    results: tuple[str, ...]

    def parameters(self) -> dict[str, Bounded]: ...

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None: ...

    def setup(self, sim: Simulation) -> None: ...

    def init(self, sim: Simulation) -> None: ...

    def context(self, decision: str, day: int, date: dt.date) -> dict[str, Any]: ...

    def observe(self, day: int) -> dict[str, Any]: ...

    def step(self, day: int, date: dt.date, inputs: StepInputs) -> dict[str, Any]: ...

    def finish(self) -> dict[str, torch.Tensor]: ...
