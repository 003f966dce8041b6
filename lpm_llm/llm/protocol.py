"""The request and answer of one chat completion, the backend protocol, and usage counters.

A :class:`ChatRequest` holds everything that shapes an answer, so that its hash is the cache key
(:meth:`ChatRequest.cache_payload`); secrets and host names are never part of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion request (always ``n=1``).

    ``sample`` and ``attempt`` are the sample index (``samples`` mode) and the re-ask index; both
    are part of the cache key, so that n samples are n cached answers and a re-ask is a new one.
    ``label`` says who asks (prompt, archetype) for error messages; it is not part of the key.
    """

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    temperature: float
    max_tokens: int
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    sample: int = 0
    attempt: int = 0
    label: str = field(default="", compare=False)

    def cache_payload(self) -> dict[str, Any]:
        """Everything that shapes the answer, as plain JSON-able data (the label excluded)."""
        payload = asdict(self)
        payload.pop("label")
        payload["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        return payload

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class ChatAnswer:
    """The parts of a completion that the decision layer reads (what the cache stores).

    ``top_logprobs``: the first generated token's alternatives as (token, logprob), or None when
    logprobs were not requested. ``empty`` marks a completion without choices (or whose choice has
    no message): an unusable answer, re-asked like any other. ``cache_hit`` marks an answer read
    from the cache.
    """

    text: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    empty: bool = False
    cache_hit: bool = False
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cache_hit")
        if not self.empty:  # stored only when set: the stored form of ordinary answers is unchanged
            data.pop("empty")
        if self.model is None:
            data.pop("model")
        if self.top_logprobs is not None:
            data["top_logprobs"] = [[t, lp] for t, lp in self.top_logprobs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], cache_hit: bool = False) -> ChatAnswer:
        tops = data.get("top_logprobs")
        return cls(
            text=data["text"],
            top_logprobs=None if tops is None else tuple((str(t), float(lp)) for t, lp in tops),
            finish_reason=data.get("finish_reason"),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            empty=bool(data.get("empty", False)),
            cache_hit=cache_hit,
            model=data.get("model"),
        )


class ChatBackend(Protocol):
    """Sends one request to a model. Implemented by ``OpenAIBackend``; wrapped by ``LLMClient``."""

    async def complete(self, request: ChatRequest) -> ChatAnswer: ...

    async def aclose(self) -> None: ...


@dataclass
class Usage:
    """What a run cost, accumulated by an ``LLMClient`` and the decisions that use it.

    Attributes:
        calls: answers asked for (cache hits included).
        cache_hits: answers read from the cache.
        requests: HTTP requests the server answered (a response arrived, whatever its status),
            retries included; counted by httpx event hooks.
        unanswered: HTTP requests started that got no response: refused or dropped connections,
            timeouts, and requests in flight when a run stopped (the server may or may not have
            seen them; none of them returned tokens).
        retries: of the answered requests, retries (the SDK's, after a 408/409/429/5xx, a timeout
            or a connection error; and the backend's, after a 200 whose body is not a completion).
        error_responses: HTTP responses with status 429 or >= 500, or a 200 whose body is not JSON.
        prompt_tokens, completion_tokens: as reported by the server (cached answers count 0).
        reasks: answers asked again because the previous one was unusable.
        fallbacks: archetype probabilities replaced by ``fallback_probability``.
        wall_s: seconds spent waiting for answers.
        reported_models: model name as the server reported it in its response -> answers used
            (cached answers included): what produced the run's answers, whatever name was asked for.
    """

    calls: int = 0
    cache_hits: int = 0
    requests: int = 0
    unanswered: int = 0
    retries: int = 0
    error_responses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasks: int = 0
    fallbacks: int = 0
    wall_s: float = 0.0
    reported_models: dict[str, int] = field(default_factory=dict)

    def count_model(self, answer: ChatAnswer) -> None:
        if answer.model:
            self.reported_models[answer.model] = self.reported_models.get(answer.model, 0) + 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
