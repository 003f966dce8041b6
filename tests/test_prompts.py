"""PromptSpec: loading, versioning, rendering and every load/render error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.resources import resource_dir

PROFILE = {"description": "a 35-44 year old woman in Queens", "age_band": "35-44", "sex": "female",
           "borough": "Queens"}
CONTEXT = {"date": "2020-03-20", "cases_week": 5400, "cases_trend": "rising",
           "policies": "stay-at-home order (NY PAUSE)", "step": 7}


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bundled_isolation_renders_every_variable():
    spec = PromptSpec.from_yaml("isolation.yaml")
    assert spec.name == "isolation" and spec.answer == "yes_no"
    messages = spec.render({**PROFILE, **CONTEXT})
    assert [m["role"] for m in messages] == ["system", "user"]
    text = "\n".join(m["content"] for m in messages)
    assert set(spec.input_variables) == {"description", "borough", "date", "cases_week", "cases_trend", "policies"}
    for value in ("a 35-44 year old woman in Queens", "Queens", "2020-03-20", "5400",
                  "rising", "stay-at-home order (NY PAUSE)"):
        assert value in text
    # Shared text first, so the local server reuses its evaluated prefix across archetypes.
    other = spec.render({**PROFILE, **CONTEXT, "description": "x", "borough": "y"})
    assert messages[0]["content"] == other[0]["content"]
    assert text.index("2020-03-20") < text.index("a 35-44 year old woman in Queens")
    assert "{" not in text, "an unfilled template variable is left"


def test_bundled_work_prompt_declares_its_context():
    spec = PromptSpec.from_yaml("work.yaml")
    assert set(spec.input_variables) == {
        "description", "borough", "month", "cases_week", "cases_trend", "policies",
        "unemployment_rate", "income_support",
    }
    text = spec.render({**PROFILE, **CONTEXT, "month": "April 2020", "unemployment_rate": 14.2,
                        "income_support": "$600 a week"})[1]["content"]
    assert "14.2%" in text and "$600 a week" in text and "April 2020" in text


def test_version_is_short_sha256_of_the_file_and_changes_with_it(tmp_path):
    bundled = resource_dir("prompts") / "isolation.yaml"
    spec = PromptSpec.from_yaml(bundled)
    assert spec.version == hashlib.sha256(bundled.read_bytes()).hexdigest()[:12]
    copy = write(tmp_path, bundled.read_text() + "\n# an edit\n")
    assert PromptSpec.from_yaml(copy).version != spec.version


def test_missing_variable_names_it_and_the_file():
    spec = PromptSpec.from_yaml("isolation.yaml")
    variables = {**PROFILE, **CONTEXT}
    del variables["cases_trend"]
    with pytest.raises(KeyError, match=r"cases_trend.*") as err:
        spec.render(variables)
    assert "isolation.yaml" in str(err.value)


def test_undeclared_template_variable_fails_at_load(tmp_path):
    path = write(tmp_path, "name: t\nanswer: yes_no\ninput_variables: [a]\nuser: '{a} and {b}?'\n")
    with pytest.raises(ValueError, match=r"undeclared variable\(s\) \['b'\]") as err:
        PromptSpec.from_yaml(path)
    assert str(path) in str(err.value)


def test_declared_but_unused_variable_fails_at_load(tmp_path):
    path = write(tmp_path, "name: t\nanswer: yes_no\ninput_variables: [a, z]\nuser: '{a}?'\n")
    with pytest.raises(ValueError, match=r"\['z'\] are declared but no template uses them"):
        PromptSpec.from_yaml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\nanswer: maybe\ninput_variables: []\nuser: hi\n", "unknown answer kind 'maybe'"),
        ("name: t\nanswer: choice\ninput_variables: []\nuser: hi\n", "needs `options`"),
        ("name: t\nanswer: yes_no\noptions: [a, b]\ninput_variables: []\nuser: hi\n", "only valid with"),
        ("name: t\nanswer: yes_no\ninput_variables: []\nuser: hi\ncolour: red\n", r"unknown key\(s\)"),
        ("name: t\nanswer: yes_no\nuser: hi\n", r"missing key\(s\) \['input_variables'\]"),
        ("name: t\nanswer: yes_no\ninput_variables: a\nuser: hi\n", "must be a list"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: t\nanswer: yes_no\ninput_variables: []\nuser: 'unbalanced {'\n", "invalid template"),
    ],
)
def test_malformed_prompt_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        PromptSpec.from_yaml(write(tmp_path, text))


def test_choice_prompt_and_literal_braces(tmp_path):
    path = write(tmp_path, "name: c\nanswer: choice\noptions: [bus, car, walk]\ninput_variables: [who]\n"
                           "user: 'How does {who} travel? Reply as JSON {{\"mode\": ...}}'\n")
    spec = PromptSpec.from_yaml(path)
    assert spec.options == ("bus", "car", "walk")
    assert spec.render({"who": "she"}) == [
        {"role": "user", "content": 'How does she travel? Reply as JSON {"mode": ...}'}
    ]


def test_unknown_prompt_file_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match="no_such_prompt.yaml"):
        PromptSpec.from_yaml("no_such_prompt.yaml")
