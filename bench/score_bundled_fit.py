"""Loss of the bundled first-wave parameters (experiments/covid_nyc.yaml) on the calibration's 4 evaluation
seeds, with the current embedded-model answers: a re-check of the bundled fit after the answers change.

    python bench/score_bundled_fit.py [SCALE]      # default 0.1 (the fit's 1:10 city)
"""
import datetime as dt
import sys
import time

import torch

from lpm_llm.calibrate.fit import FrozenDecisions, SimulationObjective, first_wave_space
from lpm_llm.calibrate.targets import observed_weekly
from lpm_llm.core.sim import Simulation, months_between
from lpm_llm.llm.client import open_client
from lpm_llm.models import Epidemic
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.runner.experiment import Experiment
from lpm_llm.runner.run import build_decisions, build_population

torch.set_num_threads(1)
scale = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
exp = Experiment.from_yaml("experiments/covid_nyc.yaml", [f"population.scale={scale}"])
cfg, cal = exp.config, exp.config.calibration
t0 = time.time()
pop = build_population(cfg)
arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)
client = open_client(cfg.llm)
dec = {"isolate": FrozenDecisions(build_decisions(cfg, client, arch)["isolate"])}
weeks = ((cal.end - cal.start).days + 1) // 7  # complete weeks, as the calibration counts them
sim = Simulation(pop, [Epidemic(cfg.epidemic)], archetypes=arch, decisions=dec,
                 interventions=cfg.interventions.schedule(), start_date=cal.start, days=7 * weeks, seed=0)
obs = observed_weekly(cal.start, weeks, tuple(cal.targets))
obj = SimulationObjective(sim, obs, weeks=weeks, scale=pop.scale)
n_months = months_between(cal.start, cal.start + dt.timedelta(days=7 * weeks - 1)) + 1
space = first_wave_space(cfg.epidemic, n_months, alignment=tuple(cfg.decisions["isolate"].alignment))
with torch.no_grad():
    loss = float(obj(space.values(), [10_000 + j for j in range(4)]))
print(f"scale {scale}: {pop.n} agents, loss on 4 evaluation seeds {loss:.4f}, "
      f"LLM requests {client.usage.requests}, {time.time() - t0:.0f} s")
client.close()
