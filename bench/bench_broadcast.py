"""Benchmark: K=100 archetype probabilities -> 8.3M agent decisions (gather + Bernoulli draws) on CPU.

Target: at most 0.2 s per call. Prints the median of several runs, for 1 thread and for torch's
default thread count: on a machine whose cores are shared (load above the core count) one thread
is often faster, since the threads of one call wait for each other.

    python bench/bench_broadcast.py [--n 8300000] [--k 100] [--repeats 9] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lpm_llm.core.behavior import broadcast
from lpm_llm.population import smallest_int_dtype

TARGET_S = 0.2


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8_300_000, help="agents")
    parser.add_argument("--k", type=int, default=100, help="archetypes")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU thread counts to try (default: 1 and torch's default)")
    args = parser.parse_args()
    threads = args.threads or sorted({1, torch.get_num_threads()})

    setup = torch.Generator().manual_seed(0)
    # the archetype column as a Population stores it: the smallest integer dtype that fits K
    index = torch.randint(0, args.k, (args.n,), generator=setup).to(smallest_int_dtype(args.k - 1))
    probs = torch.rand(args.k, generator=setup)
    draws = torch.Generator().manual_seed(1)
    probs_grad = probs.clone().requires_grad_(True)

    def naive():  # for comparison under the same load: int64 advanced indexing, a bool temporary
        p = probs[index.long()]
        return (torch.rand(p.shape, generator=draws) < p).to(torch.float32)

    cases = {
        "naive gather + draw": naive,
        "broadcast": lambda: broadcast(probs, index, generator=draws),
        "broadcast straight-through": lambda: broadcast(
            probs_grad, index, generator=draws, straight_through=True
        ),
    }
    print(f"N={args.n:,} agents, K={args.k} archetypes, index {index.dtype}, torch {torch.__version__}, CPU")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for name, fn in cases.items():
            t = timed(fn, args.repeats)
            median = statistics.median(t)
            verdict = "ok" if median <= TARGET_S else f"SLOWER than the {TARGET_S} s target"
            print(f"{n_threads} thread(s)  {name:28s} median {median * 1e3:7.1f} ms  "
                  f"(min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, {args.repeats} runs)  {verdict}")


if __name__ == "__main__":
    main()
