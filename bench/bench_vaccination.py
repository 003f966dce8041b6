"""Validation of the vaccination behaviour against New York City's data: simulated coverage (>= 1
dose) by borough and by age band against ``vaccination_daily.csv``.

    python bench/bench_vaccination.py [EXPERIMENT.yaml] [--steps 25] [--seeds 3]

1. Runs the experiment (default ``experiments/covid_vaccination_nyc.yaml``: epidemic + vaccination,
   1:100 city, the embedded model) once through the runner; its weekly answers per archetype
   (``decisions.csv``, from the LLM cache on a rerun) are then inputs, replayed in every simulation
   below (as the first-wave calibration reuses its isolation answers).
2. Fits only city-wide quantities, by Adam on the score-function gradients
   (:class:`~lpm_llm.calibrate.Calibrator`): the vaccination decision's alignment map (a, b) and the
   supply scale, to the city-wide weekly coverage from 2020-12-14 to 2021-06-30 (squared error in
   percentage points). The borough and age differences are never fitted: they come from the
   archetypes' answers (and from eligibility by age).
3. Baseline: every archetype has the same willingness every week, ``sigmoid(b)``, with b and the
   supply scale fitted the same way.
4. Scores both (and the LLM's answers with the identity alignment) on common seeds: coverage on
   2021-03-31 and 2021-06-30 by borough and by age band, the mean absolute error in percentage
   points and Spearman's rank correlation (scipy.stats.spearmanr) against the observed coverage.

The fits and scores run the vaccination model alone (the answers are fixed, and the vaccination
does not read the epidemic's state; the epidemic only shaped the prompts' cases in step 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpm_llm.calibrate import Calibrator  # noqa: E402
from lpm_llm.core.parameters import Bounded, ParameterSpace  # noqa: E402
from lpm_llm.core.sim import Simulation  # noqa: E402
from lpm_llm.data.vaccination import load_vaccination  # noqa: E402
from lpm_llm.models import Vaccination  # noqa: E402
from lpm_llm.population import AGE_BANDS, BOROUGHS  # noqa: E402
from lpm_llm.runner.experiment import Experiment  # noqa: E402

DATES = ("2021-03-31", "2021-06-30")


class Replay:
    """The answers of a run, (steps, K) by decision step, given back by the context's ``step``."""

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def probabilities(self, context):
        return self.table[int(context["step"])]


class Same:
    """One willingness for every archetype and week (the baseline): the alignment shift alone sets it."""

    def __init__(self, k: int):
        self.p = torch.full((k,), 0.5)

    def probabilities(self, context):
        return self.p


def observed(residents_by_band: pd.Series, residents_by_borough: pd.Series) -> dict[str, pd.DataFrame]:
    """Observed coverage (percent with >= 1 dose): ``city`` (date-indexed), ``borough``, ``age`` (DATES)."""
    t = load_vaccination()
    city = t[(t["dimension"] == "borough") & (t["group"] == "NYC")].set_index("date")["people_1plus"]
    city = city / residents_by_borough.sum() * 100
    out = {"city": city}
    for dim, denominators in (("borough", residents_by_borough), ("age", residents_by_band)):
        sel = t[(t["dimension"] == dim) & t["date"].isin(pd.to_datetime(DATES)) & (t["group"] != "NYC")]
        wide = sel.pivot(index="group", columns="date", values="people_1plus")
        wide.columns = [str(c.date()) for c in wide.columns]
        out[dim] = wide.div(denominators, axis=0).mul(100).loc[list(denominators.index)]
    return out


def simulated(results, start: dt.date) -> dict[str, pd.DataFrame]:
    """Simulated coverage in percent on DATES by borough and by age band (agents as the denominator)."""
    v = results.series["vaccinated_1"].detach()
    pop = results.daily[results.daily["date"] == results.daily["date"].min()]
    size = torch.tensor(pop["population"].to_numpy(), dtype=torch.float32).view(v.shape[1:])
    out = {}
    for name, axis, labels in (("borough", 1, BOROUGHS), ("age", 0, AGE_BANDS)):
        cols = {}
        for d in DATES:
            t = (dt.date.fromisoformat(d) - start).days
            cols[d] = (v[t].sum(axis) / size.sum(axis) * 100).numpy()  # (B, A): sum ages or boroughs
        out[name] = pd.DataFrame(cols, index=list(labels))
    return out


