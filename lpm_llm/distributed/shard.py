"""One simulation over several ranks: the agents partitioned by area (borough).

Households, classrooms and workplaces never cross a borough, so every group layer is local to a
rank. What crosses ranks each day is small and aggregated, each time one ``all_reduce`` of a
(areas x age bands)-sized tensor in which every rank fills the cells of its own areas and leaves
the others at 0: the community layer's infectious pressure, and the day's result series. Since every
cell comes from exactly one rank, the sum is exact (x + 0), and a run's numbers are bit-identical
on any number of ranks (the random draws are counter-based per global agent id:
:mod:`lpm_llm.core.rng`).

Gradients cross ranks through ``torch.distributed.nn.functional.all_reduce``, whose backward pass
sums the incoming gradients over ranks. Every rank computes the same series after the reductions;
the calibration loss is taken on rank 0 only (the others back-propagate it times 0, which keeps the
collectives of the backward pass in step), and the parameters' gradients are then summed over ranks
(:meth:`AreaShard.sum_gradients`), so that every rank takes the same optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lpm_llm.population import Population

__all__ = ["AreaShard", "Ranks", "area_partition", "shard_population"]

_GROUPS = ("household", "school", "workplace")


def area_partition(area_sizes: Sequence[float], world: int) -> list[list[int]]:
    """Areas dealt to `world` ranks so that their agents are balanced: largest first, each to the
    rank with the fewest agents so far (ties: the lowest rank). Every rank gets at least one area."""
    if world > len(area_sizes):
        raise ValueError(f"area sharding over {world} ranks needs at least {world} areas, "
                         f"the population has {len(area_sizes)}")
    load = [0.0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for area in sorted(range(len(area_sizes)), key=lambda a: (-area_sizes[a], a)):
        r = min(range(world), key=lambda i: (len(owned[i]) > 0, load[i], i))
        owned[r].append(area)
        load[r] += area_sizes[area]
    return [sorted(o) for o in owned]


@dataclass
class Ranks:
    """Sums over the ranks of a group, with the calibration rule of the module docstring: the loss of
    the summed (or gathered) series on rank 0 only, the parameters' gradients summed over ranks.

    Attributes:
        rank, world: this rank and the number of ranks.
        reductions, reduced_bytes: the collectives this rank took part in, and the bytes of its
            tensors in them (what it sends; a ring all-reduce moves about twice that per rank).
    """

    rank: int
    world: int
    reductions: int = 0
    reduced_bytes: int = 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over ranks (a new tensor); differentiable when gradients are on (the backward
        pass sums the gradients over ranks)."""
        if self.world == 1:
            return x
        self.reductions += 1
        self.reduced_bytes += x.numel() * x.element_size()
        if torch.is_grad_enabled() and x.requires_grad:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(x, op=dist.ReduceOp.SUM)
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` (the same shape on each) concatenated along dim 0 in rank order, on every
        rank; differentiable like :meth:`sum`."""
        if self.world == 1:
            return x
        self.reductions += 1
        self.reduced_bytes += x.numel() * x.element_size()
        if torch.is_grad_enabled() and x.requires_grad:  # a sum of zero-padded blocks: exact (x + 0)
            from torch.distributed.nn.functional import all_reduce  # (its all_gather is deprecated)

            pad = [x.new_zeros(x.shape) for _ in range(self.world - 1)]
            return all_reduce(torch.cat([*pad[:self.rank], x, *pad[self.rank:]]), op=dist.ReduceOp.SUM)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (pickled), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (pickled) on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Sum the ``.grad`` of `parameters` over ranks, in place (one collective for all)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for p, g in zip(parameters, grads, strict=True):
            p.grad = flat[i:i + g.numel()].view_as(g).clone()
            i += g.numel()

    def loss_weight(self) -> float:
        """1 on rank 0, 0 elsewhere: the factor of this rank's copy of a loss computed from reduced series."""
        return 1.0 if self.rank == 0 else 0.0

    def objective(self, objective: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """`objective` (a loss of the reduced series, the same on every rank) as this rank's share of
        it: times :meth:`loss_weight`. Pair with ``Calibrator(aggregate=ranks.aggregate)``."""
        def share(*args: Any, **kwargs: Any) -> torch.Tensor:
            return objective(*args, **kwargs) * self.loss_weight()
        return share

    def aggregate(self, loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> float:
        """After each rank's backward pass of its share of the loss: the parameters' gradients summed
        over ranks (the same on every rank), and the loss (rank 0's) returned to every rank."""
        self.sum_gradients(parameters)
        return float(self.sum(loss.detach().reshape(1).to(torch.float64)))


@dataclass
class AreaShard(Ranks):
    """This rank's part of an area-sharded population (see :class:`Ranks` for the sums).

    Attributes:
        areas: the area (borough) codes this rank holds.
        ids: (n,) int32 global id of each local agent (its row in the whole population), in
            increasing order.
        n_global: agents in the whole population.
        city_sum: None (the day's series and the community pressure per area are summed over
            ranks), or, for data holders who keep their areas to themselves (:mod:`lpm_llm.privacy`),
            the sum over ranks of the city-wide community pressure per age band alone (a secure
            sum): each rank's series then stay its own areas' (other areas' cells 0).
    """

    areas: tuple[int, ...] = ()
    ids: torch.Tensor = None  # type: ignore[assignment]
    n_global: int = 0
    city_sum: Callable[[torch.Tensor], torch.Tensor] | None = None


def shard_population(population: Population, rank: int, world: int, *, area_column: str = "borough"
                     ) -> tuple[Population, AreaShard]:
    """This rank's agents (those of its areas, in their global order) and its :class:`AreaShard`.

    The group columns (``household``, ``school``, ``workplace``) are renumbered 0.. in the order of
    their global ids (-1 stays "none"), so that the local layers are as small as the shard."""
    if area_column not in population:
        raise KeyError(f"area sharding needs population column {area_column!r}")
    area = population[area_column].long()
    n_areas = len(population.labels(area_column)) if area_column in population.codebooks else int(area.max()) + 1
    sizes = torch.bincount(area.cpu(), minlength=n_areas).tolist()
    owned = area_partition(sizes, world)[rank]
    mask = torch.isin(area, torch.tensor(owned, device=area.device))
    ids = mask.nonzero().squeeze(1)
    columns = {}
    for name, col in population.columns.items():
        local = col.index_select(0, ids)
        if name in _GROUPS:
            local = _renumber(local)
        columns[name] = local
    local = Population(columns, population.codebooks, **population._meta())
    return local, AreaShard(rank, world, areas=tuple(owned), ids=ids.to(torch.int32), n_global=population.n)


def _renumber(groups: torch.Tensor) -> torch.Tensor:
    """Group ids renumbered 0..G-1 keeping their order; -1 (none) stays -1."""
    member = groups >= 0
    if not bool(member.any()):
        return groups.clone()
    _, inverse = torch.unique(groups[member], return_inverse=True)
    out = torch.full_like(groups, -1)
    out[member] = inverse.to(groups.dtype)
    return out
