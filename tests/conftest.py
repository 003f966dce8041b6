"""Shared fixtures: one small synthetic New York City per test session."""

from __future__ import annotations

import pytest

from lpm_llm.population import Population
from lpm_llm.synthesis import synthesize_nyc


@pytest.fixture(scope="session")
def small_nyc() -> Population:
    """About 83,000 agents (scale 0.01, seed 0). Shared: never modify its columns in place."""
    return synthesize_nyc(scale=0.01, seed=0)
