"""``PromptSpec``: one decision's prompt, loaded from ``prompts/<name>.yaml`` and rendered per archetype.

A prompt file holds::

    name: isolation                  # the decision's name
    description: Does this person stay home this week?
    answer: yes_no                   # yes_no | probability | choice (then also `options: [...]`)
    input_variables: [description, age_band, date, ...]
    system: |                        # langchain-core f-string templates: {variable}
      ...
    user: |
      ...
    examples:                        # optional: worked examples for few-shot framing
      - {description: ..., date: ..., answer: "Yes"}   # every input variable, and the answer

Its ``version`` is the first 12 hex digits of the sha256 of the file's bytes: computed, never
written in the file, so that any edit changes it (and every decision record carries it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from langchain_core.prompts import ChatPromptTemplate

from lpm_llm.resources import resolve_path

ANSWER_KINDS: tuple[str, ...] = ("yes_no", "probability", "choice")
_KEYS = {"name", "description", "answer", "options", "input_variables", "system", "user", "examples"}
_REQUIRED = ("name", "answer", "input_variables", "user")
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


@dataclass(frozen=True)
class PromptSpec:
    """A decision prompt: templates, declared variables and the kind of answer expected.

    Attributes:
        name: decision name, e.g. ``"isolation"``.
        description: one line saying what is asked.
        answer: ``"yes_no"``, ``"probability"`` or ``"choice"``.
        options: the allowed answers of a ``choice`` prompt (empty otherwise).
        input_variables: the variables the templates use, as declared in the file.
        system, user: the f-string templates.
        version: short sha256 of the file's content.
        source: the file it was loaded from (for error messages).
        examples: worked examples, each a mapping of every input variable and ``answer`` (the
            assistant's reply), used by ``few_shot`` (see :mod:`~lpm_llm.llm.elicitation`).
    """

    name: str
    answer: str
    input_variables: tuple[str, ...]
    user: str
    system: str = ""
    description: str = ""
    options: tuple[str, ...] = ()
    version: str = ""
    source: str = "<inline>"
    examples: tuple[dict[str, str], ...] = ()
    _template: ChatPromptTemplate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"prompt {self.source}"
        if self.answer not in ANSWER_KINDS:
            raise ValueError(
                f"{where}: unknown answer kind {self.answer!r}; known: {', '.join(ANSWER_KINDS)}"
            )
        if self.answer == "choice" and len(self.options) < 2:
            raise ValueError(f"{where}: answer 'choice' needs `options` with at least two entries")
        if self.answer != "choice" and self.options:
            raise ValueError(f"{where}: `options` is only valid with answer 'choice', not {self.answer!r}")
        messages = ([("system", self.system)] if self.system else []) + [("human", self.user)]
        try:
            template = ChatPromptTemplate.from_messages(messages, template_format="f-string")
        except (ValueError, KeyError) as err:
            raise ValueError(f"{where}: invalid template: {err}") from err
        used = set(template.input_variables)
        declared = set(self.input_variables)
        if used - declared:
            raise ValueError(
                f"{where}: template uses undeclared variable(s) {sorted(used - declared)}; "
                f"declare them in input_variables (declared: {sorted(declared)})"
            )
        if declared - used:
            raise ValueError(
                f"{where}: input_variables {sorted(declared - used)} are declared but no template uses them"
            )
        object.__setattr__(self, "_template", template)
        for i, ex in enumerate(self.examples):
            missing = sorted(declared - set(ex))
            extra = sorted(set(ex) - declared - {"answer"})
            if missing or extra or "answer" not in ex:
                raise ValueError(f"{where}: examples[{i}] must give every input variable and `answer`; "
                                 f"missing {missing + ([] if 'answer' in ex else ['answer'])}, unknown {extra}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PromptSpec:
        """Load a prompt file: a path, or the name of a bundled prompt (``"isolation.yaml"``)."""
        file = resolve_path(path, "prompts")
        raw = file.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"prompt {file}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"prompt {file}: expected a mapping with keys {sorted(_KEYS)}")
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"prompt {file}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"prompt {file}: missing key(s) {missing}")
        examples = data.get("examples") or []
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            raise ValueError(f"prompt {file}: examples must be a list of mappings (variables and answer)")
        variables = data["input_variables"]
        if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
            raise ValueError(f"prompt {file}: input_variables must be a list of names")
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            answer=str(data["answer"]),
            options=tuple(str(o) for o in data.get("options") or ()),
            input_variables=tuple(variables),
            system=str(data.get("system") or ""),
            user=str(data["user"]),
            version=hashlib.sha256(raw).hexdigest()[:12],
            source=str(file),
            examples=tuple({str(k): str(v) for k, v in e.items()} for e in examples),
        )

    def render(self, variables: Mapping[str, Any], few_shot: int = 0) -> list[dict[str, str]]:
        """Fill the templates: ``[{"role": "system", "content": ...}, {"role": "user", ...}]``.

        ``variables`` may hold more keys than the prompt needs (the whole simulation context);
        a declared variable that is missing raises a ``KeyError`` naming it and the prompt file.
        ``few_shot``: the first that many ``examples``, each a user turn and the assistant's
        answer, go between the system message and the question.
        """
        missing = [v for v in self.input_variables if v not in variables]
        if missing:
            raise KeyError(
                f"prompt {self.source} needs variable(s) {missing}; given: {sorted(variables)}"
            )
        if few_shot > len(self.examples):
            raise ValueError(f"prompt {self.source} has {len(self.examples)} examples; few_shot {few_shot} "
                             "asks for more: lower llm.elicitation.few_shot or add examples to the prompt")
        messages = self._messages(variables)
        shots = []
        for ex in self.examples[:few_shot]:
            shots += [m for m in self._messages(ex) if m["role"] == "user"]
            shots.append({"role": "assistant", "content": ex["answer"]})
        return messages[:-1] + shots + messages[-1:]

    def content_free(self, few_shot: int = 0) -> list[dict[str, str]]:
        """The question with every variable ``N/A`` (contextual calibration), examples included."""
        from lpm_llm.llm.elicitation import CONTENT_FREE

        return self.render(dict.fromkeys(self.input_variables, CONTENT_FREE), few_shot)

    def _messages(self, variables: Mapping[str, Any]) -> list[dict[str, str]]:
        values = {v: variables[v] for v in self.input_variables}
        messages = self._template.format_messages(**values)
        return [{"role": _ROLES[m.type], "content": str(m.content).strip()} for m in messages]
