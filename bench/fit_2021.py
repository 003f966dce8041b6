"""The whole-period fit of experiments/covid_nyc_2021.yaml (issue 15), run once; its best member's values
are the experiment's epidemic parameters, and its ensemble gives the uncertainty bands.

An ensemble of MEMBERS fits (different seeds; member 0 from the YAML's values, the others from starting
points jittered around them), each STEPS Adam steps of one run (learning rate 0.1 -> 0.01) with the
variants' importation rates updated every 2 steps (lpm_llm.calibrate.period), against weekly reported
cases, hospital admissions and deaths by borough from 2020-03-01 (69 weeks), the April 2020 antibody
survey, and a smoothness penalty (weight SMOOTH) on the monthly transmission change. The vaccination
decisions are the embedded model's answers, asked once at the YAML's values (frozen, then reused).
Every member and its starting point are scored on 2 common evaluation seeds; writes
bench/results/fit_2021/: fit_2021.json (values, variant rates, losses per target, per-series errors,
histories), ensemble_weekly.csv (weekly series per member, evaluation seed and area), lineages.csv and plots
with the ensemble's 5-95% bands (members x evaluation seeds): cases, hospitalized, deaths, coverage,
lineages, transmission.

    python bench/fit_2021.py [SCALE] [MEMBERS] [STEPS] [SMOOTH]      # defaults 0.01 3 30 0.25
    FIT_2021_CONSTANT=0.4 FIT_2021_OUT=/tmp/fit python bench/fit_2021.py 0.002 1 2   # a smoke test, no LLM
    FIT_2021_SET="epidemic.fatality_scale=[1.6,1.6];calibration.fatality_smoothness=0.05" python bench/fit_2021.py
        # --set overrides of the experiment, separated by ';' (here: a start by month, and its penalty weight)
    FIT_2021_SET="calibration.loss=negbin" FIT_2021_EVAL_SEEDS=10000,10001,10002,10003 python bench/fit_2021.py
        # the count loss (lpm_llm.calibrate.targets.count_loss), scored on 4 evaluation seeds
    FIT_2021_SEED=7 python bench/fit_2021.py      # the fit's step seeds 1007, 1008, ... (a replicate)

The bundled values come from `python bench/fit_2021.py 0.01 3 25 0.25` started from these (then the YAML's):
beta_scale 0.7; transmission_change 0.6, 0.65, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.2, 1.2, 1.2, 1.1, 1.0, 1.0, 1.0;
initial_infections_per_100k 250 (Staten Island 400); ascertainment 0.1, 0.3, 0.45, 0.5, then 0.6; ascertainment
by borough 1.46, 1, 0.766, 1.13, 0.935; fatality_scale 0.865; importation_per_100k 0.5; every variant 0.2 per
100,000 a day; IHR as published (outputs in bench/results/fit_2021_first/). A rerun now starts from the fitted
values: the ensemble around the shipped values in bench/results/fit_2021/ is
`FIT_2021_SET="calibration.fatality_smoothness=0.05" python bench/fit_2021.py 0.01 3 20 0.25`, and
bench/fit_2021_bands.py gives its bands per run (README, "Uncertainty of the shipped fit").
"""
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lpm_llm import plots
from lpm_llm.calibrate.fit import FrozenDecisions
from lpm_llm.calibrate.period import EVALUATION_SEEDS, evaluate_period, fit_period, period_space
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.data.observed import load_covid
from lpm_llm.llm.client import open_client
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.runner.experiment import Experiment
from lpm_llm.runner.period_run import period_objective
from lpm_llm.runner.run import build_decisions, build_population

torch.set_num_threads(1)
args = sys.argv[1:] + [None] * 4
scale = float(args[0] or 0.01)
members, steps, smooth = int(args[1] or 3), int(args[2] or 30), float(args[3] or 0.25)
out = Path(os.environ.get("FIT_2021_OUT", "bench/results/fit_2021"))
out.mkdir(parents=True, exist_ok=True)
extra = [x for x in os.environ.get("FIT_2021_SET", "").split(";") if x.strip()]  # e.g. a fatality by month to start
exp = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", [f"population.scale={scale}",
                                                                 f"calibration.smoothness={smooth}", *extra])
cfg, cal = exp.config, exp.config.calibration
t0 = time.time()
pop = build_population(cfg)
arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)
client = open_client(cfg.llm)
constant = os.environ.get("FIT_2021_CONSTANT")
source = ConstantDecision(float(constant), arch.k) if constant else build_decisions(cfg, client, arch)["vaccinate"]
# the same simulation and objective as `lpm-llm calibrate experiments/covid_nyc_2021.yaml` (one fit)
objective, epidemic = period_objective(cfg, pop, arch, {"vaccinate": FrozenDecisions(source)})
weeks = objective.weeks
initial_rates = [v.importation_per_100k for v in epidemic.params.variants]
initial_trans = {v.lineage: v.transmissibility for v in epidemic.params.variants}
seed0 = int(os.environ.get("FIT_2021_SEED", "0"))  # added to the fit's seeds (not the evaluation seeds)
evaluation = [int(x) for x in os.environ.get("FIT_2021_EVAL_SEEDS", "").split(",") if x.strip()] or list(
    EVALUATION_SEEDS)  # e.g. FIT_2021_EVAL_SEEDS=10000,10001,10002,10003,10004,10005: more held-out seeds


def score(values, rates, member, trans=None):
    """Loss terms on the evaluation seeds, frames for the plots (lpm_llm.calibrate.period.evaluate_period)."""
    s = evaluate_period(objective, epidemic, values, rates, evaluation, member=member, transmissibility=trans)
    return s.summary, s.frames, s.lineages


