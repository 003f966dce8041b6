"""Lineage shares of the shipped covid_nyc_2021.yaml values on a 1:500 city over 6 evaluation seeds
(constant vaccination willingness 0.33, no LLM), with the fitted continuous importation of the resident
lineage (5.49 a day per 100,000) and with it cut to 0.5: the mean simulated share per 4-week period
against the sequenced one, and the growth of Alpha against the resident lineage (``Other``), Alpha against
Iota and Gamma against Alpha per 4 weeks (issue 15: is the lineage mismatch Alpha's transmissibility?).

    python bench/fit_2021_lineage_start.py      # about 1 minute
"""
import numpy as np
import torch

from lpm_llm.calibrate.fit import FrozenDecisions
from lpm_llm.calibrate.period import evaluate_period, period_space
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.runner.experiment import Experiment
from lpm_llm.runner.period_run import period_objective
from lpm_llm.runner.run import build_population

torch.set_num_threads(1)
cfg = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", ["population.scale=0.002"]).config
pop = build_population(cfg)
arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)
objective, epidemic = period_objective(cfg, pop, arch, {"vaccinate": FrozenDecisions(ConstantDecision(0.33, arch.k))})
rates = [v.importation_per_100k for v in epidemic.params.variants]
space = period_space(objective.simulation)
seeds = list(range(10_000, 10_006))


def growth(x, a, b):
    return np.round(np.diff(np.log(x[a].clip(lower=0.5) / x[b].clip(lower=0.5))), 2).tolist()


for importation in (float(space.to_dict()["importation_per_100k"]), 0.5):
    values = space.values()
    values["importation_per_100k"] = torch.tensor(importation)
    s = evaluate_period(objective, epidemic, values, rates, seeds)
    t = s.lineages.groupby(["period_start", "variant"])[["simulated_percent", "observed_percent"]].mean().round(1)
    sim, obs = t["simulated_percent"].unstack(), t["observed_percent"].unstack()
    print(f"== resident importation {importation:.2f} a day per 100,000, seeds {seeds}: totals",
          {k: round(v["simulated"]) for k, v in s.summary["totals"].items()},
          f"lineage loss {s.summary['lineage_loss']:.3f}, mean absolute error "
          f"{float((sim - obs).abs().to_numpy().mean()):.2f} points")
    print((sim.astype(str) + " / " + obs.astype(str)).to_string())
    for a, b in (("B.1.1.7", "Other"), ("B.1.1.7", "B.1.526"), ("P.1", "B.1.1.7")):
        print(f"  {a} against {b}, growth of log(share ratio) per 4 weeks: simulated {growth(sim, a, b)}, "
              f"observed {growth(obs, a, b)}")
