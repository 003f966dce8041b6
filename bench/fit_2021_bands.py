"""The 5-95% bands of an ensemble written by bench/fit_2021.py (issue 15): every (member, evaluation seed) run
re-scored one at a time, so that each draw's share infected by the survey's date is known (fit_2021.json keeps
the mean over the seeds, ensemble_weekly.csv weekly counts only). Writes FOLDER/bands.csv, one row per draw:
city totals over the fitted weeks (reported cases, admissions, deaths, deaths to 2020-08-01), the share of
agents infected by the serology target's infection date (2020-04-24 - 18 days = 2020-04-06), the lineage log
loss (lpm_llm.calibrate.period.lineage_errors) and the lineage shares' mean absolute error in percentage
points (6 periods x 5 groups); prints the draws and their 5%, 50% and 95% quantiles (linear interpolation).

    python bench/fit_2021_bands.py [FOLDER]          # default bench/results/fit_2021; 75 s at 1:100

The simulation is built as bench/fit_2021.py built it (the scale, smoothness and --set overrides of the
folder's fit_2021.json), and the vaccination answers are frozen as there (lpm_llm.calibrate.fit.FrozenDecisions
keeps the answers of the first run: member 0's start, the experiment's values, on the first evaluation seed),
so the runs replay the fit's scoring: their totals equal ensemble_weekly.csv's (checked; a mismatch raises).
"""
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from lpm_llm.calibrate.fit import FrozenDecisions
from lpm_llm.calibrate.period import evaluate_period, period_space
from lpm_llm.llm.client import open_client
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.runner.experiment import Experiment
from lpm_llm.runner.period_run import period_objective
from lpm_llm.runner.run import build_decisions, build_population

torch.set_num_threads(1)
folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/fit_2021")
fit = json.loads((folder / "fit_2021.json").read_text())
exp = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", [f"population.scale={fit['scale']}",
                                                                 f"calibration.smoothness={fit['smoothness']}",
                                                                 *fit["overrides"]])
cfg = exp.config
pop = build_population(cfg)
arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)
client = open_client(cfg.llm)
frozen = FrozenDecisions(build_decisions(cfg, client, arch)["vaccinate"])
objective, epidemic = period_objective(cfg, pop, arch, {"vaccinate": frozen})
seeds = fit["evaluation_seeds"]
start_rates = [v.importation_per_100k for v in epidemic.params.variants]
start_trans = {v.lineage: v.transmissibility for v in epidemic.params.variants}
evaluate_period(objective, epidemic, period_space(objective.simulation).values(), start_rates, seeds[:1],
                transmissibility=start_trans)  # freezes the answers as the fit's first scoring did
cut = (pd.Timestamp("2020-08-02") - pd.Timestamp(cfg.calibration.start)).days // 7  # weeks before 2020-08-02
rows = []
for m in fit["members_detail"]:
    space = period_space(objective.simulation)
    space.set_values(m["values"])
    for s in seeds:
        score = evaluate_period(objective, epidemic, space.values(), list(m["variant_rates"].values()), [s],
                                member=m["member"], transmissibility={**start_trans, **m["transmissibility"]})
        weekly = score.weekly[score.weekly.target == "deaths"]
        shares = score.lineages
        rows.append({"member": m["member"], "seed": s,
                     **{t: v["simulated"] for t, v in score.summary["totals"].items()},
                     "deaths_to_2020-08-01": float(weekly[weekly.week_start < weekly.week_start.min()
                                                          + pd.Timedelta(weeks=cut)].simulated.sum()),
                     "infected_by_2020-04-06": score.summary["serology_share"],
                     "lineage_log_loss": score.summary["lineage_loss"],
                     "lineage_mae_points": float((shares.simulated_percent - shares.observed_percent).abs().mean())})
        print(rows[-1], flush=True)
bands = pd.DataFrame(rows)
weekly = pd.read_csv(folder / "ensemble_weekly.csv", parse_dates=["week_start"])
weekly = weekly[(weekly.area == "NYC") & (weekly.week_start < pd.Timestamp(cfg.calibration.start)
                                          + pd.Timedelta(weeks=fit["weeks"]))]
deaths = weekly.groupby(["member", "seed"])["deaths"].sum()
replayed = bands.set_index(["member", "seed"])["deaths"]
if not ((deaths - replayed).abs() < 1.0).all():  # counts are multiples of 100 residents at 1:100
    raise SystemExit(f"the re-scored runs do not replay the fit's: deaths {replayed.to_dict()} vs {deaths.to_dict()}")
bands.to_csv(folder / "bands.csv", index=False)
print(bands.round(4).to_string(index=False))
print(bands.drop(columns=["member", "seed"]).quantile([0.05, 0.5, 0.95]).round(4).to_string())