def markdown(frame: pd.DataFrame, index: bool = True, digits: int = 1) -> str:
    """A DataFrame as a markdown table (no optional dependency)."""
    f = frame.reset_index() if index else frame
    def cell(x):
        return f"{x:.{digits}f}" if isinstance(x, float | np.floating) else str(x)
    lines = ["| " + " | ".join(map(str, f.columns)) + " |", "|" + "---|" * len(f.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in f.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "covid_vaccination_nyc.yaml"))
    ap.add_argument("--steps", type=int, default=25, help="Adam steps per fit")
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds")
    ap.add_argument("--lr", type=float, default=0.15)
    ap.add_argument("--decisions", help="decisions.csv of a run of the experiment (skips step 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    # 1. the experiment's answers
    t0 = time.perf_counter()
    exp = Experiment.from_yaml(args.experiment)
    cfg = exp.config
    if args.decisions:
        decisions = pd.read_csv(args.decisions)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = exp.run(Path(tmp) / "run")
        decisions = run.decisions
        llm = run.manifest.get("llm", {})
        print(f"experiment run: {time.perf_counter() - t0:.0f} s; LLM usage {llm}")
    dec = decisions[decisions["decision"] == "vaccinate"]
    from lpm_llm.population.archetypes import ArchetypeSpec
    from lpm_llm.runner.run import build_population

    population = build_population(cfg)
    arch = ArchetypeSpec.from_yaml(cfg.archetypes).assign(population)
    steps = sorted(dec["step"].unique())
    table = {int(s): torch.tensor(dec[dec["step"] == s].sort_values("archetype")["probability"].to_numpy(),
                                  dtype=torch.float32) for s in steps}
    answers = torch.stack(list(table.values()))
    print(f"answers: {answers.shape[0]} weeks x {answers.shape[1]} archetypes, mean {answers.mean():.3f}, "
          f"spread between archetypes (sd, mean over weeks) {answers.std(1).mean():.3f}")

    start = cfg.start_date
    params = dict(cfg.model_params.get("vaccination", {}))
    marg = pd.read_csv(ROOT / "lpm_llm" / "data" / "nyc" / "population_marginals.csv")
    by_borough = marg[marg["dimension"] == "total"].set_index("borough")["population"].astype(float)
    by_band = marg[marg["dimension"] == "age"].groupby("group")["population"].sum().astype(float)
    by_band.index = [str(i) for i in by_band.index]
    by_band = by_band.loc[list(AGE_BANDS)]
    obs = observed(by_band, by_borough.loc[list(BOROUGHS)])
    weekly = pd.date_range("2020-12-14", "2021-06-30", freq="7D")
    target = torch.tensor(obs["city"].reindex(weekly).to_numpy(), dtype=torch.float32)
    days = torch.tensor([(d.date() - start).days for d in weekly])

    def make_sim(source):
        return Simulation(population, [Vaccination(params)], archetypes=arch, decisions={"vaccinate": source},
                          start_date=start, days=cfg.days, seed=0)

    def fit(source, names):
        sim = make_sim(source)
        declared = sim.parameters()
        specs = {n: declared[n] for n in names}
        if "vaccinate_alignment_b" in specs:  # the baseline's willingness sigmoid(b) needs the whole range
            specs["vaccinate_alignment_b"] = Bounded(-6.0, 6.0, 0.0, doc="shift of the vaccinate alignment map")
        space = ParameterSpace(specs)

        def objective(values, seeds):
            values = dict(values)
            values.setdefault("vaccinate_alignment_a", torch.tensor(1.0))
            losses = []
            for s in seeds:
                sim.set_parameters(values)
                sim.seed = s
                r = sim.run()
                cov = r.series["vaccinated_1"].sum((1, 2)).index_select(0, days) / population.n * 100
                losses.append(((cov - target) ** 2).mean())
            return torch.stack(losses).mean()

        t = time.perf_counter()
        cal = Calibrator(space, method="adam", steps=args.steps, lr=args.lr, seeds_per_step=1).fit(objective)
        print(f"  fit {names}: loss {cal.loss_history_[0]:.2f} -> {cal.loss_history_[-1]:.2f} (pp^2) in "
              f"{time.perf_counter() - t:.0f} s; fitted {cal.params_}")
        return cal.params_

    def score(source, values):
        sim = make_sim(source)
        values = {k: torch.tensor(v) for k, v in values.items()}
        values.setdefault("vaccinate_alignment_a", torch.tensor(1.0))
        sim.set_parameters(values)
        frames = []
        with torch.no_grad():
            for s in range(100, 100 + args.seeds):
                sim.seed = s
                frames.append(simulated(sim.run(), start))
        return {k: sum(f[k] for f in frames) / len(frames) for k in ("borough", "age")}

    print("fitting the LLM's alignment map and the supply (city-wide only)")
    llm_fit = fit(Replay(table), ["vaccinate_alignment_a", "vaccinate_alignment_b", "vaccine_supply_scale"])
    print("fitting the baseline's one willingness and the supply (city-wide only)")
    base_fit = fit(Same(arch.k), ["vaccinate_alignment_b", "vaccine_supply_scale"])
    runs = {
        "LLM archetypes, fitted alignment": score(Replay(table), llm_fit),
        "same willingness (baseline), fitted": score(Same(arch.k), base_fit),
        "LLM archetypes, identity alignment": score(Replay(table), {"vaccinate_alignment_b": 0.0,
                                                                     "vaccine_supply_scale": 1.0}),
    }

    rows = []
    for dim in ("borough", "age"):
        for d in DATES:
            o = obs[dim][d]
            line = {"by": dim, "date": d}
            for name, sim_cov in runs.items():
                s = sim_cov[dim][d]
                line[f"{name}: MAE pp"] = float(np.mean(np.abs(s.to_numpy() - o.to_numpy())))
                line[f"{name}: Spearman"] = float(spearmanr(s.to_numpy(), o.to_numpy()).statistic)
            rows.append(line)
    summary = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    print("\ncoverage (% with >= 1 dose), observed and simulated (mean of", args.seeds, "seeds)")
    for dim in ("borough", "age"):
        for d in DATES:
            frame = pd.DataFrame({"observed": obs[dim][d], **{n: r[dim][d] for n, r in runs.items()}})
            print(f"\n{dim}, {d}\n" + markdown(frame.rename_axis(dim)))
    print("\nsummary\n" + markdown(summary, index=False, digits=2))


if __name__ == "__main__":
    main()
