"""Archetype fidelity: how well K archetypes stand in for N individuals.

A stratified sample of agents (strata: the experiment's archetypes, proportional allocation, at
least one agent each while the sample allows; each sampled agent weighted by the agents of its
stratum it stands for) is asked the decision's question with each agent's own attributes (every
attribute the population has: age band, sex, borough, race/ethnicity, employment) at several
decision dates, in the context observed then in their borough
(:func:`~lpm_llm.behaviour.context.observed_context`). For each archetype set, each agent's answer
is compared with the answer of their archetype (asked as in a run: its profile, the context of the
borough where most of its members live). Per set, weighted over agents and dates:

- ``mad``: mean |P(individual) - P(archetype)|; ``bias``: mean P(archetype) - P(individual);
- ``r2``: the share of the individuals' variance around each date's mean that the archetypes'
  answers explain, 1 - sum w (p_i - p_a)^2 / sum w (p_i - mean_t)^2 (1: the archetype's answer is
  every member's; 0: no better than one number per date; negative: worse);
- ``r2_partition``: the same with the archetype's answer replaced by the mean answer of its sampled
  members: what the grouping itself could explain if each archetype's answer were its members'
  mean (the gap to ``r2`` is the profile's misrepresentation of its members);
- ``slope``, ``intercept``: weighted least squares of P(individual) on P(archetype) (calibration:
  slope 1 and intercept 0 when archetypes are right on average at every level); the binned table
  is in ``fidelity_calibration.csv``;
- ``profile_share``: the share of agents whose attributes are exactly their archetype's profile;
- ``requests_per_run``: K x the decision steps of the experiment (the LLM cost of a run).

Every answer goes through the experiment's client (cache, counters, elicitation); identical
questions (agents with the same attributes and borough, archetype profiles equal to an agent's)
are asked once.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm_llm.behaviour.context import observed_context
from lpm_llm.core.behavior import PerArchetype, majority_area
from lpm_llm.population.archetypes import ATTRIBUTES, Archetypes, ArchetypeSpec, describe
from lpm_llm.population.table import BOROUGHS

log = logging.getLogger(__name__)

#: the default archetype sets compared: k-means on every attribute, each profile a real combination
KMEANS_KS = (10, 30, 64, 100, 300)


def stratified_sample(strata: torch.Tensor, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n,) agent indices and (n,) weights summing to 1: proportional allocation over ``strata``
    (N,) with at least one agent per non-empty stratum when ``n`` allows; weight = the stratum's
    share of the agents / its agents sampled."""
    s = strata.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(s)
    present = np.flatnonzero(sizes)
    n = min(n, s.size)
    alloc = np.floor(n * sizes[present] / s.size).astype(np.int64)
    if n >= present.size:
        alloc = np.maximum(alloc, 1)
    alloc = np.minimum(alloc, sizes[present])
    order = np.argsort(-(n * sizes[present] / s.size - alloc))  # largest remainders first
    i = 0
    while alloc.sum() < n:
        j = order[i % order.size]
        if alloc[j] < sizes[present[j]]:
            alloc[j] += 1
        i += 1
    while alloc.sum() > n:  # more strata than agents asked for: drop the smallest allocations
        j = int(np.argmax(np.where(alloc > 0, -sizes[present], -np.inf)))
        alloc[j] -= 1
    picked, weights = [], []
    for stratum, m in zip(present, alloc, strict=True):
        if m == 0:
            continue
        members = np.flatnonzero(s == stratum)
        picked.append(rng.choice(members, size=m, replace=False))
        weights.append(np.full(m, sizes[stratum] / s.size / m))
    idx, w = np.concatenate(picked), np.concatenate(weights)
    return idx, w / w.sum()


def individual_profiles(population: Any, agents: np.ndarray) -> list[dict[str, str]]:
    """Each agent's own attributes (every archetype attribute the population has), as labels."""
    attrs = [a for a in ATTRIBUTES if a in population]
    cols = {a: population[a].to(torch.int64).cpu().numpy()[agents] for a in attrs}
    return [{a: ATTRIBUTES[a][int(cols[a][i])] for a in attrs} for i in range(len(agents))]


def decision_dates(start: dt.date, days: int, every: int, n: int) -> list[dt.date]:
    """``n`` of the experiment's decision dates, spread at 1/(2n), 3/(2n), ... of them."""
    steps = [start + dt.timedelta(days=d) for d in range(0, days, every)]
    return sorted({steps[min(len(steps) - 1, int((2 * i + 1) * len(steps) / (2 * n)))] for i in range(n)})


