"""Fit with the data known on a date, then forecast the weeks after it from an ensemble.

One weekly update (:meth:`Forecaster.update`), given the as-of date D and what last week left
(:class:`FitState`, or nothing for a single forecast):

1. **data as of D** (:mod:`lpm_llm.forecast.asof`): daily rows after the cut-off cut, complete weeks
   only, the policy schedule held at its state on D;
2. **fit**: a few Adam steps (:class:`~lpm_llm.calibrate.Calibrator`) of the models' declared
   parameters (those of ``parameters``), warm-started from last week's values and Adam state (or
   from the experiment's parameters); the simulation is **re-run from the start date** every
   time: every parameter (seeding, earlier months' transmission and ascertainment) may move with a
   new week of data, the past state is a function of them, and the gradient needs the whole
   window; carrying last week's end state forward would freeze the past at old parameters;
3. **parameter uncertainty**: a diagonal Laplace approximation from the fit's curvature: for the
   scalars and the last month of each monthly parameter (what drives the weeks ahead), the second
   difference of the loss along that raw coordinate (common seeds), turned into a posterior
   standard deviation with the loss read as a Gaussian log-likelihood of the log weekly counts
   (residual variance = the loss at the fit);
4. **ensemble**: ``members`` runs from the fit start to D + horizon weeks, each with its own seed
   (stochastic uncertainty) and raw parameters drawn from the Laplace approximation (member 0
   at the fit itself, whose run asks the LLM for the forecast weeks' decisions);
5. **reporting noise**: per target a log-normal error around each member's weekly counts (or a
   negative binomial, ``noise="negbin"``), its scale fitted by maximum likelihood to the last
   ``dispersion_weeks`` observed weeks against the ensemble mean: in a 1:100 city the simulation's
   own noise is 100x a real city's in variance, and still far too narrow around a misfit. The
   negative binomial keeps each member's mean, and with the small sizes such misfits give
   (k ~ 1) its median falls well below it; the log-normal keeps the median and is the scale the
   fit's loss measures errors on, so it is the default;
6. **quantiles** of the pooled draws per target, week and area (boroughs, and their sum for the
   city) in the Hub's format (:mod:`lpm_llm.forecast.hub`).

The LLM's answers are frozen per decision date (:class:`~lpm_llm.calibrate.FrozenDecisions`) and
kept in the state: in a stream each decision date is asked once, by the first run that reaches it
(a date first reached as a forecast week is asked with the context simulated by that week's fit,
with the data known then), so a weekly update asks the LLM for one new date (its 4th forecast week).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm_llm.calibrate.fit import Calibrator, FrozenDecisions, SimulationObjective
from lpm_llm.calibrate.period import HOSPITALISATION_SCALE, PeriodObjective, set_with_hospitalisation
from lpm_llm.calibrate.targets import SERIES_OF, observed_weekly, simulated_weekly
from lpm_llm.core.interventions import InterventionSchedule, Policy
from lpm_llm.core.parameters import ParameterSpace
from lpm_llm.forecast.asof import as_date, complete_weeks, cutoff_date, observed_as_of, schedule_as_of
from lpm_llm.forecast.hub import LOCATION_OF, hub_frame
from lpm_llm.population import BOROUGHS

__all__ = ["TRACK_DIRECTIONS", "FitState", "ForecastResult", "ForecastSettings", "Forecaster", "nb_dispersion"]

TRACK_DIRECTIONS = (("transmission_change", 0.2), ("importation_per_100k", 0.5), ("ascertainment", 0.2),
                    ("hospitalisation_scale", 0.2))
"""The directions of :attr:`ForecastSettings.track_weeks`' search, in order, each with its step in
log units: the recent months' transmission (how fast the epidemic grows now), the importation of
infections (its level where the scaled city holds few infected agents, and a new wave's seed), the
recent months' ascertainment (cases against admissions and deaths), the IHR's scale (admissions
against cases and deaths; where the update fits it). Along each, the factors
``exp(0, -2 step, -step, step, 2 step)`` are tried (the current values first: a decision date not
asked before is asked in that run, at the fitted trajectory), then the best times ``exp(+-step/2)``.
A direction the update does not fit is skipped. The directions are searched :data:`TRACK_ROUNDS`
times (a best factor at the edge is searched further in the next round)."""
TRACK_ROUNDS = 2

log = logging.getLogger(__name__)


@dataclass
class ForecastSettings:
    """How a weekly update fits and forecasts (``lpm-llm forecast`` / ``assimilate`` options).

    Attributes:
        horizon: weeks ahead (1-4 for the Hub).
        steps: Adam steps of a warm-started update; ``first_steps`` for an update without a
            previous week (default: ``steps``).
        lr, seeds_per_step: Adam's learning rate and the runs averaged per step; ``first_lr``: the
            learning rate of an update without a previous week (default: ``lr``), e.g. a cold start
            from the package's defaults, far from the data, that later weeks then follow with a
            smaller ``lr``.
        fit_targets: targets in the loss; ``targets``: targets forecast (default: the fit targets).
        parameters: calibrated parameter names (default: every declared one); may add
            ``hospitalisation_scale``, the multiplier of the epidemic's IHR by age that the
            whole-period fit calibrates (:data:`~lpm_llm.calibrate.period.HOSPITALISATION_SCALE`).
        members: ensemble runs; ``draws``: negative binomial draws per member and area.
        laplace_seeds: runs per loss evaluation of the curvature; ``laplace_step``: its step in raw
            units; ``max_sd``: the largest posterior sd allowed (raw units; also used where the loss
            is not convex along a coordinate).
        dispersion_weeks: last observed weeks that fit the reporting noise.
        noise: ``lognormal`` (default): ``log(1 + y)`` normal around each member's
            ``log(1 + count)``, its sd the root mean square log residual of the boroughs (pooled) and
            of the city (its own), the scale of the fit's loss, each member's median kept; or
            ``negbin``: a negative binomial with the member's count as mean, its size fitted by
            maximum likelihood (the city the sum of the boroughs' draws).
        reporting_lag_days: last days treated as not yet reported (see :mod:`~lpm_llm.forecast.asof`).
        start_grid: ``((name, (v1, v2, ...)), ...)``: for an update without a previous week (a cold
            start), before the fit, each named parameter in turn is set to each value (every entry
            of a vector alike), the loss on the known weeks evaluated (``seeds_per_step`` runs,
            common seeds) and the best value kept. From a far-off start (the package's defaults
            seed 10 infections per 100,000: less than 2 agents of a 1:500 city, where the epidemic
            often dies out and the loss has no gradient) this finds the basin with the known data
            only; the grid's losses are in the result's ``settings``.
        track_weeks: a warm update's line searches (0: none). Before the Adam steps, along each
            direction of :data:`TRACK_DIRECTIONS` in turn (the monthly entries of every month that
            the last ``track_weeks`` known weeks touch, and of the months after, scaled together; a
            scalar scaled), a few factors are tried and the one with the lowest loss on the whole
            window kept (``seeds_per_step`` runs, common seeds, the penalty included; plain runs,
            no gradient). Adam moves a coordinate by about its learning rate a step whatever the
            evidence, so a few small steps a week cannot follow a new wave (a factor of 1.5 in a
            month's transmission is 40 steps at 0.01); a search along the directions the new weeks
            inform can. The factors tried and their losses are in the result's ``settings``.
        smoothness: weight of the penalty on month-to-month moves of ``transmission_change``
            (:func:`~lpm_llm.calibrate.targets.smoothness_penalty`, as in the whole-period fit; 0: none).
        loss, dispersion: the loss of the weekly counts, as the whole-period fit's
            (:class:`~lpm_llm.calibrate.period.PeriodObjective`): ``log_mse`` (default; its floor is
            one agent per area and week) or a count deviance, ``poisson`` or ``negbin`` with
            dispersion k, which prices counts of a fraction of an agent (``calibration.loss`` and
            ``calibration.dispersion`` of an experiment).
        scenario: policies assumed after the as-of date (default: the schedule held as it stood).
        seed: base seed (every run's seed is a function of it and the as-of date).
    """

    horizon: int = 4
    steps: int = 3
    first_steps: int | None = None
    lr: float = 0.05
    first_lr: float | None = None
    seeds_per_step: int = 2
    fit_targets: tuple[str, ...] = ("cases", "deaths")
    targets: tuple[str, ...] | None = None
    parameters: tuple[str, ...] | None = None
    members: int = 16
    draws: int = 200
    laplace_seeds: int = 1
    laplace_step: float = 0.25
    max_sd: float = 0.5
    dispersion_weeks: int = 4
    noise: str = "lognormal"
    reporting_lag_days: int = 0
    smoothness: float = 0.0
    scenario: tuple[Policy, ...] = ()
    start_grid: tuple[tuple[str, tuple[float, ...]], ...] = ()
    track_weeks: int = 0
    loss: str = "log_mse"
    dispersion: float = 10.0
    seed: int = 0
    checkpoint_days: int | None = None

    def __post_init__(self) -> None:
        self.fit_targets = tuple(self.fit_targets)
        self.targets = tuple(self.targets) if self.targets else self.fit_targets
        unknown = sorted(set(self.targets) | set(self.fit_targets) - set(SERIES_OF))
        unknown = [t for t in unknown if t not in SERIES_OF]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; known: {', '.join(SERIES_OF)}")
        if self.horizon < 1 or self.members < 1 or self.draws < 1:
            raise ValueError("horizon, members and draws must be >= 1")
        if self.noise not in ("lognormal", "negbin"):
            raise ValueError(f"noise must be 'lognormal' or 'negbin', got {self.noise!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.track_weeks < 0:
            raise ValueError(f"track_weeks must be >= 0, got {self.track_weeks}")
        if self.loss not in ("log_mse", "poisson", "negbin"):
            raise ValueError(f"loss must be 'log_mse', 'poisson' or 'negbin', got {self.loss!r}")
        self.start_grid = tuple((str(n), tuple(float(v) for v in vals)) for n, vals in self.start_grid)
        if any(not vals for _, vals in self.start_grid):
            raise ValueError("every start_grid entry needs at least one value")


@dataclass
class FitState:
    """What one weekly update hands the next (and what a checkpoint stores).

    Attributes:
        as_of: the update's as-of date (ISO).
        params: name -> fitted value (float or list).
        optimizer: Adam's ``state_dict()`` (None before any step).
        answers: decision -> ISO date -> (K,) frozen LLM probabilities.
    """

    as_of: str
    params: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    answers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        torch.save({"as_of": self.as_of, "params": self.params, "optimizer": self.optimizer,
                    "answers": self.answers}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> FitState:
        d = torch.load(Path(path), weights_only=False)
        return cls(d["as_of"], d["params"], d["optimizer"], d["answers"])


@dataclass
class ForecastResult:
    """One forecast: the Hub table and what it was made from.

    Attributes:
        forecast: the Hub long table (:func:`~lpm_llm.forecast.hub.hub_frame`).
        known: the weekly observations used (target, target_end_date, location, value).
        fitted: the ensemble's median weekly counts over the fitted weeks (same columns).
        params: the fitted parameters; ``sd``: Laplace posterior sd (raw units) by entry label.
        dispersion: target -> the fitted noise scale (``log_sd_boroughs``, ``log_sd_city``, or ``negbin_k``).
        loss_history: Adam's losses; ``timings``: seconds per phase; ``settings``: dates and sizes.
    """

    as_of: dt.date
    forecast: pd.DataFrame
    known: pd.DataFrame
    fitted: pd.DataFrame
    params: dict[str, Any]
    sd: dict[str, float]
    dispersion: dict[str, float]
    loss_history: list[float]
    timings: dict[str, float]
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"as_of": self.as_of.isoformat(), "params": self.params, "laplace_sd": self.sd,
                "dispersion": self.dispersion, "loss_history": self.loss_history,
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()}, "settings": self.settings}

    def save(self, out_dir: str | Path, *, plot: bool = True) -> list[Path]:
        """Write ``forecast.csv`` (Hub format), ``known.csv``, ``fitted.csv``, ``forecast.json`` and
        (``plot``) the fan charts ``fan_<target>.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "forecast.csv", out / "known.csv", out / "fitted.csv", out / "forecast.json"]
        self.forecast.to_csv(paths[0], index=False)
        self.known.to_csv(paths[1], index=False)
        self.fitted.to_csv(paths[2], index=False)
        paths[3].write_text(json.dumps(self.summary(), indent=2, default=str))
        if plot:
            from lpm_llm.forecast.plot import plot_fan

            for target in self.settings["targets"]:
                paths.append(plot_fan(self, target, out / f"fan_{target}.png"))
        return paths


def nb_dispersion(observed: np.ndarray, mean: np.ndarray) -> float:
    """Maximum-likelihood size k of a negative binomial with the given means (variance mu + mu^2/k),
    searched over k in [1e-2, 1e6] (log scale); large k: Poisson-like."""
    from scipy.optimize import minimize_scalar
    from scipy.special import gammaln

    y = np.asarray(observed, dtype=float).ravel()
    mu = np.clip(np.asarray(mean, dtype=float).ravel(), 0.5, None)
    ok = np.isfinite(y) & np.isfinite(mu)
    y, mu = y[ok], mu[ok]
    if y.size == 0:
        return 1e6

    def nll(logk: float) -> float:
        k = math.exp(logk)
        ll = gammaln(y + k) - gammaln(k) - gammaln(y + 1) + k * np.log(k / (k + mu)) + y * np.log(mu / (k + mu))
        return -float(ll.sum())

    res = minimize_scalar(nll, bounds=(math.log(1e-2), math.log(1e6)), method="bounded")
    return float(math.exp(res.x))


def log_residual_sd(observed: np.ndarray, mean: np.ndarray) -> float:
    """Root mean square of ``log(1 + observed) - log(1 + mean)``: the maximum-likelihood sd of a
    log-normal error around the model (bias included, so a model that is off widens its own
    intervals); at least 0.05."""
    r = np.log1p(np.clip(np.asarray(observed, float), 0, None)) - np.log1p(np.clip(np.asarray(mean, float), 0, None))
    r = r[np.isfinite(r)]
    return max(float(np.sqrt(np.mean(r ** 2))) if r.size else 1.0, 0.05)


def _resized(value: Any, shape: tuple[int, ...]) -> Any:
    """A fitted value for a parameter whose shape grew (a new month): the last entry holds."""
    if not shape:
        return float(value) if not isinstance(value, list) else float(value[0])
    v = list(value) if isinstance(value, list) else [float(value)]
    n = shape[0]
    return (v + [v[-1]] * n)[:n]


def _resize_optimizer(state: Mapping[str, Any] | None, old: Mapping[str, tuple[int, ...]],
                      space: ParameterSpace) -> dict[str, Any] | None:
    """Adam's state for `space` from one for parameters of the shapes `old` (in the same order):
    a parameter that gained entries (a new month) repeats its last entry's moments; a parameter
    that is new or changed otherwise starts the state afresh (None)."""
    if state is None or list(old) != list(space.names):
        return None
    state = copy.deepcopy(dict(state))
    for i, name in enumerate(space.names):
        entry = state["state"].get(i)
        shape = tuple(space.raw[name].shape)
        if entry is None or tuple(old[name]) == shape:
            continue
        if len(shape) != 1 or len(old[name]) != 1 or old[name][0] > shape[0]:
            return None
        pad = shape[0] - old[name][0]
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry[key]
            entry[key] = torch.cat([t, t[-1:].expand(pad)])
    return state


class _Constant:
    """A decision source that answers `p` for every archetype without asking anyone (the start grid's
    stand-in for a decision a model cannot run without)."""

    def __init__(self, k: int, p: float = 0.5):
        self.k, self.p = int(k), float(p)

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        return torch.full((self.k,), self.p)


class Forecaster:
    """Weekly fits and forecasts of one configured simulation against observed daily data.

    Args:
        population, archetypes: the scaled synthetic city and its archetypes (None without decisions).
        decisions: decision name -> source (an LLM decision, or a mock in tests); each is frozen per date.
        models: a factory of the configured models (fresh instances for each simulation).
        schedule: the full policy schedule (cut at each as-of date).
        start: the first simulated day (week 0 starts here).
        scale: agents per resident.
        settings: :class:`ForecastSettings`.
        observed: daily observations (date, area, columns of the targets); default: the bundled data.
        alignment: decision -> (a, b) its alignment map starts from.
        sim_kwargs: further :class:`~lpm_llm.core.sim.Simulation` arguments (decision_every, persistence).
        on_step: called as ``on_step(phase, index, loss_or_nan, seconds)``.
    """

    def __init__(
        self, population: Any, archetypes: Any, decisions: Mapping[str, Any] | None,
        models: Callable[[], list[Any]], schedule: InterventionSchedule | None, *, start: str | dt.date,
        scale: float, settings: ForecastSettings | None = None, observed: pd.DataFrame | None = None,
        alignment: Mapping[str, tuple[float, float]] | None = None, device: torch.device | str = "cpu",
        sim_kwargs: Mapping[str, Any] | None = None,
        on_step: Callable[[str, int, float, float], None] | None = None,
    ):
        self.population, self.archetypes = population, archetypes
        self.sources = dict(decisions or {})
        self.models = models
        self.schedule = schedule or InterventionSchedule()
        self.start = as_date(start)
        self.scale = float(scale)
        self.settings = settings or ForecastSettings()
        self.observed = observed
        self.alignment = dict(alignment or {})
        self.device = device
        self.sim_kwargs = dict(sim_kwargs or {})
        self.on_step = on_step

    # -- pieces -----------------------------------------------------------------------------------
    def _simulation(self, days: int, schedule: InterventionSchedule, frozen: Mapping[str, Any], seed: int,
                    as_of: dt.date):
        """A simulation of `days` days from the start; every model with a ``cut_at(date)`` method is
        told the as-of date first, so that the data it reads itself (the vaccination's observed
        doses and eligibility steps, the epidemic's variant introductions) stop there too."""
        from lpm_llm.core.behavior import AlignmentMap
        from lpm_llm.core.sim import Simulation

        kwargs = dict(self.sim_kwargs)
        if self.settings.checkpoint_days:
            kwargs["checkpoint_days"] = self.settings.checkpoint_days
        models = self.models()
        for m in models:
            if hasattr(m, "cut_at"):
                m.cut_at(as_of)
        return Simulation(
            self.population, models, archetypes=self.archetypes, decisions=dict(frozen) or None,
            interventions=schedule, start_date=self.start, days=days, seed=seed, device=self.device,
            alignment={k: AlignmentMap(a=a, b=b) for k, (a, b) in self.alignment.items() if k in frozen},
            **kwargs)

    def _frozen(self, state: FitState | None) -> dict[str, FrozenDecisions]:
        frozen = {}
        for name, src in self.sources.items():
            f = FrozenDecisions(src)
            if state is not None:  # every date is asked once in a stream, by the first run that reaches it
                f.answers = {d: p.clone() for d, p in state.answers.get(name, {}).items()}
            frozen[name] = f
        return frozen

    def _tick(self, phase: str, index: int, value: float, t0: float) -> None:
        if self.on_step is not None:
            self.on_step(phase, index, value, time.perf_counter() - t0)

    def _uncertain_entries(self, space: ParameterSpace, n_months: int, n_areas: int) -> list[tuple[int, str]]:
        """(flat raw index, label) of the scalars and of the last entry of each monthly vector."""
        out, i = [], 0
        for name in space.names:
            spec, n = space.specs[name], space.raw[name].numel()
            monthly = len(spec.shape) == 1 and n in (n_months, n_months - 1) and (
                "month" in spec.doc or n != n_areas)
            if not spec.shape:
                out.append((i, name))
            elif monthly:
                out.append((i + n - 1, f"{name}[{n - 1}]"))
            i += n
        return out

    def _grid_start(self, space: ParameterSpace, objective: SimulationObjective, seed0: int) -> dict[str, Any]:
        """Set each ``start_grid`` parameter of `space` to its best grid value (in turn, the others as
        they stand); returns name -> {"values", "losses", "best"}. `objective`'s simulation runs
        without decisions: asking the LLM at every grid point would cost K questions per decision
        date and point, and a stream keeps the first answers it gets for a date, so they would be
        those of a far-off trajectory; the decisions (and their alignment) enter with the fit. A
        decision that a model cannot run without (the vaccination's) is answered 1/2 by every
        archetype in the grid's runs, the LLM not asked."""
        out: dict[str, Any] = {}
        seeds = [seed0 + 900 + j for j in range(self.settings.seeds_per_step)]
        for name, values in self.settings.start_grid:
            if name not in space.specs:
                raise KeyError(f"start_grid names {name!r}, which is not fitted; fitted: {', '.join(space.names)}")
            shape = tuple(space.specs[name].shape)
            losses = []
            probe = copy.deepcopy(space)
            declared = {*objective.simulation.parameters(), "hospitalisation_scale"}
            with torch.no_grad():
                for v in values:
                    probe.set_values({name: _resized(v, shape)})
                    losses.append(float(objective({k: x for k, x in probe.values().items() if k in declared}, seeds)))
            best = values[int(np.argmin(losses))]
            space.set_values({name: _resized(best, shape)})
            out[name] = {"values": list(values), "losses": losses, "best": best}
            log.info("start grid %s: %s -> %s", name, dict(zip(values, np.round(losses, 4), strict=True)), best)
        return out

    def _track(self, space: ParameterSpace, objective: SimulationObjective, weeks: int, seed0: int) -> dict[str, Any]:
        """A line search along each direction of :data:`TRACK_DIRECTIONS` in turn
        (:attr:`ForecastSettings.track_weeks`); returns name -> {"entries", "factors", "losses",
        "best"}, and "seconds"."""
        s = self.settings
        t0 = time.perf_counter()
        months = objective.simulation.month_index
        first_month = months[max(0, 7 * (weeks - s.track_weeks))]
        declared = {*objective.simulation.parameters(), "hospitalisation_scale"}
        seeds = [seed0 + 700 + j for j in range(s.seeds_per_step)]
        probe = copy.deepcopy(space)
        out: dict[str, Any] = {}
        for round_, (name, step) in itertools.product(range(TRACK_ROUNDS), TRACK_DIRECTIONS):
            if name not in space.specs:
                continue
            spec = space.specs[name]
            base = np.atleast_1d(np.asarray(space.to_dict()[name], dtype=float))
            if not spec.shape:
                entries = [0]
            else:  # a monthly vector: transmission_change's entry i is month i + 1, ascertainment's month i
                offset = 1 if name == "transmission_change" else 0
                entries = list(range(max(0, first_month - offset), int(spec.shape[0])))
            tried: dict[float, float] = {}

            def scaled(log_f: float, base=base, entries=entries, spec=spec) -> Any:
                v = base.copy()
                v[entries] = np.clip(v[entries] * math.exp(log_f), spec.lo, spec.hi)
                return v.tolist() if spec.shape else float(v[0])

            def loss(log_f: float, name=name, scaled=scaled, tried=tried) -> float:
                key = round(log_f, 6)
                if key not in tried:
                    probe.set_values({name: scaled(log_f)})
                    with torch.no_grad():
                        values = {k: x for k, x in probe.values().items() if k in declared}
                        tried[key] = float(objective(values, seeds))
                return tried[key]

            best = min((0.0, -2 * step, -step, step, 2 * step), key=loss)  # the current values first
            best = min((best, best - step / 2, best + step / 2), key=loss)
            space.set_values({name: scaled(best)})
            probe.set_values({name: scaled(best)})
            keys = sorted(tried)
            key = f"{name}:{round_}" if round_ else name
            out[key] = {"entries": entries, "factors": [math.exp(k) for k in keys],
                        "losses": [tried[k] for k in keys], "best": math.exp(best)}
            log.info("track: %s%s x %.3f (losses %s)", name, entries, math.exp(best),
                     {round(math.exp(k), 3): round(tried[k], 4) for k in keys})
        out["seconds"] = time.perf_counter() - t0
        return out

    # -- the update -------------------------------------------------------------------------------
    def update(self, as_of: str | dt.date, state: FitState | None = None) -> tuple[ForecastResult, FitState]:
        """Fit with the data known on `as_of` (warm-started from `state`), forecast; returns the
        forecast and the state for next week."""
        s = self.settings
        as_of = as_date(as_of)
        timings: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        cut = cutoff_date(as_of, s.reporting_lag_days)
        weeks = complete_weeks(self.start, cut)
        if weeks < 2:
            raise ValueError(f"as of {as_of} the data hold {weeks} complete week(s) from {self.start}; need 2 or more")
        daily = observed_as_of(cut, self.observed)
        all_targets = tuple(dict.fromkeys((*s.fit_targets, *s.targets)))
        known = observed_weekly(self.start, weeks, all_targets, observed=daily)
        schedule = schedule_as_of(self.schedule, as_of, s.scenario)
        seed0 = s.seed + 1000 * (as_of - self.start).days
        frozen = self._frozen(state)

        # fit
        fit_sim = self._simulation(7 * weeks, schedule, frozen, seed0, as_of)
        specs = fit_sim.parameters(alignment={k: v for k, v in self.alignment.items() if k in frozen})
        names = list(s.parameters) if s.parameters else list(specs)
        for d in frozen:  # an alignment map's slope and shift are set together
            pair = [f"{d}_alignment_a", f"{d}_alignment_b"]
            if any(n in names for n in pair):
                names += [n for n in pair if n not in names]
        hospitalisation = "hospitalisation_scale" in names  # the IHR's scale, as the whole-period fit's
        if hospitalisation:
            specs["hospitalisation_scale"] = HOSPITALISATION_SCALE
        unknown = sorted(set(names) - set(specs))
        if unknown and fit_sim.month_index[-1] == 0:  # a month-on-month change needs 2 months of window
            log.info("as of %s the window holds one month: %s not fitted yet", as_of, ", ".join(unknown))
            names, unknown = [n for n in names if n in specs], []
        if unknown:
            raise KeyError(f"unknown calibrated parameter(s) {unknown}; known: {', '.join(specs)}")
        space = ParameterSpace({k: specs[k] for k in names}, device=self.device)
        optimizer = None
        if state is not None:
            old_shapes = {k: tuple(np.shape(v)) for k, v in state.params.items() if k in space.specs}
            space.set_values({k: _resized(v, space.specs[k].shape) for k, v in state.params.items()
                              if k in space.specs})
            optimizer = _resize_optimizer(state.optimizer, old_shapes, space)
        def objective_of(sim, smoothness=s.smoothness) -> SimulationObjective:
            observed = {t: known[t] for t in s.fit_targets}
            if hospitalisation or s.loss != "log_mse":
                return PeriodObjective(sim, observed, epidemic=sim.model("epidemic"), weeks=weeks, scale=self.scale,
                                       smoothness=smoothness, loss=s.loss, dispersion=s.dispersion)
            return SimulationObjective(sim, observed, weeks=weeks, scale=self.scale, smoothness=smoothness)

        objective = objective_of(fit_sim)
        grid = {}
        if state is None and s.start_grid:  # without decisions: the LLM is first asked at the chosen start
            required = {u.name for m in self.models() for u in getattr(m, "decisions", ()) if u.required}
            stand_in = {n: _Constant(self.archetypes.k) for n in self.sources if n in required}
            grid_sim = self._simulation(7 * weeks, schedule, stand_in, seed0, as_of)
            grid = self._grid_start(space, objective_of(grid_sim, smoothness=0.0), seed0)
        track = {}
        if state is not None and s.track_weeks and "transmission_change" in space.specs:
            track = self._track(space, objective, weeks, seed0)
        steps = s.steps if state is not None else (s.first_steps if s.first_steps is not None else s.steps)
        history: list[float] = []
        if steps > 0:
            lr = s.first_lr if state is None and s.first_lr is not None else s.lr
            cal = Calibrator(space, steps=steps, lr=lr, seeds_per_step=s.seeds_per_step, seed=seed0,
                             optimizer_state=optimizer,
                             on_step=lambda m, i, loss, sec: self._tick("fit", i, loss, t0)).fit(objective)
            space, history, optimizer = cal.space_, cal.loss_history_, cal.optimizer_state_
        timings["fit"] = time.perf_counter() - t0
        log.info("as of %s: fit %.1f s (%d steps)", as_of, timings["fit"], steps)

        # curvature along the forecast-driving coordinates (common seeds)
        t1 = time.perf_counter()
        probe = copy.deepcopy(space)
        v0 = space.get_vector()
        lap_seeds = [seed0 + 500 + j for j in range(s.laplace_seeds)]
        n_months = fit_sim.month_index[-1] + 1
        entries = self._uncertain_entries(space, n_months, len(fit_sim.areas))
        n_resid = sum(int(known[t].numel()) for t in s.fit_targets) / len(s.fit_targets)
        sd: dict[str, float] = {}
        sd_vec = torch.zeros_like(v0)
        with torch.no_grad():
            base = float(objective(space.values(), lap_seeds))
            sigma2 = max(base, 1e-3)
            for j, (idx, label) in enumerate(entries):
                losses = []
                for sign in (1.0, -1.0):
                    v = v0.clone()
                    v[idx] += sign * s.laplace_step
                    probe.set_vector(v)
                    losses.append(float(objective(probe.values(), lap_seeds)))
                curv = (losses[0] - 2 * base + losses[1]) / s.laplace_step ** 2
                precision = n_resid * curv / (2 * sigma2)
                value = min(1.0 / math.sqrt(precision), s.max_sd) if precision > 0 else s.max_sd
                sd[label] = value
                sd_vec[idx] = value
                self._tick("laplace", j, curv, t0)
        timings["laplace"] = time.perf_counter() - t1
        log.info("as of %s: curvature %.1f s (%d entries)", as_of, timings["laplace"], len(entries))

        # ensemble: decision dates not asked before are asked in member 0's run (at the fit)
        t2 = time.perf_counter()
        total = weeks + s.horizon
        fc_sim = self._simulation(7 * total, schedule, frozen, seed0, as_of)
        rng = np.random.default_rng(seed0)
        z = rng.standard_normal((s.members, v0.numel()))
        z[0] = 0.0
        runs = {t: [] for t in all_targets}
        with torch.no_grad():
            for j in range(s.members):
                probe.set_vector(v0 + sd_vec * torch.as_tensor(z[j]))
                set_with_hospitalisation(fc_sim, fc_sim.model("epidemic"), probe.values())
                fc_sim.seed = seed0 + 10_000 + j
                series = fc_sim.run().series
                for t in all_targets:
                    runs[t].append((simulated_weekly(series[SERIES_OF[t]], total) / self.scale).cpu().numpy())
                self._tick("ensemble", j, float("nan"), t0)
        timings["ensemble"] = time.perf_counter() - t2
        log.info("as of %s: ensemble %.1f s (%d members)", as_of, timings["ensemble"], s.members)

        # reporting noise and quantiles
        areas = list(BOROUGHS)
        week_ends = [self.start + dt.timedelta(days=7 * (weeks + h) - 1) for h in range(1, s.horizon + 1)]
        samples, dispersion, fitted_rows, known_rows = {}, {}, [], []
        for t in all_targets:
            x = np.stack(runs[t])  # (S, W+H, B)
            obs = known[t].cpu().numpy()
            lo = max(0, weeks - s.dispersion_weeks)
            if s.noise == "negbin":
                k = nb_dispersion(obs[lo:weeks], x[:, lo:weeks].mean(0))
                dispersion[t] = {"negbin_k": k}
                mu = np.clip(x[:, weeks:], 0, None)  # (S, H, B)
                draws = rng.negative_binomial(k, k / (k + mu[None] + 1e-12), size=(s.draws, *mu.shape))
                draws = draws.reshape(-1, s.horizon, len(areas)).astype(float)
                samples[t] = np.concatenate([draws, draws.sum(2, keepdims=True)], axis=2)
            else:  # log-normal around each member, the boroughs' sd pooled, the city's its own
                xa = np.concatenate([x, x.sum(2, keepdims=True)], axis=2)  # (S, W+H, B+1)
                oa = np.concatenate([obs, obs.sum(1, keepdims=True)], axis=1)
                sd_b = log_residual_sd(oa[lo:weeks, :-1], xa[:, lo:weeks, :-1].mean(0))
                sd_c = log_residual_sd(oa[lo:weeks, -1:], xa[:, lo:weeks, -1:].mean(0))
                dispersion[t] = {"log_sd_boroughs": sd_b, "log_sd_city": sd_c}
                sd_loc = np.array([sd_b] * len(areas) + [sd_c])
                eps = rng.standard_normal((s.draws, *xa[:, weeks:].shape))
                draws = np.expm1(np.log1p(np.clip(xa[None, :, weeks:], 0, None)) + sd_loc * eps)
                samples[t] = np.clip(draws, 0, None).reshape(-1, s.horizon, len(areas) + 1)
            med = np.median(np.concatenate([x, x.sum(2, keepdims=True)], axis=2)[:, :weeks], axis=0)
            full_obs = np.concatenate([obs, obs.sum(1, keepdims=True)], axis=1)
            for w in range(weeks):
                end = (self.start + dt.timedelta(days=7 * w + 6)).isoformat()
                for a, area in enumerate([*areas, "NYC"]):
                    fitted_rows.append((t, end, LOCATION_OF[area], float(med[w, a])))
                    known_rows.append((t, end, LOCATION_OF[area], float(full_obs[w, a])))
        forecast = hub_frame({t: samples[t] for t in s.targets}, as_of, week_ends)
        cols = ["target", "target_end_date", "location", "value"]
        timings["total"] = time.perf_counter() - t0
        timings["cpu_total"] = time.process_time() - c0  # all threads (the in-process LLM included)
        settings = {"start": self.start.isoformat(), "as_of": as_of.isoformat(), "cutoff": cut.isoformat(),
                    "weeks_fitted": weeks, "horizon": s.horizon, "targets": list(s.targets),
                    "fit_targets": list(s.fit_targets), "steps": steps,
                    "lr": s.first_lr if state is None and s.first_lr is not None else s.lr, "members": s.members,
                    "draws": s.draws, "scale": self.scale, "agents": int(self.population.n),
                    "parameters": list(space.names), "seed": seed0, "warm_start": state is not None,
                    "incomplete_week": "dropped", "reporting_lag_days": s.reporting_lag_days,
                    **({"start_grid": grid} if grid else {}), **({"track": track} if track else {})}
        result = ForecastResult(
            as_of=as_of, forecast=forecast, known=pd.DataFrame(known_rows, columns=cols),
            fitted=pd.DataFrame(fitted_rows, columns=cols), params=space.to_dict(), sd=sd,
            dispersion=dispersion, loss_history=history, timings=timings, settings=settings)
        answers = {name: {d: p.clone() for d, p in f.answers.items()} for name, f in frozen.items()}
        new_state = FitState(as_of.isoformat(), space.to_dict(), optimizer, answers)
        return result, new_state
