"""Lineage shares per 4-week period: simulated (symptomatic onsets by lineage) and observed (NYC's
sequenced cases, ``lpm_llm/data/nyc/variants_4weekly.csv``), on the same periods and lineage groups.

The observed file (NYC Department of Health and Mental Hygiene, ``nychealth/coronavirus-data``,
``variants/variant-epi-data.csv``; see ``lpm_llm/data/nyc/README.md``) gives lineage counts among
sequenced cases per 4-week period from 2021-01-03. A lineage the model carries (``EpidemicParams.variants``,
matched by Pango name as a prefix, so that "B.1.526 +E484K" and "B.1.526 no E484K" are B.1.526) is
compared on its own; every other lineage, and the model's resident lineage, is ``Other``.
"""

from __future__ import annotations

import datetime as dt
from importlib import resources

import numpy as np
import pandas as pd
import torch

from lpm_llm.models.epidemic_params import EpidemicParams

__all__ = ["GENERATION_DAYS", "PERIOD_ANCHOR", "TRANSMISSIBILITY_RANGE", "compare_lineage_shares", "growth_gaps",
           "observed_lineage_shares", "simulated_lineage_shares"]

PERIOD_ANCHOR = dt.date(2021, 1, 3)
"""First day of the observed 4-week periods; simulated periods are aligned to it."""
_PERIOD = 28
GENERATION_DAYS = 5.2
"""The model's mean generation interval at the defaults (README, "Generation interval"): a lineage
whose reproduction number is T times another's grows relative to it at about ``log T / 5.2`` a day."""

TRANSMISSIBILITY_RANGE: dict[str, tuple[float, float, str]] = {
    "B.1.1.7": (1.3, 1.9, "Alpha: reproduction number 43-90% higher in England (Davies et al. 2021, Science "
                "372:eabg3055), transmission 35-45% higher in the United States (Washington et al. 2021, Cell "
                "184:2587): 1.3 .. 1.9"),
    "P.1": (1.4, 2.4, "Gamma: 1.7-2.4 times as transmissible in Manaus (Faria et al. 2021, Science 372:815), an "
            "estimate that also holds its immune escape (21-46% of protection from past infection), which the "
            "model does not carry; the lower bound is taken down to 1.4 for that (an assumption)"),
}
"""Lineage -> (lower, upper, source): the bounds within which the whole-period fit may move a variant's
relative transmissibility (``calibration.variant_transmissibility``;
:func:`lpm_llm.calibrate.period.update_transmissibility`)."""


def _group(lineage: str, params: EpidemicParams) -> str:
    for v in params.variants:
        if lineage == v.lineage or lineage.startswith(v.lineage + " "):
            return v.lineage
    return "Other"


def observed_lineage_shares(params: EpidemicParams | None = None) -> pd.DataFrame:
    """Columns ``period_start, period_end`` (dates, inclusive), ``variant`` (a modelled lineage or
    ``Other``), ``sequenced_count``, ``observed_percent`` (of the period's sequenced cases)."""
    params = params or EpidemicParams()
    with resources.files("lpm_llm.data").joinpath("nyc/variants_4weekly.csv").open() as f:
        raw = pd.read_csv(f, parse_dates=["period_start", "period_end"])
    raw["variant"] = [_group(v, params) for v in raw["variant"]]
    out = raw.groupby(["period_start", "period_end", "variant"], as_index=False)["sequenced_count"].sum()
    total = out.groupby("period_start")["sequenced_count"].transform("sum")
    out["observed_percent"] = 100.0 * out["sequenced_count"] / total
    out["period_start"] = out["period_start"].dt.date
    out["period_end"] = out["period_end"].dt.date
    return out


