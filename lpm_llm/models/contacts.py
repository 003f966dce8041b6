"""Contact layers as group memberships: the force of infection as segment sums, never N x N.

Four layers, in this order everywhere (``LAYERS``): household, school (classrooms), workplace and
community. Households, classrooms and workplaces are groups in which every member meets every other
member; community mixing is a (borough x age band) contact matrix.

For a group layer L with daily transmission rate ``beta_L``, agent j in group g receives

    force_L[j] = beta_L * (P_g - w_j) / max(n_g - 1, 1),    P_g = sum of w_i over members i of g,

where ``w_i`` is agent i's current infectiousness (0 unless infectious) and ``n_g`` the group's size:
``beta_L`` is the total daily transmission rate of one infectious member spread evenly over the
other ``n_g - 1`` members (frequency-dependent mixing within the group). A susceptible agent has
``w_j = 0``, so the force is evaluated as ``beta_L * P_g / max(n_g - 1, 1)``, one gather per layer.

Community: with ``P[b, a]`` the infectiousness summed over cell (borough b, age band a) and
``N[b, a]`` the cell's size, the prevalence an agent of borough b meets in age band a' is

    Q[b, a'] = (1 - x) * P[b, a'] / N[b, a'] + x * sum_b' P[b', a'] / sum_b' N[b', a'],

(x = ``cross_borough_share``) and the community force on an agent in cell (b, a) is
``beta_C * sum_a' C[a, a'] * Q[b, a']``, where C[a, a'] is the community contacts of an age-a agent
with age band a' relative to the population's mean: the row sums carry the age-specific contact
volumes of a contact survey (:func:`prem_community_matrix`, normalised by
:func:`normalised_contacts` to a population-weighted mean row sum of 1, so that ``beta_C`` stays
the rate of an average agent). Pressure per cell is one ``index_add_``; the rest is a (B, A) x (A, A)
product.

Isolation: an agent who isolates keeps its household contacts and drops a fraction ``compliance`` of
its school, work and community contacts, on both sides of a contact: an isolating infectious agent
emits ``(1 - compliance) * w`` outside the home, an isolating susceptible agent receives
``(1 - compliance)`` of the outside force. ``working`` (from the labour model) removes workplace
contacts of agents not working, on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lpm_llm.core.interventions import LAYERS
from lpm_llm.population import Population

__all__ = ["LAYERS", "ContactLayers", "Pressure", "default_community_matrix",
           "normalised_contacts", "prem_community_matrix"]

_REQUIRED = ("borough", "age_band", "household")


def default_community_matrix(n_age: int, assortativity: float = 0.4) -> torch.Tensor:
    """(A, A) row-stochastic matrix: ``assortativity`` of contacts in one's own age band, the rest
    spread evenly over all bands.

    A stylised stand-in for measured contact matrices (POLYMOD, Mossong et al. 2008, PLoS Med 5:e74,
    where contacts are strongly concentrated near one's own age); pass a measured matrix to
    :meth:`ContactLayers.from_population` to use one.
    """
    if not 0.0 <= assortativity <= 1.0:
        raise ValueError(f"assortativity must lie in [0, 1], got {assortativity}")
    uniform = torch.full((n_age, n_age), (1.0 - assortativity) / n_age)
    return uniform + assortativity * torch.eye(n_age)


def normalised_contacts(matrix: torch.Tensor, age_counts: torch.Tensor) -> torch.Tensor:
    """(A, A) contacts scaled so that the mean row sum over agents (``age_counts`` (A,) agents per
    band) is 1; the relative volumes between bands and each row's split are kept."""
    matrix = torch.as_tensor(matrix, dtype=torch.get_default_dtype())
    weights = age_counts.to(torch.get_default_dtype()).cpu() / age_counts.sum().clamp(min=1).cpu()
    mean = float((matrix.sum(1) * weights).sum())
    if mean <= 0:
        raise ValueError("community contact matrix has no contacts in the population's age bands")
    return matrix / mean


_PREM_FILE = "contacts/prem2017_usa_other_locations.csv"
_PREM_EDGES = tuple(range(0, 80, 5)) + (100,)  # 5-year survey bands 0-4 .. 70-74, 75+ (to 100)


def prem_community_matrix(age_edges: tuple[int, ...] = (0, 5, 13, 18, 25, 35, 45, 55, 65, 75, 100)) -> torch.Tensor:
    """(A, A) mean daily community contacts of a person in age band a with persons in band a': the
    "other locations" matrix of the United States (Prem, Cook & Jit 2017, PLoS Comput Biol
    13:e1005697, supplement S2; shipped as ``lpm_llm/data/contacts/prem2017_usa_other_locations.csv``
    with its source), aggregated from the survey's 16 five-year bands to the bands given by
    `age_edges` (default: ``AGE_BANDS``): a row of ours averages the survey rows it covers, weighted
    by years; a column of ours sums the survey columns' shares of years it covers. Row sums (contacts
    per day): 0-4 4.04, 5-12 5.23, 13-17 6.86, 18-24 6.66, 25-34 4.51, 35-44 3.99, 45-54 3.68,
    55-64 4.00, 65-74 3.07, 75+ 1.64: people aged 75+ have about a third of the community contacts of
    adults aged 25-34 (POLYMOD, on which the projection rests, shows the same fall: Mossong et al. 2008,
    PLoS Med 5:e74, Table 1)."""
    import csv
    from importlib import resources

    text = resources.files("lpm_llm.data").joinpath(_PREM_FILE).read_text()
    rows = list(csv.reader(text.splitlines()))
    survey = torch.tensor([[float(x) for x in row[1:]] for row in rows[1:]], dtype=torch.float64)
    ours = list(zip(age_edges[:-1], age_edges[1:], strict=True))
    theirs = list(zip(_PREM_EDGES[:-1], _PREM_EDGES[1:], strict=True))
    overlap = torch.tensor(
        [[max(0, min(h, h2) - max(lo, lo2)) for lo2, h2 in theirs] for lo, h in ours], dtype=torch.float64
    )  # (A, 16) years in common
    rows_w = overlap / overlap.sum(1, keepdim=True)  # a band of ours: average of the survey rows it covers
    cols_w = overlap / overlap.sum(0, keepdim=True)  # a survey column: split over our bands by years
    return (rows_w @ survey @ cols_w.T).to(torch.get_default_dtype())


@dataclass
class Pressure:
    """Daily hazard per group member, rates applied: ``beta_L * P_g / max(n_g - 1, 1)``.

    Shapes: household (H,), school (S+1,), workplace (W+1,) (slot 0 = no group, stays 0),
    community (B, A) hazard per unit ``beta_C`` before the contact matrix. A layer is None when it
    contributes nothing (no members, or rate 0 without autograd): its gather is skipped.
    """

    household: torch.Tensor | None
    school: torch.Tensor | None
    workplace: torch.Tensor | None
    community: torch.Tensor
    community_rate: torch.Tensor


@dataclass
class ContactLayers:
    """Group memberships and sizes of one population, ready for segment sums.

    Attributes (N agents, H households, S classrooms, W workplaces, B boroughs, A age bands):
        household: (N,) int32 household id in 0..H-1.
        school: (N,) int32 classroom id + 1, 0 for none (shifted so that "none" is a real slot).
        workplace: (N,) int32 workplace id + 1, 0 for none.
        cell: (N,) int32 ``borough * A + age_band``.
        inv_household: (H,) float32 ``1 / max(n_g - 1, 1)``; same for inv_school (S+1,),
            inv_workplace (W+1,) (slot 0: 0).
        cell_size: (B, A) float32 agents per cell (of the whole population when sharded).
        community_matrix: (A, A) float32 row-stochastic.
        cross_borough_share: share of community contacts made outside one's borough.
        reduce: None for a whole population; for one rank's shard of it
            (:mod:`lpm_llm.distributed.shard`), the sum over ranks applied to the community pressure
            (B, A) before it becomes a force, so that every rank sees the city's.
        reduce_city: instead of `reduce`, for data holders who keep their areas' prevalence to
            themselves (:mod:`lpm_llm.privacy`): the sum over ranks of the city-wide pressure per age
            band (A,) alone, the only part of the community force that crosses areas (a secure sum);
            each rank's own areas' pressure stays local (other areas' rows stay 0: no agent of
            theirs is here).
    """

    household: torch.Tensor
    school: torch.Tensor
    workplace: torch.Tensor
    cell: torch.Tensor
    inv_household: torch.Tensor
    inv_school: torch.Tensor
    inv_workplace: torch.Tensor
    cell_size: torch.Tensor
    community_matrix: torch.Tensor
    cross_borough_share: float
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    reduce_city: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_population(
        cls,
        population: Population,
        *,
        community_matrix: torch.Tensor | None = None,
        cross_borough_share: float = 0.1,
        device: torch.device | str | None = None,
        shard: Any = None,
    ) -> ContactLayers:
        """Build the layers from columns ``borough``, ``age_band``, ``household`` and (optional)
        ``school``, ``workplace`` (int, -1 = none). Missing school/workplace columns mean no agent
        belongs to that layer. With `shard` (a :class:`~lpm_llm.distributed.shard.AreaShard`) the
        population is one rank's part of a larger one: the cell sizes (public counts) are summed
        over ranks, and the community pressure is summed with ``shard.sum`` (``reduce``), or only its
        city-wide part with ``shard.city_sum`` when the shard has one (``reduce_city``)."""
        for name in _REQUIRED:
            if name not in population:
                raise KeyError(
                    f"contact layers need population column {name!r}; "
                    f"columns: {', '.join(sorted(population.columns))}"
                )
        if not 0.0 <= cross_borough_share <= 1.0:
            raise ValueError(f"cross_borough_share must lie in [0, 1], got {cross_borough_share}")
        device = torch.device(device) if device is not None else population.device
        n_borough = len(population.labels("borough")) if "borough" in population.codebooks else None
        n_age = len(population.labels("age_band")) if "age_band" in population.codebooks else None
        borough = population["borough"].to(device=device, dtype=torch.int32)
        age = population["age_band"].to(device=device, dtype=torch.int32)
        n_borough = n_borough or int(borough.max()) + 1
        n_age = n_age or int(age.max()) + 1
        cell = borough * n_age + age
        cell_size = torch.bincount(cell, minlength=n_borough * n_age).to(torch.get_default_dtype())
        cell_size = cell_size.view(n_borough, n_age)
        reduce = reduce_city = None
        if shard is not None:
            with torch.no_grad():
                cell_size = shard.sum(cell_size)
            reduce_city = getattr(shard, "city_sum", None)
            reduce = shard.sum if reduce_city is None else None

        household = population["household"].to(device=device, dtype=torch.int32)
        if int(household.min()) < 0:
            raise ValueError("population column 'household': every agent needs a household id >= 0")
        inv_household = _inverse_contacts(household, int(household.max()) + 1)
        school, inv_school = _shifted_groups(population, "school", device)
        workplace, inv_workplace = _shifted_groups(population, "workplace", device)

        if community_matrix is None:
            community_matrix = default_community_matrix(n_age)
        community_matrix = torch.as_tensor(community_matrix, dtype=torch.get_default_dtype(), device=device)
        if community_matrix.shape != (n_age, n_age):
            raise ValueError(
                f"community_matrix must have shape ({n_age}, {n_age}), got {tuple(community_matrix.shape)}"
            )
        if (community_matrix < 0).any():
            raise ValueError("community_matrix must be non-negative")
        return cls(
            household=household,
            school=school,
            workplace=workplace,
            cell=cell,
            inv_household=inv_household,
            inv_school=inv_school,
            inv_workplace=inv_workplace,
            cell_size=cell_size,
            community_matrix=community_matrix,
            cross_borough_share=float(cross_borough_share),
            reduce=reduce,
            reduce_city=reduce_city,
        )

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.household.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(B, A): boroughs x age bands."""
        return tuple(self.cell_size.shape)  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes of the per-agent and per-group tensors held here."""
        return sum(
            t.element_size() * t.numel()
            for t in (
                self.household,
                self.school,
                self.workplace,
                self.cell,
                self.inv_household,
                self.inv_school,
                self.inv_workplace,
            )
        )

    # -- the two halves of the force of infection ------------------------------------------------
    def pressure(
        self,
        infectious: torch.Tensor,
        weight_home: torch.Tensor,
        weight_out: torch.Tensor,
        rates: torch.Tensor,
        working: torch.Tensor | None = None,
    ) -> Pressure:
        """Sum infectiousness per group, scaled at the source by ``beta_L / max(n_g - 1, 1)`` (so that
        no group-sized multiplication is needed).

        Args:
            infectious: (n_I,) int64 indices of infectious agents.
            weight_home: (n_I,) float32 infectiousness at home.
            weight_out: (n_I,) float32 infectiousness outside the home (isolation applied).
            rates: (4,) daily transmission rate per layer in ``LAYERS`` order, interventions applied.
            working: optional (N,) bool; infectious agents not working emit nothing at work.
        """
        b, a = self.shape
        dev, dt = weight_home.device, weight_home.dtype
        grad = torch.is_grad_enabled()

        def used(i: int, inv: torch.Tensor) -> bool:
            return inv.numel() > 1 and (grad or float(rates[i]) != 0.0)

        def segment_sum(groups: torch.Tensor, inv: torch.Tensor, w: torch.Tensor, rate: torch.Tensor):
            g = groups.index_select(0, infectious)
            return torch.zeros(inv.shape, device=dev, dtype=dt).index_add_(
                0, g, w * inv.index_select(0, g) * rate
            )

        hh = (
            segment_sum(self.household, self.inv_household, weight_home, rates[0])
            if used(0, self.inv_household)
            else None
        )
        sc = (
            segment_sum(self.school, self.inv_school, weight_out, rates[1])
            if used(1, self.inv_school)
            else None
        )
        wk = None
        if used(2, self.inv_workplace):
            w_work = weight_out if working is None else weight_out * working.index_select(0, infectious)
            wk = segment_sum(self.workplace, self.inv_workplace, w_work, rates[2])
        cm = torch.zeros(b * a, device=dev, dtype=dt).index_add_(
            0, self.cell.index_select(0, infectious), weight_out
        )
        cm = cm.view(b, a)
        if self.reduce is not None:  # a shard: the city's pressure, each cell from the rank holding it
            cm = self.reduce(cm)
        city = None if self.reduce_city is None else self.reduce_city(cm.sum(0))  # a holder: the city's total
        cm_rate = (rates[3] * self.community_rate(cm, city)).reshape(-1)
        return Pressure(hh, sc, wk, cm, cm_rate)

    def community_rate(self, community_pressure: torch.Tensor, city_pressure: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(B, A) pressure -> (B, A) community force per unit ``beta_C`` (see the module docstring);
        `city_pressure` (A,): the city-wide pressure per age band, if not the sum of the rows."""
        x = self.cross_borough_share
        local = community_pressure / self.cell_size.clamp(min=1.0)
        total = community_pressure.sum(0) if city_pressure is None else city_pressure
        city = total / self.cell_size.sum(0).clamp(min=1.0)
        prevalence = (1.0 - x) * local + x * city.unsqueeze(0)
        return prevalence @ self.community_matrix.T

    def force(
        self,
        pressure: Pressure,
        *,
        outside_factor: torch.Tensor | None = None,
        working: torch.Tensor | None = None,
        agents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-agent force of infection on susceptible agents (own contribution 0).

        Args:
            pressure: from :meth:`pressure`.
            outside_factor: optional (N,) float32 multiplier of school, work and community force
                (``1 - compliance * isolating``).
            working: optional (N,) bool; agents not working get no workplace force.
            agents: optional (n,) int64: the force on these agents only (the same values).

        Returns:
            (N,) float32 force (daily hazard) before age-specific susceptibility, or (n,) with `agents`.
        """
        def at(x: torch.Tensor) -> torch.Tensor:
            return x if agents is None else x.index_select(0, agents)

        terms = [pressure.community_rate.index_select(0, at(self.cell))]
        if pressure.school is not None:
            terms.append(pressure.school.index_select(0, at(self.school)))
        if pressure.workplace is not None:
            work = pressure.workplace.index_select(0, at(self.workplace))
            terms.append(work if working is None else work * at(working))
        if torch.is_grad_enabled() or agents is not None:
            outside = sum(terms[1:], terms[0])
            if outside_factor is not None:
                outside = outside * at(outside_factor)
            if pressure.household is None:
                return outside
            return pressure.household.index_select(0, at(self.household)) + outside
        # fast path: accumulate in place into the first N-sized buffer (no autograd here)
        outside = terms[0]
        for term in terms[1:]:
            outside.add_(term)
        if outside_factor is not None:
            outside.mul_(outside_factor)
        if pressure.household is None:
            return outside
        return outside.add_(pressure.household.index_select(0, self.household))


    def force_at(
        self,
        pressure: Pressure,
        agents: torch.Tensor,
        *,
        outside_factor: torch.Tensor | None = None,
        working: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`force` evaluated for the (n,) agents `agents` only (outside_factor and working are
        (N,), as there): (n,) float32."""
        out = pressure.community_rate.index_select(0, self.cell.index_select(0, agents))
        if pressure.school is not None:
            out = out + pressure.school.index_select(0, self.school.index_select(0, agents))
        if pressure.workplace is not None:
            work = pressure.workplace.index_select(0, self.workplace.index_select(0, agents))
            out = out + (work if working is None else work * working.index_select(0, agents))
        if outside_factor is not None:
            out = out * outside_factor.index_select(0, agents)
        if pressure.household is not None:
            out = out + pressure.household.index_select(0, self.household.index_select(0, agents))
        return out


def _inverse_contacts(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) float32 ``1 / max(size - 1, 1)`` for groups given as (N,) ids in 0..G-1."""
    size = torch.bincount(groups, minlength=n_groups).to(torch.get_default_dtype())
    return 1.0 / (size - 1.0).clamp(min=1.0)


def _shifted_groups(
    population: Population, name: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ids shifted by one (0 = none) and the inverse contacts per slot (slot 0: 0)."""
    n = population.n
    if name not in population:
        return torch.zeros(n, dtype=torch.int32, device=device), torch.zeros(1, device=device)
    ids = population[name].to(device=device, dtype=torch.int32)
    if n and int(ids.min()) < -1:
        raise ValueError(f"population column {name!r}: group ids must be >= 0, or -1 for none")
    shifted = ids + 1
    n_slots = int(shifted.max()) + 1 if n else 1
    inv = _inverse_contacts(shifted, n_slots)
    inv[0] = 0.0
    return shifted, inv
