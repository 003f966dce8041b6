"""Elicitation: few-shot examples before the question, contextual calibration, and what they change."""

from __future__ import annotations

import math

import pytest

from lpm_llm.llm.decision import LLMDecision
from lpm_llm.llm.elicitation import Elicitation, calibrate, elicitation_tag
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.llm.settings import LLMSettings
from tests.behaviour_helpers import function_client

CONTEXT = {"step": 0, "date": "2020-04-05", "cases_week": "2,000", "cases_trend": "about the same as the week before",
           "policies": "none"}


class Two:
    k = 2
    profiles = [{"borough": "Queens"}, {"borough": "Bronx"}]
    descriptions = ["a woman in Queens", "a man in the Bronx"]


def _p(text: str) -> float:
    """0.2 for the content-free question (every variable N/A), else 0.6 (Queens) or 0.3."""
    if "You are N/A" in text:
        return 0.2
    return 0.6 if "Queens" in text else 0.3


def test_calibration_divides_out_the_content_free_odds():
    assert calibrate(0.2, 0.2) == pytest.approx(0.5)
    # logit(p') = logit(p) - logit(q)
    p, q = 0.6, 0.2
    c = calibrate(p, q)
    assert math.log(c / (1 - c)) == pytest.approx(math.log(p / (1 - p)) - math.log(q / (1 - q)))
    assert calibrate(0.0, 0.3) == 0.0 and calibrate(1.0, 0.3) == 1.0  # samples-mode extremes stay
    assert 0 < calibrate(0.5, 1.0) < 1  # a certain content-free answer is kept off 0 and 1
    assert elicitation_tag(Elicitation()) == "" and elicitation_tag(Elicitation(few_shot=2, calibrate="content_free")) \
        == "+fs2+cf"


def test_contextual_calibration_asks_the_content_free_question_once_and_records_both(tmp_path):
    settings = LLMSettings(min_answer_mass=0.1, elicitation={"calibrate": "content_free"})
    client, backend = function_client(_p, cache_dir=tmp_path / "c", elicitation={"calibrate": "content_free"})
    source = LLMDecision(PromptSpec.from_yaml("isolation.yaml"), client, Two(), settings)
    p1 = source.probabilities(CONTEXT).tolist()
    p2 = source.probabilities({**CONTEXT, "step": 1, "date": "2020-04-12"}).tolist()
    client.close()
    assert p1 == pytest.approx([6 / 7, 12 / 19])  # odds 1.5 and 3/7, divided by the content-free 1/4
    assert p2 == pytest.approx(p1)
    free = [r for r in backend.requests if "You are N/A" in r.messages[-1][1]]
    assert len(free) == 1 and len(backend.requests) == 5  # 2 steps x 2 archetypes + the content-free question
    rec = source.records[0]
    assert rec["raw_probability"] == pytest.approx(0.6) and rec["content_free_probability"] == pytest.approx(0.2)
    assert rec["prompt_version"] == source.prompt.version + "+cf"


def test_few_shot_puts_examples_before_the_question_and_changes_every_key(tmp_path):
    prompt = PromptSpec.from_yaml("isolation.yaml")
    plain = prompt.render({**CONTEXT, "description": "a woman in Queens", "borough": "Queens"})
    shot = prompt.render({**CONTEXT, "description": "a woman in Queens", "borough": "Queens"}, few_shot=2)
    assert [m["role"] for m in shot] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shot[0] == plain[0] and shot[-1] == plain[-1]
    assert [shot[2]["content"], shot[4]["content"]] == [prompt.examples[0]["answer"], prompt.examples[1]["answer"]]
    assert "9,500" in shot[1]["content"]  # the first example, rendered with the prompt's own template
    with pytest.raises(ValueError, match="has 4 examples; few_shot 5"):
        prompt.render({**CONTEXT, "description": "x", "borough": "Queens"}, few_shot=5)

    client, backend = function_client(_p, cache_dir=tmp_path / "c")
    LLMDecision(prompt, client, Two(), LLMSettings(min_answer_mass=0.1)).probabilities(CONTEXT)
    few = LLMDecision(prompt, client, Two(), LLMSettings(min_answer_mass=0.1, elicitation={"few_shot": 2}))
    few.probabilities(CONTEXT)
    client.close()
    assert client.usage.cache_hits == 0 and len(backend.requests) == 4  # new messages, new keys
    assert few.records[0]["prompt_version"] == prompt.version + "+fs2"


def test_examples_must_give_every_variable(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nanswer: yes_no\ninput_variables: [a, b]\nuser: '{a} {b}?'\n"
                    "examples:\n  - {a: '1', answer: 'Yes'}\n")
    with pytest.raises(ValueError, match=r"examples\[0\] must give every input variable.*missing \['b'\]"):
        PromptSpec.from_yaml(path)
