"""The whole-period fit (issue 15): New York from 2020-03-01 to 2021-06-30, with vaccination, lineages,
waning immunity, importation and the policies through June 2021.

    objective = SimulationObjective(sim, observed, weeks=69, scale=0.01, serology=NYC_SEROLOGY_APRIL_2020,
                                    smoothness=0.25)
    fit = fit_period(objective, space, epidemic, steps=25, lr=0.1, lr_final=0.01, seed=0)
    fit.values, fit.variant_rates, fit.history

What is fitted, and how:

- by gradient (Adam on the path-weight gradients, :class:`~lpm_llm.calibrate.fit.SimulationObjective`):
  the transmission scale, ``transmission_change`` by calendar month (15 values after March 2020)
  under a smoothness penalty (:func:`~lpm_llm.calibrate.targets.smoothness_penalty`), seeding by
  borough, ascertainment by month and relative by borough, the fatality scale and the rate of
  continuous importation (``importation_per_100k``), to weekly reported cases, hospital admissions
  and deaths by borough and the April 2020 antibody survey, under ``calibration.loss``: the log-MSE of
  the first-wave fit (default) or a count deviance, Poisson or negative binomial
  (:func:`~lpm_llm.calibrate.targets.count_loss`, :class:`PeriodObjective`);
- by a damped fixed-point iteration outside the gradient: each variant's importation rate, to the
  lineage shares of NYC's sequenced cases (``variants_4weekly.csv``). The lineage of an infection is
  drawn in proportion to the lineages' hazards without a score, so the path-weight estimator has no
  gradient for it (:meth:`Epidemic.set_variant_importation`); every ``variant_every`` steps
  :func:`update_variant_rates` moves each rate by ``step`` times the mean log ratio of observed to
  simulated share over the periods where the variant was sequenced, from the step's own run;
- with ``calibration.variant_transmissibility``, at the same steps and in the same way, the relative
  transmissibility of the listed variants (:func:`update_transmissibility`, within
  :data:`~lpm_llm.models.lineages.TRANSMISSIBILITY_RANGE`), to the growth of their shares while they
  rise (:func:`~lpm_llm.models.lineages.growth_gaps`): the importation rate sets a variant's level, its
  transmissibility how fast its share grows.

Identifiability. In the first-wave fit ``transmission_change`` is held at 1 when the isolation
decision is fitted (:data:`~lpm_llm.calibrate.fit.BEHAVIOUR_EXPLAINS`). The whole-period experiment has
no isolation decision (70 weekly questions to 30 archetypes would make its first run far longer than
15 minutes, and the first-wave ablation found the embedded model's isolation answers no better than a
constant): the policies of the dated schedule explain what they can, and the monthly change carries
the rest, paying for every month-to-month move through the penalty. The vaccination decision is
not fitted here (its city-wide alignment is validated in ``bench/bench_vaccination.py``), so no
behaviour competes with the monthly change.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from lpm_llm.calibrate.fit import SimulationObjective
from lpm_llm.calibrate.targets import count_loss, log_mse
from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.models.lineages import GENERATION_DAYS, TRANSMISSIBILITY_RANGE, compare_lineage_shares, growth_gaps
from lpm_llm.population import BOROUGHS

__all__ = ["EVALUATION_SEEDS", "HOSPITALISATION_SCALE", "PERIOD_PARAMETERS", "PeriodFit", "PeriodObjective",
           "PeriodScore", "evaluate_period", "fit_period", "lineage_errors", "period_space", "set_with_hospitalisation",
           "update_transmissibility", "update_variant_rates"]

log = logging.getLogger(__name__)

PERIOD_PARAMETERS = (
    "beta_scale", "transmission_change", "initial_infections_per_100k", "ascertainment",
    "ascertainment_by_borough", "fatality_scale", "importation_per_100k",
)
"""The epidemic parameters the whole-period fit calibrates by gradient."""
HOSPITALISATION_SCALE = Bounded(0.1, 10.0, 1.0, log=True, doc="multiplier of the IHR by age (admissions as NYC "
                                 "counted them against Verity et al.'s infection hospitalisation ratio)")
"""``hospitalisation_scale``: fitted with the rest; an experiment carries it as ``epidemic.ihr`` times the value."""
EVALUATION_SEEDS = (10_000, 10_001)
"""The seeds on which a fit's starting and fitted values are scored (never used by a fit's steps)."""
_SHARE_FLOOR = 1.0  # percent: a share below 1% of sequenced cases is read as "about 1%"


class PeriodObjective(SimulationObjective):
    """:class:`~lpm_llm.calibrate.fit.SimulationObjective` that also takes ``hospitalisation_scale``
    (:data:`HOSPITALISATION_SCALE`), given to `epidemic` as its ``ihr`` times the scale (the IHR by age
    is a tensor parameter of the epidemic, not a calibrated one), and whose loss of the weekly counts is
    ``loss`` (``calibration.loss``): ``log_mse`` (:func:`~lpm_llm.calibrate.targets.log_mse`, the
    first-wave fit's) or a count deviance, ``poisson`` or ``negbin`` with ``dispersion``
    (:func:`~lpm_llm.calibrate.targets.count_loss`). The serology term and the penalties are the same
    for all three."""

    def __init__(self, simulation: Any, observed: Mapping[str, torch.Tensor], *, epidemic: Any,
                 loss: str = "log_mse", dispersion: float = 10.0, **kwargs: Any):
        super().__init__(simulation, observed, **kwargs)
        if loss not in ("log_mse", "poisson", "negbin"):
            raise ValueError(f"unknown loss {loss!r}; known: log_mse, poisson, negbin")
        self.epidemic = epidemic
        self.ihr = torch.tensor(epidemic.params.ihr, dtype=torch.get_default_dtype())
        self.loss_kind = loss
        self.dispersion = float(dispersion)

    def counts_loss(self, mean: Mapping[str, torch.Tensor], variance: Mapping[str, torch.Tensor] | None
                    ) -> torch.Tensor:
        if self.loss_kind == "log_mse":
            return super().counts_loss(mean, variance)
        return count_loss(mean, self.observed, self.scale, kind=self.loss_kind, dispersion=self.dispersion,
                          variance=variance)

    def run(self, values: Mapping[str, torch.Tensor], seed: int):
        set_with_hospitalisation(self.simulation, self.epidemic, values, self.ihr)
        self.simulation.seed = int(seed)
        self.simulations += 1
        self.last = self.simulation.run()
        return self.last


def set_with_hospitalisation(simulation: Any, epidemic: Any, values: Mapping[str, torch.Tensor],
                             ihr: torch.Tensor | None = None) -> None:
    """``simulation.set_parameters(values)``, with ``hospitalisation_scale`` (if given) applied to
    `epidemic` as its IHR by age (`ihr`, default the epidemic's configured one) times the scale,
    after the other values (a model's ``set_parameters`` replaces its tensor overrides)."""
    values = dict(values)
    scale = values.pop("hospitalisation_scale", None)
    simulation.set_parameters(values)
    if scale is not None:
        base = ihr if ihr is not None else torch.tensor(epidemic.params.ihr, dtype=torch.get_default_dtype())
        epidemic.tensor_overrides["ihr"] = scale * base.to(scale.device)


def period_space(simulation: Any, *, hospitalisation: bool = True, device: str = "cpu") -> ParameterSpace:
    """The gradient-fitted parameters (:data:`PERIOD_PARAMETERS` among the simulation's declared ones,
    initialised from the configured values; ``importation_per_100k`` only when the configured rate is
    above 0) and, with `hospitalisation`, :data:`HOSPITALISATION_SCALE` starting at 1."""
    specs = {k: v for k, v in simulation.parameters().items() if k in PERIOD_PARAMETERS}
    if hospitalisation:
        specs["hospitalisation_scale"] = HOSPITALISATION_SCALE
    return ParameterSpace(specs, device=device)


def lineage_errors(symptomatic_by_lineage: torch.Tensor, start: dt.date, params: Any) -> tuple[float, dict[str, float]]:
    """Lineage shares of one run against NYC's sequenced shares.

    Returns:
        the mean over 4-week periods and lineage groups of ``(log(sim% + 1) - log(obs% + 1))^2``
        (NaN when the run covers no observed period), and per variant (Pango name) the mean of
        ``log(obs% + 1) - log(sim% + 1)`` over the periods where it was sequenced (the direction in
        which its importation rate should move; absent when it was never sequenced in the run's periods).
    """
    both = compare_lineage_shares(symptomatic_by_lineage, start, params)
    if not len(both):
        return float("nan"), {}
    gap = ((both["observed_percent"] + _SHARE_FLOOR).map(math.log)
           - (both["simulated_percent"] + _SHARE_FLOOR).map(math.log))
    loss = float((gap ** 2).mean())
    per: dict[str, float] = {}
    for v in params.variants:
        rows = (both["variant"] == v.lineage) & (both["observed_percent"] > 0)
        if rows.any():
            per[v.lineage] = float(gap[rows].mean())
    return loss, per


def update_variant_rates(rates: Sequence[float], lineages: Sequence[str], log_ratio: Mapping[str, float], *,
                         step: float = 0.5, max_move: float = 1.0, bounds: tuple[float, float] = (1e-3, 100.0)
                         ) -> list[float]:
    """One damped fixed-point step: ``rate_v *= exp(clip(step * log_ratio[v], +-max_move))`` within
    `bounds`, for each variant with a log ratio (observed over simulated share); others unchanged.

    A variant's share in its first months grows with its importation rate at the rate its
    transmissibility gives, so the log share moves about one-for-one with the log rate; ``step`` < 1
    damps the noise of a single run."""
    lo, hi = bounds
    out = []
    for rate, name in zip(rates, lineages, strict=True):
        move = max(-max_move, min(max_move, step * log_ratio.get(name, 0.0)))
        out.append(min(hi, max(lo, float(rate) * math.exp(move))))
    return out


def update_transmissibility(current: Mapping[str, float], gaps: Mapping[str, float], *, step: float = 0.5,
                            max_move: float = 0.2, generation_days: float = GENERATION_DAYS,
                            bounds: Mapping[str, tuple[float, ...]] = TRANSMISSIBILITY_RANGE) -> dict[str, float]:
    """One damped fixed-point step of the variants' relative transmissibilities (lineage -> value in
    `current`): ``log T_v += clip(step * gap_v * generation_days, +-max_move)``, within ``bounds[v]``
    (lower, upper, ...), where ``gap_v`` is :func:`~lpm_llm.models.lineages.growth_gaps`' observed minus
    simulated growth per day of ``log(share_v / share_Other)`` (a lineage T times as transmissible as the
    resident one grows against it at about ``log T / generation_days`` a day). A lineage without a gap
    stays."""
    out = dict(current)
    for name, value in current.items():
        if name not in gaps:
            continue
        lo, hi = bounds[name][0], bounds[name][1]
        move = max(-max_move, min(max_move, step * gaps[name] * generation_days))
        out[name] = min(hi, max(lo, float(value) * math.exp(move)))
    return out


@dataclass
class PeriodFit:
    """The result of :func:`fit_period`.

    Attributes:
        values: name -> fitted value (lists for vectors), as :meth:`ParameterSpace.to_dict`.
        variant_rates: lineage -> fitted importation per day per 100,000.
        space: the fitted parameter space (a copy).
        history: per step ``loss`` (the objective, penalty included), ``lineage_loss``, ``seconds``,
            ``variant_rates`` and ``transmissibility``.
        transmissibility: lineage -> fitted relative transmissibility (the lineages of
            ``fit_period(transmissibility=...)``; empty when none is fitted).
    """

    values: dict[str, Any]
    variant_rates: dict[str, float]
    space: ParameterSpace
    history: list[dict[str, Any]] = field(default_factory=list)
    transmissibility: dict[str, float] = field(default_factory=dict)


def fit_period(
    objective: Any,
    space: ParameterSpace,
    epidemic: Any,
    *,
    steps: int,
    lr: float = 0.1,
    lr_final: float | None = 0.01,
    seeds_per_step: int = 1,
    seed: int = 0,
    variant_every: int = 2,
    variant_step: float = 0.5,
    time_limit: float | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    transmissibility: Sequence[str] = (),
) -> PeriodFit:
    """Adam on `space` against `objective` (a :class:`~lpm_llm.calibrate.fit.SimulationObjective`
    over the whole period), with every ``variant_every`` steps a :func:`update_variant_rates` step of
    the variants' importation rates of `epidemic` (an :class:`~lpm_llm.models.epidemic.Epidemic` of
    the objective's simulation) from the step's last run. Step i uses seeds ``seed + 1000 + i *
    seeds_per_step + j``; the learning rate decays geometrically from `lr` to `lr_final`. Stops after
    `steps` steps or `time_limit` seconds. With `transmissibility` (lineages with a
    :data:`~lpm_llm.models.lineages.TRANSMISSIBILITY_RANGE`), at the same steps each of their relative
    transmissibilities takes an :func:`update_transmissibility` step from the run's growth gaps
    (:meth:`Epidemic.set_variant_transmissibility`): importation sets a variant's level, transmissibility
    its growth."""
    variants = list(epidemic.params.variants)
    unknown = sorted(set(transmissibility) - set(TRANSMISSIBILITY_RANGE))
    if unknown:
        raise ValueError(f"no transmissibility range for {unknown}; known: {', '.join(TRANSMISSIBILITY_RANGE)}")
    trans = {v.lineage: v.transmissibility for v in variants if v.lineage in set(transmissibility)}
    if len(trans) != len(set(transmissibility)):
        raise ValueError(f"the epidemic has no variant(s) {sorted(set(transmissibility) - set(trans))}")
    space = copy.deepcopy(space)
    opt = torch.optim.Adam(space.raw.parameters(), lr=lr, betas=(0.5, 0.9))
    gamma = (lr_final / lr) ** (1 / max(steps - 1, 1)) if lr_final else 1.0
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    variants = list(epidemic.params.variants)
    rates = [v.importation_per_100k for v in variants]
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(steps):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        opt.zero_grad()
        seeds = [seed + 1000 + i * seeds_per_step + j for j in range(seeds_per_step)]
        loss = objective(space.values(), seeds)
        loss.backward()
        opt.step()
        sched.step()
        results = objective.last
        lineage_loss, ratio = lineage_errors(results.series["symptomatic_by_lineage"],
                                             objective.simulation.start_date, epidemic.params)
        if variant_every and (i + 1) % variant_every == 0 and ratio:
            if trans:  # from the same run, before its rates move
                both = compare_lineage_shares(results.series["symptomatic_by_lineage"],
                                              objective.simulation.start_date, epidemic.params)
                trans = update_transmissibility(trans, growth_gaps(both, list(trans)), step=variant_step)
                epidemic.set_variant_transmissibility(trans)
            rates = update_variant_rates(rates, [v.lineage for v in variants], ratio, step=variant_step)
            epidemic.set_variant_importation(rates)
        record = {"step": i + 1, "loss": float(loss.detach()), "lineage_loss": lineage_loss,
                  "seconds": time.perf_counter() - t0,
                  "variant_rates": dict(zip([v.lineage for v in variants], rates, strict=True)),
                  "transmissibility": dict(trans)}
        history.append(record)
        log.info("period fit step %d: loss %.4f, lineage loss %.3f (%.0f s)", i + 1, record["loss"], lineage_loss,
                 record["seconds"])
        if on_step is not None:
            on_step(i + 1, record)
    return PeriodFit(values=space.to_dict(), variant_rates=dict(zip([v.lineage for v in variants], rates,
                                                                       strict=True)),
                     space=space, history=history, transmissibility=dict(trans))


@dataclass
class PeriodScore:
    """Values scored on common seeds (:func:`evaluate_period`).

    Attributes:
        summary: ``objective`` (the fitted loss on all the seeds together, penalty included),
            ``log_mse`` (target -> log-MSE of the seeds' mean weekly counts, not noise-corrected),
            ``negbin`` (target -> the negbin count loss of the same means, with the objective's
            dispersion, not noise-corrected: both scores whatever loss was fitted),
            ``totals`` (target -> simulated and observed city totals over the weeks),
            ``serology_share`` (mean share infected by the survey's date; absent without one) and
            ``lineage_loss`` (mean of :func:`lineage_errors`' losses).
        weekly: observed against fitted, one row per target, week and borough: ``target,
            week_start, area, observed, simulated`` (the seeds' mean, divided by the scale).
        frames: :func:`weekly_frame` of every run (daily by area), with ``member`` and ``seed``.
        lineages: :func:`~lpm_llm.models.lineages.compare_lineage_shares` of every run, with ``member``
            and ``seed``.
    """

    summary: dict[str, Any]
    weekly: pd.DataFrame
    frames: pd.DataFrame
    lineages: pd.DataFrame


def evaluate_period(objective: SimulationObjective, epidemic: Any, values: Mapping[str, torch.Tensor],
                    rates: Sequence[float], seeds: Sequence[int] = EVALUATION_SEEDS, *, member: int = 0,
                    transmissibility: Mapping[str, float] | None = None) -> PeriodScore:
    """Score `values` with the variants' importation `rates` (and, if given, `transmissibility`:
    lineage -> relative transmissibility) on `seeds`, without gradients: one run per seed gives the
    objective, the per-target errors, the lineage shares and the frames for plots."""
    epidemic.set_variant_importation(list(rates))
    if transmissibility:
        epidemic.set_variant_transmissibility(transmissibility)
    sim = objective.simulation
    runs, frames, shares, lineage = [], [], [], []
    with torch.no_grad():
        for s in seeds:
            runs.append(objective.weekly(values, s))
            r = objective.last
            frames.append(weekly_frame(r, objective.scale, member, s))
            sh = compare_lineage_shares(r.series["symptomatic_by_lineage"], sim.start_date, epidemic.params)
            shares.append(sh.assign(member=member, seed=s))
            lineage.append(lineage_errors(r.series["symptomatic_by_lineage"], sim.start_date, epidemic.params)[0])
        stacked = {t: torch.stack([w[t] for w in runs]) for t in runs[0]}
        total = float(objective.loss(stacked, values))
    obs = objective.observed
    mean = {t: stacked[t].mean(0) for t in obs}
    summary: dict[str, Any] = {
        "objective": total,
        "log_mse": {t: float(log_mse({t: mean[t]}, {t: obs[t]}, objective.scale)) for t in obs},
        "negbin": {t: float(count_loss({t: mean[t]}, {t: obs[t]}, objective.scale, kind="negbin",
                                       dispersion=getattr(objective, "dispersion", 10.0))) for t in obs},
        "totals": {t: {"simulated": float(mean[t].sum() / objective.scale), "observed": float(obs[t].sum())}
                   for t in obs},
        "lineage_loss": float(pd.Series(lineage, dtype=float).mean()),
    }
    if "serology" in stacked:
        summary["serology_share"] = float(stacked["serology"].mean())
    weeks = pd.date_range(sim.start_date, periods=objective.weeks, freq="7D")
    rows = [pd.DataFrame({"target": t, "week_start": weeks.repeat(len(BOROUGHS)),
                          "area": list(BOROUGHS) * objective.weeks,
                          "observed": obs[t].detach().cpu().reshape(-1).numpy(),
                          "simulated": (mean[t].detach().cpu() / objective.scale).reshape(-1).numpy()})
            for t in obs]
    return PeriodScore(summary=summary, weekly=pd.concat(rows, ignore_index=True),
                       frames=pd.concat(frames, ignore_index=True), lineages=pd.concat(shares, ignore_index=True))


def weekly_frame(results: Any, scale: float, member: int, seed: int) -> pd.DataFrame:
    """``Results.by_area()`` with counts divided by `scale`, tagged with the ensemble member and seed."""
    df = results.by_area()
    counts = [c for c in df.columns if c not in ("date", "area", "isolating")]
    df[counts] = df[counts] / scale
    return df.assign(member=member, seed=seed)
