"""Benchmark privacy-preserving calibration: the cost of the secure sum, and epsilon against loss.

    python bench/bench_private.py cost --scale 0.01 --holders 5 --steps 3
    python bench/bench_private.py epsilon --scale 0.002 --holders 5 --steps 10 --noise 0 0.5 1 2 4

``cost``: seconds per Adam step and bytes each holder sends per step, for the centralized fit (one
process, the whole city's loss: ``privacy.mode none``'s Adam loop) and for ``plain`` (holders as ranks,
sums in the clear), ``secure`` and ``secure+dp`` (holders as ranks started by ``lpm-llm calibrate
--nproc``). Every holder runs the whole simulation (the series are private, the simulation is the
coordinator's model), so on a machine with fewer cores than holders the holders share the cores:
the ratio that isolates the protocol's cost is secure / plain.
With ``--microdata`` each holder keeps its boroughs' residents and simulates them only (the city
sharded by area over the holders; the city's community pressure by age band crosses through the
secure sum every day, counted in the bytes sent).
``epsilon``: for each noise multiplier, the (epsilon, delta) of the fit and its loss, evaluated
afterwards without noise on 4 common seeds by the benchmark (which holds every borough's data).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

START, END = dt.date(2020, 3, 1), dt.date(2020, 4, 25)  # 8 weeks of the first wave
WEEKS = ((END - START).days + 1) // 7


def _config(scale: float, mode: str, steps: int, noise: float, microdata: bool = False) -> dict:
    config = {
        "name": "bench_private",
        "population": {"source": "nyc", "scale": scale, "seed": 1},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "enabled": False}},
        "seeds": [0],
        "calibration": {"start": START.isoformat(), "end": END.isoformat(), "steps": steps, "lr": 0.05},
        "privacy": {"mode": mode, "noise_multiplier": noise, "clip": 1.0, "transcript": False},
        "distributed": {"timeout_s": 600},
        "outputs": {"plots": False},
    }
    if microdata:  # each holder keeps its boroughs' residents: the city sharded by area over the holders
        config["privacy"]["microdata"] = True
        config["distributed"]["shard"] = "area"
    return config


def _distributed(scale: float, mode: str, steps: int, holders: int, noise: float, tmp: Path,
                 microdata: bool = False) -> dict:
    path = tmp / f"{mode}-{noise}.yaml"
    path.write_text(yaml.safe_dump(_config(scale, mode, steps, noise, microdata)))
    out = tmp / f"{mode}-{noise}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lpm_llm", "calibrate", str(path), "--out", str(out), "--quiet",
                           "--nproc", str(holders)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "calibration.json").read_text())
    result["total_s"] = time.perf_counter() - t0
    return result


def _centralized(scale: float, steps: int) -> dict:
    """The same Adam fit in one process on the whole city's loss."""
    from lpm_llm.calibrate import Calibrator, SimulationObjective, first_wave_space
    from lpm_llm.calibrate.targets import observed_weekly
    from lpm_llm.core.sim import Simulation, months_between
    from lpm_llm.models.epidemic import Epidemic
    from lpm_llm.runner.experiment import ExperimentConfig
    from lpm_llm.runner.run import build_population

    cfg = ExperimentConfig(**_config(scale, "none", steps, 0.0))
    population = build_population(cfg)
    sim = Simulation(population, [Epidemic(cfg.epidemic)], interventions=cfg.interventions.schedule(),
                     start_date=START, days=7 * WEEKS, seed=0)
    objective = SimulationObjective(sim, observed_weekly(START, WEEKS, cfg.calibration.targets), weeks=WEEKS,
                                    scale=population.scale)
    space = first_wave_space(cfg.epidemic, months_between(START, END) + 1, alignment=False)
    fit = Calibrator(space, method="adam", steps=steps, lr=0.05, seed=0).fit(objective)
    return {"wall_time": fit.wall_times_, "params": fit.params_, "objective": objective, "space": space}


def _per_step(wall: list[float]) -> float:
    """Seconds per step after the first (which also pays for warm-up)."""
    return (wall[-1] - wall[0]) / (len(wall) - 1) if len(wall) > 1 else wall[0]


def cost(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_private-"))
    rows = [("centralized (1 process)", _per_step(_centralized(args.scale, args.steps)["wall_time"]), 0)]
    for mode, noise in (("plain", 0.0), ("secure", 0.0), ("secure+dp", 1.0)):
        r = _distributed(args.scale, mode, args.steps, args.holders, noise, tmp, args.microdata)
        p = r["privacy"]
        sent = (p["secure_sum_bytes_sent_by_rank0"] + p.get("city_sum_bytes_sent_by_rank0", 0)) / max(p["rounds"], 1)
        rows.append((f"{mode} ({args.holders} holders)", _per_step(r["wall_time"]), sent))
    print(f"# one Adam step, NYC 1:{round(1 / args.scale)}, {WEEKS} weeks, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, {dt.date.today()}, "
          f"{'holders keep microdata (area shards)' if args.microdata else 'every holder runs the whole city'}")
    print("| fit | s/step | ratio to plain | bytes sent per holder per step |")
    print("|---|---|---|---|")
    plain = rows[1][1]
    for name, seconds, sent in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / plain:.2f} | {sent:.0f} |")


def epsilon_table(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_private-"))
    base = _centralized(args.scale, 1)
    objective, space = base["objective"], base["space"]
    seeds = [10_000 + j for j in range(4)]
    print(f"# secure+dp, {args.holders} holders, {args.steps} Adam steps, clip 1.0, delta 1e-5, "
          f"NYC 1:{round(1 / args.scale)}, loss on seeds {seeds} (no noise)")
    print("| noise multiplier | epsilon | final loss |")
    print("|---|---|---|")
    with torch.no_grad():
        print(f"| (the start, no fit) | 0 | {float(objective(space.values(), seeds)):.4f} |")
    for noise in args.noise:
        mode = "secure" if noise == 0 else "secure+dp"
        r = _distributed(args.scale, mode, args.steps, args.holders, noise, tmp)
        space.set_values(r["params"])
        with torch.no_grad():
            loss = float(objective(space.values(), seeds))
        eps = r["privacy"].get("epsilon", float("inf"))
        print(f"| {noise:g} | {eps:.3g} | {loss:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--scale", type=float, default=0.01)
    c.add_argument("--holders", type=int, default=5)
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--microdata", action="store_true", help="holders keep their residents (privacy.microdata)")
    e = sub.add_parser("epsilon")
    e.add_argument("--scale", type=float, default=0.002)
    e.add_argument("--holders", type=int, default=5)
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    args = p.parse_args()
    torch.set_num_threads(1)
    cost(args) if args.what == "cost" else epsilon_table(args)


if __name__ == "__main__":
    main()
