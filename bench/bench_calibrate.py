"""Benchmark calibration: one gradient step on a large city, and gradient vs gradient-free on the first wave.

    python bench/bench_calibrate.py step --agents 1000000 8336817 --days 120 [--checkpoint-days 7]
        [--before a43a8bd] [--before-max-agents 1000000] [--threads 2]
    python bench/bench_calibrate.py adam --agents 416841 833682 --steps 3 [--before-max-agents 500000]
    python bench/bench_calibrate.py profile --agents 100000 --days 56
    python bench/bench_calibrate.py wave --scale 0.01 --steps 20 --out runs/bench_calibrate

``step``: one forward and backward pass of the first-wave loss (every calibrated parameter requires
grad) on a synthetic city of about ``--agents`` agents over ``--days`` days, by this tree's code
("after") and by the code of git revision ``--before`` ("before": the gradient path before the
compact segments, extracted with ``git archive``), each configuration in its own child process: wall
and CPU seconds of the forward and backward passes, and the child's peak RSS (``os.wait4``: the
kernel's high-water mark of that process, allocator fragmentation included). "before" runs only up
to ``--before-max-agents`` (it needs about 5 GiB per million agents); larger cities print its linear
extrapolation from the largest measured one, marked as such. Both codes print their gradient; the
"after" rows give its largest relative difference from "before" on the same city.
``adam``: a few Adam steps of the first-wave fit as ``lpm-llm calibrate`` runs them (21 weeks, 2 seeds
a step, ``--checkpoint-days`` 14 as the bundled fit), before and after, wall and CPU seconds per step,
and one evaluation without gradients (the unit of the Nelder-Mead baseline).
``profile``: bytes autograd saves per agent-day, by line of code, in the forward and the backward pass
(the segments' recomputation), with every activation kept (``checkpoint_days`` None) and with
segments of 7 days: where the memory of a gradient step goes.
``wave``: :func:`lpm_llm.calibrate.calibrate_first_wave` on the bundled NYC data (constant isolation
decisions, no LLM): the loss on common evaluation seeds of gradient descent and of Nelder-Mead
(given as much wall time as Adam took) against fitting time, when Adam's fit first scored at or
below Nelder-Mead's final loss, and the forecast errors against persistence.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
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
ROOT = Path(__file__).resolve().parents[1]


def _objective(agents: int, days: int, checkpoint_days: int | None, seed: int = 0):
    from lpm_llm.calibrate.targets import observed_weekly

    pop = synthesize_nyc(scale=agents / NYC_POPULATION, seed=seed)
    arch = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)
    weeks = days // 7
    decisions = {"isolate": FrozenDecisions(ConstantDecision(0.3, arch.k))}
    sim = Simulation(pop, [Epidemic(PARAMS)], archetypes=arch, decisions=decisions, interventions=nyc_2020(),
                     start_date=START, days=days, seed=seed, checkpoint_days=checkpoint_days)
    obs = observed_weekly(START, weeks, ("cases", "deaths"))
    return pop, SimulationObjective(sim, obs, weeks=weeks, scale=pop.n / NYC_POPULATION)


def bench_step(agents: int, days: int, checkpoint_days: int | None) -> dict:
    """One gradient step in this process (the child of :func:`step_table`)."""
    pop, objective = _objective(agents, days, checkpoint_days)
    space = first_wave_space(PARAMS, n_months=5)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = objective(space.values(), [0])
    c1, t1 = time.process_time(), time.perf_counter()
    loss.backward()
    c2, t2 = time.process_time(), time.perf_counter()
    grad = torch.cat([space.raw[n].grad.reshape(-1) for n in space.names])
    return {"agents": pop.n, "days": days, "checkpoint_days": checkpoint_days,
            "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
            "cpu_s": round(c2 - c0, 2), "forward_cpu_s": round(c1 - c0, 2), "backward_cpu_s": round(c2 - c1, 2),
            "loss": float(loss.detach()), "grad": grad.tolist()}


def bench_adam_steps(agents: int, steps: int, checkpoint_days: int | None) -> dict:
    """`steps` Adam steps of the first-wave fit as ``lpm-llm calibrate`` runs them (21 weeks from
    2020-03-01, 2 seeds a step, every parameter of :func:`first_wave_space`, constant isolation
    decisions in place of the LLM's), then one evaluation without gradients (Nelder-Mead's unit)."""
    from lpm_llm.calibrate import Calibrator

    pop, objective = _objective(agents, 147, checkpoint_days)
    space = first_wave_space(PARAMS, n_months=5)
    times = []

    def on_step(method, i, loss, seconds):
        times.append((time.perf_counter(), time.process_time()))

    t0, c0 = time.perf_counter(), time.process_time()
    fit = Calibrator(space, steps=steps, lr=0.1, seeds_per_step=2, on_step=on_step).fit(objective)
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        objective(fit.space_.values(), [10_000, 10_001])
    t2, c2 = time.perf_counter(), time.process_time()
    walls = [b[0] - a[0] for a, b in zip([(t0, c0), *times[:-1]], times, strict=True)]
    cpus = [b[1] - a[1] for a, b in zip([(t0, c0), *times[:-1]], times, strict=True)]
    return {"agents": pop.n, "steps": steps, "checkpoint_days": checkpoint_days,
            "step_wall_s": [round(x, 2) for x in walls], "step_cpu_s": [round(x, 2) for x in cpus],
            "adam_wall_s": round(t1 - t0, 2), "adam_cpu_s": round(c1 - c0, 2),
            "no_grad_eval_2_seeds_wall_s": round(t2 - t1, 2), "no_grad_eval_2_seeds_cpu_s": round(c2 - c1, 2),
            "losses": fit.loss_history_, "grad": []}


def _child(code: Path, agents: int, days: int, checkpoint_days: int | None, threads: int,
           timeout: float, adam_steps: int = 0) -> dict:
    """Run :func:`bench_step` (or :func:`bench_adam_steps`) with the package at `code` in a child
    process; add its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "--agents", str(agents), "--days", str(days),
           "--threads", str(threads), "--adam-steps", str(adam_steps)]
    if checkpoint_days:
        cmd += ["--checkpoint-days", str(checkpoint_days)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s", "peak_rss_gib": usage.ru_maxrss / 2**20}
            time.sleep(0.2)
        out.seek(0)
        text = out.read()
    peak = round(usage.ru_maxrss / 2**20, 2)  # KiB on Linux
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"exit status {os.waitstatus_to_exitcode(status)}", "peak_rss_gib": peak}
    return {**json.loads(text), "peak_rss_gib": peak}


