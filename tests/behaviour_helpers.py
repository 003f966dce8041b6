"""A fake chat backend for the behaviour tests: P(yes) a known function of the question asked."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from lpm_llm.llm.client import LLMClient
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest
from lpm_llm.llm.settings import LLMSettings

#: the isolation prompt's question, read back into its variables
ISOLATION = re.compile(
    r"Today is (?P<date>.*)\. Active policies: (?P<policies>.*)\.\nQuestion: .*\n"
    r"You are (?P<description>.*)\. COVID-19 cases reported in (?P<borough>.*) in the last 7 days: "
    r"(?P<cases_week>.*) \((?P<cases_trend>.*)\)\.\n", re.S)


def read_isolation(text: str) -> dict[str, str]:
    m = ISOLATION.search(text)
    assert m, text
    return m.groupdict()


class FunctionBackend:
    """Answers every logprobs request with P(yes) = ``p(last user message)``; records the requests."""

    def __init__(self, p: Callable[[str], float], mass: float = 1.0):
        self.p, self.mass, self.requests = p, mass, []

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        self.requests.append(request)
        p = self.p(request.messages[-1][1])
        top = (("Yes", math.log(self.mass * p)), ("No", math.log(self.mass * (1 - p))))
        return ChatAnswer(text="Yes", top_logprobs=top, prompt_tokens=10, completion_tokens=1)

    async def aclose(self) -> None:
        return None


def function_client(p: Callable[[str], float], mass: float = 1.0, cache_dir=None, **settings
                    ) -> tuple[LLMClient, FunctionBackend]:
    """A client over :class:`FunctionBackend` (with an answer cache in ``cache_dir`` if given)."""
    from lpm_llm.llm.cache import ResponseCache

    backend = FunctionBackend(p, mass)
    s = LLMSettings(**{"min_answer_mass": 0.1, **settings})
    cache = ResponseCache(cache_dir) if cache_dir is not None else None
    return LLMClient(backend, s, cache=cache), backend
