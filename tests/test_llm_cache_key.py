"""The cache key's fingerprint, identical requests asked once, and replay with the local provider.

No model is run: the weights file is a small stand-in, and backends are fakes that count calls.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from lpm_llm.llm import ChatAnswer, ChatRequest, LLMClient, LLMSettings, ResponseCache, open_client, request_key
from lpm_llm.llm import fingerprint as fp
from lpm_llm.llm.errors import CacheMissError

REQUEST = ChatRequest(model="SmolLM2-135M-Instruct", messages=(("user", "Do you stay home? Yes or No."),),
                      temperature=0.7, max_tokens=1, seed=0, logprobs=True, top_logprobs=20)
ANSWER = ChatAnswer(text="Yes", top_logprobs=(("Yes", -0.2), ("No", -1.8)), prompt_tokens=12, completion_tokens=1)


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A stand-in weights file, its digests remembered in a private store."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fp, "_memo", {})
    return path


def local_key(path, **settings):
    f = fp.local_fingerprint(path, backend="b", settings={"n_ctx": 2048, **settings})
    return request_key(REQUEST, f)


def test_the_key_changes_with_the_weights_the_llama_cpp_version_and_numerics_settings(weights, monkeypatch):
    base = local_key(weights)
    assert local_key(weights) == base  # the same file and settings: the same key
    assert local_key(weights, flash_attn_batched=False) != base

    other = weights.with_name("other.gguf")
    other.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # one byte differs
    assert local_key(other) != base
    same = weights.with_name("copy.gguf")
    same.write_bytes(weights.read_bytes())  # another path, the same bytes: the same answers
    assert local_key(same) == base

    monkeypatch.setattr(fp, "llama_cpp_version", lambda: "0.0.1")
    assert local_key(weights) != base
    assert request_key(REQUEST) != base and request_key(REQUEST) == request_key(REQUEST, {})


def test_the_weights_digest_is_remembered_per_path_and_mtime(weights, monkeypatch):
    digest = fp.weights_sha256(weights)
    import hashlib

    assert digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    # a new process (empty memo) reads the remembered digest without hashing the file again
    monkeypatch.setattr(fp, "_memo", {})
    monkeypatch.setattr(fp.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert fp.weights_sha256(weights) == digest
    monkeypatch.undo()
    # the file changes (new bytes, new mtime): hashed again
    monkeypatch.setattr(fp, "_memo", {})
    weights.write_bytes(b"changed")
    os.utime(weights, ns=(1, 10**18))
    assert fp.weights_sha256(weights) == hashlib.sha256(b"changed").hexdigest()


def test_the_cache_namespace_separates_answers(tmp_path):
    shared = ResponseCache(tmp_path / "c")
    shared.put(REQUEST, ANSWER)
    shared.close()
    again = ResponseCache(tmp_path / "c")
    assert again.get(REQUEST).text == "Yes"
    again.close()
    host_b = ResponseCache(tmp_path / "c", fingerprint={"namespace": "host-b"})
    assert host_b.get(REQUEST) is None
    host_b.close()


class CountingBackend:
    def __init__(self):
        self.calls = 0

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        self.calls += 1
        await asyncio.sleep(0.05)
        return ANSWER

    async def aclose(self) -> None:
        return None


def test_identical_requests_in_flight_are_asked_once(tmp_path):
    backend = CountingBackend()
    client = LLMClient(backend, LLMSettings(concurrency=4), cache=ResponseCache(tmp_path / "c"))
    other = ChatRequest(**{**REQUEST.__dict__, "seed": 1})

    async def ask():
        return await asyncio.gather(*(client.acomplete(r) for r in (REQUEST, REQUEST, other, REQUEST)))

    answers = client.run(ask())
    assert backend.calls == 2  # REQUEST once, `other` once
    assert [a.cache_hit for a in answers] == [False, True, False, True]
    assert {a.text for a in answers} == {"Yes"}
    assert client.usage.calls == 4 and client.usage.cache_hits == 2
    client.close()


def test_an_error_reaches_every_asker_of_an_identical_request(tmp_path):
    class Failing(CountingBackend):
        async def complete(self, request):
            self.calls += 1
            await asyncio.sleep(0.05)
            raise RuntimeError("endpoint down")

    backend = Failing()
    client = LLMClient(backend, LLMSettings(), cache=None)

    async def ask():
        return await asyncio.gather(client.acomplete(REQUEST), client.acomplete(REQUEST), return_exceptions=True)

    errors = client.run(ask())
    assert backend.calls == 1 and all(isinstance(e, RuntimeError) for e in errors)
    client.close()


@pytest.mark.parametrize("local_backend", ["inprocess", "server"])
def test_replay_with_the_local_provider_starts_and_loads_nothing(weights, tmp_path, monkeypatch, local_backend):
    from lpm_llm.llm import inprocess, local

    monkeypatch.setattr(local, "model_file", lambda: weights)
    monkeypatch.setattr(local.LocalServer, "start", lambda self: pytest.fail("a server was started"))
    monkeypatch.setattr(inprocess.InProcessBackend, "_load", lambda self: pytest.fail("the model was loaded"))
    cache_dir = tmp_path / "cache"
    settings = LLMSettings(cache_dir=str(cache_dir), local_backend=local_backend)
    fingerprint = (local.server_fingerprint(weights) if local_backend == "server"
                   else inprocess.InProcessBackend(weights).fingerprint)
    filled = ResponseCache(cache_dir, fingerprint=fingerprint)
    filled.put(REQUEST, ANSWER)
    filled.close()

    client = open_client(settings.model_copy(update={"cache_mode": "replay"}))
    assert client.run(client.acomplete(REQUEST)).text == "Yes"
    with pytest.raises(CacheMissError, match="replay"):
        client.run(client.acomplete(ChatRequest(**{**REQUEST.__dict__, "seed": 5})))
    assert client.usage.requests == 0
    client.close()
