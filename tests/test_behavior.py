"""broadcast: K archetype probabilities -> N Bernoulli decisions; statistics, determinism, gradients.

(Holding decisions between decision steps is the simulator's job and is tested there.)
"""

from __future__ import annotations

import math

import pytest
import torch

from lpm_llm.core.behavior import AlignmentMap, ConstantDecision, DecisionSource, broadcast, broadcast_persistent

N = 200_000
P = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 0.33])


def agents(n: int = N, k: int = len(P), seed: int = 1, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_mean_decision_per_archetype_is_its_probability():
    index = agents()
    d = broadcast(P, index, generator=torch.Generator().manual_seed(0))
    assert d.shape == (N,) and d.dtype == torch.float32
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    for k, p in enumerate(P.tolist()):
        members = d[index.long() == k]
        se = math.sqrt(p * (1 - p) / len(members))
        assert abs(members.mean().item() - p) <= 5 * se + 1e-12, (k, p, members.mean().item())
    assert d[index.long() == 0].sum() == 0 and d[index.long() == 4].min() == 1


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_same_seed_same_draws_whatever_the_index_dtype(dtype):
    reference = broadcast(P, agents(), generator=torch.Generator().manual_seed(3))
    again = broadcast(P, agents(dtype=dtype), generator=torch.Generator().manual_seed(3))
    assert torch.equal(reference, again)
    other = broadcast(P, agents(dtype=dtype), generator=torch.Generator().manual_seed(4))
    assert not torch.equal(reference, other)


def test_straight_through_gradient_is_the_expected_values_gradient():
    index = agents(n=50_000)
    weights = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    probs = P.clone().clamp(0.05, 0.95).requires_grad_(True)
    d = broadcast(probs, index, generator=torch.Generator().manual_seed(0), straight_through=True)
    assert set(d.detach().unique().tolist()) <= {0.0, 1.0}  # forward: hard draws
    (weights * d).sum().backward()
    st_grad = probs.grad.clone()

    probs.grad = None
    (weights * probs[index.long()]).sum().backward()  # the expected value's gradient
    torch.testing.assert_close(st_grad, probs.grad, rtol=1e-4, atol=1e-3)  # float32 sums in another order


def test_gradient_through_the_alignment_map_matches_finite_differences():
    """d E[sum w * decision] / d b: straight-through autograd vs a central difference in float64."""
    index = agents(n=20_000)
    weights = torch.rand(20_000, generator=torch.Generator().manual_seed(5))
    llm_p = torch.tensor([0.2, 0.4, 0.5, 0.6, 0.8, 0.3])
    align = AlignmentMap(k=None, a=1.3, b=-0.2)
    d = broadcast(align(llm_p), index, generator=torch.Generator().manual_seed(0), straight_through=True)
    (weights * d).sum().backward()

    def expected(b: float) -> float:
        a = float(align.a.detach())
        p = torch.sigmoid(a * torch.logit(llm_p.double()) + b)
        return float((weights.double() * p[index.long()]).sum())

    h = 1e-4
    fd = (expected(-0.2 + h) - expected(-0.2 - h)) / (2 * h)
    assert align.b.grad.item() == pytest.approx(fd, rel=1e-4)


def test_without_straight_through_no_gradient_flows():
    probs = P.clone().requires_grad_(True)
    assert not broadcast(probs, agents(n=100), generator=torch.Generator().manual_seed(0)).requires_grad


def test_shape_errors():
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        broadcast(P.reshape(2, 3), agents(n=10))
    with pytest.raises(IndexError):
        broadcast(P, torch.tensor([0, 7], dtype=torch.int8))


def test_constant_decision():
    source = ConstantDecision(0.25, k=3)
    assert isinstance(source, DecisionSource)
    assert source.probabilities({}).tolist() == [0.25] * 3
    with pytest.raises(ValueError, match="needs k"):
        ConstantDecision(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ConstantDecision(torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("r", [0.0, 0.5, 0.9])
def test_persistent_draws_keep_the_marginal_and_have_the_configured_correlation(r: float):
    """P(yes) = p at every step; the latent propensity is N(0, 1) with lag-1 correlation r; at
    p = 1/2 the share deciding yes twice is the bivariate-normal orthant 1/4 + asin(r) / (2 pi)."""
    n = 400_000
    index = torch.zeros(n, dtype=torch.int64)
    g = torch.Generator().manual_seed(7)
    half = torch.tensor([0.5])
    first, z1 = broadcast_persistent(half, index, None, r, generator=g)
    second, z2 = broadcast_persistent(half, index, z1, r, generator=g)
    third, _ = broadcast_persistent(torch.tensor([0.2]), index, z2, r, generator=g)
    se = 0.5 / math.sqrt(n)
    assert float(first.mean()) == pytest.approx(0.5, abs=5 * se)
    assert float(second.mean()) == pytest.approx(0.5, abs=5 * se)
    assert float(third.mean()) == pytest.approx(0.2, abs=5 * se)  # the marginal follows p, whatever came before
    assert float(z2.std()) == pytest.approx(1.0, abs=0.01)
    assert float(torch.corrcoef(torch.stack([z1, z2]))[0, 1]) == pytest.approx(r, abs=0.01)
    both = float((first * second).mean())
    assert both == pytest.approx(0.25 + math.asin(r) / (2 * math.pi), abs=5 * se)


def test_persistent_draws_are_straight_through():
    p = torch.tensor([0.3, 0.7], requires_grad=True)
    index = torch.arange(2).repeat(1000)
    drawn, z = broadcast_persistent(p, index, None, 0.8, generator=torch.Generator().manual_seed(0),
                                    straight_through=True)
    drawn.sum().backward()
    assert torch.equal(p.grad, torch.tensor([1000.0, 1000.0]))  # d E[sum] / dp, per archetype
    with pytest.raises(ValueError, match="persistence"):
        broadcast_persistent(p.detach(), index, z, 1.0)
