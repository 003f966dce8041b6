"""Shared fixtures: one small synthetic New York City per test session."""

from __future__ import annotations

import pytest
import torch

from lpm_llm.population import Population
from lpm_llm.population.synthesis import synthesize_nyc


@pytest.fixture(scope="session")
def small_nyc() -> Population:
    """About 83,000 agents (scale 0.01, seed 0). Shared: never modify its columns in place."""
    return synthesize_nyc(scale=0.01, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the 2 cores are shared, and oversubscription stalls the engine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def epidemic_sim(population, params=None, *, tensors=None, initial_infected=None, working=None, **kwargs):
    """A Simulation of one Epidemic model (the epidemic's own options go to the model)."""
    from lpm_llm.core.sim import Simulation
    from lpm_llm.models.epidemic import Epidemic

    model = Epidemic(params, tensors=tensors, initial_infected=initial_infected, working=working)
    return Simulation(population, [model], **kwargs)


def logprob_completion(model: str, p_yes: float, prompt_tokens: int = 50):
    """An OpenAI chat completion (as an httpx.Response) whose first token is "Yes" with top
    log-probabilities P(Yes) = p_yes and P(No) = 1 - p_yes: what a mocked endpoint answers."""
    import math

    import httpx

    top = [{"token": "Yes", "logprob": math.log(p_yes), "bytes": None},
           {"token": "No", "logprob": math.log(1 - p_yes), "bytes": None}]
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "Yes"},
                     "logprobs": {"content": [{"token": "Yes", "logprob": math.log(p_yes), "bytes": None,
                                               "top_logprobs": top}]}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    })
