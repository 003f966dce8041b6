"""Workers of the area-sharded tests (tests/test_distributed.py), importable by spawned ranks."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from lpm_llm.calibrate.fit import Calibrator, SimulationObjective, first_wave_space
from lpm_llm.calibrate.targets import observed_weekly
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.sim import Simulation
from lpm_llm.distributed.shard import shard_population
from lpm_llm.models.epidemic import Epidemic, EpidemicParams
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc

START, WEEKS, SCALE = "2020-03-01", 4, 0.001


def _city(rank: int = 0, world: int = 1):
    pop = synthesize_nyc(SCALE, seed=1)
    arch = ArchetypeSpec.model_validate({"name": "sb", "method": "group", "attributes": ["sex", "borough"]}).assign(pop)
    if world == 1:
        return pop, arch, None
    local, shard = shard_population(pop, rank, world)
    return local, dataclasses.replace(arch, index=arch.index.index_select(0, shard.ids.long())), shard


def _simulation(pop, arch, shard, tensors=None) -> Simulation:
    params = EpidemicParams(immunity_mean=20.0, importation_per_100k=2.0)
    return Simulation(pop, [Epidemic(params, tensors=tensors)], interventions=nyc_2020(), start_date=START,
                      days=7 * WEEKS, seed=3, shard=shard, archetypes=arch,
                      decisions={"isolate": ConstantDecision(0.3, k=arch.k)}, checkpoint_days=7)


def gradient_and_fit(rank: int = 0, world: int = 1, out: str | None = None) -> dict:
    """One gradient of a loss of the (summed) series, and 2 Adam steps of a calibration; on `world`
    ranks each holding some boroughs (spawned with a gloo group), or in one process."""
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pop, arch, shard = _city(rank, world)
        theta = {"beta_scale": torch.tensor(1.2, requires_grad=True),
                 "initial_infections_per_100k": torch.full((5,), 200.0, requires_grad=True),
                 "ascertainment": torch.tensor([0.2, 0.3], requires_grad=True)}
        series = _simulation(pop, arch, shard, theta).run().series
        loss = (torch.log1p(series["reported_cases"].sum((1, 2))) ** 2).mean() + 0.01 * series["deaths"].sum()
        (loss * (1.0 if shard is None else shard.loss_weight())).backward()
        params = list(theta.values())
        if shard is not None:
            shard.sum_gradients(params)
        sim = _simulation(pop, arch, shard)
        objective = SimulationObjective(sim, observed_weekly(START, WEEKS, ["cases", "deaths"]), weeks=WEEKS,
                                        scale=SCALE)
        space = first_wave_space(EpidemicParams(), 1, alignment=False,
                                 include=["beta_scale", "initial_infections_per_100k", "ascertainment"])
        cal = Calibrator(space, steps=2, lr=0.1, resample_seeds=False,
                         aggregate=None if shard is None else shard.aggregate)
        cal.fit(objective if shard is None else shard.objective(objective))
        result = {"loss": float(loss.detach()), "grads": [p.grad.clone() for p in params],
                  "fit": cal.space_.get_vector().detach().clone(), "fit_losses": list(cal.loss_history_)}
        if out is not None:
            torch.save(result, f"{out}.{rank}.pt")
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()
