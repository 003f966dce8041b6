"""The sensitivity report of a decision: P(yes) as one variable of its prompt moves, the rest held.

For a decision's prompt, the probe asks (through the run's client: cache, re-asks, counters,
elicitation, exactly as a run asks):

- every **context variable** the prompt declares (cases, trend, policies, date, ...; levels from
  :func:`~lpm_llm.behaviour.context.context_levels`), each across its levels while every other
  variable keeps its held value, for the typical person;
- every **profile attribute** of the archetypes (age band, sex, borough, ...) across its labels,
  the other attributes those of the typical person (the most common label of each, among agents),
  the context held;
- every **archetype** at the held context (``variable`` = ``archetype``).

One row per point (``behaviour.csv``): ``decision``, ``variable``, ``kind`` (context, profile,
archetype), ``level`` (the value shown to the model), ``label`` (short), ``level_index``,
``held`` (this level is the held value), ``probability``, ``raw_probability`` (before contextual
calibration), ``answer_mass`` (logprobs mode: the first token's yes+no probability), ``cache_hit``,
``requests``, ``fallback``, ``prompt_version``. The typical point is the same request in every
sweep: it is asked once (the rest are cache hits).

Cost: about 4-5 levels per context variable, every label of each attribute, and K archetypes: 64
questions for the main job (30 archetypes), asked once and cached, so that a run's probe is free on
a rerun (``outputs.behaviour: false`` turns it off).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lpm_llm.behaviour.context import KNOWN, Levels, context_levels
from lpm_llm.core.behavior import PerArchetype
from lpm_llm.population.archetypes import ATTRIBUTES, describe

log = logging.getLogger(__name__)

#: the columns of behaviour.csv
COLUMNS = ("decision", "variable", "kind", "level", "label", "level_index", "held", "probability",
           "raw_probability", "answer_mass", "cache_hit", "requests", "fallback", "prompt_version")


@dataclass
class _Points:
    """Probe points as an archetype set for :class:`~lpm_llm.llm.decision.LLMDecision`: one
    "archetype" per point, its own profile and context."""

    profiles: list[dict[str, str]]
    descriptions: list[str]

    @property
    def k(self) -> int:
        return len(self.profiles)


def typical_profile(population: Any, attributes: Sequence[str]) -> dict[str, str]:
    """The most common label of each attribute among the agents (``employed``: the majority)."""
    import torch

    out = {}
    for a in attributes:
        labels = ATTRIBUTES[a]
        counts = torch.bincount(population[a].to(torch.int64).cpu(), minlength=len(labels))
        out[a] = labels[int(counts.argmax())]
    return out


def short_label(text: str, width: int = 40) -> str:
    """A short label for a long level: each policy without parentheses, up to its first colon, in
    at most ``width`` characters of whole words, joined by " + "."""
    out = []
    for part in text.split("; "):
        words, line = re.sub(r"\s*\([^)]*\)", "", part).split(":")[0].split(), ""
        for w in words:
            if len(line) + len(w) + 1 > width:
                break
            line = f"{line} {w}".strip()
        out.append(line or part[:width])
    return " + ".join(out)


def probe_points(prompt: Any, archetypes: Any, typical: Mapping[str, str], levels: Mapping[str, Levels],
                 variables: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The probe's points: dicts of ``variable``, ``kind``, ``level``, ``level_index``, ``held``,
    ``profile`` (its fields) and ``context`` (every context variable), one variable moved each.
    ``variables``: sweep only these (context variables, attributes, ``archetype``); default all."""
    held_context = {v: lv.held for v, lv in levels.items()}
    attributes = [a for a in archetypes.profiles[0] if a in ATTRIBUTES] if archetypes.k else []
    base = {a: typical[a] for a in attributes}
    swept = set(variables) if variables is not None else {*levels, *attributes, "archetype"}
    points = []
    for v, lv in levels.items():
        if v not in swept:
            continue
        for i, value in enumerate(lv.values):
            points.append({"variable": v, "kind": "context", "level": value, "level_index": i,
                           "held": i == lv.typical, "profile": dict(base),
                           "context": {**held_context, v: value}})
    for a in attributes:
        if a not in swept:
            continue
        for i, label in enumerate(ATTRIBUTES[a]):
            points.append({"variable": a, "kind": "profile", "level": label, "level_index": i,
                           "held": label == base[a], "profile": {**base, a: label},
                           "context": dict(held_context)})
    for k in range(archetypes.k if "archetype" in swept else 0):
        points.append({"variable": "archetype", "kind": "archetype", "level": archetypes.descriptions[k],
                       "level_index": k, "held": False, "profile": dict(archetypes.profiles[k]),
                       "context": dict(held_context)})
    return points