def simulated_lineage_shares(
    symptomatic_by_lineage: torch.Tensor, start_date: str | dt.date, params: EpidemicParams
) -> pd.DataFrame:
    """(T, L) symptomatic onsets by day and lineage (the epidemic's ``symptomatic_by_lineage`` series,
    day 0 = `start_date`) -> columns ``period_start, period_end, variant, simulated_percent`` for
    every complete 4-week period (aligned to ``PERIOD_ANCHOR``) inside the run that has any onset."""
    start = start_date if isinstance(start_date, dt.date) else dt.date.fromisoformat(str(start_date))
    x = symptomatic_by_lineage.detach().double().cpu()
    names = ["Other"] + [v.lineage for v in params.variants]
    offset = (PERIOD_ANCHOR - start).days % _PERIOD  # first period start on or after day 0
    rows = []
    for first in range(offset, x.shape[0] - _PERIOD + 1, _PERIOD):
        counts = x[first: first + _PERIOD].sum(0)
        total = float(counts.sum())
        if total <= 0:
            continue
        by_group: dict[str, float] = {}
        for name, c in zip(names, counts.tolist(), strict=True):
            by_group[name] = by_group.get(name, 0.0) + c
        p_start = start + dt.timedelta(days=first)
        for name, c in by_group.items():
            rows.append((p_start, p_start + dt.timedelta(days=_PERIOD - 1), name, 100.0 * c / total))
    return pd.DataFrame(rows, columns=["period_start", "period_end", "variant", "simulated_percent"])


def compare_lineage_shares(
    symptomatic_by_lineage: torch.Tensor, start_date: str | dt.date, params: EpidemicParams
) -> pd.DataFrame:
    """Simulated and observed shares on the periods both cover: ``period_start, period_end, variant,
    simulated_percent, observed_percent, sequenced_count`` (a lineage absent from one side is 0 there)."""
    sim = simulated_lineage_shares(symptomatic_by_lineage, start_date, params)
    obs = observed_lineage_shares(params)
    both = sim.merge(obs, on=["period_start", "period_end", "variant"], how="outer")
    both = both[both["period_start"].isin(set(sim["period_start"]) & set(obs["period_start"]))]
    return both.fillna({"simulated_percent": 0.0, "observed_percent": 0.0, "sequenced_count": 0}).sort_values(
        ["period_start", "variant"]).reset_index(drop=True)


def _log_percent(percent: np.ndarray) -> np.ndarray:
    return np.log(np.clip(percent, 0.5, 100.0))  # 0.5%: a share no period of a few hundred sequences resolves


def growth_gaps(both: pd.DataFrame, lineages: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Per lineage v, the mean over its rising periods of (observed - simulated) growth per day of
    ``log(share_v / share_Other)``, its share against the resident lineage's (``Other``: the model's
    resident lineage, and every lineage it does not carry in the sequences): ``both`` is
    :func:`compare_lineage_shares`. A variant ``T`` times as transmissible as the resident lineage
    grows against it at about ``log T / GENERATION_DAYS`` a day whatever the immunity (without immune
    escape) and whatever the other variants do, so a gap of ``g`` a day asks for ``log T`` to move by
    about ``g * GENERATION_DAYS``; its importation sets the level, not this growth. The rising periods
    are the consecutive pairs from its first period with an observed share of at least 1% up to its
    observed peak. Lineages without two such periods are absent."""
    out: dict[str, float] = {}
    other = both[both["variant"] == "Other"].set_index("period_start")
    for name in lineages:
        rows = both[both["variant"] == name].sort_values("period_start").set_index("period_start")
        if rows.empty:
            continue
        obs, sim = rows["observed_percent"].to_numpy(float), rows["simulated_percent"].to_numpy(float)
        present = np.flatnonzero(obs >= 1.0)
        if not len(present):
            continue
        first, peak = int(present[0]), int(np.argmax(obs))
        if peak - first < 1:
            continue
        ref = other.reindex(rows.index).fillna(0.0)
        span = slice(first, peak + 1)
        lo = _log_percent(obs[span]) - _log_percent(ref["observed_percent"].to_numpy(float)[span])
        ls = _log_percent(sim[span]) - _log_percent(ref["simulated_percent"].to_numpy(float)[span])
        out[name] = float((np.diff(lo) - np.diff(ls)).mean()) / _PERIOD
    return out
