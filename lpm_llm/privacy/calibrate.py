"""Calibration in which each data holder's observed series, loss and gradient stay with it.

Each rank is a holder of some boroughs' observations (dealt out in turn: with 5 ranks, one borough
each). Every rank runs the same simulation (same parameters, same seeds: the simulation is the
coordinator's model, not anyone's data; LLM decisions are asked by rank 0 and broadcast), computes
the loss terms of its own boroughs only, and back-propagates them to the parameters. The (loss,
gradient) vectors go through :class:`~lpm_llm.privacy.secure_sum.SecureSum`: rank 0, the
coordinator, learns their sum over holders, which is the loss and gradient of the whole city
(:func:`~lpm_llm.calibrate.targets.log_mse` is a mean over boroughs), and every rank takes the same
Adam step. With ``secure+dp`` each holder first clips its vector and adds its share of the noise.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpm_llm.calibrate.fit import Calibrator, SimulationObjective, first_wave_space
from lpm_llm.calibrate.targets import log_mse, observed_weekly
from lpm_llm.core.sim import months_between
from lpm_llm.distributed.group import Group
from lpm_llm.population import BOROUGHS
from lpm_llm.privacy.dp import GaussianNoise, epsilon
from lpm_llm.privacy.secure_sum import FixedPoint, SecureSum
from lpm_llm.privacy.settings import PrivacySettings

log = logging.getLogger(__name__)

__all__ = ["HolderObjective", "PrivateFit", "calibrate_private", "holder_columns", "secure_city_sum"]


class _SecureSumOp(torch.autograd.Function):
    """The sum over holders of a tensor through a secure sum; its backward pass is the secure sum of
    the gradients (each holder's loss reaches the other holders' agents through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, secure: Any, what: str) -> torch.Tensor:  # noqa: D102
        ctx.secure, ctx.what = secure, what
        total = secure(x.detach().double().cpu().numpy().reshape(-1), what=what)
        return torch.as_tensor(total, dtype=x.dtype, device=x.device).view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        total = ctx.secure(grad.detach().double().cpu().numpy().reshape(-1), what=f"{ctx.what} (gradient)")
        return torch.as_tensor(total, dtype=grad.dtype, device=grad.device).view_as(grad), None, None


