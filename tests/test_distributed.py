"""Runs on several ranks (``lpm-llm run --nproc 2``: torchrun, gloo on CPU).

Seed-sharded runs must give the run folder of one process; a rank that dies must stop the run
with an error, not a hang; the launcher's death must take its ranks with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lpm_llm.distributed import Group
from lpm_llm.distributed.launch import launch_command, strip_nproc
from lpm_llm.runner.cli import main
from tests.conftest import logprob_completion

KEY_ENV = "LPM_DIST_TEST_KEY"


# -- pieces -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_deal_and_undeal_are_inverse_and_cover_every_item_once(world):
    items = list(range(11))
    shares = [Group(rank=r, world=world).deal(items) for r in range(world)]
    assert sorted(x for s in shares for x in s) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert Group(world=world).undeal(shares) == items


def test_the_launch_command_is_torchrun_on_this_python_without_nproc():
    argv = ["run", "exp.yaml", "--nproc", "3", "--set", "days=5", "--nproc=3"]
    assert strip_nproc(argv) == ["run", "exp.yaml", "--set", "days=5"]
    cmd = launch_command(strip_nproc(argv), 3)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=3" in cmd and cmd[-5:] == ["lpm_llm", "run", "exp.yaml", "--set", "days=5"]
    with pytest.raises(ValueError, match="at least 1"):
        launch_command(argv, 0)


def test_a_bad_config_fails_before_any_rank_starts(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "dayz": 3}))
    assert main(["run", str(path), "--nproc", "2", "--quiet"]) == 2
    assert "dayz" in capsys.readouterr().err


# -- a local OpenAI-compatible endpoint shared by the ranks ---------------------------------------

class _Endpoint(ThreadingHTTPServer):
    """Answers every chat completion with P(yes) a fixed function of the prompt, after ``delay`` s."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0):
        self.asked = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N805 - the server is `self` here
                body = json.loads(handler.rfile.read(int(handler.headers.get("content-length", 0))))
                with self.lock:
                    self.asked += 1
                time.sleep(delay)
                text = "\n".join(m["content"] for m in body["messages"])
                p = 0.05 + 0.9 * int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
                content = logprob_completion(body["model"], p).content
                handler.send_response(200)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(content)))
                handler.end_headers()
                handler.wfile.write(content)

            def log_message(handler, *args) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _experiment(tmp_path: Path, endpoint: _Endpoint, days: int = 15) -> Path:
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    config = {
        "name": "dist",
        "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": endpoint.url, "api_key_env": KEY_ENV,
                "probability_mode": "logprobs", "cache_mode": "off", "max_retries": 0},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "every_days": 7, "persistence": 0.5}},
        "start_date": "2020-03-10",
        "days": days,
        "seeds": [0, 1, 2],
        "scenarios": {"open_schools": {"interventions": {"remove": ["school_closure"]}}},
        "outputs": {"plots": False, "behaviour": False},
        "distributed": {"timeout_s": 60},
    }
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, KEY_ENV: "sk-test-not-a-secret", "OMP_NUM_THREADS": "1"}


