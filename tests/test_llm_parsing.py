"""Parsing of model answers: yes/no, stated probabilities, first-token logprobs, refusals."""

from __future__ import annotations

import math

import pytest

from lpm_llm.llm.parsing import (
    ParseError,
    normalise_token,
    parse_choice,
    parse_probability,
    parse_yes_no,
    yes_no_mass,
    yes_probability_from_logprobs,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", True), ("Yes.", True), ("no!", False), ("YES, because cases are rising", True),
        ("**No**", False), ('"yes"', True), ("```\nNo\n```", False), ('{"answer": "yes"}', True),
        ("I think the answer is no.", False), ("  no, I go out  ", False), ("Answer: Yes", True),
    ],
)
def test_yes_no(text, expected):
    assert parse_yes_no(text) is expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I can't help with that.", "refusal"),
        ("As an AI, I do not have a body.", "refusal"),
        ("I'm sorry, I cannot answer.", "refusal"),
        ("maybe", "unparseable"),
        ("", "unparseable"),
        ("It depends: yes and no", "unparseable"),
        ("Nothing to add", "unparseable"),  # "no" only as part of a word
    ],
)
def test_yes_no_failures(text, reason):
    with pytest.raises(ParseError) as err:
        parse_yes_no(text)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"probability": 0.7}', 0.7),
        ('```json\n{"probability": 0.25}\n```', 0.25),
        ('Sure! Here it is: {"probability": 0.4, "why": "cases"} Hope this helps.', 0.4),
        ('{"probability": "70%"}', 0.7),
        ('{"probability": "0.3"}', 0.3),
        ("70%", 0.7),
        ("I would say 35 %.", 0.35),
        ("0.6", 0.6),
        ("probability: .5", 0.5),
        ('{"probability": 1}', 1.0),
        ('{"probability": 0}', 0.0),
    ],
)
def test_stated_probability(text, expected):
    assert parse_probability(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"probability": 1.7}', "out_of_range"),
        ('{"probability": -0.2}', "out_of_range"),
        ("1.7", "out_of_range"),  # a bare number above 1 is not read as a percentage
        ("150%", "out_of_range"),
        ('{"p": 0.2}', "missing_field"),
        ('{"probability": "high"}', "unparseable"),
        ('{"probability": true}', "unparseable"),
        ('{"probability": null}', "unparseable"),
        ("I'd say 0.6, given 5400 cases", "unparseable"),
        ("no idea", "unparseable"),
        ("As an AI I cannot estimate that", "refusal"),
    ],
)
def test_stated_probability_failures(text, reason):
    with pytest.raises(ParseError) as err:
        parse_probability(text)
    assert err.value.reason == reason


def test_logprobs_sum_variants_and_renormalise():
    tops = [("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("YES.", math.log(0.05)),
            ("No", math.log(0.2)), ("\u2581no", math.log(0.05)), ("The", math.log(0.1))]
    assert yes_probability_from_logprobs(tops) == pytest.approx(0.65 / 0.9)


def test_logprobs_only_yes_gives_one_and_neither_is_an_error():
    assert yes_probability_from_logprobs([("Yes", -0.1), ("Sure", -2.0)]) == pytest.approx(1.0)
    with pytest.raises(ParseError) as err:
        yes_probability_from_logprobs([("The", -0.1), ("I", -1.0)])
    assert err.value.reason == "no_yes_no_token"


def test_normalise_token():
    variants = (" Yes", "YES", "yes.", "\u2581yes", "\u0120Yes", "**yes**")
    assert {normalise_token(t) for t in variants} == {"yes"}
    assert normalise_token("Yesterday") == "yesterday"


def test_choice():
    assert parse_choice("I take the Bus.", ["bus", "car"]) == "bus"
    with pytest.raises(ParseError, match="several options"):
        parse_choice("bus or car", ["bus", "car"])
    with pytest.raises(ParseError) as err:
        parse_choice("I cannot say", ["bus", "car"])
    assert err.value.reason == "refusal"


def test_yes_no_mass_below_the_minimum_is_not_an_answer():
    # The example: the model was about to say "I"; yes and no hold 1.1e-5 of the first token.
    tops = [("I", -0.01), ("Yes", -11.5), ("No", -13.8)]
    yes, no = yes_no_mass(tops)
    assert yes == pytest.approx(math.exp(-11.5)) and no == pytest.approx(math.exp(-13.8))
    assert yes_probability_from_logprobs(tops) == pytest.approx(0.909, abs=1e-3)  # renormalised: no minimum
    with pytest.raises(ParseError) as err:
        yes_probability_from_logprobs(tops, min_mass=0.5)
    assert err.value.reason == "low_answer_mass" and "'I'" in str(err.value) and "0.5" in str(err.value)
    # At or above the minimum the renormalised probability is returned unchanged.
    ok = [(" Yes", math.log(0.3)), ("no", math.log(0.2)), ("I", math.log(0.5))]
    assert yes_probability_from_logprobs(ok, min_mass=0.5) == pytest.approx(0.6)
    with pytest.raises(ParseError, match="low_answer_mass"):
        yes_probability_from_logprobs(ok, min_mass=0.51)
