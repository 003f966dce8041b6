"""``LLMClient``: cache first, then a bounded number of concurrent requests to a backend; usage counted.

``open_client(settings)`` builds one from :class:`LLMSettings`: it starts the embedded model for
``provider: local`` or reads the API key from the environment for ``provider: openai``.

The simulation loop is synchronous: :meth:`LLMClient.run` runs a coroutine on the client's own
event loop, in a private daemon thread, so it works when called repeatedly, from scripts and from
notebooks that already run a loop. Everything asynchronous happens on that one loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from lpm_llm.llm.cache import ResponseCache
from lpm_llm.llm.errors import LLMSetupError
from lpm_llm.llm.protocol import ChatAnswer, ChatBackend, ChatRequest, Usage
from lpm_llm.llm.settings import LLMSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_HEADER = "x-stainless-retry-count"  # set by the openai SDK on every request: 0, 1, 2...


class LLMClient:
    """Answers :class:`ChatRequest` s: from the cache when it has them, else from the backend.

    Args:
        backend: sends requests (``OpenAIBackend``, or a fake in tests).
        settings: ``concurrency`` bounds the requests in flight.
        cache: the answer cache (None: no cache).
        usage: counters to add to (a new :class:`Usage` if None); the HTTP-level counters
            (``requests``, ``retries``, ``error_responses``) are filled by :func:`count_http`.
        close_backend: close the backend in :meth:`close` (False when the caller owns its HTTP client).
    """

    def __init__(
        self,
        backend: ChatBackend,
        settings: LLMSettings,
        *,
        cache: ResponseCache | None = None,
        usage: Usage | None = None,
        close_backend: bool = True,
    ):
        self.backend = backend
        self.settings = settings
        self.cache = cache
        self.usage = usage if usage is not None else Usage()
        self._close_backend = close_backend
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The backend's endpoint, for messages (``(openai default)`` when the SDK picks it)."""
        return getattr(self.backend, "base_url", None) or "(openai default)"

    async def acomplete(self, request: ChatRequest) -> ChatAnswer:
        """The answer to one request; must run on this client's loop (see :meth:`run`)."""
        self.usage.calls += 1
        if self.cache is not None:
            cached = self.cache.get(request)
            if cached is not None:
                self.usage.cache_hits += 1
                return cached
        async with self._semaphore:
            answer = await self.backend.complete(request)
        self.usage.prompt_tokens += answer.prompt_tokens
        self.usage.completion_tokens += answer.completion_tokens
        if self.cache is not None:
            self.cache.put(request, answer)
        return answer

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for its result (the sync facade)."""
        loop = self._ensure_loop()
        start = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
        finally:
            self.usage.wall_s += time.perf_counter() - start

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="lpm-llm-client", daemon=True
                )
                self._thread.start()
            return self._loop

    def close(self) -> None:
        """Close the backend (if owned), the loop and the cache. Safe to call twice."""
        if self._close_backend:
            self._close_backend = False
            self.run(self.backend.aclose())
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_http(http_client: httpx.AsyncClient, usage: Usage) -> None:
    """Count the HTTP requests of ``http_client`` into ``usage`` (see :class:`Usage`).

    A request counts in ``requests`` when its response arrives, so that a request abandoned
    before any answer (connection refused, timeout, cancelled when a run stops) is never counted
    as one the server answered; until then it counts in ``unanswered``.
    """

    async def on_request(request: httpx.Request) -> None:
        usage.unanswered += 1

    async def on_response(response: httpx.Response) -> None:
        usage.unanswered -= 1
        usage.requests += 1
        if response.request.headers.get(_RETRY_HEADER, "0") != "0":
            usage.retries += 1
        status = response.status_code
        not_json = status == 200 and not response.headers.get("content-type", "").split(";")[0].endswith("json")
        if status == 429 or status >= 500 or not_json:
            usage.error_responses += 1

    hooks = http_client.event_hooks
    hooks["request"].append(on_request)
    hooks["response"].append(on_response)
    http_client.event_hooks = hooks


def open_client(settings: LLMSettings, http_client: httpx.AsyncClient | None = None) -> LLMClient:
    """An :class:`LLMClient` for ``settings``: the experiment runner's way in.

    ``provider: local`` starts the embedded llama.cpp server (once per process; stopped at exit).
    ``provider: openai`` reads the key from the variable named by ``api_key_env``. ``http_client``
    lets tests send through a client that respx intercepts; the caller then owns (closes) it.
    """
    cache = _open_cache(settings)  # before the server starts: a bad cache_dir fails at once
    try:
        base_url, api_key = _endpoint(settings)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    from lpm_llm.llm.openai_backend import OpenAIBackend

    usage = Usage()
    owns_http = http_client is None
    if http_client is None:
        http_client = httpx.AsyncClient(
            timeout=settings.timeout_s,
            limits=httpx.Limits(
                max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
            ),
        )
    count_http(http_client, usage)
    backend = OpenAIBackend(
        base_url=base_url,
        api_key=api_key,
        api_key_env=settings.api_key_env,
        max_retries=settings.max_retries,
        timeout_s=settings.timeout_s,
        http_client=http_client,
    )
    log.info(
        "LLM client: provider %s, model %s, cache %s (%s)",
        settings.provider, settings.model_name, settings.cache_mode,
        "-" if cache is None else cache.directory,
    )
    return LLMClient(backend, settings, cache=cache, usage=usage, close_backend=owns_http)


def _endpoint(settings: LLMSettings) -> tuple[str | None, str]:
    """(base_url, api_key): the embedded server's (started here) or the configured endpoint's."""
    if settings.provider == "local":
        if settings.base_url:
            raise LLMSetupError(
                "llm.base_url is set but llm.provider is 'local' (the embedded server picks its own port); "
                "use provider 'openai' for an external OpenAI-compatible endpoint"
            )
        from lpm_llm.llm.local import shared_server

        base_url, api_key = shared_server().base_url, "local-no-key"
    else:
        api_key = os.environ.get(settings.api_key_env, "")
        if not api_key:
            raise LLMSetupError(
                f"set {settings.api_key_env} (or the variable named by llm.api_key_env) to the API key of "
                f"{settings.base_url or 'the OpenAI API'}; the key is read from the environment, "
                "never from the config"
            )
        base_url = settings.base_url
    return base_url, api_key


def _open_cache(settings: LLMSettings) -> ResponseCache | None:
    """The answer cache of ``settings``; a folder that cannot be used is an :class:`LLMSetupError`."""
    if settings.cache_mode == "off":
        return None
    path = settings.cache_path
    if path.exists() and not path.is_dir():
        raise LLMSetupError(f"llm.cache_dir {path} is a file, not a folder; set llm.cache_dir to a folder "
                            "(it is created if missing)")
    try:
        return ResponseCache(path, settings.cache_mode)
    except (OSError, sqlite3.Error) as e:
        raise LLMSetupError(f"cannot open the answer cache in {path} ({type(e).__name__}: {e}); set "
                            "llm.cache_dir to a writable folder, or llm.cache_mode: off") from None
