"""One simulation on 1 and 2 ranks (area sharding over torch.distributed, gloo on CPU), and a 10x New York.

Scenarios, each rank a fresh process (``torch.multiprocessing.spawn``; gloo on 127.0.0.1):

- ``nyc``: full synthetic NYC (8,336,817 agents), all four layers, the NYC 2020 interventions,
  weekly isolation decisions for 100 archetypes from a constant source (as ``bench_engine.py``'s
  ``nyc``), ``--days`` days: 1 rank with 1 and 2 threads against 2 ranks of 1 thread each (this
  machine has 2 cores).
- ``replicated``: New York replicated ``--copies`` times with distinct agent ids (10: about 83
  million agents), each borough ``copies`` times larger, on ``--ranks`` ranks of 1 thread; each rank
  synthesizes the city once and replicates its own boroughs (the whole population never exists in
  one process).

Prints one JSON line per configuration and a table: seconds of the simulation loop, seconds per
simulated day, per-rank peak RSS, bytes per agent of the tensors a rank holds, and the traffic per
day (bytes each rank puts into all-reduce sums: community pressure, the day's series, decisions'
shares). Usage::

    python bench/bench_distributed.py nyc --days 100
    python bench/bench_distributed.py replicated --copies 10 --days 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _replicate(local, copies: int):
    """`local` (a shard of NYC) repeated `copies` times: distinct groups, the same areas; ids by copy."""
    import torch

    from lpm_llm.population import Population

    columns = {}
    for name, col in local.columns.items():
        if name in ("household", "school", "workplace"):
            size = int(col.max()) + 1
            parts = [torch.where(col >= 0, col + k * size, col) for k in range(copies)]
        else:
            parts = [col] * copies
        columns[name] = torch.cat(parts)
    scale = None if local.scale is None else local.scale * copies
    return Population(columns, local.codebooks, scale=scale)


def worker(rank: int, world: int, scenario: str, days: int, threads: int, copies: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from lpm_llm.core.behavior import ConstantDecision
    from lpm_llm.core.interventions import nyc_2020
    from lpm_llm.core.sim import Simulation
    from lpm_llm.distributed.shard import AreaShard, shard_population
    from lpm_llm.models.epidemic import Epidemic, EpidemicParams
    from lpm_llm.population.synthesis import synthesize_nyc

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    t0 = time.perf_counter()
    pop = synthesize_nyc(scale=1.0, seed=0)
    n_city = pop.n
    shard = None
    if world > 1 or copies > 1:
        local, shard = shard_population(pop, rank, world)
        del pop
        if copies > 1:  # global id of agent i of copy k: k * n_city + i
            ids = torch.cat([shard.ids.long() + k * n_city for k in range(copies)]).to(torch.int32)
            local = _replicate(local, copies)
            shard = AreaShard(rank, world, areas=shard.areas, ids=ids, n_global=n_city * copies)
        pop = local

    class _Archetypes:  # borough x age band x sex: 100 archetypes
        index = (pop["borough"].int() * 20 + pop["age_band"].int() * 2 + pop["sex"].int()).to(torch.int32)
        k = 100

    sim = Simulation(pop, [Epidemic(EpidemicParams(initial_infections_per_100k=(30.0,) * 5))], days=days, seed=1,
                     start_date="2020-03-01", archetypes=_Archetypes,
                     decisions={"isolate": ConstantDecision(torch.linspace(0.05, 0.6, 100))}, decision_every=7,
                     interventions=nyc_2020(), shard=shard)
    t_setup = time.perf_counter() - t0
    before = (shard.reductions, shard.reduced_bytes) if shard is not None else (0, 0)
    t1 = time.perf_counter()
    with torch.no_grad():
        results = sim.run()
    t_run = time.perf_counter() - t1
    epidemic = sim.model("epidemic")
    n = pop.n
    state_bytes = (pop.nbytes() + epidemic.contacts.nbytes() + results.final_state.nbytes() + 4 * n  # held decisions
                   + _Archetypes.index.element_size() * n + epidemic.engine.age.element_size() * n
                   + epidemic.engine.borough.element_size() * n + (shard.ids.element_size() * n if shard else 0))
    row = dict(scenario=scenario, rank=rank, ranks=world, threads=threads, agents=n,
               agents_total=shard.n_global if shard else n, days=days, t_setup=round(t_setup, 1),
               t_run=round(t_run, 2), s_per_day=round(t_run / days, 3), peak_rss_mb=round(_peak_rss_mb()),
               state_bytes_per_agent=round(state_bytes / n, 1),
               reductions_per_day=round(((shard.reductions - before[0]) if shard else 0) / days, 1),
               traffic_bytes_per_day=round(((shard.reduced_bytes - before[1]) if shard else 0) / days),
               infections=float(results.series["new_infections"].sum()),
               timings={k: round(v, 2) for k, v in results.timings.items()})
    Path(f"{out}.{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def run(scenario: str, world: int, threads: int, days: int, copies: int = 1) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        s.close()
        out = str(Path(tmp) / "row")
        mp.spawn(worker, args=(world, scenario, days, threads, copies, out), nprocs=world, join=True)
        rows = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'configuration':<26}{'rank':>5}{'agents':>13}{'days':>5}{'loop s':>9}{'s/day':>8}{'peak RSS MB':>12}"
            f"{'B/agent':>9}{'traffic B/day':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['scenario']} {r['ranks']} rank(s) x {r['threads']} thr"
        lines.append(f"{name:<26}{r['rank']:>5}{r['agents']:>13,}{r['days']:>5}{r['t_run']:>9.1f}{r['s_per_day']:>8.3f}"
                     f"{r['peak_rss_mb']:>12,}{r['state_bytes_per_agent']:>9.1f}{r['traffic_bytes_per_day']:>14,}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["nyc", "replicated"])
    ap.add_argument("--days", type=int, default=100)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    rows: list[dict] = []
    if args.scenario == "nyc":
        for world, threads in ((1, 1), (1, 2), (2, 1)):
            rows += run("nyc", world, threads, args.days)
        one = {r["threads"]: r["t_run"] for r in rows if r["ranks"] == 1}
        two = max(r["t_run"] for r in rows if r["ranks"] == 2)
        summary = (f"speed-up of 2 ranks x 1 thread: {one[1] / two:.2f}x against 1 rank x 1 thread, "
                   f"{one[2] / two:.2f}x against 1 rank x 2 threads")
    else:
        rows += run("replicated", args.ranks, 1, args.days, args.copies)
        total = rows[0]["agents_total"]
        worst = max(r["s_per_day"] for r in rows)
        summary = (f"{total:,} agents on {args.ranks} ranks: {worst:.2f} s per simulated day "
                   f"({total / worst / 1e6:.1f} M agent-days/s), "
                   f"traffic {rows[0]['traffic_bytes_per_day']:,} B/day/rank")
    print(_table(rows))
    print(summary)


if __name__ == "__main__":
    main()