def secure_city_sum(secure: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``AreaShard.city_sum`` for data holders that keep their residents' microdata: the city-wide
    community pressure per age band (A,), summed over holders through `secure` (a
    :class:`~lpm_llm.privacy.secure_sum.SecureSum`, or :class:`PlainSum`), differentiably. The
    coordinator learns that sum each day (and, in the backward pass, the sum of the holders'
    gradients with respect to it), not any holder's prevalence."""
    def city_sum(x: torch.Tensor) -> torch.Tensor:
        return _SecureSumOp.apply(x, secure, "community pressure by age band")
    return city_sum


class HolderObjective(SimulationObjective):
    """One holder's share of :class:`SimulationObjective`'s loss: the terms of the series it holds.

    ``columns``: target -> the boroughs (indices) whose series of that target this holder holds;
    ``observed``: target -> (weeks, len(columns[target])) in that order. Each target's term is
    :func:`log_mse` over the held columns times ``len(columns) / n_boroughs``, divided by the
    experiment's ``n_targets``, so that the holders' losses sum to the loss of the whole city.
    Every holder runs the whole simulation at every call (its decision steps are collectives).
    """

    def __init__(self, simulation: Any, observed: Mapping[str, torch.Tensor], *,
                 columns: Mapping[str, Sequence[int]], n_boroughs: int, n_targets: int, weeks: int, scale: float,
                 debias: bool = True):
        super().__init__(simulation, observed, weeks=weeks, scale=scale, debias=debias)
        self.columns = {t: torch.tensor(list(c), dtype=torch.long) for t, c in columns.items() if len(c)}
        self.n_boroughs = n_boroughs
        self.n_targets = n_targets

    def __call__(self, values: Mapping[str, torch.Tensor], seeds: int | Sequence[int]) -> torch.Tensor:
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        runs = [super(HolderObjective, self).weekly(values, s) for s in seeds]
        loss = torch.zeros((), device=self.simulation.device, requires_grad=True)
        for t, cols in self.columns.items():
            x = torch.stack([r[t].index_select(1, cols.to(r[t].device)) for r in runs])
            debias = self.debias and len(seeds) > 1
            variance = {t: x.var(0) / len(seeds)} if debias else None
            term = log_mse({t: x.mean(0)}, {t: self.observed[t]}, self.scale, variance=variance)
            loss = loss + term * (len(cols) / self.n_boroughs / self.n_targets)
        return loss


def holder_columns(rank: int, world: int, targets: Sequence[str], private: Sequence[str] | None,
                   n_boroughs: int = len(BOROUGHS)) -> dict[str, list[int]]:
    """target -> the boroughs whose series rank ``rank`` holds: its own boroughs (dealt out in turn) for
    the private targets; every borough for the others (published data) on rank 0, none elsewhere."""
    mine = Group(rank, world).deal(list(range(n_boroughs)))
    private = list(targets) if private is None else list(private)
    return {t: (mine if t in private else (list(range(n_boroughs)) if rank == 0 else [])) for t in targets}


class PlainSum:
    """The sums of :class:`SecureSum` sent in the clear (``privacy.mode: plain``): no protection at all,
    the baseline that shows what the secure sum costs. Each holder's vector is rounded to the same
    fixed-point grid, so that the two give bit-identical sums (the masks change nothing)."""

    def __init__(self, group: Group, frac_bits: int = 32):
        self.group = group
        self.codec = FixedPoint(frac_bits, parties=group.world)
        self.rounds = 0
        self.bytes_sent = 0

    def __call__(self, x: np.ndarray, what: str = "") -> np.ndarray:
        x = self.codec.decode(self.codec.encode(x))  # exact in float64 sums below 2^(52 - frac_bits)
        self.bytes_sent += x.nbytes
        received = self.group.gather(x)
        total = np.sum(received, axis=0) if self.group.is_main else None
        self.rounds += 1
        return np.asarray(self.group.broadcast(total), dtype=np.float64)


@dataclass
class PrivateFit:
    """What the coordinator learned: the fitted parameters and the published (aggregate) losses."""

    params: dict[str, Any]
    loss_history: list[float]
    wall_times: list[float]
    holders: dict[int, list[str]]
    privacy: dict[str, Any]


def calibrate_private(
    simulation: Any,
    params: Any,
    group: Group,
    settings: PrivacySettings,
    *,
    start: dt.date,
    weeks: int,
    targets: Sequence[str],
    scale: float,
    steps: int,
    lr: float,
    lr_final: float | None = None,
    seeds_per_step: int = 1,
    seed: int = 0,
    parameters: Sequence[str] | None = None,
    alignment: tuple[float, float] | bool = False,
    transcript: str | None = None,
    on_step: Callable[[str, int, float, float], None] | None = None,
    holds: Sequence[int] | None = None,
) -> PrivateFit:
    """Fit ``first_wave_space`` to the holders' weekly ``targets`` with Adam, through secure sums.

    Args:
        simulation: this rank's :class:`~lpm_llm.core.sim.Simulation` of ``7 * weeks`` days (the
            same on every rank; its decisions broadcast from rank 0).
        params: the epidemic parameters the fit starts from.
        alignment: fit the isolation decision's alignment map (True, or a starting (a, b)).
        holds: the boroughs this holder holds microdata and every series of (its area shard,
            ``simulation.shard``); None: boroughs dealt out in turn, series only (every holder runs
            the whole simulation).
    """
    if settings.mode == "none":
        raise ValueError("calibrate_private needs privacy.mode secure or secure+dp")
    if group.world < 2:
        raise ValueError(f"privacy.mode {settings.mode} needs 2 or more data holders (ranks); "
                         "start it with lpm-llm calibrate ... --nproc 5 (one holder per borough)")
    if group.world > len(BOROUGHS):
        raise ValueError(f"{group.world} ranks but {len(BOROUGHS)} boroughs: each holder needs a borough")
    if group.world == 2 and settings.mode != "plain":
        log.warning("2 data holders: rank 0, the coordinator, is one of them and learns the other's vector "
                    "(the sum minus its own); use 3 or more for the secure sum to hide anything")
    unknown = sorted(set(settings.private or ()) - set(targets))
    if unknown:
        raise ValueError(f"privacy.private names {unknown}, which calibration.targets {list(targets)} do not fit")
    if holds is None:
        columns = holder_columns(group.rank, group.world, targets, settings.private)
    else:  # microdata: the simulated series of other boroughs are not here, every target is private
        if settings.private is not None and set(settings.private) != set(targets):
            raise ValueError("privacy.microdata: every calibration target is private (the holders' simulated "
                             f"series stay with them); privacy.private {settings.private} leaves some public")
        columns = {t: sorted(holds) for t in targets}
    observed = {t: observed_weekly(start, weeks, [t], areas=[BOROUGHS[b] for b in c], device=simulation.device)[t]
                for t, c in columns.items() if c}
    objective = HolderObjective(simulation, observed, columns=columns, n_boroughs=len(BOROUGHS),
                                n_targets=len(targets), weeks=weeks, scale=scale)
    space = first_wave_space(params, months_between(start, start + dt.timedelta(days=7 * weeks - 1)) + 1,
                             alignment=alignment, include=parameters, device=simulation.device)
    secure = (SecureSum(group, frac_bits=settings.frac_bits, transcript=transcript) if settings.mode != "plain"
              else PlainSum(group, settings.frac_bits))
    noise = (GaussianNoise(settings.clip, settings.noise_multiplier, group.world)
             if settings.mode == "secure+dp" else None)

    def aggregate(loss: torch.Tensor, parameters: list[torch.Tensor]) -> float:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        vector = np.concatenate([[float(loss)], *[g.detach().double().cpu().numpy().reshape(-1) for g in grads]])
        if noise is not None:
            vector = noise(vector)
        total = secure(vector, what="loss+gradient")
        at = 1
        for p, g in zip(parameters, grads, strict=True):
            p.grad = torch.as_tensor(total[at:at + g.numel()], dtype=p.dtype, device=p.device).view_as(p)
            at += g.numel()
        return float(total[0])

    fit = Calibrator(space, method="adam", steps=steps, lr=lr, lr_final=lr_final, seeds_per_step=seeds_per_step,
                     seed=seed, on_step=on_step, aggregate=aggregate).fit(objective)
    privacy: dict[str, Any] = {"mode": settings.mode, "holders": group.world, "rounds": secure.rounds,
                               "frac_bits": settings.frac_bits, "published": "loss and gradient sums per step"}
    if noise is not None:
        privacy.update(noise_multiplier=settings.noise_multiplier, clip=settings.clip, delta=settings.delta,
                       epsilon=epsilon(settings.noise_multiplier, secure.rounds, settings.delta),
                       accountant="opacus RDPAccountant (sampling rate 1, holder-level add/remove)")
    if holds is None:
        holders = {r: {t: [BOROUGHS[b] for b in c] for t, c in holder_columns(r, group.world, targets,
                                                                               settings.private).items()}
                   for r in range(group.world)}
    else:
        everyone = group.gather(sorted(holds)) or []  # on rank 0; a collective of every rank
        holders = {r: {t: [BOROUGHS[b] for b in areas] for t in targets} for r, areas in enumerate(everyone)}
        privacy["microdata"] = True
    privacy["private"] = list(targets) if settings.private is None else list(settings.private)
    privacy["secure_sum_bytes_sent_by_rank0"] = secure.bytes_sent
    return PrivateFit(params=fit.params_, loss_history=fit.loss_history_, wall_times=fit.wall_times_,
                      holders=holders, privacy=privacy)
