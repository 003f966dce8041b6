"""The behaviour report in a run folder and `lpm-llm probe`: through the run's client (mocked endpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pandas as pd
import pytest
import respx
import yaml

from lpm_llm.runner.cli import main
from tests.conftest import logprob_completion

ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers


def _answer(request: httpx.Request) -> httpx.Response:
    """P(yes) 0.8 under the stay-at-home order, else 0.3."""
    body = json.loads(request.content)
    text = body["messages"][-1]["content"]
    return logprob_completion(body["model"], 0.8 if "PAUSE" in text else 0.3)


@pytest.fixture
def experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret-0123")
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    config = {
        "name": "tiny", "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": ENDPOINT, "api_key_env": "LPM_TEST_KEY",
                "cache_dir": str(tmp_path / "cache"), "max_retries": 0},
        "start_date": "2020-03-01", "days": 36, "seeds": [0], "outputs": {"plots": True},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_run_writes_the_behaviour_report_and_counts_its_questions(experiment_file: Path, tmp_path: Path):
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
        assert main(["run", str(experiment_file), "--out", str(tmp_path / "run"), "--quiet"]) == 0
        asked = route.call_count
        assert main(["probe", str(experiment_file), "--out", str(tmp_path / "probe"), "--quiet"]) == 0
        assert route.call_count == asked, "the probe's questions were asked (and cached) by the run"
    run, probe = tmp_path / "run", tmp_path / "probe"
    report = pd.read_csv(run / "behaviour.csv")
    assert (run / "behaviour_isolate.png").stat().st_size > 0
    pd.testing.assert_frame_equal(report.drop(columns=["cache_hit", "requests"]),
                                  pd.read_csv(probe / "behaviour.csv").drop(columns=["cache_hit", "requests"]))
    manifest = json.loads((run / "manifest.json").read_text())
    decisions = pd.read_csv(run / "decisions.csv")
    b = manifest["behaviour"]
    # every request of the run is a decision's or the probe's, counted in the one usage
    assert manifest["llm"]["usage"]["requests"] == asked == decisions["requests"].sum() + b["sent"]
    assert b["questions"] == len(report) and b["sent"] == report["requests"].sum()
    # the mocked model reads only the stay-at-home order: its sweep moves by 0.5, nothing else
    assert b["range"]["isolate"]["policies"] == pytest.approx(0.5)
    assert {v: r for v, r in b["range"]["isolate"].items() if v != "policies"} == dict.fromkeys(
        ["date", "cases_week", "cases_trend", "sex", "borough", "archetype"], 0.0)
    pm = json.loads((probe / "manifest.json").read_text())
    assert pm["status"] == "ok" and pm["llm"]["usage"]["requests"] == 0
