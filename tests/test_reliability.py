"""Issue 12 at the command line: one clear line and exit 2 for every bad input or broken endpoint, the
answer mass in decisions.csv and the manifest, run folders that never mix, SIGTERM like Ctrl-C, and
request counts that match what the server answered.

The LLM is mocked with respx, except in the SIGTERM test, where the product runs as a child process
against a small OpenAI-compatible server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pandas as pd
import pytest
import respx
import torch
import yaml

from lpm_llm.runner.cli import main

ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers
URL = f"{ENDPOINT}/chat/completions"
KEY_ENV = "LPM_TEST_KEY"


def _config(tmp_path: Path, **changes) -> dict:
    config = {
        "name": "tiny",
        "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": ENDPOINT, "api_key_env": KEY_ENV,
                "probability_mode": "logprobs", "cache_dir": str(tmp_path / "cache"), "max_retries": 0},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "every_days": 7}},
        "start_date": "2020-03-01",
        "days": 8,
        "seeds": [0],
        "outputs": {"plots": False, "behaviour": False},  # decisions only: the counts below
    }
    config.update(changes)
    return config


@pytest.fixture
def experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """10 archetypes (sex x borough), 8 days: decisions on days 0 and 7 (20 answers)."""
    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret-0123")
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    return path


def _answer(request: httpx.Request, tops: list[tuple[str, float]]) -> httpx.Response:
    body = json.loads(request.content)
    alternatives = [{"token": t, "logprob": lp, "bytes": None} for t, lp in tops]
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": tops[0][0]},
                     "logprobs": {"content": [{**alternatives[0], "top_logprobs": alternatives}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
    })


def _by_borough(request: httpx.Request) -> httpx.Response:
    """Manhattan: yes+no mass 0.9 (P(yes) 2/3); elsewhere 0.4 (P(yes) 0.5), re-asks included."""
    text = json.loads(request.content)["messages"][1]["content"]
    if "Manhattan" in text:
        return _answer(request, [("Yes", math.log(0.6)), ("No", math.log(0.3)), ("I", math.log(0.1))])
    return _answer(request, [("I", math.log(0.6)), ("Yes", math.log(0.2)), ("No", math.log(0.2))])


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# -- 1. the answer mass ------------------------------------------------------------------------------

def test_answer_mass_is_in_decisions_csv_and_summarised_in_the_manifest(experiment_file, tmp_path, capsys):
    out = tmp_path / "run"
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(URL).mock(side_effect=_by_borough)
        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet",
                          "--set", "llm.min_answer_mass=0.35"], capsys)
    assert code == 0, err
    decisions = pd.read_csv(out / "decisions.csv")
    assert len(decisions) == route.call_count == 20
    manhattan = decisions["description"].str.contains("Manhattan")
    assert decisions.loc[manhattan, "answer_mass"].round(6).eq(0.9).all()
    assert decisions.loc[~manhattan, "answer_mass"].round(6).eq(0.4).all()
    assert decisions.loc[manhattan, "probability"].round(6).eq(round(2 / 3, 6)).all()
    summary = _manifest(out)["llm"]["answer_mass"]
    assert summary == {"answers": 20, "min_answer_mass": 0.35, "below_minimum": 0, "min": 0.4, "p05": 0.4,
                       "median": 0.4, "p95": 0.9, "max": 0.9}
    assert decisions.loc[~manhattan, "probability"].round(6).eq(0.5).all() and decisions["reasks"].eq(0).all()


def test_default_minimum_turns_low_mass_answers_into_counted_fallbacks(experiment_file, tmp_path, capsys):
    out = tmp_path / "run"
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(URL).mock(side_effect=_by_borough)
        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet", "--set", "llm.max_reasks=1",
                          "--set", "llm.on_failure=fallback", "--set", "llm.fallback_probability=0.1"], capsys)
    assert code == 0, err
    decisions = pd.read_csv(out / "decisions.csv")
    low = ~decisions["description"].str.contains("Manhattan")
    assert decisions.loc[low, "fallback"].all() and not decisions.loc[~low, "fallback"].any()
    assert decisions.loc[low, "probability"].round(6).eq(0.1).all()  # never the renormalised 0.5
    assert route.call_count == 20 + low.sum()  # each low answer re-asked once
    llm = _manifest(out)["llm"]
    assert llm["usage"]["fallbacks"] == low.sum() == llm["answer_mass"]["below_minimum"] == 16
    assert llm["usage"]["reasks"] == 16 and llm["answer_mass"]["min_answer_mass"] == 0.5


# -- 4. an HTML page with status 200 ----------------------------------------------------------------

def test_html_page_is_one_line_and_exit_2(experiment_file, tmp_path, capsys):
    page = httpx.Response(200, text="<html><body>Log in to continue</body></html>",
                          headers={"content-type": "text/html", "retry-after-ms": "1"})
    out = tmp_path / "run"
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(URL).mock(return_value=page)
        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet", "--set", "llm.max_retries=1",
                          "--set", "llm.concurrency=1"], capsys)
    assert code == 2 and len(err) == 1 and route.call_count >= 2  # archetype 0 and its retry (others cancelled)
    assert err[0].startswith(f"lpm-llm: error: the LLM endpoint {ENDPOINT} answered HTTP 200 for prompt 'isolation'")
    assert "archetype 0" in err[0] and "not a chat completion" in err[0] and "Log in to continue" in err[0]
    manifest = _manifest(out)
    assert manifest["status"] == "failed" and manifest["error"].startswith("LLMRequestError")
    assert manifest["llm"]["usage"]["requests"] == route.call_count and manifest["llm"]["usage"]["retries"] >= 1


# -- 5. one clear line for each bad input ----------------------------------------------------------

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    prompt = tmp_path / "needs_income.yaml"
    prompt.write_text("name: income\nanswer: yes_no\ninput_variables: [borough, income]\n"
                      "user: 'You live in {borough} and earn {income}. Do you stay home? Yes or No.'\n")
    return {
        "out-unwritable": (["--out", "/proc/self/x/y"], "cannot create the output folder /proc/self/x/y"),
        "out-is-a-file": (["--out", str(tmp_path / "arch.yaml")], "is a file; choose another --out"),
        "cache-dir-is-a-file": (["--set", f"llm.cache_dir={tmp_path / 'arch.yaml'}"], "is a file, not a folder"),
        "cache-dir-unwritable": (["--set", "llm.cache_dir=/proc/self/lpm"], "cannot open the answer cache in"),
        "prompt-variable": (["--set", f"decisions.isolate.prompt={prompt}"],
                            "needs variable(s) ['income']"),
        "no-such-device": (["--set", f"device=cuda:{torch.cuda.device_count()}"], "device is 'cuda:"),
        "bad-date": (["--set", "start_date=2020-13-45"], "start_date: '2020-13-45' is not a valid value"),
    }


@pytest.mark.parametrize("case", ["out-unwritable", "out-is-a-file", "cache-dir-is-a-file", "cache-dir-unwritable",
                                  "prompt-variable", "no-such-device", "bad-date"])
def test_bad_input_is_one_clear_line_and_exit_2(experiment_file, tmp_path, capsys, case):
    extra, expected = _bad_inputs(tmp_path)[case]
    args = ["run", str(experiment_file), "--quiet", *extra]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "run")]
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as mock:
        mock.post(URL).mock(side_effect=_by_borough)
        code, err = _run(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lpm-llm: error: ") and expected in err[0], err[0]


def test_experiment_path_that_is_a_folder_or_holds_a_bad_date(tmp_path, capsys):
    code, err = _run(["run", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "is a folder; give an experiment YAML file" in err[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndays: 10\nstart_date: 2020-13-45\n")
    code, err = _run(["run", str(bad), "--quiet"], capsys)
    assert code == 2 and len(err) == 1
    assert "bad.yaml: start_date (line 3): not a valid value (month must be in 1..12)" in err[0]


# -- 6. run folders never mix ----------------------------------------------------------------------

def test_a_non_empty_out_folder_is_refused_unless_overwrite(experiment_file, tmp_path, capsys):
    out = tmp_path / "run"
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(URL).mock(side_effect=_by_borough)
        assert main(["run", str(experiment_file), "--out", str(out), "--quiet", "--set",
                     "llm.min_answer_mass=0.5", "--set", "llm.on_failure=fallback",
                     "--set", "llm.fallback_probability=0.1", "--set", "llm.max_reasks=0"]) == 0
        (out / "stale.csv").write_text("from an earlier run\n")
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        capsys.readouterr()

        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet"], capsys)
        assert code == 2 and len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a refused run touched the folder"

        # --overwrite: a failed rerun leaves its own config and manifest, nothing of the earlier run
        mock.post(URL).mock(return_value=httpx.Response(400, json={"error": {"message": "no"}}))
        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet", "--overwrite"], capsys)
    assert code == 2 and len(err) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json"]
    assert _manifest(out)["status"] == "failed"


def test_overwrite_never_empties_a_folder_that_is_not_a_run_folder(experiment_file, tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    code, err = _run(["run", str(experiment_file), "--out", str(precious), "--quiet", "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "is not a run folder" in err[0]
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]


# -- 9. requests in the manifest are requests the server answered ----------------------------------

def test_aborted_run_counts_only_answered_requests(experiment_file, tmp_path, capsys):
    import asyncio

    asked, answered = [], []

    async def first_fails(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        if len(asked) == 1:
            await asyncio.sleep(0.05)  # the other requests in flight meanwhile
            answered.append(request)
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        await asyncio.sleep(30)  # cancelled when the run stops

    out = tmp_path / "run"
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(URL).mock(side_effect=first_fails)
        code, err = _run(["run", str(experiment_file), "--out", str(out), "--quiet",
                          "--set", "llm.concurrency=4"], capsys)
    assert code == 2 and len(err) == 1 and "HTTP 400" in err[0]
    usage = _manifest(out)["llm"]["usage"]
    assert usage["requests"] == len(answered) == 1
    assert usage["unanswered"] == len(asked) - 1 >= 3  # in flight when the run stopped


# -- 7. SIGTERM is handled like Ctrl-C --------------------------------------------------------------

class _SlowServer(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint that takes every request and answers none until released."""

    daemon_threads = True

    def __init__(self):
        self.asked = threading.Event()
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N805 - the server is `self` here
                handler.rfile.read(int(handler.headers.get("content-length", 0)))
                self.asked.set()
                self.release.wait(60)
                handler.send_response(503)
                handler.end_headers()

            def log_message(handler, *args) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_write_the_manifest_and_say_so(experiment_file, tmp_path, signum, code, said):
    server = _SlowServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data = yaml.safe_load(experiment_file.read_text())
    data["llm"]["base_url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    experiment_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"

    def default_sigint() -> None:  # a suite started in the background hands its children SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    child = subprocess.Popen([sys.executable, "-m", "lpm_llm", "run", str(experiment_file), "--out", str(out),
                              "--quiet"], stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                             preexec_fn=default_sigint)
    try:
        assert server.asked.wait(120), "the run never asked the LLM"
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        server.release.set()
        server.shutdown()
        server.server_close()
    ours = [line for line in stderr.splitlines() if line.startswith("lpm-llm")]
    assert child.returncode == code, stderr
    assert len(ours) == 1 and ours[0].startswith(f"lpm-llm: {said}; the partial run folder is kept")
    assert "Traceback" not in stderr
    manifest = _manifest(out)
    assert manifest["status"] == "interrupted"
    assert manifest["error"] == ("SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)")
    assert manifest["llm"]["usage"]["requests"] == 0 and manifest["llm"]["usage"]["unanswered"] >= 1
    assert "total" in manifest["wall_time_s"]
