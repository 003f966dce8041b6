"""Mechanisms of the epidemic added with issue 15 (see :mod:`lpm_llm.models.seirm`): case isolation,
waning infection-acquired immunity, and the lineage of each new infection. :class:`Mechanisms` is a
part of :class:`~lpm_llm.models.seirm.EpidemicModel` (a mixin: its methods use the model's parameters,
contact layers and device), each with its own stream of counter-based draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lpm_llm.core.rng import Draws
from lpm_llm.models._codes import CASE_ISOLATION as _CASE_ISOLATION
from lpm_llm.models._codes import ISOLATES as _ISOLATES
from lpm_llm.models._codes import LINEAGE as _LINEAGE
from lpm_llm.models._codes import PRIOR as _PRIOR
from lpm_llm.models._codes import REINFECTION as _REINFECTION
from lpm_llm.models._codes import S
from lpm_llm.models._estimator import _score_weight

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lpm_llm.models.seirm import EpidemicInputs

__all__ = ["Mechanisms"]


class Mechanisms:
    """Case isolation, waning immunity and lineages: methods of :class:`~lpm_llm.models.seirm.EpidemicModel`."""

    def _case_isolated(self, inf_flags: torch.Tensor, inf_onset: torch.Tensor, t: int) -> torch.Tensor:
        """(n_I,) bool: infectious agents who are reported cases isolating on day t (from
        ``case_isolation_delay`` days after they became infectious, ``report_delay`` if None)."""
        p = self.params
        delay = p.report_delay if p.case_isolation_delay is None else p.case_isolation_delay
        return ((inf_flags & _ISOLATES) != 0) & (inf_onset.to(torch.int32) + delay <= t)

    def _isolation_draw(
        self,
        onset: torch.Tensor,
        symp: torch.Tensor,
        inputs: EpidemicInputs,
        compliance: torch.Tensor,
        gen: Draws,
        grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """At onset, a symptomatic agent will be a reported case who isolates with probability
        ``report_rate[borough] * case_isolation_compliance`` (flag ``_ISOLATES``).

        Returns:
            (isolates, score): (n_onset,) bool, for the caller to write into the flags, and with
            `grad` the score of the draw, by which the onset agents' path weights are multiplied
            (with that of the symptomatic draw: one update); (None, None) without case isolation.
        """
        if inputs.report_rate is None or onset.numel() == 0:
            return None, None
        rate = inputs.report_rate.index_select(0, self.borough.index_select(0, onset))
        q = symp * (rate * compliance).clamp(0.0, 1.0)
        u = gen.uniform(_CASE_ISOLATION, onset)
        isolates = u < q.detach()
        return isolates, (_score_weight(q, isolates) if grad else None)

    def _wane(
        self,
        waned: torch.Tensor,
        disease: torch.Tensor,
        next_day: torch.Tensor,
        flags: torch.Tensor,
        threshold: torch.Tensor,
        theta: Mapping[str, torch.Tensor],
        gen: Draws,
        grad: bool,
    ) -> torch.Tensor:
        """Agents whose immunity waned today become susceptible with ``reinfection_susceptibility``: a
        fresh Exp(1) threshold over their reduced susceptibility (see ``initial_state``). Writes
        `disease`, `next_day` and `flags` in place (copies when gradients are on); returns the
        thresholds."""
        if waned.numel() == 0:
            return threshold
        disease.index_fill_(0, waned, S)
        next_day.index_fill_(0, waned, -1)
        flags.index_fill_(0, waned, _PRIOR)
        susc = (self._susceptibility(theta).index_select(0, waned) * theta["reinfection_susceptibility"]).detach()
        tau = gen.uniform(_REINFECTION, waned).neg_().log1p_().neg_()  # Exp(1)
        fresh = tau / susc  # susceptibility 0: inf
        return threshold.index_copy(0, waned, fresh) if grad else threshold.index_copy_(0, waned, fresh)

    @staticmethod
    def _lineages_present(inf_lineage: torch.Tensor | None, inputs: EpidemicInputs) -> bool:
        """Whether any lineage but the resident one can infect today (infectious or imported)."""
        if inf_lineage is not None and bool((inf_lineage > 0).any()):
            return True
        return inputs.importation is not None and bool((inputs.importation.detach()[1:] > 0).any())

    def _attribute_lineage(
        self,
        new_inf: torch.Tensor,
        infectious: torch.Tensor,
        inf_lineage: torch.Tensor,
        w_home: torch.Tensor,
        w_out: torch.Tensor,
        inputs: EpidemicInputs,
        outside_factor: torch.Tensor | None,
        gen: Draws,
    ) -> torch.Tensor:
        """(n,) int8 lineage of today's infections `new_inf`: drawn in proportion to the force each
        lineage puts on the agent (its infectious agents' pressure, evaluated for these agents only,
        plus its importation hazard). Competing hazards: given an infection, the lineage is l with
        probability h_l / sum h. No gradient (the lineage mix is not calibrated by gradient)."""
        c, n, n_lin = self.contacts, new_inf.numel(), self.n_lineages
        with torch.no_grad():
            if inputs.importation is None:
                hazard = torch.zeros(n_lin, n, device=self.device)
            else:
                hazard = inputs.importation.detach().reshape(n_lin, 1).expand(n_lin, n).clone()
            factor = None if outside_factor is None else outside_factor.detach()
            sharded = c.reduce is not None or c.reduce_city is not None  # every rank: every lineage's pressure
            for lin in range(n_lin):
                sel = (inf_lineage == lin).nonzero().squeeze(1)
                if sel.numel() == 0 and not sharded:
                    continue
                pressure = c.pressure(infectious.index_select(0, sel), w_home.detach().index_select(0, sel),
                                      w_out.detach().index_select(0, sel), inputs.rates.detach(), inputs.working)
                hazard[lin] += c.force_at(pressure, new_inf, outside_factor=factor, working=inputs.working)
            cumulative = hazard.cumsum(0)
            u = gen.uniform(_LINEAGE, new_inf) * cumulative[-1]
            drawn = (cumulative < u.unsqueeze(0)).sum(0).clamp(max=n_lin - 1)
            return torch.where(cumulative[-1] > 0, drawn, 0).to(torch.int8)
