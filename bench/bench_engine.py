"""Speed and memory of the epidemic engine, side by side with Starsim, Covasim and LASER, in one run.

Scenarios (each in its own subprocess, so that peak RSS is its own):

- ``random``: N agents, 100 days, one well-mixed layer, beta 0.5/day, exponential latent 4 d and
  infectious 7 d (R0 about 3.8), 0.1% seeded: the peers' scenario (``../shared/bench/peers/`` beside the repository).
- ``full``: synthetic NYC scaled to N agents, all four layers, the NYC 2020 interventions, weekly
  isolation decisions for 100 archetypes from a constant source (a stand-in for a cached LLM).
- ``nyc``: the same at full scale (8,336,817 agents).

Peers run through their own virtual environments (``bash ../shared/bench/peers/setup.sh``);
a missing one is skipped with a note. Usage::

    python bench/bench_engine.py                       # everything, 1 thread
    python bench/bench_engine.py --skip-nyc --skip-peers --agents 200000
    python bench/bench_engine.py --threads 2

``agent-steps/s`` counts the simulation loop only (set-up excluded), like the peers' ``t_run``.
``state B/agent`` counts the tensors the run holds per agent (population columns, contact
layers, archetype index, epidemic state, held decisions); ``peak RSS`` is the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/tmp/lpm-peers"))
REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPTS = Path(os.environ.get("PEER_SCRIPTS", REPO.parent / "shared" / "bench" / "peers"))
NYC_AGENTS = 8_336_817


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(scenario: str, agents: int, days: int, threads: int) -> dict:
    """Run one scenario in this process; returns a result row."""
    import torch

    torch.set_num_threads(threads)
    from lpm_llm.core.behavior import ConstantDecision
    from lpm_llm.core.interventions import nyc_2020
    from lpm_llm.core.sim import Simulation
    from lpm_llm.models.epidemic import Epidemic, EpidemicParams
    from lpm_llm.population import AGE_BANDS, BOROUGHS, Population

    t0 = time.perf_counter()
    kwargs: dict = {}
    if scenario == "random":
        pop = Population(
            {
                "borough": torch.zeros(agents, dtype=torch.int8),
                "age_band": torch.full((agents,), 4, dtype=torch.int8),
                "household": torch.arange(agents, dtype=torch.int32),
            },
            {"borough": BOROUGHS, "age_band": AGE_BANDS},
        )
        params = EpidemicParams(
            beta_household=0,
            beta_school=0,
            beta_workplace=0,
            beta_community=0.5,
            community_matrix=tuple(tuple(float(i == j) for j in range(10)) for i in range(10)),
            susceptibility=(1.0,) * 10,
            rel_infectiousness_asymptomatic=1.0,
            duration_distribution="exponential",
            latent_mean=4.0,
            infectious_mean=7.0,
            initial_infections_per_100k=(100.0,) * 5,
        )
    else:
        from lpm_llm.population.synthesis import synthesize_nyc

        scale = 1.0 if scenario == "nyc" else agents / NYC_AGENTS
        pop = synthesize_nyc(scale=scale, seed=0)
        params = EpidemicParams(initial_infections_per_100k=(30.0,) * 5)

        class _Archetypes:  # borough x age band x sex: 100 archetypes
            index = (pop["borough"].int() * 20 + pop["age_band"].int() * 2 + pop["sex"].int()).to(torch.int32)
            k = 100

        kwargs = dict(
            archetypes=_Archetypes,
            decisions={"isolate": ConstantDecision(torch.linspace(0.05, 0.6, 100))},
            decision_every=7,
            interventions=nyc_2020(),
        )
    t_setup = time.perf_counter() - t0
    sim = Simulation(pop, [Epidemic(params)], days=days, seed=1, start_date="2020-03-01", **kwargs)
    t1 = time.perf_counter()
    with torch.no_grad():
        results = sim.run()
    t_run = time.perf_counter() - t1
    n = pop.n
    held = n * 4 if kwargs else 0  # the held isolation decisions, float32
    arch = kwargs["archetypes"].index.element_size() * n if kwargs else 0
    state_bytes = (
        pop.nbytes()
        + sim.model("epidemic").contacts.nbytes()
        + results.final_state.nbytes()
        + held
        + arch
        + sim.model("epidemic").engine.age.element_size() * n
        + sim.model("epidemic").engine.borough.element_size() * n
    )
    infected = float(results.series["new_infections"].sum())
    return dict(
        peer="lpm_llm",
        model=scenario,
        n_agents=n,
        n_days=days,
        threads=threads,
        t_setup=round(t_setup, 2),
        t_run=round(t_run, 2),
        agent_steps_per_s=round(n * days / t_run),
        peak_rss_mb=round(_peak_rss_mb()),
        state_bytes_per_agent=round(state_bytes / n, 1),
        cum_infections=infected,
        timings={k: round(v, 2) for k, v in results.timings.items()},
    )


def run_peer(name: str, agents: int, days: int) -> dict:
    python = PEERS_DIR / name / "bin" / "python"
    script = PEER_SCRIPTS / f"bench_{name}.py"
    if not python.exists() or not script.exists():
        return dict(peer=name, note=f"skipped: {python} or {script} missing (run {PEER_SCRIPTS}/setup.sh)")
    args = [str(python), str(script), str(agents), str(days)] + (["1"] if name == "laser" else [])
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        return dict(peer=name, note=f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    row["peak_rss_mb"] = round(int(proc.stderr.strip().splitlines()[-1]) / 1024)
    row["model"] = "default" if name == "covasim" else "SEIR"
    return row


def _subprocess_ours(scenario: str, agents: int, days: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--scenario",
        scenario,
        "--agents",
        str(agents),
        "--days",
        str(days),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return dict(peer="lpm_llm", model=scenario, note=f"failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    head = (
        f"{'simulator':<22}{'model':<9}{'agents':>10}{'days':>5}{'seconds':>9}{'agent-steps/s':>15}"
        f"{'peak RSS MB':>12}{'B/agent':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "note" in r:
            lines.append(f"{r['peer']:<22}{r.get('model', ''):<9}  {r['note']}")
            continue
        name = r["peer"] + (f" {r['version']}" if "version" in r else f" ({r.get('threads', 1)} thr)")
        rss = r.get("peak_rss_mb", float("nan"))
        bpa = r.get("state_bytes_per_agent")
        bpa_txt = f"{bpa:>9.0f}" if bpa is not None else f"{1e6 * rss / r['n_agents']:>8.0f}*"
        lines.append(
            f"{name:<22}{r.get('model', ''):<9}{r['n_agents']:>10,}{r['n_days']:>5}{r['t_run']:>9.2f}"
            f"{r['agent_steps_per_s']:>15,}{rss:>12,}{bpa_txt}"
        )
    lines.append("B/agent: state bytes per agent for lpm_llm; * peak RSS per agent for peers")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-nyc", action="store_true")
    ap.add_argument("--peers", default="starsim,covasim,laser")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario, print JSON
    args = ap.parse_args()
    if args.scenario:
        print(json.dumps(run_ours(args.scenario, args.agents, args.days, args.threads)))
        return

    rows = []
    for scenario in ("random", "full"):
        rows.append(_subprocess_ours(scenario, args.agents, args.days, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_nyc:
        rows.append(_subprocess_ours("nyc", NYC_AGENTS, args.days, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    peers = {}
    if not args.skip_peers:
        for name in args.peers.split(","):
            peers[name] = run_peer(name, args.agents, args.days)
            rows.append(peers[name])
            print(json.dumps(peers[name]), flush=True)
    print()
    print(_table(rows))
    ours = {r["model"]: r for r in rows if r.get("peer") == "lpm_llm" and "note" not in r}
    print()
    for name, peer in peers.items():
        if "note" in peer:
            continue
        for model in ("random", "full"):
            if model in ours:
                ratio = ours[model]["agent_steps_per_s"] / peer["agent_steps_per_s"]
                print(f"lpm_llm {model:<7} vs {name:<8}: {ratio:6.1f}x agent-steps/s")
    if "nyc" in ours:
        r = ours["nyc"]
        print(
            f"full NYC: {r['n_agents']:,} agents x {r['n_days']} days in {r['t_run']:.1f} s "
            f"(target <= 60 s), state {r['state_bytes_per_agent']:.0f} B/agent (target <= 150), "
            f"peak RSS {r['peak_rss_mb']:,} MB"
        )


if __name__ == "__main__":
    main()