print(f"scale {scale}: {pop.n} agents, {weeks} weeks, {members} members x {steps} steps, smoothness {smooth}",
      flush=True)
results, frames, shares = [], [], []
for m in range(members):
    space = period_space(objective.simulation)
    if m > 0:  # a jittered starting point: scalars and seeding by a factor exp(N(0, 0.15)), reproducibly
        g = torch.Generator().manual_seed(m)
        start = space.to_dict()
        for name in ("beta_scale", "fatality_scale", "importation_per_100k", "hospitalisation_scale",
                     "initial_infections_per_100k"):
            v = torch.as_tensor(start[name], dtype=torch.float64)
            start[name] = (v * torch.exp(0.15 * torch.randn(v.shape, generator=g, dtype=torch.float64))).tolist()
        space.set_values(start)
    epidemic.set_variant_importation(initial_rates)
    before, _, _ = score(space.values(), initial_rates, m, initial_trans)
    t1 = time.time()
    fit = fit_period(objective, space, epidemic, steps=steps, lr=0.1, lr_final=0.01, seed=100 * m + seed0,
                     transmissibility=cal.variant_transmissibility,
                     on_step=lambda i, r, m=m: print(f"member {m} step {i}: loss {r['loss']:.4f} lineage "
                                                f"{r['lineage_loss']:.3f} ({r['seconds']:.0f} s)", flush=True))
    rates = list(fit.variant_rates.values())
    after, frame, share = score(fit.space.values(), rates, m, {**initial_trans, **fit.transmissibility})
    print(f"member {m}: objective {before['objective']:.4f} -> {after['objective']:.4f} on the evaluation seeds "
          f"({time.time() - t1:.0f} s); serology {after['serology_share']:.3f}; lineage loss "
          f"{after['lineage_loss']:.3f}; log-MSE {after['log_mse']}", flush=True)
    results.append({"member": m, "start": before, "fitted": after, "values": fit.values,
                    "variant_rates": fit.variant_rates, "transmissibility": fit.transmissibility,
                    "history": fit.history, "seconds": time.time() - t1})
    frames.append(frame)
    shares.append(share)

best = min(results, key=lambda r: r["fitted"]["objective"])
ensemble = pd.concat(frames, ignore_index=True)
lineages = pd.concat(shares, ignore_index=True)
first = pd.Timestamp(cal.start)
week = first + pd.to_timedelta((ensemble["date"] - first).dt.days // 7 * 7, unit="D")
keys = [ensemble["member"], ensemble["seed"], ensemble["area"], week.rename("week_start")]
flows = ensemble.groupby(keys)[["new_infections", "reported_cases", "hospitalized", "deaths"]].sum()
stocks = ensemble.sort_values("date").groupby(keys)[["vaccinated_1", "population"]].last()
flows.join(stocks).round(1).reset_index().to_csv(out / "ensemble_weekly.csv", index=False)
lineages.to_csv(out / "lineages.csv", index=False)
summary = {"scale": scale, "agents": pop.n, "weeks": weeks, "members": members, "steps": steps,
           "smoothness": smooth, "overrides": extra, "fatality_smoothness": cal.fatality_smoothness,
           "loss": cal.loss, "dispersion": cal.dispersion,
           "evaluation_seeds": evaluation, "best_member": best["member"],
           "llm_requests": client.usage.requests, "seconds": time.time() - t0, "members_detail": results}
(out / "fit_2021.json").write_text(json.dumps(summary, indent=1, default=str))

# plots with the ensemble's bands: each (member, seed) is one draw
draws = ensemble.assign(seed=ensemble["member"] * 100_000 + ensemble["seed"])
observed = load_covid(cfg.start_date.isoformat(), (cfg.start_date + dt.timedelta(days=cfg.days - 1)).isoformat())
for target, column in (("cases", "reported_cases"), ("hospitalized", "hospitalized"), ("deaths", "deaths")):
    plots.plot_epidemic(draws, observed, out / f"{target}.png", sim_column=column, obs_column=target,
                        title=f"Weekly {target}, 2020-03 .. 2021-06: observed and the fitted ensemble "
                              f"({members} fits x {len(evaluation)} seeds, 5-95%)")
residents = draws[draws["date"] == draws["date"].min()].groupby("area")["population"].first()  # scaled already
plots.plot_coverage(draws, plots.observed_coverage(residents), out / "coverage.png")
plots.plot_lineages(lineages.assign(seed=lineages["member"] * 100_000 + lineages["seed"]), out / "lineages.png")
months = pd.date_range(cfg.start_date, periods=len(best["values"]["transmission_change"]) + 1, freq="MS")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(8, 4))
for r in results:
    ax.plot(months, [1.0] + r["values"]["transmission_change"], "o-", label=f"fit {r['member']}")
ax.set_ylabel("transmission change (March 2020 = 1)")
ax.set_title(f"Fitted monthly transmission beyond the policy schedule (smoothness weight {smooth})")
ax.legend()
fig.tight_layout()
fig.savefig(out / "transmission.png", dpi=110)
print(json.dumps({"best_member": best["member"], "values": best["values"], "variant_rates": best["variant_rates"],
                  "transmissibility": best["transmissibility"],
                  "ihr": [round(x * best["values"]["hospitalisation_scale"], 6) for x in epidemic.params.ihr]}),
      flush=True)
print(f"done in {time.time() - t0:.0f} s; LLM requests {client.usage.requests}", flush=True)
client.close()
