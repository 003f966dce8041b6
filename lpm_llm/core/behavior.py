"""From K archetype probabilities to N agent decisions.

The LLM answers once per archetype; every member of an archetype then draws its own decision from
that archetype's probability. Optionally a small calibrated map (the alignment map,
``logit(p') = a * logit(p) + b``) sits between the LLM's answer and the draw, and a straight-through
estimator lets gradients of a loss reach ``a`` and ``b`` through the discrete draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

_EPS = 1e-6


class PerArchetype(tuple):
    """A context value that differs by archetype: ``values[k]`` is archetype k's value.

    Plain context values are the same for every archetype; wrap a length-K sequence in
    ``PerArchetype`` to give each archetype its own (for example the cases in its borough).
    """

    def __new__(cls, values):
        return super().__new__(cls, values)


@runtime_checkable
class DecisionSource(Protocol):
    """Anything that gives one probability per archetype for a decision step.

    ``context`` holds the simulation context of the step (date, recent cases, their trend,
    active policies, ...); a value wrapped in :class:`PerArchetype` differs by archetype.
    Implementations: :class:`ConstantDecision` and the LLM-backed ``lpm_llm.llm.LLMDecision``.
    """

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        """(K,) float32 probabilities in [0, 1]."""
        ...


class ConstantDecision:
    """A fixed probability per archetype (or one for all): a baseline, and a stand-in in tests."""

    def __init__(self, p: float | torch.Tensor, k: int | None = None):
        p = torch.as_tensor(p, dtype=torch.get_default_dtype())
        if p.dim() == 0:
            if k is None:
                raise ValueError("ConstantDecision with a scalar probability needs k, the archetype count")
            p = p.expand(k).clone()
        if ((p < 0) | (p > 1)).any():
            raise ValueError(f"probabilities must lie in [0, 1], got min {p.min():.3g} max {p.max():.3g}")
        self.p = p

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        return self.p


class AlignmentMap(nn.Module):
    """``logit(p') = a * logit(p) + b``, shared (k=None) or one (a, b) per archetype (k given).

    Starts at the identity (a=1, b=0). ``a`` is kept positive through a softplus so that the map
    never reverses the order of the LLM's answers.
    """

    def __init__(self, k: int | None = None, a: float = 1.0, b: float = 0.0):
        super().__init__()
        shape = () if k is None else (k,)
        # softplus^-1(a) so that the initial slope is exactly `a`
        raw_a = torch.log(torch.expm1(torch.tensor(float(a))))
        self.raw_a = nn.Parameter(torch.full(shape, float(raw_a)))
        self.b = nn.Parameter(torch.full(shape, float(b)))

    @property
    def a(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_a)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """(K,) probabilities -> (K,) mapped probabilities."""
        return align(p, self.a, self.b)


def align(p: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """The alignment map ``logit(p') = a * logit(p) + b`` with (a, b) given as values (for example
    tensors from bounded calibrated parameters); :class:`AlignmentMap` holds them as parameters."""
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.sigmoid(a * torch.logit(p) + b)


def majority_area(index: torch.Tensor, area: torch.Tensor, k: int, n_areas: int,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[int]:
    """(K,) the area (borough) where most members of each archetype live (0 for an empty archetype);
    `reduce` sums the counts over the ranks of an area-sharded population."""
    cells = torch.bincount(index.long() * n_areas + area.long().to(index.device), minlength=k * n_areas)
    if reduce is not None:
        cells = reduce(cells)
    return cells.view(k, n_areas).argmax(dim=1).tolist()


def change_text(week: float, before: float) -> str:
    """Text for the change of weekly cases on the week before (as the prompts show it)."""
    if before <= 0:
        return "no cases the week before" if week > 0 else "no change"
    return trend_text(100.0 * (week - before) / before)


def trend_text(percent: float) -> str:
    """Text for a percent change on the week before."""
    if abs(percent) < 5:
        return "about the same as the week before"
    return f"{'up' if percent > 0 else 'down'} {abs(round(percent))}% on the week before"


def broadcast(
    probs: torch.Tensor,
    index: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    straight_through: bool = False,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw N agent decisions from K archetype probabilities.

    Args:
        probs: (K,) probabilities in [0, 1].
        index: (N,) archetype of each agent, values in 0..K-1, on the population's device.
        generator: source of randomness (on the same device as `index`).
        uniforms: (N,) float32 uniform draws in [0, 1) to use instead of `generator` (the
            simulation's counter-based draws, :mod:`lpm_llm.core.rng`); overwritten.
        straight_through: if True, the result carries the gradient of ``probs[index]``
            (forward value: the hard 0/1 draw; backward: d decision / d p = 1).

    Returns:
        (N,) float32 tensor of 0.0 and 1.0 on ``index.device``.
    """
    if probs.dim() != 1:
        raise ValueError(f"probs must have shape (K,), got {tuple(probs.shape)}")
    # index_select takes int32 indices as they are: widening int8/int16 codes to int32 (not int64)
    # and skipping advanced indexing halves the time at N = 8.3M (bench/bench_broadcast.py).
    if index.dtype not in (torch.int32, torch.int64):
        index = index.to(torch.int32)
    p = torch.index_select(probs.to(device=index.device, dtype=torch.get_default_dtype()), 0, index)
    if uniforms is not None:
        if uniforms.shape != p.shape:
            raise ValueError(f"uniforms must have shape {tuple(p.shape)}, got {tuple(uniforms.shape)}")
        u = uniforms
    else:
        u = torch.rand(p.shape, generator=generator, device=index.device, dtype=torch.get_default_dtype())
    hard = torch.lt(u, p.detach(), out=u)  # 1.0 where u < p, in place: no (N,) bool temporary
    if straight_through and p.requires_grad:
        return hard + (p - p.detach())
    return hard


def broadcast_persistent(
    probs: torch.Tensor,
    index: torch.Tensor,
    latent: torch.Tensor | None,
    persistence: float,
    *,
    generator: torch.Generator | None = None,
    straight_through: bool = False,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw N agent decisions from K archetype probabilities with a per-agent latent propensity
    that persists from one decision step to the next.

    Each agent carries a standard normal ``z``: ``z = eps`` at the first step and ``z = r z + sqrt(1
    - r^2) eps`` after (``r = persistence``, ``eps ~ N(0, 1)`` fresh), so ``z`` stays N(0, 1) and
    consecutive values have correlation ``r``. The agent decides yes when ``Phi(z) < p`` of its
    archetype: P(yes) is exactly ``p`` at every step (as with :func:`broadcast`), and with the same
    ``p`` the same agents tend to decide alike (for p = 1/2, P(yes twice) = 1/4 + asin(r) / (2 pi)).

    ``uniforms`` (N,) in [0, 1), if given, replace `generator`: ``eps = Phi^-1((k + 1/2) / 2^24)`` of
    the draw ``k / 2^24`` (a normal without infinite values).

    Returns:
        (N,) float32 decisions (straight-through like :func:`broadcast`), and the new latent (N,).
    """
    if probs.dim() != 1:
        raise ValueError(f"probs must have shape (K,), got {tuple(probs.shape)}")
    if not 0.0 <= persistence < 1.0:
        raise ValueError(f"persistence must lie in [0, 1), got {persistence}")
    if index.dtype not in (torch.int32, torch.int64):
        index = index.to(torch.int32)
    p = torch.index_select(probs.to(device=index.device, dtype=torch.get_default_dtype()), 0, index)
    if uniforms is not None:
        if uniforms.shape != p.shape:
            raise ValueError(f"uniforms must have shape {tuple(p.shape)}, got {tuple(uniforms.shape)}")
        eps = torch.special.ndtri(uniforms.double() + 2.0**-25).to(torch.get_default_dtype())
    else:
        eps = torch.randn(p.shape, generator=generator, device=index.device, dtype=torch.get_default_dtype())
    z = eps if latent is None else persistence * latent + math.sqrt(1.0 - persistence**2) * eps
    u = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    hard = (u < p.detach()).to(torch.get_default_dtype())
    if straight_through and p.requires_grad:
        return hard + (p - p.detach()), z
    return hard, z
