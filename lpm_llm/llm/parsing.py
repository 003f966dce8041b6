"""Turn a model's answer into a yes/no, a probability, or one of a prompt's options.

Every parser returns a value or raises :class:`ParseError` with a ``reason`` that the decision
layer puts in its re-ask message; nothing unreadable ever becomes 0.0. Rules:

- Yes/no text: the first word decides ("Yes.", "no!", "YES, because ..."); otherwise, if the
  text contains the whole word yes or the whole word no but not both, that one. Markdown
  (``**Yes**``), quotes and code fences are ignored. A refusal ("I can't help with that",
  "As an AI ...") is a ``ParseError`` of reason ``refusal``.
- Stated probability: the ``"probability"`` field of the first JSON object in the text (code
  fences and surrounding prose are ignored); without JSON, a percentage in the text, or else the
  text's only number. A percentage ``"70%"`` (as a JSON string or in prose) means 0.70. A bare
  number must lie in [0, 1]: 1.7 or -0.2 is ``out_of_range`` (never read as 1.7 %).
- Logprobs: P(yes) = sum of exp(logprob) of the first-token alternatives that normalise to "yes",
  divided by that of "yes" plus "no" (tokens are normalised by stripping whitespace, tokenizer
  space markers and punctuation, and lowercasing). Neither present is a ``ParseError``; so is a
  yes+no mass (the first token's probability of reading yes or no) below ``min_mass``: when the
  model was about to say "I" or "Today", renormalising its tiny yes/no mass would turn a
  non-answer into a confident probability.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence

PROBABILITY_FIELD = "probability"

#: JSON schema of a stated probability, sent as the response format in ``json`` mode.
PROBABILITY_SCHEMA: dict = {
    "type": "object",
    "properties": {PROBABILITY_FIELD: {"type": "number", "minimum": 0, "maximum": 1}},
    "required": [PROBABILITY_FIELD],
}

_REFUSALS = re.compile(
    r"\b(i\s*(?:can(?:'|’)?t|cannot|can\s+not|am\s+unable|'m\s+unable|won(?:'|’)?t|am\s+not\s+able|"
    r"'m\s+not\s+able)\b|as\s+an\s+(?:ai|a\.i\.|language\s+model)|i(?:'|’)?m\s+sorry|i\s+am\s+sorry|"
    r"i\s+apologi[sz]e)",
    re.IGNORECASE,
)
_FENCE = re.compile(r"```[a-zA-Z]*")
_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PERCENT = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*%")
_TOKEN_STRIP = " \t\n\r\"'`*_.,!?:;()[]{}<>\u2581\u0120\u010a"


class ParseError(ValueError):
    """An answer that cannot be used. ``reason``: unparseable, refusal, out_of_range, missing_field,
    no_yes_no_token, low_answer_mass, no_choices."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _clean(text: str) -> str:
    return _FENCE.sub(" ", text or "").strip()


def is_refusal(text: str) -> bool:
    """True if the text reads like a refusal ("I can't help with that", "As an AI ...")."""
    return bool(_REFUSALS.search(text or ""))


def parse_yes_no(text: str) -> bool:
    """True for a yes, False for a no; ``ParseError`` otherwise (see the module docstring)."""
    words = _WORD.findall(_clean(text).lower())
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    if is_refusal(text):
        raise ParseError("refusal", f"the model refused: {_short(text)}")
    found = {w for w in words if w in ("yes", "no")}
    if len(found) == 1:
        return found.pop() == "yes"
    if found:
        raise ParseError("unparseable", f"both yes and no in {_short(text)}")
    raise ParseError("unparseable", f"no yes or no in {_short(text)}")


