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