def _before_tree(rev: str, into: Path) -> Path:
    """The package as of git revision `rev`, extracted under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lpm_llm", "archetypes", "prompts",
                              "experiments"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def step_table(agents: list[int], days: int, checkpoint_days: int, before: str, before_max: int,
               threads: int, timeout: float) -> list[dict]:
    """before/after rows of one gradient step per city size (see the module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = _before_tree(before, Path(tmp))
        largest = None
        for n in agents:
            ref = None
            if n <= before_max:
                ref = _child(old, n, days, checkpoint_days, threads, timeout)
                rows.append({"code": f"before ({before})", **{k: v for k, v in ref.items() if k != "grad"}})
                print(json.dumps(rows[-1]), flush=True)
                if "error" not in ref:
                    largest = ref
            elif largest is not None:
                k = n / largest["agents"]
                rows.append({"code": f"before ({before}), extrapolated linearly from {largest['agents']} agents",
                             "agents": n, "days": days,
                             "peak_rss_gib": round(largest["peak_rss_gib"] * k, 1),
                             "total_s": round(largest["total_s"] * k, 1)})
                print(json.dumps(rows[-1]), flush=True)
            new = _child(ROOT, n, days, checkpoint_days, threads, timeout)
            row = {"code": "after", **{k: v for k, v in new.items() if k != "grad"}}
            if ref is not None and "grad" in ref and "grad" in new:
                a, b = torch.tensor(new["grad"]), torch.tensor(ref["grad"])
                row["grad_max_rel_diff"] = float(((a - b).abs() / b.abs().clamp(min=1e-6)).max())
                row["loss_diff"] = new["loss"] - ref["loss"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def adam_table(agents: list[int], steps: int, checkpoint_days: int, before: str, before_max: int,
               threads: int, timeout: float) -> list[dict]:
    """before/after Adam steps of the first-wave fit per city size (children as in :func:`step_table`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = _before_tree(before, Path(tmp))
        for n in agents:
            codes = ([(f"before ({before})", old)] if n <= before_max else []) + [("after", ROOT)]
            for name, code in codes:
                r = _child(code, n, 147, checkpoint_days, threads, timeout, adam_steps=steps)
                r.pop("grad", None)
                rows.append({"code": name, **r})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_saved(agents: int, days: int, checkpoint_days: int | None) -> dict:
    """Bytes per agent-day that autograd saves, by line of code (unique storages of at least N/64
    elements, at least N/64): during the forward pass, and during the backward pass (the segments' recomputation,
    whose saved tensors live one segment at a time)."""
    pop, objective = _objective(agents, days, checkpoint_days)
    space = first_wave_space(PARAMS, n_months=5)
    seen: dict = {}
    by: dict[str, collections.Counter] = {"forward": collections.Counter(), "backward": collections.Counter()}
    phase = ["forward"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype, t.untyped_storage().nbytes())
        if seen.get(key) is not t and t.numel() >= pop.n // 64:
            seen[key] = t
            frame = [f for f in traceback.extract_stack(limit=14) if "lpm_llm" in f.filename][-1]
            where = f"{Path(frame.filename).name}:{frame.lineno} {frame.line.strip()[:60]}"
            by[phase[0]][f"{where} [{str(t.dtype).replace('torch.', '')}]"] += t.untyped_storage().nbytes()
        return t

    from lpm_llm.models import _segments

    recompute = _segments._Plan.advance

    def hooked(plan, *args, gradients: bool):  # the hooks of the forward pass do not reach the backward's
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return recompute(plan, *args, gradients=gradients)

    _segments._Plan.advance = hooked
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = objective(space.values(), [0])
        seen.clear()
        phase[0] = "backward"
        loss.backward()
    finally:
        _segments._Plan.advance = recompute
    out = {"agents": pop.n, "days": days, "checkpoint_days": checkpoint_days}
    for ph, counter in by.items():
        out[f"{ph}_saved_bytes_per_agent_day"] = round(sum(counter.values()) / pop.n / days, 1)
        out[f"{ph}_by_line"] = {k: round(v / pop.n / days, 2) for k, v in counter.most_common(12)}
    return out


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
    s.add_argument("--agents", type=int, nargs="+", default=[1_000_000])
    s.add_argument("--days", type=int, default=120)
    s.add_argument("--checkpoint-days", type=int, default=7)
    s.add_argument("--before", default="a43a8bd", help="git revision of the code to compare with")
    s.add_argument("--before-max-agents", type=int, default=1_000_000)
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    c = sub.add_parser("_child")
    c.add_argument("--agents", type=int)
    c.add_argument("--days", type=int)
    c.add_argument("--checkpoint-days", type=int, default=None)
    c.add_argument("--threads", type=int)
    c.add_argument("--adam-steps", type=int, default=0)
    a = sub.add_parser("adam")
    a.add_argument("--agents", type=int, nargs="+", default=[416_841, 833_682])
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--checkpoint-days", type=int, default=14)
    a.add_argument("--before", default="a43a8bd")
    a.add_argument("--before-max-agents", type=int, default=500_000)
    a.add_argument("--threads", type=int, default=torch.get_num_threads())
    a.add_argument("--timeout", type=float, default=1800.0)
    p = sub.add_parser("profile")
    p.add_argument("--agents", type=int, default=100_000)
    p.add_argument("--days", type=int, default=56)
    w = sub.add_parser("wave")
    w.add_argument("--scale", type=float, default=0.01)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--seeds-per-step", type=int, default=1)
    w.add_argument("--lr", type=float, default=0.1)
    w.add_argument("--lr-final", type=float, default=0.02)
    w.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.what == "_child":
        torch.set_num_threads(args.threads)
        result = (bench_adam_steps(args.agents, args.adam_steps, args.checkpoint_days) if args.adam_steps
                  else bench_step(args.agents, args.days, args.checkpoint_days))
        print(json.dumps(result))
        return 0
    if args.what == "step":
        result = step_table(args.agents, args.days, args.checkpoint_days, args.before, args.before_max_agents,
                            args.threads, args.timeout)
    elif args.what == "adam":
        result = adam_table(args.agents, args.steps, args.checkpoint_days, args.before, args.before_max_agents,
                            args.threads, args.timeout)
    elif args.what == "profile":
        result = [profile_saved(args.agents, args.days, None), profile_saved(args.agents, args.days, 7)]
    else:
        result = bench_wave(args.scale, args.steps, args.seeds_per_step, args.lr, args.lr_final, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