def parse_choice(text: str, options: Sequence[str]) -> str:
    """The one option named in the text (case-insensitive, whole words); ``ParseError`` otherwise."""
    cleaned = _clean(text).lower()
    hits = [o for o in options if re.search(rf"(?<!\w){re.escape(o.lower())}(?!\w)", cleaned)]
    if len(hits) == 1:
        return hits[0]
    if not hits and is_refusal(text):
        raise ParseError("refusal", f"the model refused: {_short(text)}")
    which = "several options" if hits else "none of the options"
    raise ParseError("unparseable", f"{which} {list(options)} in {_short(text)}")


def _first_json_object(text: str) -> dict | None:
    """The first decodable JSON object in the text, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _to_probability(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise ParseError("unparseable", f"{where} is a boolean ({value}), not a probability")
    if isinstance(value, str):
        s = value.strip()
        pct = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*%", s)
        if pct:
            return _in_range(float(pct.group(1)) / 100.0, s)
        try:
            value = float(s)
        except ValueError:
            raise ParseError("unparseable", f"{where} is not a number: {s!r}") from None
    if not isinstance(value, int | float):
        raise ParseError("unparseable", f"{where} is not a number: {value!r}")
    return _in_range(float(value), repr(value))


def _in_range(p: float, shown: str) -> float:
    if not math.isfinite(p) or p < 0.0 or p > 1.0:
        raise ParseError("out_of_range", f"probability {shown} is outside [0, 1]")
    return p


def parse_probability(text: str) -> float:
    """A stated probability in [0, 1] (see the module docstring); ``ParseError`` otherwise."""
    cleaned = _clean(text)
    obj = _first_json_object(cleaned)
    if obj is not None:
        if PROBABILITY_FIELD not in obj:
            raise ParseError(
                "missing_field", f"JSON without a {PROBABILITY_FIELD!r} field (keys: {sorted(obj)})"
            )
        return _to_probability(obj[PROBABILITY_FIELD], f"field {PROBABILITY_FIELD!r}")
    percents = _PERCENT.findall(cleaned)
    if len(set(percents)) == 1:
        return _in_range(float(percents[0]) / 100.0, percents[0] + "%")
    numbers = _NUMBER.findall(cleaned)
    if len(set(numbers)) == 1 and not percents:
        return _in_range(float(numbers[0]), numbers[0])
    if is_refusal(text):
        raise ParseError("refusal", f"the model refused: {_short(text)}")
    if not numbers:
        raise ParseError("unparseable", f"no probability in {_short(text)}")
    raise ParseError("unparseable", f"several numbers, none marked as the probability, in {_short(text)}")


def normalise_token(token: str) -> str:
    """``" Yes"``, ``"YES."``, ``"\u2581yes"`` -> ``"yes"``."""
    return token.strip(_TOKEN_STRIP).lower()


def yes_no_mass(top_logprobs: Iterable[tuple[str, float]]) -> tuple[float, float]:
    """(mass of yes, mass of no) among the first token's (token, logprob) alternatives."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in top_logprobs:
        key = normalise_token(token)
        if key in mass:
            mass[key] += math.exp(logprob)
    return mass["yes"], mass["no"]


def yes_probability_from_logprobs(top_logprobs: Iterable[tuple[str, float]], min_mass: float = 0.0) -> float:
    """P(yes) renormalised over yes and no, from the first token's (token, logprob) alternatives.

    ``ParseError`` when neither is among them (``no_yes_no_token``), or when yes + no hold less
    than ``min_mass`` of the first token's probability (``low_answer_mass``).
    """
    tops = list(top_logprobs)
    yes, no = yes_no_mass(tops)
    total = yes + no
    if total <= 0.0:
        raise ParseError(
            "no_yes_no_token", f"neither yes nor no among the first token's alternatives {[t for t, _ in tops][:8]}"
        )
    if total < min_mass:
        likely = max(tops, key=lambda t: t[1])[0]
        raise ParseError(
            "low_answer_mass",
            f"yes and no hold {total:.3f} of the first token's probability, below llm.min_answer_mass "
            f"{min_mass:g} (most likely first token: {likely!r})",
        )
    return yes / total


def _short(text: str, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
