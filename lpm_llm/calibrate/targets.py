"""Observed targets, the calibration loss and forecast scores, shared by :mod:`lpm_llm.calibrate`.

Weeks are 7-day blocks counted from the simulation's start date (week 0 = start .. start + 6), as in
:func:`lpm_llm.data.observed.weekly`. Areas are the five boroughs in ``BOROUGHS`` order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lpm_llm.data.observed import load_covid, weekly
from lpm_llm.population import BOROUGHS

__all__ = [
    "COUNT_FLOOR",
    "COUNT_LOSSES",
    "NYC_SEROLOGY_APRIL_2020",
    "OBSERVED_COLUMN",
    "SERIES_OF",
    "SerologyTarget",
    "forecast_scores",
    "count_loss",
    "log_mse",
    "negbin_deviance",
    "poisson_deviance",
    "observed_weekly",
    "serology_loss",
    "simulated_weekly",
    "smoothness_penalty",
]

SERIES_OF: dict[str, str] = {"cases": "reported_cases", "deaths": "deaths", "hospitalized": "hospitalized"}
"""Calibration target -> the simulated series (``Results.series`` key) compared with it."""
OBSERVED_COLUMN: dict[str, str] = {"cases": "cases", "deaths": "deaths", "hospitalized": "hospitalized"}
"""Calibration target -> the column of :func:`lpm_llm.data.observed.load_covid`."""


@dataclass(frozen=True)
class SerologyTarget:
    """A serological survey: the share of residents with antibodies on ``date`` (the middle of the
    sampling period), with its 95% confidence interval. Antibodies appear about ``delay`` days after
    infection, so the simulated share is the share of agents infected by ``date - delay``."""

    date: dt.date
    share: float
    lower: float
    upper: float
    delay: int
    source: str


NYC_SEROLOGY_APRIL_2020 = SerologyTarget(
    date=dt.date(2020, 4, 24),
    share=0.227,
    lower=0.215,
    upper=0.240,
    delay=18,
    source=(
        "New York State's antibody survey of 15,101 adults at grocery stores, 2020-04-19 to 2020-04-28: "
        "22.7% (95% CI 21.5-24.0) in New York City, adjusted for the assay's sensitivity and "
        "specificity (Rosenberg et al. 2020, Ann Epidemiol 48:23). Delay: IgG seroconversion a median 13 "
        "days after symptom onset (Long et al. 2020, Nat Med 26:845), onset about 5 days after "
        "infection (Lauer et al. 2020)"
    ),
)
"""New York City's April 2020 seroprevalence, a calibration target on its date."""


def serology_loss(infected_share: torch.Tensor, target: SerologyTarget) -> torch.Tensor:
    """Squared distance on the log scale from the simulated share infected (a scalar tensor, the
    city's share of agents ever infected by ``target.date - target.delay``) to the survey's 95% CI:
    0 inside the interval (the survey cannot tell those apart), ``(log p - log bound)^2`` outside, the
    same units as :func:`log_mse`'s weekly terms."""
    p = infected_share.clamp(min=1e-9)
    below = torch.log(torch.tensor(target.lower, dtype=p.dtype, device=p.device)) - torch.log(p)
    above = torch.log(p) - torch.log(torch.tensor(target.upper, dtype=p.dtype, device=p.device))
    return torch.clamp(torch.maximum(below, above), min=0.0).pow(2)


def smoothness_penalty(change: torch.Tensor, weight: float, *, anchored: bool = True) -> torch.Tensor:
    """``weight * sum_m (log c_m - log c_{m-1})^2`` over the months of a ``transmission_change``
    (M-1,) tensor, with ``c_0 = 1`` (the first month, against which the others are relative); with
    ``anchored=False`` over the given months only (a monthly ``fatality_scale`` (M,): no month is fixed).

    A Gaussian random-walk prior on the log of transmission by month (up to a constant, with
    ``weight = 1 / (2 sigma^2)`` for a monthly step of SD sigma): a change of transmission that
    the dated policies (and, where fitted, the behaviour) do not explain costs in proportion to its
    square, month by month, so the fitted curve moves only where the data ask for it. Its gradient
    in ``l_m = log c_m`` is ``2 weight ((l_m - l_{m-1}) - (l_{m+1} - l_m))`` (the last month has
    only the first term)."""
    if weight < 0:
        raise ValueError(f"the smoothness weight must be >= 0, got {weight}")
    log_c = torch.log(change.clamp(min=1e-12)).reshape(-1)
    path = torch.cat([log_c.new_zeros(1), log_c]) if anchored else log_c
    return weight * path.diff().pow(2).sum()