def _one_and_two_ranks(tmp_path: Path, path: Path, endpoint: _Endpoint, monkeypatch, command: str = "run") -> int:
    """`command` of `path` in this process into tmp_path/one, then with --nproc 2 into tmp_path/two;
    returns the questions the endpoint got from the one process."""
    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret")
    assert main([command, str(path), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    asked_by_one = endpoint.asked
    done = subprocess.run([sys.executable, "-m", "lpm_llm", command, str(path), "--out", str(tmp_path / "two"),
                           "--quiet", "--nproc", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return asked_by_one


@pytest.mark.slow
def test_two_ranks_write_the_run_folder_of_one_process(tmp_path, monkeypatch):
    endpoint = _Endpoint()
    path = _experiment(tmp_path, endpoint)
    asked_by_one = _one_and_two_ranks(tmp_path, path, endpoint, monkeypatch)
    one, two = tmp_path / "one", tmp_path / "two"
    pd.testing.assert_frame_equal(pd.read_parquet(one / "metrics.parquet"), pd.read_parquet(two / "metrics.parquet"))
    pd.testing.assert_frame_equal(pd.read_csv(one / "summary.csv"), pd.read_csv(two / "summary.csv"))
    columns = ["scenario", "seed", "decision", "date", "archetype", "probability", "answer_mass"]
    pd.testing.assert_frame_equal(pd.read_csv(one / "decisions.csv")[columns],
                                  pd.read_csv(two / "decisions.csv")[columns])
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["status"] == "ok" and m2["distributed"]["ranks"] == 2
    # the other rank's questions are counted in rank 0's manifest
    assert m2["llm"]["usage"]["calls"] == m1["llm"]["usage"]["calls"] == asked_by_one
    assert endpoint.asked == 2 * asked_by_one
    assert m2["llm"]["answer_mass"] == m1["llm"]["answer_mass"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _start_slow_run(tmp_path: Path, shard: str = "seed") -> tuple[subprocess.Popen, list[int]]:
    """A 2-rank run whose LLM answers slowly; returns the launcher and its two ranks once they asked."""
    endpoint = _Endpoint(delay=0.2)
    path = _experiment(tmp_path, endpoint, days=60)
    if shard != "seed":
        config = yaml.safe_load(path.read_text())
        config["distributed"]["shard"] = shard
        path.write_text(yaml.safe_dump(config))
    launcher = subprocess.Popen([sys.executable, "-m", "lpm_llm", "run", str(path), "--out", str(tmp_path / "run"),
                                 "--quiet", "--nproc", "2"], env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while endpoint.asked < 6 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert endpoint.asked >= 6, "the ranks never asked the LLM"
    ranks = _children(launcher.pid)
    assert len(ranks) == 2, ranks
    return launcher, ranks


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("shard", ["seed", "area"])
def test_a_rank_killed_mid_run_stops_the_run_with_an_error(tmp_path, shard):
    launcher, ranks = _start_slow_run(tmp_path, shard)
    try:
        os.kill(ranks[1], signal.SIGKILL)
        launcher.wait(timeout=60)  # well within the configured collective timeout
        assert launcher.returncode != 0
        assert "lpm_llm" in launcher.stderr.read()  # torchrun names the failed command
        deadline = time.monotonic() + 20
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks)
    finally:
        launcher.kill()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_ranks_die_with_the_launcher_however_it_is_stopped(tmp_path):
    launcher, ranks = _start_slow_run(tmp_path)
    launcher.kill()  # SIGKILL: no chance to clean up
    launcher.wait()
    deadline = time.monotonic() + 20
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(r) for r in ranks)


# -- area sharding ------------------------------------------------------------------------------------

def test_areas_are_dealt_to_balance_agents_and_every_rank_gets_one():
    from lpm_llm.distributed.shard import area_partition

    sizes = [1418, 2559, 1628, 2253, 476]  # NYC's boroughs, thousands
    for world in (1, 2, 3, 5):
        parts = area_partition(sizes, world)
        assert sorted(a for p in parts for a in p) == list(range(5)) and all(parts)
        load = [sum(sizes[a] for a in p) for p in parts]
        assert max(load) - min(load) <= max(sizes)  # the greedy rule's guarantee
    assert area_partition(sizes, 2) == [[0, 1], [2, 3, 4]]  # 3977 against 4357 thousand
    with pytest.raises(ValueError, match="at least 6 areas"):
        area_partition(sizes, 6)


def test_a_shard_keeps_its_boroughs_agents_in_order_with_local_groups():
    from lpm_llm.distributed.shard import shard_population
    from lpm_llm.population.synthesis import synthesize_nyc

    pop = synthesize_nyc(0.001, seed=3)
    shards = [shard_population(pop, r, 2) for r in range(2)]
    ids = torch.cat([s.ids.long() for _, s in shards])
    assert sorted(ids.tolist()) == list(range(pop.n))  # every agent on exactly one rank
    for local, shard in shards:
        assert torch.equal(shard.ids.long(), torch.sort(shard.ids.long()).values)  # global order kept
        assert set(local["borough"].unique().tolist()) == set(shard.areas)
        for name in ("household", "school", "workplace"):
            members = local[name][local[name] >= 0]
            assert torch.equal(members.unique(), torch.arange(int(members.max()) + 1, dtype=members.dtype))
            # the same partition into groups as the global ids
            glob = pop[name].index_select(0, shard.ids.long())
            pairs = torch.stack([glob[local[name] >= 0].long(), members.long()], 1).unique(dim=0)
            assert pairs[:, 0].unique().numel() == pairs.shape[0] == members.unique().numel()


def _area_experiment(tmp_path: Path, endpoint: _Endpoint, days: int = 21) -> Path:
    path = _experiment(tmp_path, endpoint, days=days)
    config = yaml.safe_load(path.read_text())
    config["seeds"] = [0, 1]
    config["distributed"] = {"timeout_s": 60, "shard": "area"}
    config["epidemic"] = {"variants": [{"name": "Alpha", "lineage": "B.1.1.7", "transmissibility": 1.5,
                                        "introduced": "2020-03-12", "importation_per_100k": 5.0}],
                          "immunity_mean": 10.0}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_two_area_shards_give_the_run_of_one_process(tmp_path, monkeypatch):
    """Boroughs on 2 ranks: decisions (asked by rank 0 only), school closures and every contact layer,
    variants and waning: the metrics are bit-identical to one process's."""
    endpoint = _Endpoint()
    path = _area_experiment(tmp_path, endpoint)
    asked_by_one = _one_and_two_ranks(tmp_path, path, endpoint, monkeypatch)
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = pd.read_parquet(one / "metrics.parquet")
    pd.testing.assert_frame_equal(m1, pd.read_parquet(two / "metrics.parquet"), check_exact=True)
    assert m1["new_infections"].sum() > 100 and m1["isolating"].max() > 0  # the run did something
    columns = ["scenario", "seed", "decision", "date", "archetype", "probability"]
    pd.testing.assert_frame_equal(pd.read_csv(one / "decisions.csv")[columns],
                                  pd.read_csv(two / "decisions.csv")[columns])
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["distributed"]["shard"] == "area" and sorted(sum(manifest["distributed"]["areas"], [])) == [
        0, 1, 2, 3, 4]
    assert endpoint.asked == 2 * asked_by_one  # rank 0 alone asked, as one process did


@pytest.mark.slow
def test_two_area_shards_give_the_gradient_and_the_fit_of_one_process(tmp_path):
    """Gradients cross ranks (the community pressure and the series are differentiable sums): one
    gradient through checkpointed segments, and 2 Adam steps of a calibration on 2 gloo ranks, equal
    one process's to 1e-6 relative (float32 sums of the parameters' gradients in another order)."""
    import socket

    import torch.multiprocessing as mp

    from tests.distributed_helpers import gradient_and_fit

    one = gradient_and_fit()
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    mp.spawn(gradient_and_fit, args=(2, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        two = torch.load(tmp_path / f"out.{rank}.pt")
        assert two["loss"] == one["loss"]  # the forward pass is bit-identical
        for a, b in zip(one["grads"], two["grads"], strict=True):
            assert float(a.abs().sum()) > 0
            torch.testing.assert_close(b, a, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(two["fit"], one["fit"], rtol=1e-6, atol=1e-7)
        assert two["fit_losses"] == pytest.approx(one["fit_losses"], rel=1e-6)
        assert one["fit_losses"][-1] != one["fit_losses"][0]  # the fit moved


def test_area_sharding_of_a_model_that_does_not_support_it_fails_before_any_rank_starts(tmp_path, capsys):
    path = tmp_path / "labour.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": "epidemic+labor", "distributed": {"shard": "area"},
                                    "decisions": {"isolate": {"prompt": "isolation.yaml"},
                                                  "work": {"prompt": "work.yaml"}}}))
    assert main(["run", str(path), "--nproc", "2", "--quiet"]) == 2
    assert "labor" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["area", "seed"])
def test_lpm_llm_calibrate_on_two_ranks_fits_what_one_process_fits(tmp_path, monkeypatch, shard):
    """Area shards (each rank some boroughs), or seeds split over ranks (2 per step, 4 per scoring):
    the fitted parameters and every reported loss equal one process's to 1e-6."""
    endpoint = _Endpoint()
    path = _experiment(tmp_path, endpoint)
    config = yaml.safe_load(path.read_text())
    config["population"]["scale"] = 0.0005
    config["distributed"] = {"timeout_s": 60, "shard": shard}
    config["calibration"] = {"start": "2020-03-01", "end": "2020-03-28", "forecast_weeks": 1, "steps": 2,
                             "baseline_budget": 2, "lr": 0.1, "seeds_per_step": 2 if shard == "seed" else 1}
    config["epidemic"] = {"initial_infections_per_100k": [400.0] * 5}
    del config["scenarios"]
    path.write_text(yaml.safe_dump(config))
    _one_and_two_ranks(tmp_path, path, endpoint, monkeypatch, command="calibrate")
    one, two = (json.loads((tmp_path / d / "calibration.json").read_text()) for d in ("one", "two"))
    assert one["losses"]["adam"] != one["losses"]["initial"]  # the fit moved
    for name, value in one["params"].items():
        assert two["params"][name] == pytest.approx(value, rel=1e-6), name
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-6), name
    # the forecast after the fit (its seeds split over the ranks too) and the daily series of every seed
    flat = [pd.json_normalize(x["forecast"]).iloc[0].to_dict() for x in (one, two)]
    assert len(flat[0]) > 10 and flat[1] == pytest.approx(flat[0], rel=1e-6)
    daily = [pd.read_csv(tmp_path / d / "calibration_daily.csv") for d in ("one", "two")]
    assert sorted(daily[1]["seed"].unique()) == one["settings"]["eval_seeds"]
    pd.testing.assert_frame_equal(daily[0], daily[1], rtol=1e-6)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["distributed"]["shard"] == shard and manifest["status"] == "ok"
