"""Calibration of the labour model to monthly unemployment by borough, with held-out months.

:func:`calibrate_labor` fits the non-LLM parameters (job finding, exits, shocks by industry, the
alignment map) by Adam through the stochastic monthly steps, then forecasts the held-out months and
scores them against a persistence forecast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import pandas as pd
import torch

from lpm_llm.core.behavior import DecisionSource
from lpm_llm.data.observed import load_unemployment
from lpm_llm.models.labor import (
    LaborInputs,
    LaborModel,
    LaborParams,
    LaborResult,
    _rate_table,
    month_range,
    observed_labor_inputs,
    simulate_labor,
)
from lpm_llm.population import BOROUGHS, Population

log = logging.getLogger(__name__)


# -- calibration -----------------------------------------------------------------------------------
class _Memo:
    """Asks the wrapped decision source once per distinct context (contexts repeat across iterations)."""

    def __init__(self, source: DecisionSource):
        self.source = source
        self.answers: dict[str, torch.Tensor] = {}

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        key = repr(sorted(context.items()))
        if key not in self.answers:
            self.answers[key] = torch.as_tensor(self.source.probabilities(context), dtype=torch.float32)
        return self.answers[key]


@dataclass
class LaborFit:
    """Result of :func:`calibrate_labor` (fitted values end in ``_``).

    Attributes:
        params_: fitted parameters.
        model_: the fitted model.
        loss_history_: training loss per iteration (mean squared error of the rate, pp^2).
        fitted_: ``date, area, observed, simulated`` over the training months (simulated: seed mean).
        forecast_: ``date, area, observed, simulated, persistence`` over the held-out months.
        train_mae_, holdout_mae_, persistence_mae_: mean absolute errors in percentage points.
    """

    params_: LaborParams
    model_: LaborModel
    loss_history_: list[float]
    fitted_: pd.DataFrame
    forecast_: pd.DataFrame
    train_mae_: float
    holdout_mae_: float
    persistence_mae_: float



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
    observed: pd.DataFrame | None = None,
    inputs: Sequence[LaborInputs] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LaborFit:
    """Fit the non-LLM parameters (rates, shocks, alignment map) to the monthly unemployment rate.

    The loss is the mean squared error (percentage points) of the simulated rate by borough over the
    months after ``start`` up to ``end`` minus ``holdout`` months, averaged over ``seeds`` (the same
    seeds every iteration: common random numbers). Prompts show observed unemployment rates, so the
    decision source is asked once per month, not once per iteration. The held-out months are then
    forecast (prompts show simulated rates after the last training month) and compared with a
    persistence baseline (last training month repeated).
    """
    obs = load_unemployment() if observed is None else observed
    dates = month_range(start, len(pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="MS")))
    n_train = len(dates) - holdout
    if holdout < 1 or n_train < 3:
        raise ValueError(f"{start} to {end} has {len(dates)} months; need holdout >= 1 and at least 3 "
                         f"training months, got holdout={holdout}")
    table = _rate_table(obs)
    missing = [f"{d:%Y-%m}" for d in dates if pd.Timestamp(d) not in table.index]
    if missing:
        raise ValueError(f"no observed unemployment for month(s) {missing}; data covers "
                         f"{table.index.min():%Y-%m} to {table.index.max():%Y-%m}")
    target = torch.tensor(table.loc[[pd.Timestamp(d) for d in dates], list(BOROUGHS)].to_numpy(dtype=float),
                          dtype=torch.float32, device=population.device)  # (T, areas)
    steps = list(inputs) if inputs is not None else observed_labor_inputs(dates[1:], device=population.device)
    if len(steps) != len(dates) - 1:
        raise ValueError(f"inputs has {len(steps)} months; {start} to {end} needs {len(dates) - 1}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    decision = _Memo(work_decision)
    model = LaborModel(params).to(population.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    last_train = dates[n_train - 1]

    def run(seed: int, months: int) -> LaborResult:
        generator = torch.Generator(device=population.device).manual_seed(seed)
        return simulate_labor(population, model, decision, archetypes, months, dates[0], generator,
                              inputs=steps[: months - 1], observed=obs, context_rates="observed",
                              observed_until=last_train)

    history: list[float] = []
    for i in range(iterations):
        optimizer.zero_grad()
        errors = [((run(s, n_train).series["unemployment_rate"][1:] - target[1:n_train]) ** 2).mean() for s in seeds]
        loss = torch.stack(errors).mean()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        log.info("labour calibration step %d/%d: loss %.4f (pp^2)", i + 1, iterations, history[-1])
        if on_step is not None:
            on_step(i, history[-1])

    with torch.no_grad():
        simulated = torch.stack([run(s, len(dates)).series["unemployment_rate"] for s in seeds]).mean(dim=0).cpu()
    target = target.cpu()
    persistence = target[n_train - 1].expand(holdout, -1)

    def frame(rows: slice, **columns: torch.Tensor) -> pd.DataFrame:
        idx = pd.MultiIndex.from_product([pd.to_datetime(dates[rows]), BOROUGHS], names=["date", "area"])
        df = pd.DataFrame({k: v.reshape(-1).numpy().astype(float) for k, v in columns.items()}, index=idx)
        return df.reset_index()

    train = slice(1, n_train)
    test = slice(n_train, len(dates))
    fit = LaborFit(
        params_=model.params,
        model_=model,
        loss_history_=history,
        fitted_=frame(train, observed=target[train], simulated=simulated[train]),
        forecast_=frame(test, observed=target[test], simulated=simulated[test], persistence=persistence),
        train_mae_=float((simulated[train] - target[train]).abs().mean()),
        holdout_mae_=float((simulated[test] - target[test]).abs().mean()),
        persistence_mae_=float((persistence - target[test]).abs().mean()),
    )
    log.info("labour calibration: train MAE %.2f pp, held-out MAE %.2f pp, persistence %.2f pp",
             fit.train_mae_, fit.holdout_mae_, fit.persistence_mae_)
    return fit
