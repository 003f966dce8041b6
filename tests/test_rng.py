"""Counter-based draws (lpm_llm.core.rng): a pure function of (seed, day, stream, agent id)."""

from __future__ import annotations

import math

import torch
from scipy import stats

from lpm_llm.core.rng import Draws, stream_key, uniform

_M = (1 << 64) - 1


def _reference(key: int, i: int) -> float:
    """splitmix64 of id * golden + key, top 24 bits, in plain Python integers."""
    z = (i * 0x9E3779B97F4A7C15 + key) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    z ^= z >> 31
    return (z >> 40) / 2.0**24


def test_the_tensor_hash_is_the_integer_reference_including_ids_past_2_to_the_31():
    key = stream_key(7, 12, 3)
    ids = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31 + 5, 83_368_169, 2**40 + 1])
    got = uniform(key, ids).tolist()
    assert got == [_reference(key, int(i)) for i in ids]
    assert uniform(key, ids.to(torch.int32)[:5]).tolist() == got[:5]  # int32 ids give the same draws


def test_an_agents_draw_does_not_depend_on_who_else_draws_nor_where_it_is_held():
    n = 10_000
    everyone = Draws(seed=3, day=5).uniform(2, n)
    some = torch.tensor([17, 4_000, 9_999])
    assert torch.equal(Draws(3, 5).uniform(2, some), everyone[some])
    # a shard holding agents `held` (global ids) draws what the whole population draws for them
    held = torch.arange(1, n, 3)
    shard = Draws(3, 5, ids=held.to(torch.int32))
    assert torch.equal(shard.uniform(2, held.numel()), everyone[held])
    assert torch.equal(shard.uniform(2, torch.tensor([0, 5])), everyone[held[[0, 5]]])


def test_draws_are_uniform_and_streams_days_and_seeds_independent():
    n = 200_000
    u = Draws(1, 0).uniform(0, n)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=100, min=0.0, max=1.0).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    others = [Draws(1, 0).uniform(1, n), Draws(1, 1).uniform(0, n), Draws(2, 0).uniform(0, n)]
    for v in others:  # correlation within 5 standard errors of 0
        r = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
        assert abs(r) < 5 / math.sqrt(n)
        assert not torch.equal(u, v)
    # neighbouring ids are not correlated either (lag-1 autocorrelation)
    r1 = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(r1) < 5 / math.sqrt(n)
