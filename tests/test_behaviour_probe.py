"""The sensitivity probe: one variable moves at a time, the others held; answers through the client."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from lpm_llm.behaviour.context import context_levels
from lpm_llm.behaviour.probe import probe, probe_points, spread, typical_profile
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.population.archetypes import ArchetypeSpec, describe
from tests.behaviour_helpers import function_client, read_isolation

START, END = dt.date(2020, 3, 1), dt.date(2020, 5, 31)


@pytest.fixture(scope="module")
def archetypes(small_nyc):
    return ArchetypeSpec(name="asb", method="kmeans", attributes=["age_band", "sex", "borough"], k=6).assign(small_nyc)


def _held(prompt, typical, levels):
    return {**{v: lv.held for v, lv in levels.items()}, **typical, "description": describe(typical)}


def test_every_point_moves_exactly_one_variable_from_the_held_question(small_nyc, archetypes):
    prompt = PromptSpec.from_yaml("isolation.yaml")
    typical = typical_profile(small_nyc, archetypes.attributes)
    assert typical == {"age_band": "25-34", "sex": "Female", "borough": "Brooklyn"}
    levels = context_levels(["date", "cases_week", "cases_trend", "policies"], START, END, nyc_2020())
    held = read_isolation(prompt.render(_held(prompt, typical, levels))[-1]["content"])
    points = probe_points(prompt, archetypes, typical, levels)
    seen = set()
    for p in points:
        if p["kind"] == "archetype":
            continue
        values = {**p["context"], **p["profile"], "description": describe(p["profile"])}
        asked = read_isolation(prompt.render(values)[-1]["content"])
        moved = {k for k in held if asked[k] != held[k]}
        # a profile attribute shows in the description (and the borough also in its own field)
        expected = {p["variable"]} if p["kind"] == "context" else {"description"} | ({"borough"} & {p["variable"]})
        assert moved == (set() if p["held"] else expected), (p["variable"], p["level"], moved)
        seen.add((p["variable"], p["level"]))
    # every level of every variable, each held level exactly once per variable
    assert {v for v, _ in seen} == {"date", "cases_week", "cases_trend", "policies", "age_band", "sex", "borough"}
    assert len([p for p in points if p["variable"] == "age_band"]) == 10
    assert len([p for p in points if p["variable"] == "policies"]) == 4  # none, schools, +PAUSE, +masks
    assert all(sum(q["held"] for q in points if q["variable"] == v) == 1 for v, _ in seen)


def test_only_the_variable_the_model_reads_moves_its_answer(small_nyc, archetypes, tmp_path):
    """A model that reads only the stay-at-home order: every other sweep is flat, exactly."""
    client, backend = function_client(lambda text: 0.7 if "PAUSE" in text.split("Question")[0] else 0.2,
                                      cache_dir=tmp_path / "cache")
    report = probe(PromptSpec.from_yaml("isolation.yaml"), client, archetypes,
                   typical_profile(small_nyc, archetypes.attributes), start=START, end=END, schedule=nyc_2020())
    client.close()
    s = spread(report).set_index("variable")
    assert s.loc["policies", "range"] == pytest.approx(0.5, abs=1e-6)
    flat = s.drop(index="policies")
    assert (flat["range"].abs() < 1e-6).all(), flat
    assert report["answer_mass"].to_numpy() == pytest.approx(1.0)
    pol = report[report["variable"] == "policies"].set_index("label")["probability"]
    assert pol.loc["none"] == pytest.approx(0.2) and pol.filter(like="PAUSE").min() == pytest.approx(0.7)
    # each distinct question is asked once (7 sweeps hold the typical one; some archetypes are sweep
    # points): the rest are cache hits
    assert len(backend.requests) == len({r.messages for r in backend.requests}) <= len(report) - 6
    assert report["requests"].sum() == len(backend.requests)
    assert report["cache_hit"].sum() == len(report) - len(backend.requests)
    assert list(report.columns)[:4] == ["decision", "variable", "kind", "level"]


def test_a_model_that_reads_cases_rises_along_the_cases_sweep(small_nyc, archetypes):
    def p(text: str) -> float:
        cases = int(read_isolation(text)["cases_week"].replace(",", ""))
        return 0.1 + 0.8 * cases / 10000

    client, _ = function_client(p)
    report = probe(PromptSpec.from_yaml("isolation.yaml"), client, archetypes,
                   typical_profile(small_nyc, archetypes.attributes), start=START, end=END, schedule=nyc_2020())
    client.close()
    cases = report[report["variable"] == "cases_week"].sort_values("level_index")
    assert cases["probability"].tolist() == pytest.approx([0.1, 0.108, 0.18, 0.34, 0.9], abs=1e-6)
    others = report[report["variable"] != "cases_week"]
    assert others["probability"].to_numpy() == pytest.approx(0.18, abs=1e-6)  # held at 1,000 cases
    # dates: 4 spread + the middle; cases 5, trend 4, policies 4; age 10, sex 2, borough 5; K archetypes
    assert isinstance(report, pd.DataFrame) and len(report) == 5 + 5 + 4 + 4 + 10 + 2 + 5 + archetypes.k