def _check_targets(targets: Sequence[str]) -> None:
    unknown = sorted(set(targets) - set(SERIES_OF))
    if unknown or not targets:
        raise ValueError(f"unknown or no calibration target(s) {unknown}; known: {', '.join(SERIES_OF)}")


def observed_weekly(
    start: str | pd.Timestamp,
    weeks: int,
    targets: Sequence[str],
    *,
    observed: pd.DataFrame | None = None,
    device: torch.device | str = "cpu",
    areas: Sequence[str] = BOROUGHS,
) -> dict[str, torch.Tensor]:
    """Observed weekly counts by borough for weeks 0..weeks-1 from ``start``.

    Args:
        observed: daily rows (date, area, target columns); default: :func:`load_covid`.
        areas: the boroughs to return, in this order (a data holder reads only its own rows).

    Returns:
        target -> (weeks, len(areas)) tensor of the default dtype (real city counts, not scaled).
    """
    _check_targets(targets)
    areas = list(areas)
    start = pd.Timestamp(start)
    if observed is None:
        observed = load_covid(start, start + pd.Timedelta(days=7 * weeks - 1))
    observed = observed[observed["area"].isin(areas)]
    cols = [OBSERVED_COLUMN[t] for t in targets]
    w = weekly(observed, cols, start)
    w = w[w["week"] < weeks]
    out = {}
    for target, col in zip(targets, cols, strict=True):
        table = w.pivot(index="week", columns="area", values=col)
        table = table.reindex(index=range(weeks), columns=areas)
        if table.isna().any().any():
            missing = sorted(int(x) for x in table.index[table.isna().any(axis=1)])
            raise ValueError(f"observed {col!r}: no complete data for week(s) {missing} from {start.date()}")
        out[target] = torch.tensor(table.to_numpy(np.float64), dtype=torch.get_default_dtype(), device=device)
    return out


def simulated_weekly(series: torch.Tensor, weeks: int) -> torch.Tensor:
    """Daily simulated series (T, B, A) or (T, B) -> weekly sums (weeks, B), keeping autograd.

    Needs ``T >= 7 * weeks``; days past ``7 * weeks`` are ignored.
    """
    if series.dim() == 3:
        series = series.sum(-1)
    if series.dim() != 2:
        raise ValueError(f"series must have shape (T, B, A) or (T, B), got {tuple(series.shape)}")
    t = series.shape[0]
    if t < 7 * weeks:
        raise ValueError(f"series covers {t} days, fewer than the {7 * weeks} of {weeks} weeks")
    return series[: 7 * weeks].reshape(weeks, 7, series.shape[1]).sum(1)


def _matched(simulated: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]):
    """(target, simulated, observed) for every observed target, checked: a simulated series of the
    same shape exists."""
    for target, obs in observed.items():
        if target not in simulated:
            raise KeyError(f"no simulated series for target {target!r}; have: {', '.join(simulated)}")
        sim = simulated[target]
        if sim.shape != obs.shape:
            raise ValueError(
                f"target {target!r}: simulated shape {tuple(sim.shape)} != observed {tuple(obs.shape)}"
            )
        yield target, sim, obs


