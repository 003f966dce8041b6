"""Calibration of the labour model to monthly unemployment by borough, with held-out months.

:func:`calibrate_labor` fits the non-LLM parameters (job finding, exits, shocks by industry, the
alignment map) by Adam through the stochastic monthly steps, then forecasts the held-out months and
scores them against a persistence forecast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import pandas as pd
import torch

from lpm_llm.core.behavior import DecisionSource
from lpm_llm.data.observed import load_unemployment
from lpm_llm.models.labor import (
    INDUSTRIES,
    Labor,
    LaborInputs,
    LaborParams,
    labor_period,
    month_range,
    observed_labor_inputs,
    policy_for_period,
    rate_table,
)
from lpm_llm.population import BOROUGHS, Population

log = logging.getLogger(__name__)


@dataclass
class LaborFit:
    """Result of :func:`calibrate_labor` (fitted values end in ``_``).

    Attributes:
        params_: fitted parameters.
        alignment_: the fitted (a, b) of the work decision's alignment map.
        calibrator_: the :class:`~lpm_llm.calibrate.Calibrator` that fitted them.
        loss_history_: training loss per iteration (mean squared error of the rate, pp^2).
        fitted_: ``date, area, observed, simulated`` over the training months (simulated: seed mean).
        forecast_: ``date, area, observed, simulated, persistence`` over the held-out months.
        train_mae_, holdout_mae_, persistence_mae_: mean absolute errors in percentage points.
    """

    params_: LaborParams
    alignment_: tuple[float, float]
    calibrator_: Any
    loss_history_: list[float]
    fitted_: pd.DataFrame
    forecast_: pd.DataFrame
    train_mae_: float
    holdout_mae_: float
    persistence_mae_: float
    decision_params_: dict[str, Any] | None = None


def held_out_inputs(last: LaborInputs, months: Sequence[date]) -> list[LaborInputs]:
    """Inputs of held-out months: the policy calendar's, with the last known cases (``last``'s,
    trend 0) instead of the observed ones, which a forecast made at the end of training cannot see."""
    return [LaborInputs(month=m, policy=policy_for_period(*labor_period(m)), cases_week=last.cases_week.clone(),
                        cases_trend=torch.zeros_like(last.cases_trend)) for m in months]


def _decision_parameters(source: Any) -> dict[str, Any]:
    """name -> Bounded of a decision source's own calibrated parameters (empty for the LLM's)."""
    specs = getattr(source, "parameters", None)
    return dict(specs()) if callable(specs) and callable(getattr(source, "set_parameters", None)) else {}



def calibrate_labor(
    population: Population,
    archetypes: Any,
    work_decision: DecisionSource,
    *,
    start: date | str = "2020-03",
    end: date | str = "2021-06",
    holdout: int = 3,
    params: LaborParams | None = None,
    seeds: Sequence[int] = (0, 1),
    iterations: int = 100,
    lr: float = 0.05,
    lr_final: float | None = None,
    observed: pd.DataFrame | None = None,
    inputs: Sequence[LaborInputs] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    alignment: tuple[float, float] | None = None,
    stream: int = 7919,
) -> LaborFit:
    """Fit the non-LLM parameters (rates, shocks, the work decision's alignment map, starting from
    `alignment` or the identity) to the monthly unemployment rate, with the one calibration loop
    (:class:`~lpm_llm.calibrate.Calibrator`, Adam) through a :class:`~lpm_llm.core.sim.Simulation`
    of the :class:`~lpm_llm.models.labor.Labor` model.

    The loss is the mean squared error (percentage points) of the simulated rate by borough over the
    months after ``start`` up to ``end`` minus ``holdout`` months, averaged over ``seeds`` (the same
    seeds every iteration: common random numbers). Prompts show observed unemployment rates, so the
    decision source is asked once per month, not once per iteration. The held-out months are then
    forecast (prompts show simulated rates after the last training month) and compared with a
    persistence baseline (last training month repeated).

    A forecast sees nothing after its last training month: the held-out months get the policy calendar
    (announced measures, :func:`~lpm_llm.models.labor.policy_for_period`) but the last training month's
    reported cases (the last known; trend 0), never the observed future cases, and their prompts show
    the simulated unemployment rate. `inputs`, when given, are used for the training months only.

    A `work_decision` with calibrated parameters of its own (a ``parameters()`` method returning
    name -> :class:`~lpm_llm.core.parameters.Bounded` and ``set_parameters(values)``, such as
    :class:`lpm_llm.calibrate.ablate.LogisticDecision`) is not frozen: it is evaluated at every
    simulation, its parameters are fitted with the labour model's, and no alignment map is added.
    """
    obs = load_unemployment() if observed is None else observed
    dates = month_range(start, len(pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="MS")))
    n_train = len(dates) - holdout
    if holdout < 1 or n_train < 3:
        raise ValueError(f"{start} to {end} has {len(dates)} months; need holdout >= 1 and at least 3 "
                         f"training months, got holdout={holdout}")
    table = rate_table(obs)
    missing = [f"{d:%Y-%m}" for d in dates if pd.Timestamp(d) not in table.index]
    if missing:
        raise ValueError(f"no observed unemployment for month(s) {missing}; data covers "
                         f"{table.index.min():%Y-%m} to {table.index.max():%Y-%m}")
    target = torch.tensor(table.loc[[pd.Timestamp(d) for d in dates], list(BOROUGHS)].to_numpy(dtype=float),
                          dtype=torch.float32, device=population.device)  # (T, areas)
    if inputs is not None and len(inputs) != len(dates) - 1:
        raise ValueError(f"inputs has {len(inputs)} months; {start} to {end} needs {len(dates) - 1}")
    steps = (list(inputs)[: n_train - 1] if inputs is not None
             else observed_labor_inputs(dates[1:n_train], device=population.device))
    steps += held_out_inputs(steps[-1], dates[n_train:])
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    from lpm_llm.calibrate.fit import Calibrator, FrozenDecisions
    from lpm_llm.core.parameters import ParameterSpace
    from lpm_llm.core.sim import Simulation

    params = params or LaborParams()
    own = _decision_parameters(work_decision)
    # prompts show observed rates: one answer per month (a source with parameters is evaluated every time)
    decision = work_decision if own else FrozenDecisions(work_decision)
    last_train = dates[n_train - 1]

    def simulation(months: int) -> Simulation:
        labor = Labor(params, inputs=steps[: months - 1], observed=obs, context_rates="observed",
                      observed_until=last_train, stream=stream)
        days = (dates[months - 1] - dates[0]).days + 1
        return Simulation(population, [labor], archetypes=archetypes, decisions={"work": decision},
                          start_date=dates[0], days=days)

    train_sim, full_sim = simulation(n_train), simulation(len(dates))
    specs = train_sim.parameters(alignment={"work": alignment} if alignment is not None else None)
    if own:
        specs = {k: v for k, v in specs.items() if not k.startswith("work_alignment_")} | own
    space = ParameterSpace(specs, device=population.device)

    def rates(sim: Simulation, values: Any, seed: int) -> torch.Tensor:
        values = dict(values)
        if own:
            work_decision.set_parameters({k: values.pop(k) for k in own})
        sim.set_parameters(values)
        sim.seed = seed
        return sim.run().series["labor_unemployment_rate"]

    def objective(values: Any, seeds: Sequence[int]) -> torch.Tensor:
        errors = [((rates(train_sim, values, s)[1:] - target[1:n_train]) ** 2).mean() for s in seeds]
        return torch.stack(errors).mean()

    def report(method: str, i: int, loss: float, seconds: float) -> None:
        log.info("labour calibration step %d/%d: loss %.4f (pp^2)", i + 1, iterations, loss)
        if on_step is not None:
            on_step(i, loss)

    calibrator = Calibrator(space, method="adam", steps=iterations, lr=lr, lr_final=lr_final,
                            seeds_per_step=len(seeds), seed=seeds[0], betas=(0.9, 0.999), resample_seeds=False,
                            on_step=report).fit(objective)
    history = list(calibrator.loss_history_)
    values = calibrator.space_.values()
    with torch.no_grad():
        simulated = torch.stack([rates(full_sim, values, s) for s in seeds]).mean(dim=0).cpu()
    target = target.cpu()
    persistence = target[n_train - 1].expand(holdout, -1)
    fitted = {k: v.detach() for k, v in values.items() if k not in own}
    shock = fitted.pop("shock").cpu().tolist()
    align_ab = (float(fitted.pop("work_alignment_a", torch.tensor(1.0))),
                float(fitted.pop("work_alignment_b", torch.tensor(0.0))))
    fitted_params = LaborParams(**{k: float(v) for k, v in fitted.items()},
                                shock=dict(zip(INDUSTRIES, shock, strict=True)))

    def frame(rows: slice, **columns: torch.Tensor) -> pd.DataFrame:
        idx = pd.MultiIndex.from_product([pd.to_datetime(dates[rows]), BOROUGHS], names=["date", "area"])
        df = pd.DataFrame({k: v.reshape(-1).numpy().astype(float) for k, v in columns.items()}, index=idx)
        return df.reset_index()

    train = slice(1, n_train)
    test = slice(n_train, len(dates))
    fit = LaborFit(
        params_=fitted_params,
        alignment_=align_ab,
        calibrator_=calibrator,
        loss_history_=history,
        fitted_=frame(train, observed=target[train], simulated=simulated[train]),
        forecast_=frame(test, observed=target[test], simulated=simulated[test], persistence=persistence),
        train_mae_=float((simulated[train] - target[train]).abs().mean()),
        holdout_mae_=float((simulated[test] - target[test]).abs().mean()),
        persistence_mae_=float((persistence - target[test]).abs().mean()),
    )
    if own:
        fit.decision_params_ = {k: v.detach().cpu().tolist() for k, v in values.items() if k in own}
    log.info("labour calibration: train MAE %.2f pp, held-out MAE %.2f pp, persistence %.2f pp",
             fit.train_mae_, fit.holdout_mae_, fit.persistence_mae_)
    return fit
