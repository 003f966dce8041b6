"""Benchmark: where the main job's LLM time goes, the llama.cpp server against the in-process model.

The main job (`experiments/covid_nyc.yaml`) asks the embedded SmolLM2-135M, once a week for 14
weeks, whether each of 30 archetypes stays home (420 answers of about 190 prompt tokens). This
asks the same prompt of the same 30 archetypes (k-means on the 1:100 city) with the main job's
context fields filled from the observed data (each week's reported cases by borough, their trend,
New York's 2020 policies), with the cache off, of two backends in turn:

- ``server``: the llama.cpp server child process over HTTP (the old default; ``llm.concurrency``
  requests in flight). Evaluated tokens are read from its log ("prefix-match hit" lines).
- ``inprocess``: ``llama_cpp.Llama`` in this process (the new default): a step's logprobs requests
  as one prefix tree, other modes one at a time.

For each backend and probability mode it prints answers, wall time, time per answer, prompt
tokens, tokens actually evaluated (the rest reused from a shared prefix; not counted for the
in-process one-at-a-time path), prompt-evaluation tokens per second (evaluated tokens / wall time;
all of a request's time is counted, sampling and generation included),
CPU seconds, and for logprobs the largest |P(yes) difference| between the two backends over the
same prompts. Run both in one command: the machine is shared, so compare ratios from one run.

    python bench/bench_llm.py [--steps 14] [--modes logprobs samples json] [--threads 1 2]
        [--n-samples 2] [--samples-steps 1] [--backends server inprocess]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import time

import torch

from lpm_llm.core.behavior import PerArchetype, change_text
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.data.observed import load_covid
from lpm_llm.llm import LLMDecision, LLMSettings, open_client
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.resources import resolve_path

START = dt.date(2020, 3, 1)
_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit")
_FULL = re.compile(r"full prompt already cached")


def contexts(archetypes, steps: int) -> list[dict]:
    """The main job's decision contexts (every 7 days from 2020-03-01), from the observed counts."""
    covid = load_covid(end="2020-06-30")
    boroughs = ["Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"]
    daily = covid[covid["area"].isin(boroughs)].pivot_table(index="date", columns="area", values="cases")
    schedule = nyc_2020()
    out = []
    for step in range(steps):
        date = START + dt.timedelta(days=7 * step)
        ts = daily.index.searchsorted(str(date))
        week = daily.iloc[max(ts - 7, 0):ts].sum()
        before = daily.iloc[max(ts - 14, 0):max(ts - 7, 0)].sum()
        homes = [p["borough"] for p in archetypes.profiles]
        policies = schedule.active(date)
        out.append({
            "step": step * 7,
            "date": date.isoformat(),
            "cases_week": PerArchetype(f"{round(float(week.get(b, 0))):,}" for b in homes),
            "cases_trend": PerArchetype(change_text(float(week.get(b, 0)), float(before.get(b, 0))) for b in homes),
            "policies": "; ".join(policies) if policies else "none",
        })
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(backend: str, mode: str, threads: int, args, archetypes, prompt, ctxs) -> dict:
    settings = LLMSettings(
        local_backend=backend, probability_mode=mode, cache_mode="off", threads=threads,
        n_samples=args.n_samples, concurrency=2, on_failure="fallback", fallback_probability=0.5,
    )
    client = open_client(settings)
    server = None
    if backend == "server":
        from lpm_llm.llm.local import shared_server

        server = shared_server()
        log_start = server._log_path.stat().st_size
        cpu0 = cpu_seconds(server._proc.pid)
    else:
        client.backend._load()  # loading is not part of answering
        cpu0 = time.process_time()
    decision = LLMDecision(prompt, client, archetypes, settings)
    start = time.perf_counter()
    probs = [decision.probabilities(c) for c in ctxs]
    wall = time.perf_counter() - start
    u = client.usage
    row = {"backend": backend, "mode": mode, "threads": threads, "answers": u.calls, "requests": u.requests,
           "wall_s": wall, "prompt_tokens": u.prompt_tokens, "reasks": u.reasks, "fallbacks": u.fallbacks,
           "probs": torch.stack(probs)}
    if server is not None:
        row["cpu_s"] = cpu_seconds(server._proc.pid) - cpu0
        with open(server._log_path, errors="replace") as f:
            f.seek(log_start)
            text = f.read()
        reused = sum(int(m) for m in _HIT.findall(text))
        row["evaluated_tokens"] = u.prompt_tokens - reused
        row["full_prompt_hits"] = len(_FULL.findall(text))
    else:
        row["cpu_s"] = time.process_time() - cpu0
        stats = client.backend.stats
        # batched (logprobs) requests: evaluated as counted; one-at-a-time ones reuse the previous
        # prompt's prefix inside llama-cpp-python, uncounted: no figure rather than a wrong one
        row["evaluated_tokens"] = stats["evaluated_tokens"] if stats["single_requests"] == 0 else None
    client.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="decision steps in logprobs mode (main job: 14)")
    parser.add_argument("--samples-steps", type=int, default=1, help="decision steps in samples and json modes")
    parser.add_argument("--n-samples", type=int, default=2, help="samples per archetype in samples mode")
    parser.add_argument("--modes", nargs="+", default=["logprobs", "samples", "json"])
    parser.add_argument("--backends", nargs="+", default=["server", "inprocess"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="in-process llama.cpp threads to try")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    archetypes = ArchetypeSpec.from_yaml(resolve_path("nyc_kmeans30.yaml", "archetypes")).assign(
        synthesize_nyc(0.01, 0)
    )
    prompt = PromptSpec.from_yaml(resolve_path("isolation.yaml", "prompts"))
    print(f"{archetypes.k} archetypes; load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rows = []
    for mode in args.modes:
        ctxs = contexts(archetypes, args.steps if mode == "logprobs" else args.samples_steps)
        for backend in args.backends:
            for threads in args.threads if backend == "inprocess" else [1]:
                row = run(backend, mode, threads, args, archetypes, prompt, ctxs)
                rows.append(row)
                print(f"  done: {backend} {mode} threads {threads}: {row['wall_s']:.1f} s", flush=True)

    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    head = (f"{'backend':<10} {'mode':<9} {'thr':>3} {'answers':>7} {'wall s':>7} {'s/answer':>8} "
            f"{'prompt tok':>10} {'evaluated':>9} {'reused':>6} {'eval tok/s':>10} {'CPU s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ev = r["evaluated_tokens"]
        reused = "-" if ev is None else f"{1 - ev / max(r['prompt_tokens'], 1):.0%}"
        rate = "-" if ev is None else f"{ev / r['wall_s']:.0f}"
        print(f"{r['backend']:<10} {r['mode']:<9} {r['threads']:>3} {r['answers']:>7} {r['wall_s']:>7.1f} "
              f"{r['wall_s'] / max(r['answers'], 1):>8.3f} {r['prompt_tokens']:>10} {'-' if ev is None else ev:>9} "
              f"{reused:>6} {rate:>10} {r['cpu_s']:>6.1f}")
    for mode in args.modes:
        by = [r for r in rows if r["mode"] == mode]
        base = next((r for r in by if r["backend"] == "server"), None)
        for r in by:
            if base is not None and r is not base:
                print(f"{mode}: server / inprocess ({r['threads']} threads) wall time ratio "
                      f"{base['wall_s'] / r['wall_s']:.2f}x")
                if mode == "logprobs":
                    d = (r["probs"] - base["probs"]).abs()
                    print(f"  |P(yes) inprocess - server| over {d.numel()} answers: max {d.max():.4f}, "
                          f"mean {d.mean():.4f}")


if __name__ == "__main__":
    main()
