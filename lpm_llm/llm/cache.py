"""The answer cache: one entry per request, keyed by the sha256 of the request's canonical JSON.

The key covers the model, the messages, the sampling parameters (temperature, max_tokens, seed,
logprobs), the response format, the sample index and the attempt index, and the backend's
fingerprint (:mod:`~lpm_llm.llm.fingerprint`: for the embedded model the weights' sha256, the
llama-cpp-python version and the settings that change numerics; for a remote endpoint
``llm.cache_namespace``); never the API key or the host. The stored value is the answer's text,
first-token logprobs, finish reason and token counts.
``diskcache`` is safe for several processes sharing one folder; eviction is off (its default
``size_limit`` of 1 GB would silently drop answers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import diskcache

from lpm_llm.llm.errors import CacheMissError
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest

log = logging.getLogger(__name__)

CacheMode = Literal["readwrite", "replay", "off"]
CACHE_MODES: tuple[str, ...] = ("readwrite", "replay", "off")
_FORMAT = 2  # bump when the stored value or the key payload changes meaning (2: the fingerprint)


def request_key(request: ChatRequest, fingerprint: Mapping[str, Any] | None = None) -> str:
    """sha256 hex digest of the request's and the fingerprint's canonical JSON (sorted keys, no whitespace)."""
    payload = {"format": _FORMAT, "fingerprint": dict(fingerprint or {}), **request.cache_payload()}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers by request, in a ``diskcache`` folder.

    Modes: ``readwrite`` reads and stores; ``replay`` only reads, and a miss raises
    :class:`CacheMissError`; ``off`` neither reads nor stores (``directory`` is then unused).
    ``fingerprint`` (what determines the answers besides the request) is part of every key.
    """

    def __init__(
        self,
        directory: str | Path | None,
        mode: CacheMode = "readwrite",
        fingerprint: Mapping[str, Any] | None = None,
    ):
        if mode not in CACHE_MODES:
            raise ValueError(f"unknown cache_mode {mode!r}; known: {', '.join(CACHE_MODES)}")
        self.mode = mode
        self.fingerprint = dict(fingerprint or {})
        self.directory = None if directory is None else Path(directory).expanduser()
        self._cache: diskcache.Cache | None = None
        if mode != "off":
            if self.directory is None:
                raise ValueError(f"cache_mode {mode!r} needs a cache_dir")
            if mode == "replay" and not self.directory.is_dir():
                raise CacheMissError(
                    f"cache_mode 'replay' but the cache folder {self.directory} does not exist; "
                    "run once with cache_mode 'readwrite' to fill it, or point llm.cache_dir at the run's "
                    "cache"
                )
            self._cache = diskcache.Cache(str(self.directory), eviction_policy="none", size_limit=2**40)

    def key(self, request: ChatRequest) -> str:
        """The request's key in this cache (request and fingerprint)."""
        return request_key(request, self.fingerprint)

    def get(self, request: ChatRequest) -> ChatAnswer | None:
        """The cached answer (marked ``cache_hit``), None on a miss; in replay mode a miss raises."""
        if self._cache is None:
            return None
        stored = self._cache.get(self.key(request))
        if stored is not None:
            return ChatAnswer.from_json(json.loads(stored), cache_hit=True)
        if self.mode == "replay":
            raise CacheMissError(
                f"cache_mode 'replay': the cache at {self.directory} lacks the answer for "
                f"{request.label or 'a request'} (sample {request.sample}, attempt {request.attempt}, "
                f"model {request.model!r}); the prompt, context, model or sampling settings differ from "
                "the cached run (the cache key also holds the model's fingerprint: weights, llama-cpp-python version, "
                "llm.cache_namespace). Use cache_mode 'readwrite' to ask the model"
            )
        return None

    def put(self, request: ChatRequest, answer: ChatAnswer) -> None:
        if self._cache is None or self.mode == "replay":
            return
        self._cache.set(self.key(request), json.dumps(answer.to_json(), sort_keys=True))

    def __len__(self) -> int:
        return 0 if self._cache is None else len(self._cache)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
