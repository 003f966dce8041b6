"""Calibration: fit the non-LLM parameters of a simulation to observed series by gradient descent.

    space = first_wave_space(EpidemicParams(), n_months=5)
    objective = SimulationObjective(sim, observed, weeks=21, scale=0.01)
    cal = Calibrator(space, steps=40, lr=0.05, seeds_per_step=2).fit(objective)
    cal.params_, cal.loss_history_, cal.wall_times_

Parameters live in :class:`~lpm_llm.core.parameters.ParameterSpace`: each is an ``nn.Parameter`` behind a
bounded transform (see :func:`first_wave_space` for the ranges). The LLM's answers are inputs, not
parameters: :class:`FrozenDecisions` fetches each decision step's probabilities once and reuses them
in every later simulation, so that calibration makes no LLM request after the first run and the loss
is a deterministic function of (parameters, seed). Gradients reach the parameters through the
simulation's discrete draws by the path-weight (score-function) estimator described in
:mod:`lpm_llm.models.seirm`; :class:`Calibrator` with ``method="nelder-mead"`` is the
gradient-free baseline over the same unconstrained vector.

:func:`calibrate_first_wave` is the entry point the experiment runner calls: New York's first wave,
weekly reported cases and deaths by borough, fitted with both methods, then a forecast of the weeks
after the cut-off scored against the observations and against a persistence forecast.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm_llm.calibrate.calibrator import Calibrator
from lpm_llm.calibrate.targets import (
    SERIES_OF,
    forecast_scores,
    log_mse,
    observed_weekly,
    serology_loss,
    simulated_weekly,
    smoothness_penalty,
)
from lpm_llm.core.behavior import DecisionSource
from lpm_llm.core.interventions import InterventionSchedule
from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.core.sim import alignment_specs, months_between
from lpm_llm.models.epidemic import Epidemic, EpidemicParams
from lpm_llm.models.epidemic_params import calibrated_specs
from lpm_llm.population import BOROUGHS, Population

__all__ = [
    "FIRST_WAVE_PARAMETERS",
    "NYC_POPULATION",
    "Bounded",
    "CalibrationReport",
    "Calibrator",
    "FrozenDecisions",
    "ParameterSpace",
    "SimulationObjective",
    "calibrate_first_wave",
    "first_wave_space",
    "log_mse",
]

log = logging.getLogger(__name__)

NYC_POPULATION = 8_336_817
"""Residents of New York City in the bundled marginals (ACS 2019); ``scale = agents / NYC_POPULATION``."""

_ALIGNMENT = ("isolate_alignment_a", "isolate_alignment_b")
FIRST_WAVE_PARAMETERS = (
    "beta_scale", "transmission_change", "initial_infections_per_100k", "ascertainment",
    "ascertainment_by_borough", "fatality_scale", *_ALIGNMENT,
)
"""Names :func:`first_wave_space` can calibrate."""
BEHAVIOUR_EXPLAINS = ("transmission_change",)
"""Held at 1 when a fit with default parameters fits a behaviour (the isolation decision): the change
of transmission beyond the dated policy schedule is what behaviour claims to explain."""
_EPS = 1e-6

# -- the LLM's answers as fixed inputs ----------------------------------------------------------------


class FrozenDecisions:
    """Wrap a :class:`~lpm_llm.core.behavior.DecisionSource` so that each decision step is asked once.

    The first call for a step (identified by ``context[key]``, the ISO date by default) goes to the
    wrapped source; every later call for that step returns the same probabilities, whatever the rest
    of the context. During calibration the decision context (recent cases) changes with the
    parameters; freezing makes the LLM's answers inputs fixed at those of the first run (the one at
    the initial parameters), which keeps the loss deterministic in (parameters, seed) and the LLM
    cost at one request per archetype per decision step in total.

    Attributes:
        source: the wrapped source.
        calls: requests passed to the wrapped source.
        answers: step key -> (K,) probabilities.
    """

    def __init__(self, source: DecisionSource, key: str = "date"):
        self.source = source
        self.key = key
        self.calls = 0
        self.answers: dict[Any, torch.Tensor] = {}

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        if self.key not in context:
            raise KeyError(
                f"decision context has no {self.key!r} to identify the step; keys: {', '.join(context)}"
            )
        step = context[self.key]
        if step not in self.answers:
            p = torch.as_tensor(self.source.probabilities(context), dtype=torch.get_default_dtype())
            self.answers[step] = p.detach().clone()
            self.calls += 1
        return self.answers[step]



# -- parameters ---------------------------------------------------------------------------------------


def first_wave_space(
    params: EpidemicParams,
    n_months: int,
    *,
    n_boroughs: int = len(BOROUGHS),
    alignment: bool | tuple[float, float] = True,
    include: Sequence[str] | None = None,
    seeding_by_borough: bool = True,
    device: torch.device | str = "cpu",
) -> ParameterSpace:
    """The calibrated parameters of the epidemic, initialised from `params` (clipped into range).

    ===========================  ========  ============  =====================================================
    name                         shape     range         meaning
    ===========================  ========  ============  =====================================================
    beta_scale                   ()        0.2 - 5 log   multiplier of every layer's transmission rate
    transmission_change          (M-1,)    0.1 - 10 log  multiplier of transmission in months 2..M relative to
                                                         month 1 (behaviour the schedule leaves out)
    initial_infections_per_100k  (B,)      1 - 5000 log  infections on day 0 per 100,000 residents, by borough
                                 or ()                   (one for the city with ``seeding_by_borough=False``)
    ascertainment                (M,)      0.01 - 1 log  share of symptomatic onsets reported, per month
    ascertainment_by_borough     (B,)      0.2 - 5 log   relative ascertainment by borough (geometric mean 1)
    fatality_scale               ()        0.1 - 10 log  multiplier of the infection fatality ratio by age ((M,):
                                                         by month of onset, when the epidemic's is a list)
    isolate_alignment_a, _b      ()        0.25 - 4 log, slope and shift of ``logit(p') = a*logit(p) + b``
                                           -4 - 4        for the isolation decision (shared by archetypes)
    ===========================  ========  ============  =====================================================

    One shared ``beta_scale`` with the layer ratios of `params` held fixed, rather than one rate per
    layer: borough totals of cases and deaths tell how fast the epidemic grows and how much it slowed
    under the interventions, not which setting the transmission happened in; four layer rates would
    be nearly collinear in this loss, and their ratios come from household and contact studies.
    ``transmission_change`` lets that rate move by calendar month on top of the intervention
    schedule (distancing beyond the orders, the pace of reopening); the last fitted month's value
    holds in a forecast, which then continues the last month's growth rate instead of the schedule's.

    Args:
        n_months: calendar months of the fitted window (the last value holds after it).
        alignment: include ``alignment_a`` and ``alignment_b`` (only with an isolation decision),
            starting from (1, 0), the identity, or from the given (a, b).
        include: names to keep (default: all).
        seeding_by_borough: one ``initial_infections_per_100k`` per borough, or (False) one value for
            the whole city (starting from the mean of `params`' values): in a small city a borough
            starts with a handful of infected agents, too few to pin its own seeding.
    """
    specs = calibrated_specs(params, n_months, n_boroughs, seeding_by_borough=seeding_by_borough)
    if alignment is not False:
        a, b = (1.0, 0.0) if alignment is True else alignment
        specs.update(alignment_specs("isolate", a, b, label="isolation"))
    if include is not None:
        unknown = sorted(set(include) - set(specs))
        if unknown:
            raise KeyError(f"unknown calibrated parameter(s) {unknown}; known: {', '.join(specs)}")
        specs = {k: v for k, v in specs.items() if k in include}
    return ParameterSpace(specs, device=device)


# -- the objective ------------------------------------------------------------------------------------


class SimulationObjective:
    """Loss of a simulation against observed weekly counts: ``objective(values, seeds) -> scalar``.

    With several seeds the loss is that of the mean weekly series over the seeds (the ensemble mean
    is fitted, rather than each noisy run: in a small city a run's early weeks hold O(1) cases,
    and the log loss of each run would pull the fit towards its noise), corrected to second order
    for the noise left in that mean (``debias``, see :func:`log_mse`): uncorrected, a fit to the
    mean of 2 runs of a 33,000-agent city overestimated transmission by 3.5% and underestimated
    seeding by 5-15%.

    The simulation is built once (contacts and all); each call sets its seed and its parameter
    tensors and runs it (with gradients if enabled). ``values`` (from :func:`first_wave_space`, or
    any space of the simulation's declared parameters) go to the models and alignment maps that
    declare them (:meth:`~lpm_llm.core.sim.Simulation.set_parameters`).

    Args:
        simulation: a :class:`lpm_llm.core.sim.Simulation` covering at least ``7 * weeks`` days.
        observed: target -> (weeks, B) observed weekly counts of the real city
            (:func:`lpm_llm.calibrate.targets.observed_weekly`).
        weeks: weeks from the simulation's start that enter the loss.
        scale: agents per resident (simulated counts / scale are compared with observed ones).
        debias: with 2 or more seeds, pass their between-run variance to :func:`log_mse`.
        serology: a serological survey (:class:`~lpm_llm.calibrate.targets.SerologyTarget`) whose
            :func:`~lpm_llm.calibrate.targets.serology_loss` (on the seeds' mean share infected)
            enters the mean over targets as one more target; None: none.
        ranks: a :class:`~lpm_llm.distributed.shard.Ranks` over which the seeds of a call are split
            (each rank runs a contiguous block of them; their weekly series are gathered in seed
            order, so every rank computes the loss of one process), when their number is a multiple
            of the ranks'; otherwise every rank runs every seed. Use with ``ranks.objective`` and
            ``Calibrator(aggregate=ranks.aggregate)``.
        smoothness: weight of :func:`~lpm_llm.calibrate.targets.smoothness_penalty` on the values'
            ``transmission_change``, added to the loss (0: none).
        fatality_smoothness: the same on a ``fatality_scale`` by month (not anchored: no month is fixed);
            None: `smoothness`.

    ``last`` holds the ``Results`` of the latest run (for outputs that are not differentiated, e.g.
    the lineage shares of :mod:`lpm_llm.calibrate.period`); with ``ranks``, this rank's latest.
    """

    def __init__(
        self, simulation: Any, observed: Mapping[str, torch.Tensor], *, weeks: int, scale: float, debias: bool = True,
        serology: Any = None, ranks: Any = None, smoothness: float = 0.0, fatality_smoothness: float | None = None,
    ):
        unknown = sorted(set(observed) - set(SERIES_OF))
        if unknown:
            raise KeyError(f"unknown target(s) {unknown}; known: {', '.join(SERIES_OF)}")
        if simulation.days < 7 * weeks:
            raise ValueError(f"the simulation covers {simulation.days} days, fewer than {weeks} weeks")
        self.simulation = simulation
        self.observed = dict(observed)
        self.weeks = int(weeks)
        self.scale = float(scale)
        self.debias = bool(debias)
        self.serology = serology
        self.ranks = ranks
        self.smoothness = float(smoothness)
        self.fatality_smoothness = self.smoothness if fatality_smoothness is None else float(fatality_smoothness)
        self.last: Any = None
        if serology is not None:
            day = (serology.date - simulation.start_date).days - serology.delay
            if not 0 <= day < simulation.days:
                raise ValueError(f"the serology target's infection date (day {day}) is outside the simulation")
            self._serology_day = day
        self.simulations = 0

    def run(self, values: Mapping[str, torch.Tensor], seed: int):
        """Run the simulation at `values` (:meth:`Simulation.set_parameters`) with `seed`; returns its ``Results``."""
        sim = self.simulation
        sim.set_parameters(values)
        sim.seed = int(seed)
        self.simulations += 1
        self.last = sim.run()
        return self.last

    def weekly(self, values: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """target -> (weeks, B) simulated weekly counts of the scaled city (autograd kept); with a
        serology target also ``"serology"``: the share of agents infected by its day."""
        series = self.run(values, seed).series
        out = {t: simulated_weekly(series[SERIES_OF[t]], self.weeks) for t in self.observed}
        if self.serology is not None:
            infections = series["new_infections"][: self._serology_day + 1].sum()
            shard = getattr(self.simulation, "shard", None)  # an area shard: the whole population
            agents = self.simulation.population.n if shard is None else shard.n_global
            out["serology"] = infections / float(agents)
        return out

    def __call__(self, values: Mapping[str, torch.Tensor], seeds: int | Sequence[int]) -> torch.Tensor:
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        return self.loss(self._stacked(values, seeds), values)

    def loss(self, stacked: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of runs already made: `stacked` maps each target (and ``"serology"``) to the
        (seeds, ...) stack of :meth:`weekly`'s outputs, one per seed; `values` give the penalty."""
        n_seeds = next(iter(stacked.values())).shape[0]
        mean = {t: stacked[t].mean(0) for t in self.observed}
        # with 2+ runs, the loss is corrected for the noise of their mean (see log_mse)
        debias = self.debias and n_seeds > 1
        variance = {t: stacked[t].var(0) / n_seeds for t in self.observed} if debias else None
        loss = self.counts_loss(mean, variance)
        if self.serology is not None:
            share = stacked["serology"].mean()
            n = len(self.observed)  # one more target in the mean over targets
            loss = (loss * n + serology_loss(share, self.serology)) / (n + 1)
        if self.smoothness > 0 and "transmission_change" in values:
            loss = loss + smoothness_penalty(values["transmission_change"], self.smoothness)
        if self.fatality_smoothness > 0 and "fatality_scale" in values and values["fatality_scale"].dim() > 0:
            loss = loss + smoothness_penalty(values["fatality_scale"], self.fatality_smoothness, anchored=False)
        return loss

    def counts_loss(self, mean: Mapping[str, torch.Tensor], variance: Mapping[str, torch.Tensor] | None
                    ) -> torch.Tensor:
        """The loss of the seeds' mean weekly counts (`variance`: of that mean, or None): :func:`log_mse`."""
        return log_mse(mean, self.observed, self.scale, variance=variance)

    def _stacked(self, values: Mapping[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        """name -> (seeds, ...) the runs' weekly series (and serology share), split over ``ranks``."""
        ranks = self.ranks
        split = ranks is not None and ranks.world > 1 and len(seeds) % ranks.world == 0
        if split:
            k = len(seeds) // ranks.world
            seeds = seeds[ranks.rank * k:(ranks.rank + 1) * k]
        runs = [self.weekly(values, s) for s in seeds]
        stacked = {t: torch.stack([r[t] for r in runs]) for t in runs[0]}
        if split:  # every rank's block, in seed order
            stacked = {t: ranks.gather(x) for t, x in stacked.items()}
        return stacked


# -- the optimiser ------------------------------------------------------------------------------------


@dataclass
class CalibrationReport:
    """What :func:`calibrate_first_wave` measured (``to_dict`` for the manifest, ``save`` for a folder).

    Attributes:
        params: gradient-fitted parameters (name -> float or list); ``baseline_params`` the
            Nelder-Mead ones; ``bounds`` their ranges and transforms.
        losses: loss on the common evaluation seeds at the initial, gradient-fitted and
            baseline-fitted parameters.
        history: method -> ``loss``, ``wall_time`` (s), ``simulations`` per step/evaluation.
        forecast: method -> target -> scores of the forecast weeks (see
            :func:`lpm_llm.calibrate.targets.forecast_scores`; persistence = last observed week repeated).
        daily: fitted and forecast days by area (boroughs and ``NYC``) and evaluation seed, counts
            scaled to the real city (divided by ``scale``); columns as ``Results.by_area`` plus ``seed``.
        observed_weekly: the weekly observations used (week, date, area, targets); ``split`` is
            ``fit`` or ``forecast``.
        settings: dates, weeks, scale, agents, steps, seeds and budgets of the run.
    """

    params: dict[str, Any]
    baseline_params: dict[str, Any]
    bounds: dict[str, Any]
    losses: dict[str, float]
    history: dict[str, dict[str, list[float]]]
    forecast: dict[str, dict[str, Any]]
    daily: pd.DataFrame
    observed_weekly: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the DataFrames, as JSON-able data."""
        return {"settings": self.settings, "params": self.params, "baseline_params": self.baseline_params,
                "bounds": self.bounds, "losses": self.losses, "forecast": self.forecast,
                "history": self.history}

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Observed vs fitted vs forecast weekly cases and deaths per borough (one PNG per target), and
        the loss of both methods against fitting time."""
        from lpm_llm.data.observed import load_covid
        from lpm_llm.plots import plot_epidemic, plot_loss_curves

        out_dir = Path(out_dir)
        start, stop = self.daily["date"].min(), self.daily["date"].max()
        observed = load_covid(start, stop)
        paths = []
        for target in self.settings["targets"]:
            paths.append(plot_epidemic(
                self.daily, observed, out_dir / f"calibration_{target}.png", sim_column=SERIES_OF[target],
                obs_column=target, forecast_from=self.settings["cutoff"],
                title=f"Weekly {target}: observed, fitted to {self.settings['cutoff']}, forecast after",
            ))
        paths.append(plot_loss_curves(self.history, out_dir / "calibration_loss.png"))
        return paths

    def save(self, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``calibration.json``, ``calibration_daily.csv``, ``calibration_observed.csv``, plots."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"calibration{suffix}" for suffix in (".json", "_daily.csv", "_observed.csv")]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2, default=str))
        self.daily.to_csv(paths[1], index=False)
        self.observed_weekly.to_csv(paths[2], index=False)
        return paths + (self.plot(out_dir) if plots else [])


def weeks_through(start: dt.date, end: dt.date) -> int:
    """Complete 7-day weeks from `start` whose last day is on or before `end`."""
    return ((end - start).days + 1) // 7



def calibrate_first_wave(
    population: Population,
    archetypes: Any,
    decisions: Mapping[str, DecisionSource] | None,
    params: EpidemicParams,
    interventions: InterventionSchedule | None,
    *,
    start: str | dt.date = "2020-03-01",
    end: str | dt.date = "2020-07-31",
    forecast_weeks: int = 4,
    targets: Sequence[str] = ("cases", "deaths"),
    steps: int = 40,
    lr: float = 0.05,
    lr_final: float | None = None,
    seeds_per_step: int = 1,
    baseline_budget: int | None = None,
    eval_seeds: int = 4,
    curve_points: int = 8,
    checkpoint_days: int | None = 7,
    scale: float | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    observed: pd.DataFrame | None = None,
    parameters: Sequence[str] | None = None,
    alignment: tuple[float, float] | None = None,
    on_step: Callable[[str, int, float, float], None] | None = None,
    serology: Any = None,
    shard: Any = None,
) -> CalibrationReport:
    """Calibrate the epidemic to New York's first wave and forecast the weeks after it.

    The fit covers the complete weeks from `start` through `end` (the cut-off); the loss is
    :func:`log_mse` of weekly `targets` by borough (simulated counts divided by `scale` against the
    observed ones). Two fits from the same start: Adam on the gradient (``steps`` x
    ``seeds_per_step`` simulations), then Nelder-Mead without gradients for as long as Adam ran
    (a simulation without gradients is several times cheaper, so it gets more of them), or for
    ``baseline_budget`` simulations if given. Both fits are scored on ``eval_seeds`` common seeds:
    at the end, at ``curve_points`` times spread over Adam's fitting time (the fit as it stood then:
    held-out loss against wall time), and Nelder-Mead's best point once it had run as many
    simulations as Adam (``losses["nelder-mead_same_simulations"]``). Each fit then forecasts
    ``forecast_weeks`` weeks after the cut-off, scored against the observations and a persistence
    forecast (the last fitted week repeated).

    Args:
        population: the scaled synthetic city.
        archetypes: the population's archetypes (``.index``, ``.k``), or None without decisions.
        decisions: decision name -> source (``isolate``); each is wrapped in :class:`FrozenDecisions`.
        params: epidemic parameters; the calibrated ones start from their values here.
        scale: agents per resident (default: ``population.n / NYC_POPULATION``).
        checkpoint_days: run the simulation with gradients in checkpointed segments of at most this
            many days (:mod:`lpm_llm.models._segments`: a compact saved state, recomputed in the backward
            pass; less memory and time than keeping every activation, None, with the same gradient).
        observed: daily observations (date, area, targets); default: the bundled NYC data.
        parameters: names of :func:`first_wave_space` to calibrate (default: all of them; the
            alignment terms only with an ``isolate`` decision). When the default fits an isolation
            decision, ``transmission_change`` is held at 1 instead (:data:`BEHAVIOUR_EXPLAINS`): a
            free monthly change of transmission absorbs what the behaviour explains, and the fit could
            not tell the LLM's answers from a constant (issue 14; README "What the LLM adds").
        alignment: the (a, b) the isolation decision's alignment map starts from (default: identity).
        serology: a :class:`~lpm_llm.calibrate.targets.SerologyTarget` that enters the fitted loss
            (:class:`SimulationObjective`), e.g. ``NYC_SEROLOGY_APRIL_2020``; None: none.
        lr_final: Adam's learning rate at the last step (geometric decay from `lr`; default: constant).
        curve_points: times at which both fits are scored for the loss-against-time curve.
        on_step: called as ``on_step(method, index, loss, seconds)`` after each step/evaluation,
            and as ``on_step("scoring", index, loss, seconds)`` after each scoring on the evaluation
            seeds (at most ``3 + 2 * curve_points`` of them, one more when Nelder-Mead ran more
            simulations than Adam; a point already scored, such as a Nelder-Mead best that did not move,
            is not simulated again).
        shard: on several ranks (every rank calls this function), this rank's
            :class:`~lpm_llm.distributed.shard.AreaShard` when `population` is its part of an
            area-sharded city, or a :class:`~lpm_llm.distributed.shard.Ranks` to split each call's
            seeds over ranks (whole simulations per rank, :class:`SimulationObjective`'s ``ranks``).
            Adam's gradients are summed over ranks (:meth:`Ranks.aggregate`); every rank computes
            the same losses, takes the same steps and returns the same report. Nelder-Mead then gets Adam's number of
            simulations unless `baseline_budget` is given (a time limit would end it at a different
            step on each rank), and the times that place the scoring curve are rank 0's.
    """
    from lpm_llm.core.sim import Simulation

    start = start if isinstance(start, dt.date) else dt.date.fromisoformat(str(start))
    end = end if isinstance(end, dt.date) else dt.date.fromisoformat(str(end))
    weeks = weeks_through(start, end)
    if weeks < 2:
        raise ValueError(f"the fitted window {start} .. {end} holds {weeks} complete week(s); need 2 or more")
    if forecast_weeks < 0:
        raise ValueError(f"forecast_weeks must be >= 0, got {forecast_weeks}")
    scale = float(scale) if scale is not None else population.scale or population.n / NYC_POPULATION
    targets = tuple(targets)
    total_weeks = weeks + forecast_weeks
    obs_all = observed_weekly(start, total_weeks, targets, observed=observed, device=device)
    obs_fit = {t: v[:weeks] for t, v in obs_all.items()}
    frozen = {name: FrozenDecisions(src) for name, src in (decisions or {}).items()}
    held: dict[str, float] = {}
    if parameters is None and "isolate" in frozen:  # behaviour fitted: it, not a free monthly change, explains
        held = dict.fromkeys(BEHAVIOUR_EXPLAINS, 1.0)
        params = params.model_copy(update=held)
        parameters = [n for n in FIRST_WAVE_PARAMETERS if n not in held]
        log.info("isolation behaviour is fitted: %s held at 1", ", ".join(held))

    from lpm_llm.distributed.shard import AreaShard

    area = shard if isinstance(shard, AreaShard) else None  # else: seeds split over ranks

    def simulation(days: int) -> Any:
        kwargs = {"checkpoint_days": checkpoint_days} if checkpoint_days else {}
        return Simulation(population, [Epidemic(params)], archetypes=archetypes, decisions=frozen or None,
                          interventions=interventions, start_date=start, days=days, seed=seed,
                          device=device, shard=area, **kwargs)

    objective = SimulationObjective(simulation(7 * weeks), obs_fit, weeks=weeks, scale=scale, serology=serology,
                                    ranks=None if area is not None else shard)
    space = first_wave_space(params, months_between(start, start + dt.timedelta(days=7 * weeks - 1)) + 1,
                             alignment=("isolate" in frozen) and (tuple(alignment) if alignment else True),
                             include=parameters, device=device)
    eval_list = [10_000 + seed + j for j in range(eval_seeds)]

    scored = [0, time.perf_counter()]
    scores: dict[bytes, float] = {}  # a point scored once (the seeds are common): Nelder-Mead's best often stays

    def evaluate(values: Mapping[str, torch.Tensor]) -> float:
        key = b"".join(v.detach().cpu().numpy().tobytes() for v in values.values())
        if key in scores:
            return scores[key]
        with torch.no_grad():
            loss = scores[key] = float(objective(values, eval_list))
        if on_step is not None:  # the scoring is long on a large city: report it like the steps
            on_step("scoring", scored[0], loss, time.perf_counter() - scored[1])
        scored[0] += 1
        return loss

    initial = evaluate(space.values())
    fits = {}
    log.info("calibrating with adam")
    fits["adam"] = Calibrator(space, method="adam", steps=steps, lr=lr, lr_final=lr_final,
                              seeds_per_step=seeds_per_step, seed=seed, on_step=on_step,
                              aggregate=None if shard is None else shard.aggregate,
                              ).fit(objective if shard is None else shard.objective(objective))
    adam_time, adam_sims = fits["adam"].wall_times_[-1], fits["adam"].simulations_[-1]
    # the baseline: as long as Adam ran (it then gets more simulations), or a given number of simulations
    budget = {"budget": 10**9, "time_limit": adam_time} if baseline_budget is None else {"budget": baseline_budget}
    if shard is not None and baseline_budget is None:  # ranks must stop at the same simulation
        baseline_budget = adam_sims
        budget = {"budget": adam_sims}
    log.info("calibrating with nelder-mead")
    fits["nelder-mead"] = Calibrator(space, method="nelder-mead", steps=steps, seeds_per_step=seeds_per_step,
                                     seed=seed, on_step=on_step, **budget).fit(objective)
    if shard is not None:  # the scoring curve is placed by rank 0's clock on every rank
        for fit in fits.values():
            fit.wall_times_ = shard.broadcast(fit.wall_times_)
        adam_time = fits["adam"].wall_times_[-1]
    losses = {"initial": initial}
    for method, fit in fits.items():
        losses[method] = evaluate(fit.space_.values())
    # loss on the evaluation seeds against fitting time (the fit as it stood at each time)
    nm = fits["nelder-mead"]
    same = int(np.searchsorted(np.asarray(nm.simulations_), adam_sims))
    if same < len(nm.simulations_):  # Nelder-Mead's best point once it had run as many simulations as Adam
        losses["nelder-mead_same_simulations"] = evaluate(nm.space_at(nm.wall_times_[same]).values())
    curve_times = [adam_time * (i + 1) / curve_points for i in range(curve_points)] if curve_points else []
    curves = {m: [evaluate(fit.space_at(t).values()) for t in curve_times] for m, fit in fits.items()}

    # forecast: the fitted parameters over the fit window and the weeks after it
    forecaster = SimulationObjective(simulation(7 * total_weeks), obs_all, weeks=total_weeks, scale=scale)
    # seeds split over ranks like the scoring's (area shards: every rank runs every seed of its areas)
    ranks = shard if shard is not None and area is None and len(eval_list) % shard.world == 0 else None
    k = len(eval_list) // (1 if ranks is None else ranks.world)
    mine = eval_list if ranks is None else eval_list[ranks.rank * k:(ranks.rank + 1) * k]
    forecast: dict[str, dict[str, Any]] = {}
    frames = []
    for method, fit in fits.items():
        weekly = {t: [] for t in targets}
        with torch.no_grad():
            values = fit.space_.values()
            for s in mine:
                results = forecaster.run(values, s)
                for t in targets:
                    weekly[t].append(simulated_weekly(results.series[SERIES_OF[t]], total_weeks))
                if method == "adam":
                    frames.append(_scaled_by_area(results, scale).assign(seed=s))
        weekly_sum = {t: torch.zeros_like(v) for t, v in obs_all.items()}
        for t in targets:  # summed in seed order, as one process does
            stacked = torch.stack(weekly[t])
            if ranks is not None:  # every rank's block, in seed order
                stacked = ranks.gather(stacked)
            for x in stacked:
                weekly_sum[t] += x
        forecast[method] = {}
        for t in targets:
            mean = (weekly_sum[t] / len(eval_list) / scale).cpu().numpy()
            o = obs_all[t].cpu().numpy()
            if forecast_weeks:
                forecast[method][t] = forecast_scores(mean[weeks:], o[weeks:], o[weeks - 1])

    settings = {
        "start": start.isoformat(), "end": end.isoformat(),
        "cutoff": (start + dt.timedelta(days=7 * weeks)).isoformat(),
        "fit_weeks": weeks, "forecast_weeks": forecast_weeks, "targets": list(targets), "scale": scale,
        "agents": population.n if area is None else area.n_global, "steps": steps, "lr": lr,
        "seeds_per_step": seeds_per_step,
        "baseline_budget": (f"{baseline_budget} simulations" if baseline_budget is not None
                            else f"{adam_time:.1f} s (Adam's fitting time)"),
        "lr_final": lr_final, "parameters": list(space.names),
        "eval_seeds": eval_list, "checkpoint_days": checkpoint_days, "device": str(device), "seed": seed,
        "loss": "mean over targets, weeks and boroughs of (log(m/scale + 1/scale) - log(observed + "
                "1/scale))^2, m: the mean weekly count over the seeds",
        "decision_steps_asked": sum(f.calls for f in frozen.values()),  # each asks every archetype once
        "held_fixed": held,
    }
    if ranks is not None:  # every rank's seeds, in seed order
        frames = [f for part in ranks.gather_objects(frames) for f in part]
    history = {m: {"loss": f.loss_history_, "wall_time": f.wall_times_, "simulations": f.simulations_,
                   "eval_loss": curves[m], "eval_wall_time": curve_times}
               for m, f in fits.items()}
    return CalibrationReport(
        params=fits["adam"].params_, baseline_params=fits["nelder-mead"].params_, bounds=space.describe(),
        losses=losses, history=history, forecast=forecast, daily=pd.concat(frames, ignore_index=True),
        observed_weekly=_observed_frame(obs_all, start, weeks), settings=settings,
    )


def _scaled_by_area(results: Any, scale: float) -> pd.DataFrame:
    """``Results.by_area()`` with every count divided by `scale` (real-city numbers)."""
    df = results.by_area()
    counts = [c for c in df.columns if c not in ("date", "area", "isolating")]
    df[counts] = df[counts] / scale
    return df


def _observed_frame(obs: Mapping[str, torch.Tensor], start: dt.date, weeks: int) -> pd.DataFrame:
    """target -> (W, B) tensors as a long frame: week, date, area, split, targets."""
    w, b = next(iter(obs.values())).shape
    df = pd.DataFrame({
        "week": np.repeat(np.arange(w), b),
        "date": np.repeat(pd.Timestamp(start) + pd.to_timedelta(7 * np.arange(w), unit="D"), b),
        "area": np.tile(np.array(BOROUGHS[:b]), w),
    })
    df["split"] = np.where(df["week"] < weeks, "fit", "forecast")
    for t, v in obs.items():
        df[t] = v.cpu().numpy().reshape(-1)
    return df