def fidelity_metrics(p_ind: np.ndarray, p_arch: np.ndarray, weights: np.ndarray, groups: np.ndarray
                     ) -> dict[str, float]:
    """The fidelity metrics (module docstring) of (n, T) individual and archetype answers, (n,)
    weights and (n,) archetype of each sampled agent."""
    w = np.broadcast_to(weights[:, None], p_ind.shape)
    total = w.sum()
    diff = p_arch - p_ind
    date_mean = (w * p_ind).sum(0) / w.sum(0)
    ss_tot = float((w * (p_ind - date_mean) ** 2).sum())
    if ss_tot <= 1e-12 * total:  # individuals that do not differ (float noise): nothing to explain
        ss_tot = 0.0
    member_mean = np.empty_like(p_ind)
    for g in np.unique(groups):
        rows = groups == g
        member_mean[rows] = (w[rows] * p_ind[rows]).sum(0) / w[rows].sum(0)
    x, y = p_arch.ravel(), p_ind.ravel()
    ww = w.ravel()
    mx, my = (ww * x).sum() / total, (ww * y).sum() / total
    vx = float((ww * (x - mx) ** 2).sum())
    slope = float((ww * (x - mx) * (y - my)).sum() / vx) if vx > 0 else math.nan
    return {
        "mad": float((w * np.abs(diff)).sum() / total),
        "bias": float((w * diff).sum() / total),
        "r2": 1.0 - float((w * diff**2).sum()) / ss_tot if ss_tot > 0 else math.nan,
        "r2_partition": 1.0 - float((w * (member_mean - p_ind) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan,
        "slope": slope,
        "intercept": float(my - slope * mx) if vx > 0 else math.nan,
        "individual_sd": math.sqrt(ss_tot / total),
    }


def calibration_table(p_ind: np.ndarray, p_arch: np.ndarray, weights: np.ndarray, bins: int = 5) -> pd.DataFrame:
    """Weighted mean P(individual) against mean P(archetype) in ``bins`` quantile bins of P(archetype)."""
    w = np.broadcast_to(weights[:, None], p_ind.shape).ravel()
    x, y = p_arch.ravel(), p_ind.ravel()
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    rows = []
    for b in np.unique(which):
        m = which == b
        rows.append({"bin": int(b), "p_archetype": float((w[m] * x[m]).sum() / w[m].sum()),
                     "p_individual": float((w[m] * y[m]).sum() / w[m].sum()), "weight": float(w[m].sum() / w.sum())})
    return pd.DataFrame(rows)


class _Questions:
    """Distinct questions (profile, borough of the context) at one date, as an archetype set for
    :class:`~lpm_llm.llm.decision.LLMDecision`."""

    def __init__(self) -> None:
        self.keys: dict[tuple, int] = {}
        self.profiles: list[dict[str, str]] = []
        self.descriptions: list[str] = []
        self.boroughs: list[str] = []

    @property
    def k(self) -> int:
        return len(self.profiles)

    def add(self, profile: Mapping[str, str], borough: str) -> int:
        key = (tuple(sorted(profile.items())), borough)
        if key not in self.keys:
            self.keys[key] = len(self.profiles)
            self.profiles.append(dict(profile))
            self.descriptions.append(describe(profile))
            self.boroughs.append(borough)
        return self.keys[key]


def ask(prompt: Any, client: Any, settings: Any, questions: _Questions, date: dt.date, schedule: Any,
        tables: Mapping[str, Any]) -> np.ndarray:
    """(Q,) P(yes) of every question at ``date`` (one batch through the client)."""
    from lpm_llm.llm.decision import LLMDecision

    if questions.k == 0:
        return np.zeros(0)
    fields = {"description", "borough", *ATTRIBUTES}
    context_vars = [v for v in prompt.input_variables if v not in fields]
    per_borough = {b: observed_context(context_vars, date, b, schedule, **tables) for b in set(questions.boroughs)}
    context: dict[str, Any] = {"step": "fidelity"}
    for v in context_vars:
        context[v] = PerArchetype(per_borough[b][v] for b in questions.boroughs)
    profiles = [p if "borough" in p or "borough" not in prompt.input_variables else {**p, "borough": b}
                for p, b in zip(questions.profiles, questions.boroughs, strict=True)]
    source = LLMDecision(prompt, client, _Fixed(profiles, questions.descriptions), settings)
    return source.probabilities(context).double().numpy()


class _Fixed:
    def __init__(self, profiles: list[dict[str, str]], descriptions: list[str]):
        self.profiles, self.descriptions = profiles, descriptions

    @property
    def k(self) -> int:
        return len(self.profiles)


def fidelity(prompt: Any, client: Any, population: Any, sets: Mapping[str, Archetypes], *, strata: torch.Tensor,
             dates: Sequence[dt.date], schedule: Any, steps: int, sample: int = 500, seed: int = 0,
             settings: Any = None) -> dict[str, pd.DataFrame]:
    """Compare individual answers with archetype answers for each archetype set (module docstring).

    Args:
        prompt, client, settings: the decision's prompt and the client that answers (settings:
            default the client's).
        population: the agents; sets: name -> :class:`Archetypes` of that population.
        strata: (N,) stratum of each agent (the experiment's archetypes).
        dates: decision dates asked; schedule: the policies (``active(date)``).
        steps: decision steps of a run (the cost is K x steps).

    Returns:
        ``sets`` (one row per set), ``archetypes`` (one row per set and archetype),
        ``calibration`` (binned, per set), ``answers`` (per sampled agent and date).
    """
    from lpm_llm.data.observed import load_covid, load_unemployment

    tables = {"covid": load_covid() if {"cases_week", "cases_trend"} & set(prompt.input_variables) else None,
              "unemployment": load_unemployment() if "unemployment_rate" in prompt.input_variables else None}
    agents, weights = stratified_sample(strata, sample, seed)
    people = individual_profiles(population, agents)
    borough_codes = population["borough"].to(torch.int64).cpu()
    homes = {name: [BOROUGHS[h] for h in majority_area(a.index, borough_codes, a.k, len(BOROUGHS))]
             for name, a in sets.items()}
    q = _Questions()
    ind_q = [q.add(p, p["borough"]) for p in people]
    arch_q = {name: [q.add(a.profiles[k], homes[name][k]) for k in range(a.k)] for name, a in sets.items()}
    log.info("fidelity: %d agents, %d sets, %d distinct questions x %d dates", len(agents), len(sets), q.k,
             len(dates))
    answers = np.stack([ask(prompt, client, settings, q, d, schedule, tables) for d in dates], axis=1)  # (Q, T)
    p_ind = answers[ind_q]  # (n, T)
    rows, per_arch, calib = [], [], []
    for name, a in sets.items():
        group = a.index.cpu().numpy()[agents]
        p_arch = answers[arch_q[name]][group]  # (n, T)
        m = fidelity_metrics(p_ind, p_arch, weights, group)
        counts = a.counts.numpy().astype(np.float64)
        share = a.profile_share.numpy() if a.profile_share is not None else np.full(a.k, np.nan)
        rows.append({"set": name, "k": a.k, "requests_per_run": a.k * steps, **m,
                     "profile_share": float((share * counts).sum() / counts.sum()),
                     "p_archetype_sd": float(answers[arch_q[name]].std())})
        calib.append(calibration_table(p_ind, p_arch, weights).assign(set=name))
        for k in range(a.k):
            rows_k = group == k
            wk = weights[rows_k]
            per_arch.append({
                "set": name, "archetype": k, "description": a.descriptions[k], "members": int(counts[k]),
                "profile_share": float(share[k]), "sampled": int(rows_k.sum()),
                "p_archetype": float(answers[arch_q[name][k]].mean()),
                "p_individual": float((wk[:, None] * p_ind[rows_k]).sum() / wk.sum() / len(dates)) if rows_k.any()
                else math.nan,
                "mad": float((wk[:, None] * np.abs(p_arch[rows_k] - p_ind[rows_k])).sum() / wk.sum() / len(dates))
                if rows_k.any() else math.nan,
            })
    answers_df = pd.DataFrame([
        {"agent": int(agents[i]), "weight": float(weights[i]), "date": d.isoformat(), **people[i],
         "p_individual": float(p_ind[i, t]),
         **{f"p_{name}": float(answers[arch_q[name]][int(a.index[agents[i]])][t]) for name, a in sets.items()}}
        for i in range(len(agents)) for t, d in enumerate(dates)])
    return {"sets": pd.DataFrame(rows), "archetypes": pd.DataFrame(per_arch),
            "calibration": pd.concat(calib, ignore_index=True), "answers": answers_df}


def default_sets(cfg: Any, population: Any) -> dict[str, Archetypes]:
    """The experiment's archetypes, the age x sex x borough grouping, and k-means with K = 10, 30,
    64, 100, 300 on every attribute (profiles: the most common combination among members)."""
    attrs = [a for a in ATTRIBUTES if a in population]
    sets = {f"experiment ({ArchetypeSpec.from_yaml(cfg.archetypes).name})":
            ArchetypeSpec.from_yaml(cfg.archetypes).assign(population),
            "group age x sex x borough": ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(population)}
    for k in KMEANS_KS:
        spec = ArchetypeSpec(name=f"kmeans{k}_all", method="kmeans", attributes=attrs, k=k, sample_size=200_000,
                             profile="most_common")
        sets[f"kmeans K={k} (all attributes)"] = spec.assign(population)
    return sets
