"""Summarise fit_2021.py outputs (issue 15, the loss and transmissibility comparison): per folder the
losses per target on the evaluation seeds at the start and fitted, the city totals (also before and after
2020-08-01) against the observed, and the lineage shares per 4-week period (mean over the seeds) against
the sequenced ones.

    python bench/fit_2021_report.py bench/results/fit_2021_loss/log_mse bench/results/fit_2021_loss/negbin ...
"""
import json
import sys
from pathlib import Path

import pandas as pd

from lpm_llm.data.observed import load_covid

COLUMNS = ["reported_cases", "hospitalized", "deaths"]
obs = load_covid("2020-03-01", "2021-06-26")
obs["date"] = pd.to_datetime(obs["date"])
obs = obs[obs.area != "NYC"]
cut = pd.Timestamp("2020-08-01")
for d in sys.argv[1:]:
    j = json.loads(Path(f"{d}/fit_2021.json").read_text())
    m = j["members_detail"][0]
    print(f"== {d}: loss {j.get('loss')} (dispersion {j.get('dispersion')}), {j['seconds']:.0f} s, "
          f"evaluation seeds {j['evaluation_seeds']}")
    if m.get("transmissibility"):
        print("   transmissibility", {k: round(v, 3) for k, v in m["transmissibility"].items()})
    print("   variant rates", {k: round(v, 3) for k, v in m["variant_rates"].items()})
    for when in ("start", "fitted"):
        s = m[when]
        print(f"   {when}: objective {s['objective']:.4f}, serology {s.get('serology_share', float('nan')):.3f}, "
              f"lineage loss {s['lineage_loss']:.3f}")
        print("     log-MSE", {k: round(v, 3) for k, v in s["log_mse"].items()},
              " negbin", {k: round(v, 4) for k, v in s.get("negbin", {}).items()})
        print("     totals (simulated, observed)", {k: (round(v["simulated"]), round(v["observed"]))
                                                   for k, v in s["totals"].items()})
    w = pd.read_csv(f"{d}/ensemble_weekly.csv", parse_dates=["week_start"])
    w = w[(w.week_start < pd.Timestamp("2021-06-27")) & (w.area != "NYC")]
    early = w[w.week_start < cut].groupby("seed")[COLUMNS].sum().mean()
    late = w[w.week_start >= cut].groupby("seed")[COLUMNS].sum().mean()
    o_early = obs[obs.date < cut][["cases", "hospitalized", "deaths"]].sum()
    o_late = obs[obs.date >= cut][["cases", "hospitalized", "deaths"]].sum()
    print("   fitted, cases / admissions / deaths to 2020-08-01 (sim/obs):",
          [f"{a:.0f}/{b:.0f}" for a, b in zip(early, o_early, strict=True)], " after:",
          [f"{a:.0f}/{b:.0f}" for a, b in zip(late, o_late, strict=True)])
    lineages = pd.read_csv(f"{d}/lineages.csv")
    t = lineages.groupby(["period_start", "variant"])[["simulated_percent", "observed_percent"]].mean().round(1)
    t["cell"] = t.simulated_percent.astype(str) + " / " + t.observed_percent.astype(str)
    print(t["cell"].unstack().to_string())
    print("   mean absolute error, points:", round(float((t.simulated_percent - t.observed_percent).abs().mean()), 2))
