"""The LLM decision layer: prompts in, one probability per archetype out, every answer cached.

=================  ================================================================================
module             responsibility
=================  ================================================================================
settings           ``LLMSettings``: the ``llm:`` block of an experiment (provider, mode, cache...)
protocol           ``ChatRequest`` / ``ChatAnswer`` / ``Usage`` and the ``ChatBackend`` protocol
openai_backend     the only module importing the ``openai`` SDK: ``OpenAIBackend``
client             ``LLMClient`` (cache first, bounded concurrency, sync facade), ``open_client``
cache              ``ResponseCache``: diskcache keyed by the sha256 of request + fingerprint; replay mode
fingerprint        what determines an answer besides the request (weights sha256, llama.cpp version)
parsing            answers -> yes/no, stated probability, P(yes) from logprobs; ``ParseError``
decision           ``LLMDecision``: a ``DecisionSource`` asking per archetype, re-asks, fallbacks
inprocess          ``InProcessBackend``: the embedded model in this process; a step's prompts as one tree
local              ``LocalServer``: the embedded SmolLM2 model behind a llama.cpp server (optional)
errors             the exceptions, each naming what failed and the remedy
=================  ================================================================================
"""

from lpm_llm.llm.cache import ResponseCache, request_key
from lpm_llm.llm.client import LLMClient, open_client
from lpm_llm.llm.decision import LLMDecision
from lpm_llm.llm.errors import (
    AnswerError,
    CacheMissError,
    LLMError,
    LLMRequestError,
    LLMSetupError,
    PromptError,
)
from lpm_llm.llm.local import LocalServer, local_available
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest, Usage
from lpm_llm.llm.settings import LLMSettings

__all__ = [
    "AnswerError",
    "CacheMissError",
    "ChatAnswer",
    "ChatRequest",
    "LLMClient",
    "LLMDecision",
    "LLMError",
    "LLMRequestError",
    "LLMSettings",
    "LLMSetupError",
    "LocalServer",
    "PromptError",
    "ResponseCache",
    "Usage",
    "local_available",
    "open_client",
    "request_key",
]
