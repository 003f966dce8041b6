"""The experiment runner end to end: CLI, run folder, manifest counts, cache reruns, config errors, scenarios.

The LLM is an OpenAI-compatible endpoint mocked with respx (the client sends through httpx).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import respx
import yaml

from lpm_llm.runner.cli import main
from lpm_llm.runner.experiment import Experiment, load_config
from tests.conftest import logprob_completion

ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers
REPO = Path(__file__).resolve().parents[1]


def _logprob_answer(request: httpx.Request) -> httpx.Response:
    """P(yes) depends on the borough in the prompt, so that decisions differ by archetype."""
    body = json.loads(request.content)
    text = body["messages"][-1]["content"]
    return logprob_completion(body["model"], 0.8 if "Manhattan" in text else 0.3)


@pytest.fixture
def experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret-0123")
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    config = {
        "name": "tiny",
        "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": ENDPOINT, "api_key_env": "LPM_TEST_KEY",
                "probability_mode": "logprobs", "cache_dir": str(tmp_path / "cache"), "max_retries": 0},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "every_days": 7}},
        "start_date": "2020-03-01",
        "days": 15,
        "seeds": [0],
        "outputs": {"behaviour": False},  # the decisions' requests alone (the probe: tests/test_behaviour_run.py)
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_cli_run_writes_every_file_and_rerun_makes_no_request(experiment_file: Path, tmp_path: Path):
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        assert main(["run", str(experiment_file), "--out", str(tmp_path / "run1"), "--quiet"]) == 0
        first_calls = route.call_count
        assert main(["run", str(experiment_file), "--out", str(tmp_path / "run2"), "--quiet"]) == 0
        assert route.call_count == first_calls, "a rerun must be served entirely from the cache"

    out = tmp_path / "run1"
    for name in ("config.yaml", "manifest.json", "metrics.parquet", "metrics.csv", "decisions.csv",
                 "cases.png", "deaths.png", "decisions_isolate.png"):
        assert (out / name).stat().st_size > 0, name

    k, steps = 10, 3  # 2 sexes x 5 boroughs; days 0, 7, 14
    assert first_calls == k * steps
    usage = _manifest(out)["llm"]["usage"]
    assert usage["requests"] == first_calls and usage["cache_hits"] == 0
    assert usage["prompt_tokens"] == 50 * first_calls and usage["reasks"] == 0 and usage["fallbacks"] == 0
    usage2 = _manifest(tmp_path / "run2")["llm"]["usage"]
    assert usage2["requests"] == 0 and usage2["cache_hits"] == first_calls

    decisions = pd.read_csv(out / "decisions.csv")
    assert len(decisions) == k * steps
    manhattan = decisions["description"].str.contains("Manhattan")
    assert decisions.loc[manhattan, "probability"].round(6).eq(0.8).all()
    assert decisions.loc[~manhattan, "probability"].round(6).eq(0.3).all()
    assert decisions["prompt_version"].nunique() == 1 and not decisions["cache_hit"].any()
    assert pd.read_csv(tmp_path / "run2" / "decisions.csv")["cache_hit"].all()

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["date"].nunique() == 15 and set(metrics["area"].astype(str)) == {
        "Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"}
    # Same config, seed and cache: the same numbers.
    pd.testing.assert_frame_equal(metrics, pd.read_parquet(tmp_path / "run2" / "metrics.parquet"))
    # No secret anywhere in the folder or the cache.
    for path in [*out.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert b"sk-test-not-a-secret" not in path.read_bytes(), path
    manifest = _manifest(out)
    assert manifest["status"] == "ok" and manifest["seeds"] == [0]
    assert {"population", "archetypes", "simulation", "total"} <= set(manifest["wall_time_s"])
    assert manifest["versions"]["torch"]


def test_misspelt_key_names_the_key_and_the_valid_ones(experiment_file: Path, capsys: pytest.CaptureFixture):
    assert main(["run", str(experiment_file), "--set", "llm.modle=x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown key 'llm.modle'" in err[0] and "model" in err[0] and "probability_mode" in err[0]

    bad = experiment_file.parent / "bad.yaml"
    data = yaml.safe_load(experiment_file.read_text())
    data["popullation"] = {"scale": 0.1}
    bad.write_text(yaml.safe_dump(data))
    assert main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "unknown key 'popullation'" in err and "population" in err


def test_missing_api_key_and_unreachable_endpoint_each_give_one_line(
    experiment_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.delenv("LPM_TEST_KEY")
    assert main(["run", str(experiment_file), "--out", str(tmp_path / "nokey"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set LPM_TEST_KEY" in err[0]

    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret-0123")
    # Nothing listens on port 9 of the loopback: connection refused, no retries configured.
    assert main(["run", str(experiment_file), "--out", str(tmp_path / "down"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the LLM endpoint" in err[0]
    assert _manifest(tmp_path / "down")["status"] == "failed"


def test_scenario_overrides_change_only_what_they_name(experiment_file: Path, tmp_path: Path):
    data = yaml.safe_load(experiment_file.read_text())
    data["days"] = 40
    data["scenarios"] = {"no_stay_at_home": {"interventions": {"remove": ["stay_at_home", "reopening"]}}}
    path = tmp_path / "scen.yaml"
    path.write_text(yaml.safe_dump(data))

    base, scenarios = load_config(path)
    scenario = scenarios["no_stay_at_home"].model_dump()
    changed = {k for k, v in scenario.items() if base.model_dump()[k] != v and k != "scenarios"}
    assert changed == {"interventions"} and scenario["scenarios"] == {}

    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        result = Experiment.from_yaml(path).run(tmp_path / "scen")
    assert (tmp_path / "scen" / "scenarios.png").exists()
    summary = pd.read_csv(tmp_path / "scen" / "summary.csv")
    assert set(summary["scenario"]) == {"baseline", "no_stay_at_home"} and (summary["seeds"] == 1).all()
    assert (summary["deaths_p05"] <= summary["deaths_mean"]).all()
    assert (summary["deaths_mean"] <= summary["deaths_p95"]).all()
    m = result.metrics.groupby(["scenario", "date"])[["new_infections", "deaths"]].sum()
    before = pd.Timestamp("2020-03-22")  # the stay-at-home order's first day
    base_s, scen_s = m.loc["baseline"], m.loc["no_stay_at_home"]
    # Same seed and identical inputs until the order starts: identical days.
    pd.testing.assert_frame_equal(base_s[base_s.index < before], scen_s[scen_s.index < before])
    # Without the order, more people are infected afterwards.
    assert scen_s.loc[scen_s.index >= before, "new_infections"].sum() > base_s.loc[
        base_s.index >= before, "new_infections"].sum()


def test_runner_script_is_the_same_cli(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseedz: [1]\n")
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), str(bad), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'seedz'" in proc.stderr and "seeds" in proc.stderr


@pytest.mark.parametrize("model,days", [("epidemic+labor", 40), ("labor", 92)])
def test_labor_runs_end_to_end(experiment_file: Path, tmp_path: Path, model: str, days: int):
    data = yaml.safe_load(experiment_file.read_text())
    data.update(model=model, days=days)
    data["decisions"]["work"] = {"prompt": "work.yaml"}
    if model == "labor":
        del data["decisions"]["isolate"]
    path = tmp_path / "labor.yaml"
    path.write_text(yaml.safe_dump(data))
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        result = Experiment.from_yaml(path).run(tmp_path / "out")
    labor = result.labor
    months = 2 if model == "epidemic+labor" else 3  # March (start) + April (+ May)
    assert sorted(labor["date"].unique()) == list(pd.date_range("2020-03-01", periods=months, freq="MS"))
    assert (labor["labor_force"] - labor["employed"] - labor["unemployed"]).abs().max() < 1e-6
    rate = 100 * labor["unemployed"] / labor["labor_force"]
    assert (rate - labor["unemployment_rate"]).abs().max() < 1e-3
    decisions = pd.read_csv(tmp_path / "out" / "decisions.csv")
    work = decisions[decisions["decision"] == "work"]
    assert len(work) == 10 * (months - 1), "one work decision per archetype per monthly step"
    assert sorted(work["date"].unique()) == [f"2020-{m:02d}-01" for m in range(4, 3 + months)]
    assert route.call_count == len(decisions)
    assert (tmp_path / "out" / "unemployment.png").exists()
    if model == "epidemic+labor":
        assert (tmp_path / "out" / "labor.csv").exists() and (tmp_path / "out" / "cases.png").exists()


def test_labor_model_needs_a_work_decision(experiment_file: Path):
    with pytest.raises(ValueError, match="needs a monthly work decision"):
        load_config(experiment_file, overrides=["model=labor"])


def test_cli_calibrate_writes_fit_forecast_and_plots(experiment_file: Path, tmp_path: Path):
    overrides = ["calibration.end=2020-03-28", "calibration.forecast_weeks=1", "calibration.steps=2",
                 "calibration.baseline_budget=2", "calibration.targets=[cases]"]
    args = ["calibrate", str(experiment_file), "--out", str(tmp_path / "cal"), "--quiet"]
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    out = tmp_path / "cal"
    for name in ("calibration.json", "calibration_daily.csv", "calibration_cases.png", "manifest.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "calibration.json").read_text())
    assert set(summary["losses"]) == {"initial", "adam", "nelder-mead", "nelder-mead_same_simulations"}
    assert summary["settings"]["baseline_budget"] == "2 simulations"
    assert all(math.isfinite(v) for v in summary["losses"].values())
    for method in ("adam", "nelder-mead"):
        scores = summary["forecast"][method]["cases"]
        assert scores["weeks"] == 1 and set(scores["mae"]) == {"Bronx", "Brooklyn", "Manhattan", "Queens",
                                                               "Staten Island"}
        assert scores["persistence_mae_total"] > 0
    manifest = _manifest(out)
    assert manifest["status"] == "ok" and manifest["calibration"]["params"]


class _RecordingBar:
    """Stands in for tqdm: records totals, updates and descriptions."""

    made: list[_RecordingBar] = []

    def __init__(self, total: int, desc: str):
        self.total, self.n, self.descriptions, self.closed = total, 0, [desc], False
        _RecordingBar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        self.descriptions.append(desc)

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def reset(self, total: int | None = None) -> None:
        self.total, self.n = total, 0


def test_progress_covers_setup_llm_queries_and_simulation(experiment_file: Path, tmp_path: Path):
    _RecordingBar.made = []
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        Experiment.from_yaml(experiment_file, progress=_RecordingBar).run(tmp_path / "p")
    setup, sim = _RecordingBar.made
    assert setup.descriptions[0].startswith("setup") and setup.closed
    assert sim.total == sim.n == 15 and sim.closed
    asking = [d for d in sim.descriptions if "asking the LLM" in d]
    assert len(asking) == 3 and "2020-03-08" in asking[1]  # one per decision step


def test_calibration_progress_names_each_phase(experiment_file: Path, tmp_path: Path):
    """Adam (a known number of steps), Nelder-Mead for as long as Adam ran (unknown), then the scoring."""
    _RecordingBar.made = []
    overrides = ["calibration.end=2020-03-21", "calibration.forecast_weeks=0", "calibration.steps=2",
                 "calibration.targets=[cases]"]
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        Experiment.from_yaml(experiment_file, overrides, progress=_RecordingBar).calibrate(tmp_path / "c")
    bar = _RecordingBar.made[-1]
    phases = [d for d in bar.descriptions if d.startswith("calibration")]
    assert phases[:2] == ["calibration: adam", "calibration: scoring (the fits on the evaluation seeds)"]
    assert phases[2:5] == ["calibration: adam", "calibration: nelder-mead (as long as adam)", phases[1]]
    # the curves, both end points and NM at 2 sims, each distinct point scored once (a point already scored,
    # e.g. the start where Adam's first step, which asks the LLM, outlasts most curve times, is reused)
    report = json.loads((tmp_path / "c" / "calibration.json").read_text())
    points = {*report["losses"].values(), *(x for h in report["history"].values() for x in h["eval_loss"])}
    assert bar.total is None and bar.n == len(points) - 1 <= 2 * 8 + 3 and bar.closed  # the start: phase 2


def test_cli_calibrates_the_labour_model_with_a_held_out_forecast(experiment_file: Path, tmp_path: Path):
    data = yaml.safe_load(experiment_file.read_text())
    data.update(model="labor", start_date="2020-03-01", days=183)  # March .. August: 6 months, 3 held out
    data["decisions"] = {"work": {"prompt": "work.yaml"}}
    data["calibration"] = {"steps": 3, "lr": 0.1, "seeds_per_step": 1}
    path = tmp_path / "labor.yaml"
    path.write_text(yaml.safe_dump(data))
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_logprob_answer)
        assert main(["calibrate", str(path), "--out", str(tmp_path / "cal"), "--quiet"]) == 0
    out = tmp_path / "cal"
    summary = json.loads((out / "labor_calibration.json").read_text())
    assert len(summary["loss_history"]) == 3 and summary["holdout_months"] == 3
    assert all(math.isfinite(summary[k]) for k in ("train_mae_pp", "holdout_mae_pp", "persistence_mae_pp"))
    fit = pd.read_csv(out / "labor_fit.csv")
    assert set(fit["split"]) == {"fit", "forecast"} and fit.loc[fit["split"] == "forecast", "date"].nunique() == 3
    assert (out / "unemployment_fit.png").exists() and _manifest(out)["status"] == "ok"


def test_ensemble_summary_is_mean_and_band_over_seeds():
    from lpm_llm.runner.run import ensemble_summary

    rows = [{"scenario": "baseline", "date": pd.Timestamp("2020-03-01"), "area": "NYC", "seed": s,
             "new_infections": float(s), "reported_cases": 10.0 * s, "hospitalized": 0.0, "deaths": 1.0,
             "isolating": 0.5} for s in range(21)]
    out = ensemble_summary(pd.DataFrame(rows))
    assert len(out) == 1 and out.loc[0, "seeds"] == 21
    assert out.loc[0, "new_infections_mean"] == 10.0
    assert out.loc[0, "new_infections_p05"] == 1.0 and out.loc[0, "new_infections_p95"] == 19.0
    assert out.loc[0, "deaths_p05"] == out.loc[0, "deaths_p95"] == 1.0


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_experiment_validates_and_its_files_resolve(path: Path):
    from lpm_llm.llm.prompts import PromptSpec
    from lpm_llm.population.archetypes import ArchetypeSpec
    from lpm_llm.resources import resolve_path

    base, scenarios = load_config(path)
    for cfg in (base, *scenarios.values()):
        ArchetypeSpec.from_yaml(cfg.archetypes)
        for decision in cfg.decisions.values():
            PromptSpec.from_yaml(resolve_path(decision.prompt, "prompts"))
        assert cfg.llm.provider == "local", "bundled experiments run on the embedded model"


def test_calibrated_parameters_are_checked_by_name(experiment_file: Path):
    from lpm_llm.runner.config import ConfigError
    from lpm_llm.runner.experiment import load_config

    cfg, _ = load_config(experiment_file, overrides=["calibration.parameters=[beta_scale, ascertainment]"])
    assert cfg.calibration.parameters == ["beta_scale", "ascertainment"]
    with pytest.raises(ConfigError, match="beta_scle.*known: beta_scale, transmission_change"):
        load_config(experiment_file, overrides=["calibration.parameters=[beta_scle]"])


def test_the_manifest_names_the_model_the_server_reported_for_fresh_and_cached_answers(
    experiment_file: Path, tmp_path: Path
):
    """The cache key holds the requested model name (and llm.cache_namespace); what the server says
    it ran is stored with each answer and counted in the manifest, cached answers included."""

    def dated(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        return logprob_completion("mock-model-2026-01-01", 0.8 if "Manhattan" in text else 0.3)

    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=dated)
        assert main(["run", str(experiment_file), "--out", str(tmp_path / "run1"), "--quiet"]) == 0
        assert main(["run", str(experiment_file), "--out", str(tmp_path / "run2"), "--quiet"]) == 0
    asked = route.call_count
    first, second = (_manifest(tmp_path / r)["llm"]["usage"] for r in ("run1", "run2"))
    assert first["reported_models"] == {"mock-model-2026-01-01": asked}
    assert second["requests"] == 0 and second["reported_models"] == {"mock-model-2026-01-01": asked}
