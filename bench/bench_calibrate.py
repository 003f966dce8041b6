"""Benchmark calibration: one gradient step on a large city, and gradient vs gradient-free on the first wave.

    python bench/bench_calibrate.py step --agents 1000000 --days 120 [--checkpoint-days 10]
    python bench/bench_calibrate.py wave --scale 0.01 --steps 20 --out runs/bench_calibrate

``step``: one forward and backward pass of the first-wave loss (every calibrated parameter requires
grad) on a synthetic city of about ``--agents`` agents over ``--days`` days: seconds and peak RSS
(``resource.getrusage``, the whole process, so run one configuration per process).
``wave``: :func:`lpm_llm.calibrate.calibrate_first_wave` on the bundled NYC data (constant isolation
decisions, no LLM): the loss on common evaluation seeds of gradient descent and of Nelder-Mead
(given as much wall time as Adam took) against fitting time, when Adam's fit first scored at or
below Nelder-Mead's final loss, and the forecast errors against persistence.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from lpm_llm.calibrate import (
    NYC_POPULATION,
    FrozenDecisions,
    SimulationObjective,
    calibrate_first_wave,
    first_wave_space,
)
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.sim import Simulation
from lpm_llm.models.epidemic import Epidemic, EpidemicParams
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc

START = "2020-03-01"
PARAMS = EpidemicParams(initial_infections_per_100k=(100.0,) * 5, beta_scale=1.5)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_step(agents: int, days: int, checkpoint_days: int | None) -> dict:
    from lpm_llm.calibrate.targets import observed_weekly

    pop = synthesize_nyc(scale=agents / NYC_POPULATION, seed=0)
    arch = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)
    before = _rss_gib()
    weeks = days // 7
    decisions = {"isolate": FrozenDecisions(ConstantDecision(0.3, arch.k))}
    sim = Simulation(pop, [Epidemic(PARAMS)], archetypes=arch, decisions=decisions, interventions=nyc_2020(),
                     start_date=START, days=days, seed=0, checkpoint_days=checkpoint_days)
    obs = observed_weekly(START, weeks, ("cases", "deaths"))
    objective = SimulationObjective(sim, obs, weeks=weeks, scale=pop.n / NYC_POPULATION)
    space = first_wave_space(PARAMS, n_months=5)
    t0 = time.perf_counter()
    loss = objective(space.values(), [0])
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"agents": pop.n, "days": days, "checkpoint_days": checkpoint_days, "forward_s": round(t1 - t0, 1),
            "backward_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1), "rss_before_gib": round(before, 2),
            "peak_rss_gib": round(_rss_gib(), 2), "loss": float(loss.detach())}


def bench_wave(scale: float, steps: int, seeds_per_step: int, lr: float, lr_final: float | None,
               out: Path | None) -> dict:
    pop = synthesize_nyc(scale=scale, seed=0)
    arch = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)

    def progress(method, i, loss, seconds):
        print(f"  {method:12s} {i:3d}  loss {loss:.4f}  {seconds:7.1f} s", flush=True)

    report = calibrate_first_wave(pop, arch, {"isolate": ConstantDecision(0.2, arch.k)}, PARAMS, nyc_2020(),
                                  start=START, end="2020-07-31", forecast_weeks=4, steps=steps, lr=lr,
                                  lr_final=lr_final, seeds_per_step=seeds_per_step, eval_seeds=4, on_step=progress)
    if out is not None:
        report.save(out)
    summary = {"losses": report.losses, "params": report.params, "baseline_params": report.baseline_params,
               "wall_s": {m: h["wall_time"][-1] for m, h in report.history.items()},
               "simulations": {m: h["simulations"][-1] for m, h in report.history.items()},
               "eval_loss_vs_time": {m: [(round(t, 1), round(v, 4)) for t, v in zip(h["eval_wall_time"],
                                                                                   h["eval_loss"], strict=True)]
                                     for m, h in report.history.items()},
               "forecast": {m: {t: {k: v for k, v in f[t].items() if k.endswith(("total", "error"))} for t in f}
                            for m, f in report.forecast.items()}}
    # the verdict: when Adam's fit first scored at or below Nelder-Mead's final loss, and the ratio at equal time
    adam, nm = report.history["adam"], report.history["nelder-mead"]
    reached = [t for t, v in zip(adam["eval_wall_time"], adam["eval_loss"], strict=True) if v <= nm["eval_loss"][-1]]
    summary["adam_reaches_nelder_mead_final_loss_at_s"] = round(reached[0], 1) if reached else None
    summary["nelder_mead_s"] = round(nm["wall_time"][-1], 1)
    summary["loss_ratio_nelder_mead_to_adam_at_equal_time"] = round(nm["eval_loss"][-1] / adam["eval_loss"][-1], 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--agents", type=int, default=1_000_000)
    s.add_argument("--days", type=int, default=120)
    s.add_argument("--checkpoint-days", type=int, default=None)
    w = sub.add_parser("wave")
    w.add_argument("--scale", type=float, default=0.01)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--seeds-per-step", type=int, default=1)
    w.add_argument("--lr", type=float, default=0.1)
    w.add_argument("--lr-final", type=float, default=0.02)
    w.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.what == "step":
        result = bench_step(args.agents, args.days, args.checkpoint_days)
    else:
        result = bench_wave(args.scale, args.steps, args.seeds_per_step, args.lr, args.lr_final, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