def log_mse(
    simulated: Mapping[str, torch.Tensor],
    observed: Mapping[str, torch.Tensor],
    scale: float,
    *,
    floor: float | None = None,
    variance: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over targets of ``mean((log(sim / scale + floor) - log(obs + floor))^2)`` over weeks and
    boroughs.

    ``simulated``: target -> (W, B) counts of the scaled city; ``observed``: target -> (W, B) counts
    of the real city; ``floor`` (default ``1 / scale``: the residents one agent stands for) keeps
    the log finite and says that differences below one agent's worth are sampling noise of the
    scaled city, not signal. The log scale gives the rise, peak and tail of the wave, and each
    target, comparable weight although counts span four orders of magnitude; a Poisson or negative
    binomial likelihood on counts would be dominated by the peak weeks and by cases over deaths.
    With ``floor = 1`` this is the mean squared error of ``log1p`` of real-city counts.

    ``variance``: target -> (W, B) sampling variance of ``simulated`` when it is the mean of a few
    stochastic runs (between-run variance / runs). With ``Z = log(sim / scale + floor)``, ``y`` the
    observed log and ``v = Var(Z)``, the expected squared error is, to second order,
    ``(E log(mean) - y - v/2)^2 + v``: noise shifts the log down by v/2 and adds v, and v falls as
    the counts grow, so a fit to few runs prefers too many infections (+7% in a borough-week of 10
    agents with 2 runs). With `variance` each term is ``(Z + v/2 - y)^2 - v`` (v estimated from
    `variance` by the delta method), whose expectation is the squared log error of the expected
    counts to second order; it can be slightly negative.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    floor = 1.0 / scale if floor is None else float(floor)
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    terms = []
    for target, sim, obs in _matched(simulated, observed):
        level = sim.clamp(min=0) / scale + floor
        error = torch.log(level) - torch.log(obs + floor)
        if variance is None:
            terms.append(error.pow(2).mean())
        else:
            v = variance[target] / scale**2 / level.pow(2)  # delta method: Var(log X) = Var(X) / X^2
            terms.append(((error + v / 2).pow(2) - v).mean())
    return torch.stack(terms).mean()


COUNT_LOSSES = ("log_mse", "poisson", "negbin")
"""The whole-period fit's losses (``calibration.loss``): :func:`log_mse` or :func:`count_loss` of a kind."""
COUNT_FLOOR = 0.5
"""Agents added to observed and simulated counts in :func:`count_loss`: a week without a simulated count
costs a finite deviance (and has a finite gradient); the deviance stays 0 at equal counts."""


def poisson_deviance(y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Unit Poisson deviance, elementwise: ``2 (y log(y / mu) - (y - mu))`` (``0 log 0 = 0``), for
    ``y >= 0`` and ``mu > 0``. Twice the log-likelihood ratio of the saturated model (mean ``y``) to
    the mean ``mu``; 0 at ``mu = y`` and convex in ``mu``."""
    return 2.0 * (torch.special.xlogy(y, y) - torch.special.xlogy(y, mu) - (y - mu))


def negbin_deviance(y: torch.Tensor, mu: torch.Tensor, dispersion: float) -> torch.Tensor:
    """Unit negative binomial deviance, elementwise, for ``y >= 0``, ``mu > 0`` and dispersion ``k``
    (variance ``mu + mu^2 / k``; McCullagh & Nelder 1989, Generalized Linear Models, table 2.1):
    ``2 (y log(y / mu) - (y + k) log((y + k) / (mu + k)))``. 0 at ``mu = y``; where ``mu << k`` it is
    the Poisson deviance, and where ``mu, y >> k`` it tends to ``2 k (r - 1 - log r)`` with ``r = y / mu``,
    about ``k (log r)^2`` near ``r = 1``: relative errors, whatever the size of the counts (a model
    below the data by a factor 2 costs ``0.61 k``, above it by 2 ``0.39 k``). ``k -> inf`` is
    :func:`poisson_deviance`."""
    if not dispersion > 0:
        raise ValueError(f"the dispersion must be > 0, got {dispersion}")
    k = float(dispersion)
    return 2.0 * (torch.special.xlogy(y, y) - torch.special.xlogy(y, mu)
                  - (y + k) * (torch.log(y + k) - torch.log(mu + k)))


def _deviance_curvature(y: torch.Tensor, mu: torch.Tensor, dispersion: float | None) -> torch.Tensor:
    """d^2 deviance / d mu^2 (Poisson with ``dispersion`` None)."""
    d2 = 2.0 * y / mu.pow(2)
    return d2 if dispersion is None else d2 - 2.0 * (y + dispersion) / (mu + dispersion).pow(2)


def count_loss(
    simulated: Mapping[str, torch.Tensor],
    observed: Mapping[str, torch.Tensor],
    scale: float,
    *,
    kind: str = "negbin",
    dispersion: float = 10.0,
    floor: float = COUNT_FLOOR,
    variance: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over targets of a count deviance of the weekly counts by borough, in agents of the scaled
    city: ``y = obs * scale + floor`` (the expected agents of the observed count) against ``mu = sim +
    floor``.

    - ``negbin``: ``mean(negbin_deviance(y, mu, k)) / k``. The variance ``mu + mu^2 / k`` is the
      simulated city's own agent noise (Poisson) plus a relative error of about ``1 / sqrt(k)``
      (``dispersion`` k = 10: 32%) for what the model and the reporting get wrong. A week of few
      agents (the summer's deaths at 1:100) weighs as little as its Poisson noise says, instead of
      paying ``(log 2)^2`` for one agent more than the log loss' floor; a week of many agents weighs
      about ``(log y - log mu)^2`` after the division by k (:func:`negbin_deviance`), the units of
      :func:`log_mse`, so a target of large counts does not swamp one of small counts.
    - ``poisson``: each target's mean deviance divided by its mean ``y``, so that the targets weigh
      alike (a pure Poisson likelihood would be cases only: its deviance grows with the counts).

    ``variance`` (target -> (W, B) sampling variance of `simulated` when it is the mean of a few runs):
    each term is corrected to second order, ``D(y, mu) - D''(mu) v / 2``, whose expectation is the
    deviance of the expected counts (the runs' noise otherwise raises a convex deviance).
    """
    if kind not in ("poisson", "negbin"):
        raise ValueError(f"unknown count loss {kind!r}; known: poisson, negbin")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    k = float(dispersion) if kind == "negbin" else None
    terms = []
    for target, sim, obs in _matched(simulated, observed):
        y = obs * scale + floor
        mu = sim.clamp(min=0) + floor
        dev = poisson_deviance(y, mu) if k is None else negbin_deviance(y, mu, k)
        if variance is not None:
            dev = dev - 0.5 * _deviance_curvature(y, mu, k) * variance[target]
        terms.append(dev.mean() / (y.mean() if k is None else k))
    return torch.stack(terms).mean()


def forecast_scores(
    forecast: np.ndarray,
    observed: np.ndarray,
    last_week: np.ndarray,
    areas: Sequence[str] = BOROUGHS,
) -> dict[str, object]:
    """Score a forecast of F weeks against the observations and against persistence.

    Args:
        forecast: (F, B) forecast weekly counts (real city scale).
        observed: (F, B) observed weekly counts.
        last_week: (B,) the last observed week before the forecast (the persistence forecast).

    Returns:
        ``mae`` and ``persistence_mae`` per area (mean absolute error of weekly counts), their
        totals over areas (``mae_total``, ``persistence_mae_total``: the mean over areas), and the
        relative errors ``sum |error| / sum observed`` (``relative_error``,
        ``persistence_relative_error``).
    """
    forecast, observed = np.asarray(forecast, float), np.asarray(observed, float)
    persistence = np.broadcast_to(np.asarray(last_week, float), observed.shape)
    err, perr = np.abs(forecast - observed), np.abs(persistence - observed)
    total = max(float(observed.sum()), 1.0)
    return {
        "weeks": int(observed.shape[0]),
        "mae": dict(zip(areas, map(float, err.mean(0)), strict=True)),
        "persistence_mae": dict(zip(areas, map(float, perr.mean(0)), strict=True)),
        "mae_total": float(err.mean()),
        "persistence_mae_total": float(perr.mean()),
        "relative_error": float(err.sum() / total),
        "persistence_relative_error": float(perr.sum() / total),
    }
