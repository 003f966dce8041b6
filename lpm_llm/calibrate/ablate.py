"""What the LLM adds: the same calibration with other sources of behaviour, scored out of sample.

The reference comparison of LLM archetypes with heuristic agents (AgentTorch, "On the limits of
agency in agent-based models", 2024) on New York's disease waves and unemployment, on the bundled
data. Each behaviour source is calibrated with the same budget (Adam steps x seeds) on the same
window, then scored on that window and on the weeks (months) after it, which no fit saw:

- ``llm``: the LLM archetypes' answers (frozen per decision step, :class:`FrozenDecisions`) through
  the decision's calibrated alignment map; after the fit the answers are re-asked at the fitted
  trajectory (the cases the archetypes see are the fitted model's) and the fit continues from there,
  until the answers stop changing or ``rounds`` rounds have run;
- ``heuristic``: :class:`LogisticDecision`, the probability a logistic function of the archetype's
  borough's recent cases per 100,000 and the active policies, its coefficients calibrated;
- ``constant``: :class:`ConstantProbability`, one calibrated probability for every archetype and step;
- ``none``: no isolation at all (epidemic); ``persistence`` (labour): the last fitted month repeated.

The heuristic and constant sources are *differentiable decision sources*: ``parameters()`` gives
their calibrated :class:`~lpm_llm.core.parameters.Bounded` coefficients and ``set_parameters`` takes
their (differentiable) values for the next simulation, so that gradients reach them through the
straight-through draws just as they reach the LLM's alignment map. :func:`with_decision_parameters`
routes a calibration's values between such sources and the simulation.

Identifiability: in every epidemic fit here the monthly ``transmission_change`` is held at 1 (see
:data:`BEHAVIOUR_EXPLAINS`): the change of transmission beyond the dated policy schedule is what a
behaviour source claims to explain, so it is left to the behaviour.

Entry points: :func:`ablate_first_wave`, :func:`ablate_labor`; the ``lpm-llm ablate EXPERIMENT.yaml``
command is :func:`lpm_llm.runner.ablate.ablate_experiment`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm_llm.calibrate.fit import (
    BEHAVIOUR_EXPLAINS,
    Calibrator,
    FrozenDecisions,
    SimulationObjective,
    first_wave_space,
)
from lpm_llm.calibrate.targets import SERIES_OF, log_mse, observed_weekly, simulated_weekly
from lpm_llm.core.behavior import majority_area
from lpm_llm.core.interventions import InterventionSchedule, Reopening, StayAtHome
from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.core.sim import months_between
from lpm_llm.population import BOROUGHS, Population

log = logging.getLogger(__name__)

__all__ = [
    "BEHAVIOUR_EXPLAINS",
    "EPIDEMIC_SOURCES",
    "LABOR_SOURCES",
    "AblationReport",
    "ConstantProbability",
    "LogisticDecision",
    "ablate_first_wave",
    "ablate_labor",
    "with_decision_parameters",
]

EPIDEMIC_SOURCES = ("llm", "heuristic", "constant", "none")
LABOR_SOURCES = ("llm", "heuristic", "constant", "persistence")
FORECAST_DATES = ("2020-04-11", "2020-05-02", "2020-05-23")
"""The default forecast dates of the epidemic ablation: three Saturdays of the first wave, three weeks
apart (growth, peak, decline), chosen before any result was seen."""
FIRST_WAVE_FITTED = ("beta_scale", "initial_infections_per_100k", "ascertainment", "ascertainment_by_borough",
                     "fatality_scale")


# -- differentiable decision sources -------------------------------------------------------------------


def _count(value: Any) -> float:
    """A context count as the prompts show it ("1,234") -> 1234.0."""
    return float(str(value).replace(",", ""))


class LogisticDecision:
    """``p_k = sigmoid(w . x_k)``: a heuristic decision, logistic in features of the context.

    ``x_k`` = (1, log1p(cases of the last 7 days per 100,000 residents of archetype k's borough),
    *policy features of the step's date*). The cases come from the context exactly as the LLM sees
    them (``cases_week``, counts for the real borough); ``policy(date) -> list[float]`` gives the policy
    features. The coefficients are calibrated parameters named ``<decision>_heuristic_<feature>``.

    Args:
        decision: the decision's name (``isolate``, ``work``).
        home_population: (K,) residents of each archetype's borough (to turn counts per 100,000).
        policy: date -> policy feature values; ``policy_names`` their names.
        intercept: initial intercept (the logit of the starting probability); slopes start at 0.
    """

    def __init__(self, decision: str, home_population: Sequence[float], policy: Callable[[dt.date], Sequence[float]],
                 policy_names: Sequence[str], intercept: float = 0.0):
        self.decision = decision
        self.home_population = torch.as_tensor(list(home_population), dtype=torch.float64)
        self.policy = policy
        self.feature_names = ("intercept", "cases", *policy_names)
        self.intercept = float(intercept)
        self.values: dict[str, torch.Tensor] = {}

    def parameters(self) -> dict[str, Bounded]:
        out = {}
        for name in self.feature_names:
            lo, hi = (-8.0, 8.0) if name == "intercept" else (-4.0, 4.0)
            init = min(max(self.intercept, lo), hi) if name == "intercept" else 0.0
            out[f"{self.decision}_heuristic_{name}"] = Bounded(
                lo, hi, init, doc=f"logit coefficient of the heuristic {self.decision} decision: {name}")
        return out

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        self.values = dict(values)

    def features(self, context: Mapping[str, Any]) -> torch.Tensor:
        """(K, F) float32 features of a decision step."""
        counts = torch.tensor([_count(c) for c in context["cases_week"]], dtype=torch.float64)
        if counts.shape != self.home_population.shape:
            raise ValueError(f"cases_week has {counts.numel()} archetypes, "
                             f"home_population {self.home_population.numel()}")
        cases = torch.log1p(counts / self.home_population.clamp(min=1.0) * 1e5)
        day = dt.date.fromisoformat(str(context["date"])[:10])
        policy = torch.as_tensor([float(v) for v in self.policy(day)], dtype=torch.float64)
        k = counts.numel()
        return torch.cat([torch.ones(k, 1, dtype=torch.float64), cases[:, None], policy.expand(k, -1)], 1).float()

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        x = self.features(context)
        defaults = {k: torch.tensor(float(v.init)) for k, v in self.parameters().items()}
        w = torch.stack([self.values.get(k, defaults[k]).reshape(()).to(torch.float32) for k in defaults])
        return torch.sigmoid(x @ w)


class ConstantProbability:
    """One calibrated probability ``<decision>_constant`` for every archetype and step."""

    def __init__(self, decision: str, k: int, init: float = 0.3):
        self.decision, self.k, self.init = decision, int(k), float(init)
        self.values: dict[str, torch.Tensor] = {}

    def parameters(self) -> dict[str, Bounded]:
        doc = f"probability of the {self.decision} decision, every archetype"
        return {f"{self.decision}_constant": Bounded(0.001, 0.999, self.init, doc=doc)}

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        self.values = dict(values)

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        p = self.values.get(f"{self.decision}_constant", torch.tensor(self.init))
        return p.reshape(()).to(torch.float32).expand(self.k)


class _Routed:
    """``objective(values, seeds)`` with the values of differentiable decision sources routed to them."""

    def __init__(self, objective: Callable, sources: Sequence[Any]):
        self.objective = objective
        self.owned = [(src, set(src.parameters())) for src in sources]

    def route(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Give each source its values; return the others (the simulation's)."""
        rest = dict(values)
        for source, names in self.owned:
            source.set_parameters({n: rest.pop(n) for n in names if n in rest})
        return rest

    def __call__(self, values: Mapping[str, torch.Tensor], seeds: Any) -> torch.Tensor:
        return self.objective(self.route(values), seeds)


def with_decision_parameters(objective: Callable, sources: Sequence[Any]) -> _Routed:
    """``objective(values, seeds)`` for a space holding the simulation's parameters and those of the
    differentiable decision `sources`: their values go to the sources (``set_parameters``), the rest
    to `objective`; ``.route(values)`` does the routing alone."""
    return _Routed(objective, sources)


def isolation_policy_features(
    schedule: InterventionSchedule,
) -> tuple[Callable[[dt.date], list[float]], tuple[str, ...]]:
    """The policy features of the heuristic isolation decision on a date: (stay-at-home strength,
    masks): 1 under a stay-at-home order, (4 - phase) / 4 in a reopening phase, else 0; 1 when a
    mask order is in force."""
    def features(day: dt.date) -> list[float]:
        stay = 0.0
        for p in schedule.policies:
            if p.is_active(day):
                if isinstance(p, StayAtHome):
                    stay = max(stay, 1.0)
                elif isinstance(p, Reopening):
                    stay = max(stay, (4 - min(p.phase, 4)) / 4)
        masks = float(any(p.is_active(day) and p.kind == "masks" for p in schedule.policies))
        return [stay, masks]

    return features, ("stay_at_home", "masks")


def labor_policy_features(day: dt.date) -> list[float]:
    """The restriction of the labour calendar over the step ending in ``day``'s month."""
    from lpm_llm.models.labor import labor_period, policy_for_period

    return [policy_for_period(*labor_period(day)).restriction]


def home_population(population: Population, archetypes: Any) -> list[float]:
    """(K,) residents of each archetype's majority borough (bundled marginals)."""
    from lpm_llm.models.labor import borough_population

    home = majority_area(archetypes.index, population["borough"], int(archetypes.k), len(BOROUGHS))
    pops = borough_population()
    return [pops[BOROUGHS[h]][0] for h in home]


# -- the report ----------------------------------------------------------------------------------------


@dataclass
class AblationReport:
    """Scores of each behaviour source (``rows``: one per forecast date and source) and settings.

    ``rows`` columns (epidemic): forecast_date, source, fit_loss, fit_mae_cases, fit_mae_deaths,
    forecast_loss, forecast_mae_cases, forecast_mae_deaths, persistence_mae_cases,
    persistence_mae_deaths, rank (by forecast_loss, 1 = best, per forecast date), steps, simulations,
    rounds, answer_change, seconds, params. Labour: source, train_mae, holdout_mae, rank, steps, params.
    MAEs are per borough-week (month) of the real city; losses are :func:`log_mse`.
    """

    kind: str
    rows: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Mean over forecast dates per source (epidemic), or the rows (labour)."""
        if self.kind != "epidemic":
            return self.rows
        cols = ["fit_loss", "fit_mae_cases", "fit_mae_deaths", "forecast_loss", "forecast_mae_cases",
                "forecast_mae_deaths", "rank"]
        out = self.rows.groupby("source", sort=False)[cols].mean()
        out["rank_of_mean_forecast_loss"] = out["forecast_loss"].rank(method="min").astype(int)
        return out.reset_index()

    def to_markdown(self) -> str:
        def fmt(df: pd.DataFrame) -> str:
            cols = [c for c in df.columns if c not in ("params",)]
            head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            body = "".join("| " + " | ".join(_cell(r[c]) for c in cols) + " |\n" for _, r in df.iterrows())
            return head + body

        text = fmt(self.rows)
        if self.kind == "epidemic":
            text += "\nMean over forecast dates:\n\n" + fmt(self.summary())
        return text

    def save(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"ablation_{self.kind}.csv", out_dir / f"ablation_{self.kind}.json",
                 out_dir / f"ablation_{self.kind}.md"]
        self.rows.drop(columns=["params"], errors="ignore").to_csv(paths[0], index=False)
        paths[1].write_text(json.dumps({"settings": self.settings, "rows": self.rows.to_dict("records")},
                                       indent=2, default=str))
        paths[2].write_text(self.to_markdown())
        return paths


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


# -- the epidemic ---------------------------------------------------------------------------------------


def _weeks_before(start: dt.date, forecast_date: dt.date) -> int:
    """Complete 7-day weeks from `start` that end before `forecast_date`."""
    return (forecast_date - start).days // 7


def ablate_first_wave(
    population: Population,
    archetypes: Any,
    llm: Any,
    params: Any,
    interventions: InterventionSchedule | None,
    *,
    start: str | dt.date = "2020-03-01",
    forecast_dates: Sequence[str | dt.date] = FORECAST_DATES,
    forecast_weeks: int = 4,
    sources: Sequence[str] = EPIDEMIC_SOURCES,
    targets: Sequence[str] = ("cases", "deaths"),
    steps: int = 15,
    lr: float = 0.1,
    seeds_per_step: int = 1,
    eval_seeds: int = 2,
    rounds: int = 3,
    tolerance: float = 0.02,
    scale: float | None = None,
    observed: pd.DataFrame | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_step: Callable[[str, int, float, float], None] | None = None,
) -> AblationReport:
    """Calibrate the epidemic with each behaviour source on the weeks from `start` to each forecast
    date, and score the fit and the `forecast_weeks` weeks after it.

    Each fit: Adam, ``steps`` steps of ``seeds_per_step`` seeds (fresh seeds each step, the same for
    every source), learning rate `lr`, over :data:`FIRST_WAVE_FITTED` plus the source's own
    parameters (the LLM's alignment map, the heuristic's coefficients, the constant), with
    ``transmission_change`` held at 1 (:data:`BEHAVIOUR_EXPLAINS`). The LLM's answers are then
    re-asked at the fitted trajectory, over the fit and forecast weeks (these answers are the ones
    scored); while the fit-window answers moved by more than `tolerance` (largest absolute change of
    a probability) and fewer than `rounds` re-asks were made, the fit continues from where it stood
    with the new answers, ``steps`` more steps, and the LLM is asked again (at most `rounds` re-asks
    and `rounds` - 1 refits).
    The other sources then get as many steps as the LLM used, so that every source has the same
    budget. A forecast uses only data before its date: the observations of later weeks enter its
    scores, never its fit; the decision contexts are the simulation's own cases; the policy schedule
    is the one known on the date (:meth:`~lpm_llm.core.interventions.InterventionSchedule.as_of`: later policies
    removed, those in force held open-ended), in the simulation and in the heuristic's features.

    Scores (on ``eval_seeds`` common seeds 10000 + j, mean weekly series): ``fit_loss`` and
    ``forecast_loss`` (:func:`log_mse` over the targets), MAE per borough-week of cases and deaths
    (real city), the persistence forecast's MAE (the last fitted week repeated), and the rank of
    each source by forecast loss at each date.
    """
    from lpm_llm.core.sim import Simulation
    from lpm_llm.models.epidemic import Epidemic

    start = start if isinstance(start, dt.date) else dt.date.fromisoformat(str(start))
    dates = [d if isinstance(d, dt.date) else dt.date.fromisoformat(str(d)) for d in forecast_dates]
    unknown = sorted(set(sources) - set(EPIDEMIC_SOURCES))
    if unknown:
        raise ValueError(f"unknown behaviour source(s) {unknown}; known: {', '.join(EPIDEMIC_SOURCES)}")
    if "llm" in sources and llm is None:
        raise ValueError("the 'llm' source needs an LLM decision source")
    if rounds < 1 or steps < 1 or forecast_weeks < 1:
        raise ValueError(f"rounds, steps and forecast_weeks must be >= 1, got {rounds}, {steps}, {forecast_weeks}")
    scale = float(scale) if scale is not None else population.scale or population.n / 8_336_817
    params = params.model_copy(update=dict.fromkeys(BEHAVIOUR_EXPLAINS, 1.0))  # what behaviour explains
    full_schedule = interventions or InterventionSchedule()
    homes = home_population(population, archetypes) if archetypes is not None else []
    eval_list = [10_000 + seed + j for j in range(eval_seeds)]
    rows = []
    t_all = time.perf_counter()
    for date in dates:
        weeks = _weeks_before(start, date)
        if weeks < 2:
            raise ValueError(f"forecast date {date} leaves {weeks} complete week(s) after {start}; need 2 or more")
        total = weeks + forecast_weeks
        fit_end = start + dt.timedelta(days=7 * weeks - 1)
        obs_fit = observed_weekly(start, weeks, targets, observed=_before(observed, date), device=device)
        obs_all = observed_weekly(start, total, targets, observed=observed, device=device)
        n_months = months_between(start, fit_end) + 1
        budget = steps
        # the policies as known on the forecast date: later ones removed, those in force held open-ended
        schedule = full_schedule.as_of(date)
        policy, policy_names = isolation_policy_features(schedule)
        for name in [s for s in ("llm", "heuristic", "constant", "none") if s in sources]:
            t0 = time.perf_counter()
            own: list[Any] = []
            decision: Any = None
            if name == "llm":
                decision = FrozenDecisions(llm)
            elif name == "heuristic":
                own = [LogisticDecision("isolate", homes, policy, policy_names, intercept=math.log(0.3 / 0.7))]
                decision = own[0]
            elif name == "constant":
                own = [ConstantProbability("isolate", int(archetypes.k))]
                decision = own[0]

            def simulation(days: int, decision: Any = decision, schedule: InterventionSchedule = schedule) -> Any:
                return Simulation(population, [Epidemic(params)], archetypes=archetypes if decision else None,
                                  decisions={"isolate": decision} if decision is not None else None,
                                  interventions=schedule, start_date=start, days=days, seed=seed, device=device)

            space = first_wave_space(params, n_months, alignment=name == "llm", include=[
                *FIRST_WAVE_FITTED, *(("isolate_alignment_a", "isolate_alignment_b") if name == "llm" else ())],
                device=device)
            if own:
                space = ParameterSpace({**space.specs, **own[0].parameters()}, device=device)
            objective = SimulationObjective(simulation(7 * weeks), obs_fit, weeks=weeks, scale=scale)
            fit_objective = with_decision_parameters(objective, own)
            n_steps = steps if name == "llm" else budget
            used, change, rounds_run = 0, float("nan"), 1
            fit = Calibrator(space, steps=n_steps, lr=lr, seeds_per_step=seeds_per_step, seed=seed,
                             on_step=on_step).fit(fit_objective)
            used += n_steps
            sims = objective.simulations
            forecaster_decision = decision
            if name == "llm":
                for r in range(1, rounds + 1):
                    rounds_run = r
                    fresh = FrozenDecisions(llm)  # re-asked at the fitted trajectory (fit and forecast weeks)
                    with torch.no_grad():
                        probe = simulation(7 * total, fresh)
                        probe.set_parameters(fit.space_.values())
                        probe.run()
                    sims += 1
                    common = [d for d in decision.answers if d <= fit_end.isoformat()]
                    change = max(float((fresh.answers[d] - decision.answers[d]).abs().max()) for d in common)
                    decision = fresh
                    if change <= tolerance or r == rounds:
                        break
                    objective = SimulationObjective(simulation(7 * weeks, fresh), obs_fit, weeks=weeks, scale=scale)
                    fit = Calibrator(fit.space_, steps=steps, lr=lr, seeds_per_step=seeds_per_step,
                                     seed=seed + used * seeds_per_step, on_step=on_step).fit(objective)
                    used += steps
                    sims += objective.simulations
                forecaster_decision = decision
                budget = used
            forecaster = SimulationObjective(simulation(7 * total, forecaster_decision), obs_all, weeks=total,
                                             scale=scale)
            score = _score(with_decision_parameters(forecaster, own), forecaster, fit.space_.values(), obs_all,
                           weeks, scale, eval_list)
            rows.append({"forecast_date": date.isoformat(), "source": name, **score, "steps": used,
                         "simulations": sims + len(eval_list), "rounds": rounds_run, "answer_change": change,
                         "seconds": time.perf_counter() - t0,
                         "params": {k: v for k, v in fit.space_.to_dict().items()}})
            log.info("ablation %s %s: fit loss %.3f, forecast loss %.3f, forecast MAE cases %.1f",
                     date, name, score["fit_loss"], score["forecast_loss"], score["forecast_mae_cases"])
    frame = pd.DataFrame(rows)
    frame.insert(frame.columns.get_loc("steps"), "rank",
                 frame.groupby("forecast_date")["forecast_loss"].rank(method="min").astype(int))
    settings = {"start": start.isoformat(), "forecast_dates": [d.isoformat() for d in dates],
                "forecast_weeks": forecast_weeks, "sources": list(sources), "targets": list(targets),
                "steps": steps, "lr": lr, "seeds_per_step": seeds_per_step, "eval_seeds": eval_list,
                "rounds": rounds, "tolerance": tolerance, "scale": scale, "agents": population.n,
                "fitted": [*FIRST_WAVE_FITTED, "+ the source's own parameters"],
                "held_fixed": {"transmission_change": 1.0}, "seconds": time.perf_counter() - t_all}
    return AblationReport("epidemic", frame, settings)


def _before(observed: pd.DataFrame | None, date: dt.date) -> pd.DataFrame:
    """The daily observations strictly before `date` (the bundled data by default)."""
    from lpm_llm.data.observed import load_covid

    obs = load_covid() if observed is None else observed
    return obs[pd.to_datetime(obs["date"]) < pd.Timestamp(date)].copy()


def _score(objective: _Routed, forecaster: SimulationObjective, values: Mapping[str, torch.Tensor],
           obs_all: Mapping[str, torch.Tensor], weeks: int, scale: float, seeds: Sequence[int]) -> dict[str, float]:
    """Fit-window and forecast scores of the mean weekly series over `seeds`."""
    runs: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        rest = objective.route(values)
        for s in seeds:
            results = forecaster.run(rest, s)
            runs.append({t: simulated_weekly(results.series[SERIES_OF[t]], forecaster.weeks) for t in obs_all})
    mean = {t: torch.stack([r[t] for r in runs]).mean(0) for t in obs_all}
    out = {"fit_loss": float(log_mse({t: v[:weeks] for t, v in mean.items()},
                                     {t: v[:weeks] for t, v in obs_all.items()}, scale)),
           "forecast_loss": float(log_mse({t: v[weeks:] for t, v in mean.items()},
                                          {t: v[weeks:] for t, v in obs_all.items()}, scale))}
    for t in obs_all:
        sim_t, obs_t = (mean[t] / scale).cpu().numpy(), obs_all[t].cpu().numpy()
        out[f"fit_mae_{t}"] = float(np.abs(sim_t[:weeks] - obs_t[:weeks]).mean())
        out[f"forecast_mae_{t}"] = float(np.abs(sim_t[weeks:] - obs_t[weeks:]).mean())
        out[f"persistence_mae_{t}"] = float(np.abs(obs_t[weeks - 1][None] - obs_t[weeks:]).mean())
    return out


# -- the labour market ----------------------------------------------------------------------------------


def ablate_labor(
    population: Population,
    archetypes: Any,
    llm: Any,
    *,
    start: str | dt.date = "2020-02",
    end: str | dt.date = "2021-06",
    holdout: int = 3,
    params: Any = None,
    alignment: tuple[float, float] | None = None,
    sources: Sequence[str] = LABOR_SOURCES,
    steps: int = 40,
    lr: float = 0.1,
    seeds: Sequence[int] = (0, 1),
    hysteresis_start: float = 0.3,
    on_step: Callable[[int, float], None] | None = None,
) -> AblationReport:
    """The labour model's monthly work decision from each source, fitted by
    :func:`~lpm_llm.calibrate.labor_fit.calibrate_labor` with the same steps, seeds and learning rate
    on the same months, the last `holdout` held out: MAE (percentage points) of the unemployment
    rate by borough on the fitted and on the held-out months, and the rank by held-out MAE.

    ``persistence`` is the last fitted month repeated (no fit). The fits start the labour
    parameters from `params`, with ``hysteresis`` at least `hysteresis_start` (mid-range: the
    parameter is fitted, and at its bound 0 the bounded transform has almost no gradient); the LLM's
    alignment map from `alignment`; the heuristic at P(work) = 0.9 with zero slopes; the constant at 0.9.
    """
    from lpm_llm.calibrate.labor_fit import calibrate_labor
    from lpm_llm.models.labor import LaborParams

    unknown = sorted(set(sources) - set(LABOR_SOURCES))
    if unknown:
        raise ValueError(f"unknown behaviour source(s) {unknown}; known: {', '.join(LABOR_SOURCES)}")
    params = params or LaborParams()
    params = params.model_copy(update={"hysteresis": max(params.hysteresis, hysteresis_start)})
    homes = home_population(population, archetypes)
    rows, persistence = [], None
    t_all = time.perf_counter()
    for name in [s for s in LABOR_SOURCES if s in sources and s != "persistence"]:
        t0 = time.perf_counter()
        if name == "llm":
            source, align_start = llm, alignment
        elif name == "heuristic":
            source, align_start = LogisticDecision("work", homes, labor_policy_features, ("restriction",),
                                                   intercept=math.log(0.9 / 0.1)), None
        else:
            source, align_start = ConstantProbability("work", int(archetypes.k), init=0.9), None
        fit = calibrate_labor(population, archetypes, source, start=start, end=end, holdout=holdout, params=params,
                              seeds=seeds, iterations=steps, lr=lr, alignment=align_start, on_step=on_step)
        persistence = fit.persistence_mae_
        fitted = {**fit.params_.model_dump(mode="json"), **(fit.decision_params_ or {})}
        if name == "llm":
            fitted["work_alignment"] = list(fit.alignment_)
        rows.append({"source": name, "train_mae": fit.train_mae_, "holdout_mae": fit.holdout_mae_,
                     "steps": steps, "seconds": time.perf_counter() - t0, "params": fitted})
        log.info("labour ablation %s: train MAE %.2f pp, held-out MAE %.2f pp", name, fit.train_mae_,
                 fit.holdout_mae_)
    if "persistence" in sources:
        if persistence is None:
            raise ValueError("the persistence row is scored alongside a fitted source; name one more source")
        rows.append({"source": "persistence", "train_mae": float("nan"), "holdout_mae": persistence,
                     "steps": 0, "seconds": 0.0, "params": {}})
    frame = pd.DataFrame(rows)
    frame.insert(3, "rank", frame["holdout_mae"].rank(method="min").astype(int))
    settings = {"start": str(start), "end": str(end), "holdout_months": holdout, "steps": steps, "lr": lr,
                "seeds": list(seeds), "hysteresis_start": hysteresis_start, "agents": population.n,
                "held_out_cases": "the last training month's (a forecast does not see later cases)",
                "seconds": time.perf_counter() - t_all}
    return AblationReport("labor", frame, settings)
