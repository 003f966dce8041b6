"""``LLMClient``: cache first, then a bounded number of concurrent requests to a backend; usage counted.

``open_client(settings)`` builds one from :class:`LLMSettings`: for ``provider: local`` the
embedded model in this process (:mod:`~lpm_llm.llm.inprocess`, loaded at the first cache miss) or
behind a llama.cpp server (``local_backend: server``); for ``provider: openai`` it reads the API
key from the environment. In replay mode the local provider starts and loads nothing.
Identical requests in flight at once are sent once and share the answer.

The simulation loop is synchronous: :meth:`LLMClient.run` runs a coroutine on the client's own
event loop, in a private daemon thread, so it works when called repeatedly, from scripts and from
notebooks that already run a loop. Everything asynchronous happens on that one loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from lpm_llm.llm.cache import ResponseCache, request_key
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
        # a backend that batches what arrives together (the in-process model) takes every request
        self._semaphore = asyncio.Semaphore(getattr(backend, "max_concurrency", None) or settings.concurrency)
        self._inflight: dict[str, asyncio.Future] = {}
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
                self.usage.count_model(cached)
                return cached
        key = request_key(request, None if self.cache is None else self.cache.fingerprint)
        shared = self._inflight.get(key)
        if shared is not None:  # the same request is being asked: ask once
            answer = await asyncio.shield(shared)
            self.usage.cache_hits += 1
            self.usage.count_model(answer)
            return dataclasses.replace(answer, cache_hit=True)
        self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            async with self._semaphore:
                answer = await self.backend.complete(request)
        except BaseException as err:
            waiting = self._inflight.pop(key)
            if isinstance(err, asyncio.CancelledError):
                waiting.cancel()
            else:
                waiting.set_exception(err)
                waiting.exception()  # retrieved: nobody need be waiting for it
            raise
        self._inflight.pop(key).set_result(answer)
        self.usage.prompt_tokens += answer.prompt_tokens
        self.usage.completion_tokens += answer.completion_tokens
        self.usage.count_model(answer)
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


def open_client(settings: LLMSettings, http_client: httpx.AsyncClient | None = None, *,
                waiting: int = 0) -> LLMClient:
    """An :class:`LLMClient` for ``settings``: the experiment runner's way in.

    ``provider: local`` runs the embedded model in this process (``local_backend: inprocess``,
    loaded at the first cache miss) or starts the llama.cpp server (``server``; once per process,
    stopped at exit); in replay mode neither. ``provider: openai`` reads the key from the variable
    named by ``api_key_env``. ``http_client`` lets tests send through a client that respx
    intercepts; the caller then owns (closes) it. ``waiting``: other processes of this run that wait
    while the model answers (the other ranks of a distributed run): with ``threads`` unset, the
    embedded model then counts their cores as free (:func:`lpm_llm.llm.inprocess.auto_threads`).
    """
    if settings.provider == "local":
        if settings.base_url:
            raise LLMSetupError(
                "llm.base_url is set but llm.provider is 'local' (the embedded server picks its own port); "
                "use provider 'openai' for an external OpenAI-compatible endpoint"
            )
        if settings.local_backend == "inprocess" or settings.cache_mode == "replay":
            return _local_client(settings, waiting)
        from lpm_llm.llm.local import server_fingerprint, shared_server

        cache = _open_cache(settings, server_fingerprint())  # before the server starts: a bad cache_dir fails at once
        try:
            base_url, api_key = shared_server().base_url, "local-no-key"
        except BaseException:
            if cache is not None:
                cache.close()
            raise
    else:
        api_key = os.environ.get(settings.api_key_env, "")
        if not api_key:
            raise LLMSetupError(
                f"set {settings.api_key_env} (or the variable named by llm.api_key_env) to the API key of "
                f"{settings.base_url or 'the OpenAI API'}; the key is read from the environment, "
                "never from the config"
            )
        base_url = settings.base_url
        # the model name is in the request; llm.cache_namespace is added by _open_cache
        cache = _open_cache(settings, {})
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


def _open_cache(settings: LLMSettings, fingerprint: dict[str, Any]) -> ResponseCache | None:
    """The answer cache of ``settings``, its keys carrying `fingerprint` (what determines the answers)
    and ``llm.cache_namespace``; a folder that cannot be used is an :class:`LLMSetupError`."""
    if settings.cache_mode == "off":
        return None
    if settings.cache_namespace is not None:
        fingerprint = {**fingerprint, "namespace": settings.cache_namespace}
    path = settings.cache_path
    if path.exists() and not path.is_dir():
        raise LLMSetupError(f"llm.cache_dir {path} is a file, not a folder; set llm.cache_dir to a folder "
                            "(it is created if missing)")
    try:
        return ResponseCache(path, settings.cache_mode, fingerprint=fingerprint)
    except (OSError, sqlite3.Error) as e:
        raise LLMSetupError(f"cannot open the answer cache in {path} ({type(e).__name__}: {e}); set "
                            "llm.cache_dir to a writable folder, or llm.cache_mode: off") from None


def _local_client(settings: LLMSettings, waiting: int = 0) -> LLMClient:
    """The embedded model in this process (loaded at the first miss), or, in replay mode, nothing at all.

    Replay reads the answers of whichever local backend is configured (its fingerprint is in the
    keys) and never loads or starts a model: a miss is an error before any backend is reached.
    """
    from lpm_llm.llm.inprocess import InProcessBackend
    from lpm_llm.llm.local import model_file, server_fingerprint

    usage = Usage()
    if settings.local_backend == "server":
        backend: ChatBackend = _ReplayOnly()
        fingerprint = server_fingerprint()
    else:
        backend = InProcessBackend(model_file(), n_threads=settings.threads, weights=settings.local_weights,
                                   usage=usage, waiting=waiting)
        fingerprint = backend.fingerprint
    cache = _open_cache(settings, fingerprint)
    log.info("LLM client: provider local (%s, threads %s), model %s, cache %s (%s)", settings.local_backend,
             settings.threads or "auto", settings.model_name, settings.cache_mode,
             "-" if cache is None else cache.directory)
    return LLMClient(backend, settings, cache=cache, usage=usage)


class _ReplayOnly:
    """The backend of a replay run: never reached (the cache raises on a miss first)."""

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        raise LLMSetupError(f"replay mode asks no model ({request.label})")

    async def aclose(self) -> None:
        return None
