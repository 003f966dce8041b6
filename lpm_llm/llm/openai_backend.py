"""``OpenAIBackend``: chat completions through the ``openai`` SDK (the only module that imports it).

Works with any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, the llama.cpp server. The SDK
retries 408/409/429/5xx responses, timeouts and connection errors ``max_retries`` times with
exponential backoff (0.5 s doubling to 8 s, or the server's ``retry-after``/``retry-after-ms``);
what is left after that becomes an :class:`~lpm_llm.llm.errors.LLMRequestError` naming the
endpoint, the asker and the remedy. The API key is handed to the SDK only.

A status-200 response whose body is not a chat completion (an HTML page from a proxy or a web UI,
broken JSON, JSON without ``choices``) is a server error too: it is retried the same way, by this
module (the SDK does not retry a 200), and then raised like the others. A completion whose
``choices`` list is empty is an answer, an unusable one: it comes back as ``ChatAnswer(empty=True)``
and the decision layer re-asks it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai

from lpm_llm.llm.errors import LLMRequestError, LLMSetupError
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest


class OpenAIBackend:
    """One ``AsyncOpenAI`` client.

    Args:
        base_url: the endpoint, e.g. ``http://127.0.0.1:8000/v1`` (None: the SDK's default, OpenAI).
        api_key: the key (read from the environment by the caller; never stored elsewhere).
        api_key_env: name of the variable it came from, for error messages.
        max_retries, timeout_s: passed to the SDK.
        http_client: the ``httpx.AsyncClient`` that sends the requests (tests inject one under respx).
    """

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str,
        api_key_env: str,
        max_retries: int,
        timeout_s: float,
        http_client: httpx.AsyncClient,
    ):
        self.base_url = base_url
        self._api_key_env = api_key_env
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._sdk = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=max_retries,
            timeout=timeout_s,
            http_client=http_client,
        )

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        kwargs: dict = {
            "model": request.model,
            "messages": request.message_dicts(),
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "n": 1,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = request.top_logprobs
        if request.response_format is not None:
            kwargs["response_format"] = request.response_format
        for retry in range(self._max_retries + 1):
            if retry:  # tells the request counter (and the server) that this is a retry
                kwargs["extra_headers"] = {_RETRY_HEADER: str(retry)}
            raw = await self._send(kwargs, request)
            try:
                return _answer(_parse_body(raw))
            except _NotACompletion as err:
                if retry == self._max_retries:
                    raise LLMRequestError(
                        f"the LLM endpoint {self._where()} answered HTTP 200 for {request.label} with a body "
                        f"that is not a chat completion ({err}; after {self._max_retries} retries); check that "
                        "llm.base_url is the OpenAI-compatible API (it usually ends in /v1)"
                    ) from None
                await asyncio.sleep(_retry_delay(raw.headers, retry))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, kwargs: dict, request: ChatRequest):
        """One call of the SDK (its own retries included): the raw response, or an LLM error."""
        try:
            return await self._sdk.chat.completions.with_raw_response.create(**kwargs)
        except openai.APITimeoutError as err:
            raise LLMRequestError(
                f"the LLM endpoint {self._where()} did not answer within {self._timeout_s:g} s "
                f"(after {self._max_retries} retries) for {request.label}; raise llm.timeout_s or "
                "llm.max_retries, or lower llm.concurrency"
            ) from err
        except openai.APIConnectionError as err:
            raise LLMRequestError(
                f"cannot reach the LLM endpoint {self._where()} (after {self._max_retries} retries): {err}; "
                "start the server or fix llm.base_url"
            ) from err
        except openai.AuthenticationError as err:
            raise LLMSetupError(
                f"the LLM endpoint {self._where()} rejected the API key (HTTP 401); check the key in the "
                f"environment variable {self._api_key_env} (named by llm.api_key_env)"
            ) from err
        except openai.APIStatusError as err:
            hint = ""
            if err.status_code == 400 and request.response_format is not None:
                hint = "; if the server rejects the response format, set llm.json_format: json_object or none"
            elif err.status_code == 400 and request.logprobs:
                hint = "; if the server does not support logprobs, set llm.probability_mode: samples or json"
            raise LLMRequestError(
                f"the LLM endpoint {self._where()} answered HTTP {err.status_code} for {request.label} "
                f"(after up to {self._max_retries} retries): {_short(err.message)}{hint}"
            ) from err

    def _where(self) -> str:
        return self.base_url or "(openai default)"

    async def aclose(self) -> None:
        await self._sdk.close()


_RETRY_HEADER = "x-stainless-retry-count"  # the SDK's own retry counter; the SDK keeps a caller's value


class _NotACompletion(Exception):
    """A status-200 body that is not a chat completion; the message describes it."""


def _retry_delay(headers: httpx.Headers, retry: int) -> float:
    """Seconds before retry ``retry + 1``: the server's retry-after(-ms) if sane, else 0.5 s doubling to 8 s."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if 0 <= seconds <= 60:
            return seconds
    return min(0.5 * 2**retry, 8.0)


def _parse_body(raw) -> object:
    try:
        return raw.parse()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _NotACompletion(f"{raw.headers.get('content-type', 'no content-type')} that does not decode: "
                              f"{err}: {_short(raw.http_response.text, 120)}") from None


def _answer(response) -> ChatAnswer:
    """The answer in a parsed body; ``_NotACompletion`` if it is not a chat completion."""
    if isinstance(response, str):  # the SDK returns a non-JSON body as text
        raise _NotACompletion(f"not JSON: {_short(response, 120)}")
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        shown = response.model_dump(exclude_none=True) if hasattr(response, "model_dump") else response
        raise _NotACompletion(f"JSON without a choices list: {_short(json.dumps(shown, default=str), 120)}")
    try:  # the SDK does not validate a body: fields may be missing or of the wrong type
        usage = getattr(response, "usage", None)
        tokens = {"prompt_tokens": int(usage.prompt_tokens or 0) if usage else 0,
                  "completion_tokens": int(usage.completion_tokens or 0) if usage else 0}
        reported = getattr(response, "model", None)
        tokens["model"] = str(reported) if reported else None  # the model as the server names it
        if not choices or choices[0].message is None:
            return ChatAnswer(text="", finish_reason=choices[0].finish_reason if choices else None, empty=True,
                              **tokens)
        choice = choices[0]
        message = choice.message
        text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
        tops = None
        if choice.logprobs is not None and choice.logprobs.content:
            tops = tuple((str(t.token), float(t.logprob)) for t in choice.logprobs.content[0].top_logprobs)
        return ChatAnswer(text=str(text), top_logprobs=tops, finish_reason=choice.finish_reason, **tokens)
    except (AttributeError, TypeError, ValueError, IndexError) as err:
        raise _NotACompletion(f"a completion of unexpected shape ({type(err).__name__}: {err})") from None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
