"""Two reference forecasters of a weekly count series, scored beside the model.

- :func:`hub_baseline`: the COVID-19 Forecast Hub's baseline (Cramer et al. 2022, PNAS 119(15)):
  the median is the last observed week; the spread comes from the past week-to-week changes,
  symmetrized (each change d also counted as -d); h weeks ahead is the last value plus the sum of
  h independent changes drawn from that set; quantiles are then shifted so that the median is the
  last value, and truncated at 0.
- :func:`ets_baseline`: exponential smoothing (statsmodels ``ETSModel``: additive error, additive
  damped trend) on ``log(1 + y)``; quantiles of simulated future paths, back-transformed.

Both take the history as it stood on the forecast date and return (H, Q) quantiles at `levels`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from lpm_llm.forecast.hub import HUB_LEVELS

__all__ = ["ets_baseline", "hub_baseline"]


def hub_baseline(
    history: Sequence[float], horizon: int = 4, levels: Sequence[float] = HUB_LEVELS, *,
    samples: int = 100_000, seed: int = 0,
) -> np.ndarray:
    """(horizon, Q) quantiles of the Hub baseline given the weekly `history` (oldest first).

    One week ahead the quantiles are exact quantiles of ``last + change`` over the symmetrized
    changes; further ahead, of ``last + sum of h changes`` estimated from `samples` draws.
    """
    y = np.asarray(history, dtype=float)
    if y.size == 0:
        raise ValueError("the Hub baseline needs at least one observed week")
    last = y[-1]
    d = np.diff(y)
    changes = np.concatenate([d, -d]) if d.size else np.zeros(1)
    rng = np.random.default_rng(seed)
    out = np.empty((horizon, len(levels)))
    for h in range(1, horizon + 1):
        x = changes if h == 1 else rng.choice(changes, size=(samples, h)).sum(1)
        q = np.quantile(x, levels)
        q = q - np.quantile(x, 0.5)  # the median is the last value exactly
        out[h - 1] = np.clip(last + q, 0, None)
    return np.maximum.accumulate(out, axis=1)


def ets_baseline(
    history: Sequence[float], horizon: int = 4, levels: Sequence[float] = HUB_LEVELS, *,
    damped: bool = True, paths: int = 2000, seed: int = 0,
) -> np.ndarray:
    """(horizon, Q) quantiles from exponential smoothing of ``log(1 + history)``.

    Additive error and trend (damped unless ``damped=False``; with fewer than 6 weeks no trend),
    fitted by maximum likelihood (statsmodels ``ETSModel``); quantiles of `paths` simulated
    futures, mapped back by ``exp(x) - 1`` (quantiles commute with a monotone map).
    """
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    y = np.log1p(np.clip(np.asarray(history, dtype=float), 0, None))
    if y.size < 3:
        raise ValueError(f"ETS needs at least 3 observed weeks, got {y.size}")
    trend = "add" if y.size >= 6 else None
    model = ETSModel(y, error="add", trend=trend, damped_trend=bool(damped and trend))
    with warnings.catch_warnings():  # convergence chatter on short series; the fit is still usable
        warnings.simplefilter("ignore")
        fit = model.fit(disp=False)
        sims = fit.simulate(nsimulations=horizon, repetitions=paths, anchor="end",
                            rng=np.random.default_rng(seed))
    sims = np.asarray(sims).reshape(horizon, paths)
    q = np.quantile(sims, levels, axis=1).T  # (H, Q)
    return np.clip(np.expm1(q), 0, None)
