"""How a decision's question is put to the model and its answer read: few-shot framing and
contextual calibration (``llm.elicitation``).

- ``few_shot: N`` puts the first N worked examples of the prompt file (its ``examples:`` list:
  template variables and the answer, Yes or No) before the question, as earlier user and assistant
  turns rendered with the prompt's own template. They show the model the form of an answer (one
  word) and that the situation matters; they are a prior chosen by whoever wrote them, and they are
  in the prompt file for everyone to read.
- ``calibrate: content_free`` divides out the model's answer bias (Zhao et al. 2021, "Calibrate
  Before Use"): the same messages (examples included) are asked once with every template variable
  replaced by ``N/A``, giving P_cf(yes); each answer p becomes p' with
  logit(p') = logit(p) - logit(P_cf(yes)), i.e. p' = (p / P_cf) / (p / P_cf + (1 - p) / (1 - P_cf)).
  For a yes/no answer this is a shift in logit space, the same for every archetype and step: it
  moves answers towards 1/2, where the same evidence moves the probability most, and keeps the
  order of every pair of answers.

A few-shot change changes the messages, hence every cache key. Calibration does not change what is
asked (the raw answers are a pure function of the request and are shared), but changes the
probability, so that :func:`elicitation_tag` is appended to the prompt version of every record.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: the value of every template variable in the content-free question (Zhao et al. use "N/A")
CONTENT_FREE = "N/A"
#: P_cf is kept in [eps, 1 - eps], so that a model sure of its content-free answer cannot
#: turn every answer into 0 or 1
_EPS = 1e-3


class Elicitation(BaseModel):
    """The ``llm.elicitation`` block: ``{calibrate: none | content_free, few_shot: N}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibrate: Literal["none", "content_free"] = Field(
        "none", description="content_free: divide out P(yes) of a content-free question (Zhao et al. 2021)")
    few_shot: int = Field(0, ge=0, le=16, description="worked examples from the prompt file's `examples:` "
                                                       "put before the question")


def elicitation_tag(e: Elicitation) -> str:
    """'' for the default; else e.g. ``+fs2+cf``, appended to the prompt version of every answer."""
    tag = f"+fs{e.few_shot}" if e.few_shot else ""
    return tag + ("+cf" if e.calibrate == "content_free" else "")


def calibrate(p: float, p_content_free: float) -> float:
    """p with the content-free bias divided out: logit(p') = logit(p) - logit(p_cf).

    An answer of exactly 0 or 1 (samples mode) stays where it is.
    """
    if p <= 0.0 or p >= 1.0 or math.isnan(p):
        return p
    q = min(max(p_content_free, _EPS), 1.0 - _EPS)
    odds = (p / (1.0 - p)) * ((1.0 - q) / q)
    return odds / (1.0 + odds)
