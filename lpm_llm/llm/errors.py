"""Errors of the LLM decision layer. Every message names what failed and how to fix it."""

from __future__ import annotations


class LLMError(RuntimeError):
    """Base class of every error raised by :mod:`lpm_llm.llm`."""


class LLMSetupError(LLMError):
    """The LLM cannot be used as configured (missing API key, missing extra, server did not start)."""


class LLMRequestError(LLMError):
    """A request failed after the SDK's retries: connection refused, timeout, HTTP 4xx/5xx."""


class CacheMissError(LLMError):
    """``cache_mode: replay`` and the cache lacks an answer the run needs."""


class AnswerError(LLMError):
    """The model's answer could not be turned into a probability, even after re-asking."""


class PromptError(LLMError):
    """A prompt cannot be filled in this run: it uses a variable the runner does not supply."""
