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
from lpm_llm.calibrate.targets import observed_weekly
from lpm_llm.core.sim import months_between
from lpm_llm.distributed.group import Group
from lpm_llm.population import BOROUGHS
from lpm_llm.privacy.dp import GaussianNoise, epsilon
from lpm_llm.privacy.secure_sum import SecureSum
from lpm_llm.privacy.settings import PrivacySettings

log = logging.getLogger(__name__)

__all__ = ["HolderObjective", "PrivateFit", "calibrate_private"]


class HolderObjective(SimulationObjective):
    """One holder's share of :class:`SimulationObjective`'s loss: its boroughs' terms only.

    ``observed`` holds the holder's boroughs (columns in ``boroughs`` order); the loss is that of
    those columns times ``len(boroughs) / n_boroughs``, so that the holders' losses sum to the loss
    of the whole city.
    """

    def __init__(self, simulation: Any, observed: Mapping[str, torch.Tensor], *, boroughs: Sequence[int],
                 n_boroughs: int, weeks: int, scale: float, debias: bool = True):
        super().__init__(simulation, observed, weeks=weeks, scale=scale, debias=debias)
        self.columns = torch.tensor(list(boroughs), dtype=torch.long)
        self.share = len(boroughs) / n_boroughs

    def weekly(self, values: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        full = super().weekly(values, seed)
        return {t: x.index_select(1, self.columns.to(x.device)) for t, x in full.items()}

    def __call__(self, values: Mapping[str, torch.Tensor], seeds: int | Sequence[int]) -> torch.Tensor:
        return super().__call__(values, seeds) * self.share


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
) -> PrivateFit:
    """Fit ``first_wave_space`` to the holders' weekly ``targets`` with Adam, through secure sums.

    Args:
        simulation: this rank's :class:`~lpm_llm.core.sim.Simulation` of ``7 * weeks`` days (the
            same on every rank; its decisions broadcast from rank 0).
        params: the epidemic parameters the fit starts from.
        alignment: fit the isolation decision's alignment map (True, or a starting (a, b)).
    """
    if settings.mode == "none":
        raise ValueError("calibrate_private needs privacy.mode secure or secure+dp")
    if group.world < 2:
        raise ValueError(f"privacy.mode {settings.mode} needs 2 or more data holders (ranks); "
                         "start it with lpm-llm calibrate ... --nproc 5 (one holder per borough)")
    if group.world > len(BOROUGHS):
        raise ValueError(f"{group.world} ranks but {len(BOROUGHS)} boroughs: each holder needs a borough")
    mine = group.deal(list(range(len(BOROUGHS))))
    observed = observed_weekly(start, weeks, targets, areas=[BOROUGHS[b] for b in mine],
                               device=simulation.device)
    objective = HolderObjective(simulation, observed, boroughs=mine, n_boroughs=len(BOROUGHS), weeks=weeks,
                                scale=scale)
    space = first_wave_space(params, months_between(start, start + dt.timedelta(days=7 * weeks - 1)) + 1,
                             alignment=alignment, include=parameters, device=simulation.device)
    secure = SecureSum(group, frac_bits=settings.frac_bits, transcript=transcript)
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
    holders = {r: [BOROUGHS[b] for b in Group(r, group.world).deal(list(range(len(BOROUGHS))))]
               for r in range(group.world)}
    return PrivateFit(params=fit.params_, loss_history=fit.loss_history_, wall_times=fit.wall_times_,
                      holders=holders, privacy=privacy)
