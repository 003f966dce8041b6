"""The gradient estimator of the epidemic's discrete draws (see "Gradients" in
:mod:`lpm_llm.models.seirm`): the path weights of the agents' own infection draws, the pressure that
carries the infectious agents' weights, and the exact terms of small groups. :class:`GradientTerms`
is a part of :class:`~lpm_llm.models.seirm.EpidemicModel` (a mixin: its methods use the model's
contact layers, susceptibility and device).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from lpm_llm.models._codes import PRIOR as _PRIOR
from lpm_llm.models._codes import I, S
from lpm_llm.models.contacts import Pressure

if TYPE_CHECKING:

    from lpm_llm.models.seirm import EpidemicInputs, EpidemicState

__all__ = ["GradientTerms"]


def _score_weight(p: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward exactly 1.0; backward the score of a Bernoulli(p) draw with outcome `hard` (bool):
    ``dp / p`` where it is 1, ``-dp / (1 - p)`` where it is 0 (see "Gradients" in the module docstring)."""
    pd = p.detach()
    one = torch.ones_like(pd)
    return torch.where(hard, p / torch.where(pd > 0, pd, one), (1.0 - p) / torch.where(pd < 1, 1.0 - pd, one))


_SMALL_GROUP = 10
"""Largest household, classroom or workplace whose members' influence on one another enters the gradient
through the exact likelihood ratio (see "Gradients" in the module docstring); larger groups and the
community use the tangent, whose bias is of the order of one pair's hazard (< 0.05 there)."""


@dataclass
class _GroupIndex:
    """One group layer's members, for the gradient estimator (G groups including slot 0 = none).

    Attributes:
        group: (N,) int64 group of each agent.
        inv: (G,) float32 ``1 / max(n_g - 1, 1)`` (0 for slot 0 of school and workplace).
        small: (G,) bool groups of 2 .. ``_SMALL_GROUP`` members (never slot 0).
        order: (N,) agents sorted by group; ``start`` (G,) first position of each group in it.
        size: (G,) members of small groups, 0 for the others (the members a new infection looks up).
    """

    group: torch.Tensor
    inv: torch.Tensor
    small: torch.Tensor
    order: torch.Tensor
    start: torch.Tensor
    size: torch.Tensor


def _group_index(group: torch.Tensor, inv: torch.Tensor, slot_zero_is_none: bool) -> _GroupIndex:
    g = group.long()
    size = torch.bincount(g, minlength=inv.numel())
    small = (size > 1) & (size <= _SMALL_GROUP)
    if slot_zero_is_none:
        small[0] = False
    order = torch.argsort(g, stable=True)
    return _GroupIndex(g, inv, small, order, torch.cumsum(size, 0) - size, torch.where(small, size, 0))


