"""Industry groups of working-age agents, drawn from published shares by borough.

The labour model hits industries unequally (a stay-at-home order closes restaurants, not city
agencies), so each agent aged 18-64 gets an ``industry`` column: an int8 code into
:data:`INDUSTRIES`, -1 for agents outside working age. Shares come from the bundled
``lpm_llm/data/nyc/industry_shares.csv`` (ACS 2015-2019 5-year, table DP03, industry of employed
civilians 16+ by borough of residence; approximate, see the data README), summed into coarse groups.
Agents who are not employed get the industry of the employed in their borough: their usual or last
industry is not published at this resolution, and the shares differ little.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from lpm_llm.population.table import BOROUGHS, Population
from lpm_llm.resources import nyc_data_path

INDUSTRIES: tuple[str, ...] = (
    "leisure_hospitality",
    "retail_personal_services",
    "professional_office",
    "health_education",
    "construction_manufacturing",
    "transport_utilities",
    "public_administration",
)
"""Coarse industry groups; the code of a group is its position here."""

WORKING_AGE_BANDS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64")
"""Age bands that make up the working-age population (18-64)."""


def working_age_mask(population: Population) -> torch.Tensor:
    """(N,) bool: the agent's age band is one of :data:`WORKING_AGE_BANDS`."""
    labels = population.labels("age_band")
    missing = [b for b in WORKING_AGE_BANDS if b not in labels]
    if missing:
        raise ValueError(f"age_band codebook lacks working-age band(s) {missing}; codebook: {list(labels)}")
    codes = torch.tensor([labels.index(b) for b in WORKING_AGE_BANDS], device=population.device)
    return torch.isin(population["age_band"].long(), codes)


def load_industry_shares(path: str | Path | None = None) -> torch.Tensor:
    """(boroughs, industries) float32 shares, each row summing to 1, rows in ``BOROUGHS`` order.

    Reads ``borough, group, percent`` rows (extra columns ignored) and sums percents by group.
    """
    p = Path(path) if path else nyc_data_path("industry_shares.csv")
    if not p.exists():
        raise FileNotFoundError(f"industry shares file {p} does not exist")
    df = pd.read_csv(p)
    missing = [c for c in ("borough", "group", "percent") if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; found {list(df.columns)}")
    bad_groups = sorted(set(df["group"]) - set(INDUSTRIES))
    if bad_groups:
        raise ValueError(f"{p}: unknown industry group(s) {bad_groups}; known: {', '.join(INDUSTRIES)}")
    bad_boroughs = sorted(set(df["borough"]) - set(BOROUGHS))
    absent = sorted(set(BOROUGHS) - set(df["borough"]))
    if bad_boroughs or absent:
        raise ValueError(f"{p}: boroughs must be exactly {', '.join(BOROUGHS)}; "
                         f"unknown {bad_boroughs}, absent {absent}")
    if (df["percent"] < 0).any():
        raise ValueError(f"{p}: negative percent in rows {df.index[df['percent'] < 0].tolist()[:5]}")
    table = df.pivot_table(index="borough", columns="group", values="percent", aggfunc="sum", fill_value=0.0)
    table = table.reindex(index=list(BOROUGHS), columns=list(INDUSTRIES), fill_value=0.0)
    shares = torch.tensor(table.to_numpy(), dtype=torch.float32)
    return shares / shares.sum(dim=1, keepdim=True)


def assign_industry(
    population: Population,
    generator: torch.Generator,
    shares: torch.Tensor | Mapping[str, Mapping[str, float]] | None = None,
) -> Population:
    """A new Population with an ``industry`` int8 column (codebook :data:`INDUSTRIES`).

    Args:
        population: needs ``borough`` and ``age_band`` columns with their codebooks.
        generator: source of randomness, on the population's device.
        shares: (boroughs, industries) tensor, or borough -> {industry: share}; default the bundled
            ACS shares. Rows are normalised to sum to 1.

    Agents outside working age (18-64) get -1. Draws are independent per agent.
    """
    if shares is None:
        table = load_industry_shares()
    elif isinstance(shares, Mapping):
        unknown = sorted(set(shares) - set(BOROUGHS))
        if unknown:
            raise ValueError(f"industry shares: unknown borough(s) {unknown}; known: {', '.join(BOROUGHS)}")
        rows = []
        for b in BOROUGHS:
            row = dict(shares.get(b, {}))
            bad = sorted(set(row) - set(INDUSTRIES))
            if bad:
                raise ValueError(f"industry shares for {b}: unknown group(s) {bad}; "
                                 f"known: {', '.join(INDUSTRIES)}")
            rows.append([float(row.get(g, 0.0)) for g in INDUSTRIES])
        table = torch.tensor(rows, dtype=torch.float32)
    else:
        table = torch.as_tensor(shares, dtype=torch.float32)
    if table.shape != (len(BOROUGHS), len(INDUSTRIES)):
        raise ValueError(f"industry shares must have shape {(len(BOROUGHS), len(INDUSTRIES))} "
                         f"(boroughs {BOROUGHS} x industries {INDUSTRIES}), got {tuple(table.shape)}")
    if (table < 0).any() or (table.sum(dim=1) <= 0).any():
        raise ValueError("industry shares must be non-negative with a positive sum in every borough")
    if population.labels("borough") != BOROUGHS:
        raise ValueError(f"borough codebook must be {BOROUGHS}, got {population.labels('borough')}")
    device = population.device
    table = (table / table.sum(dim=1, keepdim=True)).to(device)
    borough = population["borough"].long()
    u = torch.rand(population.n, generator=generator, device=device)
    cumulative = table.cumsum(dim=1)[borough]  # (N, industries)
    # first group whose cumulative share exceeds u; clamp guards against rounding of the last sum
    code = (u.unsqueeze(1) >= cumulative).sum(dim=1).clamp(max=len(INDUSTRIES) - 1)
    code = torch.where(working_age_mask(population), code, torch.full_like(code, -1))
    out = population.with_columns(industry=code.to(torch.int8))
    out.codebooks["industry"] = INDUSTRIES
    return out
