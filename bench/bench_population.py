"""Benchmark: synthesize New York City and assign archetypes; prints time, peak memory, bytes/agent.

    python bench/bench_population.py            # full city, 8,336,817 agents
    python bench/bench_population.py --scale 0.1

Targets (2-core machine, full scale): synthesis <= 60 s, peak RSS <= 1.5 GB, state <= 150 bytes per
agent; K=100 grouping <= 5 s; K=64 k-means <= 30 s. Peak RSS is the whole process (Python, torch,
scikit-learn included), read from resource.getrusage after each stage.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the city (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-archetypes", action="store_true", help="only time the synthesis")
    args = parser.parse_args()

    from lpm_llm.population.archetypes import ArchetypeSpec
    from lpm_llm.population.synthesis import synthesize_nyc

    print(f"imports done: peak RSS {peak_rss_mb():.0f} MiB")

    t0 = time.perf_counter()
    pop = synthesize_nyc(scale=args.scale, seed=args.seed)
    dt = time.perf_counter() - t0
    print(f"synthesize_nyc(scale={args.scale}): {pop.n:,} agents in {dt:.2f} s; "
          f"peak RSS {peak_rss_mb():.0f} MiB; {pop.nbytes() / pop.n:.1f} bytes/agent "
          f"({pop.nbytes() / 2**20:.0f} MiB of columns)")
    print(f"  households {int(pop['household'].max()) + 1:,}, classrooms {int(pop['school'].max()) + 1:,}, "
          f"workplaces {int(pop['workplace'].max()) + 1:,}, employed {int(pop['employed'].sum()):,}")
    if args.no_archetypes:
        return
    for name in ("nyc_age_sex_borough.yaml", "nyc_kmeans64.yaml"):
        spec = ArchetypeSpec.from_yaml(name)
        t0 = time.perf_counter()
        arch = spec.assign(pop)
        dt = time.perf_counter() - t0
        print(f"{spec.name} ({spec.method}, K={arch.k}): {dt:.2f} s; peak RSS {peak_rss_mb():.0f} MiB; "
              f"smallest archetype {int(arch.counts.min()):,} agents")


if __name__ == "__main__":
    main()