def probe(prompt: Any, client: Any, archetypes: Any, typical: Mapping[str, str], *, start: dt.date,
          end: dt.date, schedule: Any, settings: Any = None, decision: str | None = None,
          n_dates: int = 4, variables: Sequence[str] | None = None) -> pd.DataFrame:
    """The sensitivity report of one decision (see the module docstring); one row per point.

    Args:
        prompt: the decision's :class:`~lpm_llm.llm.prompts.PromptSpec`.
        client: the :class:`~lpm_llm.llm.client.LLMClient` (its cache and usage counters).
        archetypes: ``k``, ``profiles``, ``descriptions`` (the run's archetypes).
        typical: the held profile, attribute -> label (:func:`typical_profile`).
        start, end: the window whose dates, months and policies are probed.
        schedule: the run's intervention schedule (``active(date)``).
        settings: :class:`~lpm_llm.llm.settings.LLMSettings` (default: the client's).
        n_dates: dates (and months) probed, besides the middle of the window.
        variables: sweep only these (default: every variable, attribute and the archetypes).
    """
    from lpm_llm.llm.decision import LLMDecision

    profile_fields = {"description", *(archetypes.profiles[0] if archetypes.k else {})}
    context_vars = [v for v in prompt.input_variables if v not in profile_fields]
    levels = context_levels(context_vars, start, end, schedule, n_dates=n_dates)
    points = probe_points(prompt, archetypes, typical, levels, variables)
    asked = _Points(profiles=[p["profile"] for p in points],
                    descriptions=[describe(p["profile"]) for p in points])
    source = LLMDecision(prompt, client, asked, settings)
    context: dict[str, Any] = {"step": "probe"}
    for v in context_vars:
        context[v] = PerArchetype(p["context"][v] for p in points)
    source.probabilities(context)
    rows = []
    for p, rec in zip(points, source.records, strict=True):
        rows.append({
            "decision": decision or prompt.name, "variable": p["variable"], "kind": p["kind"],
            "level": p["level"], "label": short_label(p["level"]), "level_index": p["level_index"],
            "held": p["held"], **{c: rec[c] for c in ("probability", "raw_probability", "answer_mass", "cache_hit",
                                                      "requests", "fallback", "prompt_version")},
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def spread(report: pd.DataFrame) -> pd.DataFrame:
    """Per decision and variable: the range of P(yes) (max - min), its min and max, the levels,
    and the least answer mass among them."""
    g = report.groupby(["decision", "variable"], sort=False)
    out = pd.DataFrame({"levels": g.size(), "p_min": g["probability"].min(), "p_max": g["probability"].max(),
                        "min_answer_mass": g["answer_mass"].min()})
    out.insert(1, "range", out["p_max"] - out["p_min"])
    return out.reset_index()


def probe_decisions(cfg: Any, client: Any, population: Any, archetypes: Any,
                    variables: Sequence[str] | None = None) -> pd.DataFrame:
    """The sensitivity report of every enabled decision of an experiment config (its window,
    schedule, prompts and elicitation); decisions whose prompts have variables without probe
    levels are skipped with a warning."""
    from lpm_llm.llm.prompts import PromptSpec
    from lpm_llm.resources import resolve_path

    end = cfg.start_date + dt.timedelta(days=cfg.days - 1)
    typical = typical_profile(population, [a for a in archetypes.attributes if a in ATTRIBUTES])
    frames = []
    for name, dc in cfg.decisions.items():
        if not dc.enabled:
            continue
        prompt = PromptSpec.from_yaml(resolve_path(dc.prompt, "prompts"))
        profile_fields = {"description", *archetypes.attributes}
        unknown = [v for v in prompt.input_variables if v not in profile_fields and v not in KNOWN]
        if unknown:
            log.warning("behaviour probe of decision %r skipped: no probe levels for its variable(s) %s",
                        name, unknown)
            continue
        frames.append(probe(prompt, client, archetypes, typical, start=cfg.start_date, end=end,
                            schedule=cfg.interventions.schedule(), settings=cfg.llm, decision=name,
                            variables=variables))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def write_behaviour(cfg: Any, client: Any, population: Any, archetypes: Any, out_dir: Any,
                    plots: bool = True, variables: Sequence[str] | None = None) -> dict[str, Any]:
    """Probe every decision of ``cfg``; write ``behaviour.csv`` and ``behaviour_<decision>.png``
    into ``out_dir``. Returns the manifest's summary: the range of P(yes) per decision and
    variable, the least answer mass, the questions asked and those sent to the model."""
    from pathlib import Path

    out_dir = Path(out_dir)
    before = (client.usage.calls, client.usage.cache_hits)
    report = probe_decisions(cfg, client, population, archetypes, variables)
    report.to_csv(out_dir / "behaviour.csv", index=False)
    if plots and len(report):
        from lpm_llm.behaviour.plots import plot_probe

        for name, d in report.groupby("decision", sort=False):
            plot_probe(d, out_dir / f"behaviour_{name}.png",
                       title=f"P({name}) as one variable moves, the others held (red ring: held level)")
    s = spread(report)
    return {
        "questions": client.usage.calls - before[0],
        "sent": (client.usage.calls - before[0]) - (client.usage.cache_hits - before[1]),
        "range": {d: dict(zip(g["variable"], g["range"].round(4), strict=True)) for d, g in s.groupby("decision")},
        "min_answer_mass": None if report["answer_mass"].isna().all() else float(report["answer_mass"].min()),
    }