def _members(index: _GroupIndex, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The members of small groups: for `groups` (n,) group ids, pairs (position in `groups`, member)
    over every member of each small group listed (other groups have none), as two (total,) int64."""
    size = index.size.index_select(0, groups)
    total = int(size.sum())
    dev = groups.device
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty
    j = torch.repeat_interleave(torch.arange(groups.numel(), device=dev), size, output_size=total)
    first = torch.cumsum(size, 0) - size
    offset = torch.arange(total, device=dev) - first.index_select(0, j)
    return j, index.order.index_select(0, index.start.index_select(0, groups).index_select(0, j) + offset)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for x >= 0 (-inf at 0)."""
    return torch.log(-torch.expm1(-x))


class GradientTerms:
    """The gradient estimator's methods of :class:`~lpm_llm.models.seirm.EpidemicModel`."""

    # -- the gradient estimator (see "Gradients" in the module docstring) ----------------------------
    def _infection_scores(
        self,
        state: EpidemicState,
        pressure: Pressure,
        new_inf: torch.Tensor,
        outside_factor: torch.Tensor | None,
        inputs: EpidemicInputs,
        susceptibility: torch.Tensor,
    ) -> torch.Tensor:
        """(N,) path weights after today's infection draws: each scored susceptible agent's weight times
        ``p / sg(p)`` if infected today (`new_inf`), ``(1 - p) / sg(1 - p)`` if not, with ``p = 1 -
        exp(-force * susceptibility)`` (and the day's imports). Scored: every susceptible agent, or those
        in ``inputs.scored``, at whom alone the force (with the tangent of the infectious agents'
        weights, see :meth:`_weighted_pressure`) is then gathered."""
        c = self.contacts
        imported = 0.0 if inputs.importation is None else inputs.importation.sum()
        if inputs.scored is None:  # every agent: dense (gathers at a subset save their indices)
            f = c.force(pressure, outside_factor=outside_factor, working=inputs.working) + imported
            p = -torch.expm1(-f * susceptibility)
            if inputs.imports is not None:
                p = 1.0 - (1.0 - p) * (1.0 - inputs.imports)
            hit = torch.zeros(p.shape, dtype=torch.bool, device=self.device).index_fill_(0, new_inf, True)
            return torch.where(state.disease == S, state.weight * _score_weight(p, hit), state.weight)
        idx = ((state.disease == S) & inputs.scored).nonzero().squeeze(1)
        f = c.force(pressure, outside_factor=outside_factor, working=inputs.working, agents=idx) + imported
        p = -torch.expm1(-f * susceptibility.index_select(0, idx))
        if inputs.imports is not None:
            p = 1.0 - (1.0 - p) * (1.0 - inputs.imports.index_select(0, idx))
        hit = torch.zeros(state.disease.shape, dtype=torch.bool, device=self.device).index_fill_(0, new_inf, True)
        score = _score_weight(p, hit.index_select(0, idx))
        return state.weight.index_copy(0, idx, state.weight.index_select(0, idx) * score)

    # -- the gradient estimator's group terms (see "Gradients" in the module docstring) --------------
    @cached_property
    def _small_groups(self) -> tuple[_GroupIndex, ...]:
        """Household, classroom and workplace membership (``LAYERS`` order, community excluded)."""
        c = self.contacts
        return (
            _group_index(c.household, c.inv_household, False),
            _group_index(c.school, c.inv_school, True),
            _group_index(c.workplace, c.inv_workplace, True),
        )

    def _weighted_pressure(
        self,
        weight: torch.Tensor,
        infectious: torch.Tensor,
        w_home: torch.Tensor,
        w_out: torch.Tensor,
        inputs: EpidemicInputs,
    ) -> Pressure:
        """The pressure with the infectious agents' path weights `weight` (n_I,): live (tangent) in the
        community and in large groups, detached in small groups, where they enter through
        :meth:`_group_terms` instead. Forward values are those of the plain pressure."""
        c = self.contacts
        live = c.pressure(infectious, w_home * weight, w_out * weight, inputs.rates, inputs.working)
        # the weights alone are detached: the rates, compliance and isolation keep their gradients
        fixed = c.pressure(
            infectious, w_home * weight.detach(), w_out * weight.detach(), inputs.rates, inputs.working
        )
        mixed = {}
        for name, index in zip(("household", "school", "workplace"), self._small_groups, strict=True):
            lv, fx = getattr(live, name), getattr(fixed, name)
            mixed[name] = None if lv is None else torch.where(index.small, fx, lv)
        return replace(live, **mixed)

    def _group_terms(
        self,
        state: EpidemicState,
        weight: torch.Tensor,
        new_inf: torch.Tensor,
        hazard: torch.Tensor,
        infectious: torch.Tensor,
        w_home: torch.Tensor,
        outside_factor: torch.Tensor | None,
        inputs: EpidemicInputs,
        susceptibility: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add to the path weights of today's infections `new_inf` the terms of their small groups.

        For each group layer and each member m of a small group who has been infectious, ``log_ratio``
        accumulates the log likelihood ratio of the other members' paths without m's emission in that
        group (survival days: ``+ hazard from m``; infection days: ``log(1 - exp(-(H - h))) - log(1 -
        exp(-H))`` with H the infected agent's total hazard that day, h the part from m). A new
        infection k then takes ``(1 - exp(log_ratio[m])) * d group_weight[m]`` from each such member:
        the score of m's draws times the exact change that m's emission made to the group's paths
        (a Rao-Blackwellised score function over the group, unbiased however saturated the group's
        transmission is), where the tangent (m's weight inside the force) would be biased low.

        Args:
            weight: (N,) path weights after today's draws (own draws, community and large groups), or
                None to update ``log_ratio`` alone (no gradients).
            new_inf: (n,) today's infections; hazard: (n,) float64 their total hazard today.
            infectious: (n_I,) agents infectious today; w_home: (n_I,) their infectiousness (detached).
            susceptibility: (N,) detached.

        Returns:
            weight (N,), group_weight (3, N), log_ratio (3, N) after today.
        """
        n, dev = self.contacts.n, self.device
        # updated in place: the log-ratios carry no gradient (every input here is detached), and no one
        # reads an earlier day's (a checkpointed segment saves a compact copy at its start)
        log_ratio = state.log_ratio
        group_weight = state.group_weight
        disease = state.disease
        rates = inputs.rates.detach()
        outside = None if outside_factor is None else outside_factor.detach()
        working = None if inputs.working is None else inputs.working.to(torch.get_default_dtype())
        survivors = disease == S
        survivors.index_fill_(0, new_inf, False)
        # I, R, M and awaiting death, and those susceptible again after waning: emitted before or today
        ever_infectious = (disease >= I) | ((state.flags & _PRIOR) != 0)

        def receive(layer: int, idx: torch.Tensor) -> torch.Tensor:
            """(len(idx),) how much of a group's emission the agents `idx` receive in `layer`."""
            r = susceptibility.index_select(0, idx)
            if layer > 0 and outside is not None:
                r = r * outside.index_select(0, idx)
            if layer == 2 and working is not None:
                r = r * working.index_select(0, idx)
            return r

        terms = []
        for layer, index in enumerate(self._small_groups):
            g_inf = index.group.index_select(0, infectious)
            emit = rates[layer] * index.inv.index_select(0, g_inf) * w_home
            factor = None  # outside the home: isolation, and work for those working
            if layer > 0 and outside is not None:
                factor = outside.index_select(0, infectious)
            if layer == 2 and working is not None:
                w_inf = working.index_select(0, infectious)
                factor = w_inf if factor is None else factor * w_inf
            emit = (emit if factor is None else emit * factor) * index.small.index_select(0, g_inf)
            # every member who stayed susceptible today took `emit * receive` from each emitter: summed
            # over the members of the emitters' groups only (not over every agent)
            j, members = _members(index, g_inf)
            exposed = torch.zeros(infectious.numel(), device=dev).index_add_(
                0, j, receive(layer, members) * survivors.index_select(0, members))
            log_ratio[layer].index_add_(0, infectious, emit * exposed)
            # members of the small groups of today's infections who have been infectious
            k, m = _members(index, index.group.index_select(0, new_inf))
            if k.numel() == 0:
                terms.append(None)
                continue
            keep = ever_infectious.index_select(0, m)
            k, m = k[keep], m[keep]
            emit_now = torch.zeros(n, device=dev).index_copy_(0, infectious, emit).index_select(0, m)
            h = (receive(layer, new_inf.index_select(0, k)) * emit_now).double()
            big_h = hazard.index_select(0, k)
            ratio = torch.where(h > 0, _log1mexp((big_h - h).clamp(min=0.0)) - _log1mexp(big_h), 0.0)
            log_ratio[layer].index_add_(0, m, ratio.to(torch.get_default_dtype()))
            if weight is None:
                continue
            terms.append((layer, k, m, -torch.expm1(log_ratio[layer].index_select(0, m))))
        if weight is None:  # the log-ratios alone (a segment's forward pass, see lpm_llm.models._segments)
            return None, None, log_ratio
        # the members' path weights, every layer in one gather (its backward pass: one (3N,) buffer)
        found = [x for x in terms if x is not None]
        if found:
            flat = torch.cat([layer * n + m for layer, _, m, _ in found])
            gathered = group_weight.view(-1).index_select(0, flat).split([m.numel() for _, _, m, _ in found])
            w_of = {layer: w for (layer, *_), w in zip(found, gathered, strict=True)}
        terms = [None if x is None else torch.zeros(new_inf.numel(), device=dev).index_add(
                     0, x[1], x[3] * (w_of[x[0]] - w_of[x[0]].detach())) for x in terms]
        base = weight.index_select(0, new_inf)
        present = [x for x in terms if x is not None]
        total_term = sum(present, torch.zeros_like(base))
        rows = [base * (1.0 + total_term - (x if x is not None else 0.0)) for x in terms]
        group_weight.index_copy_(1, new_inf, torch.stack(rows))  # in place: (3, N), autograd records it
        if present:
            weight = weight.index_copy(0, new_inf, base * (1.0 + total_term))
        return weight, group_weight, log_ratio
