"""A short refit of the bundled first-wave parameters (experiments/covid_nyc.yaml) after a change of the
epidemic's defaults, with the same frozen LLM answers as bench/score_bundled_fit.py (asked at the bundled
parameters on the first evaluation seed): score the bundled parameters on the 4 evaluation seeds, run Adam
for at most MINUTES of wall time (SEEDS runs per step, learning rate 0.1 decaying to 0.01 over MAX_STEPS),
score the result on the same seeds, and print the fitted values for the YAML.

    python bench/refit_bundled.py [SCALE] [MINUTES] [MAX_STEPS] [SEEDS]     # defaults 0.01 20 30 1
"""
import datetime as dt
import json
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
args = sys.argv[1:] + [None] * 4
scale = float(args[0] or 0.01)
minutes, max_steps, per_step = float(args[1] or 20), int(args[2] or 30), int(args[3] or 1)
exp = Experiment.from_yaml("experiments/covid_nyc.yaml", [f"population.scale={scale}"])
cfg, cal = exp.config, exp.config.calibration
t0 = time.time()
pop = build_population(cfg)
arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)
client = open_client(cfg.llm)
dec = {"isolate": FrozenDecisions(build_decisions(cfg, client, arch)["isolate"])}
weeks = ((cal.end - cal.start).days + 1) // 7
sim = Simulation(pop, [Epidemic(cfg.epidemic)], archetypes=arch, decisions=dec,
                 interventions=cfg.interventions.schedule(), start_date=cal.start, days=7 * weeks, seed=0)
obs = observed_weekly(cal.start, weeks, tuple(cal.targets))
obj = SimulationObjective(sim, obs, weeks=weeks, scale=pop.scale)
n_months = months_between(cal.start, cal.start + dt.timedelta(days=7 * weeks - 1)) + 1
space = first_wave_space(cfg.epidemic, n_months, alignment=tuple(cfg.decisions["isolate"].alignment))
evaluation = [10_000 + j for j in range(4)]
with torch.no_grad():
    before = float(obj(space.values(), evaluation))
print(f"scale {scale}: {pop.n} agents; bundled parameters: loss {before:.4f} on 4 evaluation seeds "
      f"({client.usage.requests} LLM requests, {time.time() - t0:.0f} s)", flush=True)
opt = torch.optim.Adam(space.raw.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(0.01 / 0.1) ** (1 / max(max_steps - 1, 1)))
t1, step = time.time(), 0
while step < max_steps and time.time() - t1 < 60 * minutes:
    opt.zero_grad()
    loss = obj(space.values(), [1000 + per_step * step + j for j in range(per_step)])
    loss.backward()
    opt.step()
    sched.step()
    step += 1
    print(f"step {step}: loss {float(loss):.4f} ({time.time() - t1:.0f} s)", flush=True)
with torch.no_grad():
    after = float(obj(space.values(), evaluation))
print(f"after {step} Adam steps of {per_step} run(s) ({time.time() - t1:.0f} s): loss {after:.4f} on the 4 "
      f"evaluation seeds (bundled parameters: {before:.4f}); LLM requests {client.usage.requests}", flush=True)
print(json.dumps(space.to_dict()), flush=True)
client.close()
