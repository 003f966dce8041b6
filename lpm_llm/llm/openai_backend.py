"""``OpenAIBackend``: chat completions through the ``openai`` SDK (the only module that imports it).

Works with any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, the llama.cpp server. The SDK
retries 408/409/429/5xx responses, timeouts and connection errors ``max_retries`` times with
exponential backoff (0.5 s doubling to 8 s, or the server's ``retry-after``/``retry-after-ms``);
what is left after that becomes an :class:`~lpm_llm.llm.errors.LLMRequestError` naming the
endpoint, the asker and the remedy. The API key is handed to the SDK only.
"""

from __future__ import annotations

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
        try:
            response = await self._sdk.chat.completions.create(**kwargs)
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
        return _answer(response)

    def _where(self) -> str:
        return self.base_url or "(openai default)"

    async def aclose(self) -> None:
        await self._sdk.close()


def _answer(response) -> ChatAnswer:
    if not response.choices:
        raise LLMRequestError("the LLM endpoint returned a completion without choices")
    choice = response.choices[0]
    message = choice.message
    text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
    tops = None
    if choice.logprobs is not None and choice.logprobs.content:
        tops = tuple((t.token, float(t.logprob)) for t in choice.logprobs.content[0].top_logprobs)
    usage = response.usage
    return ChatAnswer(
        text=text,
        top_logprobs=tops,
        finish_reason=choice.finish_reason,
        prompt_tokens=int(usage.prompt_tokens) if usage else 0,
        completion_tokens=int(usage.completion_tokens) if usage else 0,
    )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
