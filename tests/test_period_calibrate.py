"""``lpm-llm calibrate`` on the whole-period experiment (covid_nyc_2021.yaml): on a 1:1000 city over 10
weeks, started from a transmission scale far too low, a few steps of the fit lower the objective on the
evaluation seeds and write the run folder; a config the fit cannot take is refused before anything runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import respx
import yaml

from lpm_llm.runner.cli import main
from lpm_llm.runner.config import ConfigError
from lpm_llm.runner.experiment import Experiment
from lpm_llm.runner.period_run import check_period_config
from tests.conftest import logprob_completion

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers
MOCK = ["llm.provider=openai", "llm.model=mock-model", f"llm.base_url={ENDPOINT}", "llm.api_key_env=LPM_TEST_KEY",
        "llm.cache_mode='off'", "llm.max_retries=0"]
# 10 weeks from 2020-03-01 (the survey's date inside), a city of 8,337 agents, from half the fitted transmission
SMALL = ["population.scale=0.001", "days=70", "calibration.end=2020-05-09", "calibration.steps=4",
         "calibration.lr=0.15", "epidemic.beta_scale=0.35", "outputs.plots=true"]


@pytest.mark.slow
def test_calibrate_fits_the_whole_period_and_writes_its_run_folder(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret")
    (tmp_path / "arch.yaml").write_text("{name: borough, method: group, attributes: [borough]}\n")
    out = tmp_path / "fit"
    sets = [x for kv in [*SMALL, *MOCK, f"archetypes={tmp_path / 'arch.yaml'}"] for x in ("--set", kv)]
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(
            side_effect=lambda r: logprob_completion(json.loads(r.content)["model"], 0.5))
        code = main(["calibrate", str(ROOT / "experiments/covid_nyc_2021.yaml"), "--out", str(out), "-q", *sets])
    assert code == 0, capsys.readouterr().err
    assert route.call_count == 0  # 10 weeks end long before the first vaccination question (2020-11-30)
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["weeks"] == 10 and summary["evaluation_seeds"] == [10_000, 10_001]
    assert len(summary["history"]) == 4 and all(math.isfinite(r["loss"]) for r in summary["history"])
    # too little transmission: the fit raises it and the seeding in every borough, and the loss on the
    # evaluation seeds (never fitted) falls
    start = Experiment.from_yaml(ROOT / "experiments/covid_nyc_2021.yaml").config.epidemic
    assert summary["values"]["beta_scale"] > 0.35 * math.exp(0.05)
    assert all(f > s for f, s in zip(summary["values"]["initial_infections_per_100k"],
                                     start.initial_infections_per_100k, strict=True))
    assert summary["fitted"]["objective"] < 0.8 * summary["start"]["objective"]
    assert summary["fitted"]["log_mse"]["cases"] < summary["start"]["log_mse"]["cases"]
    assert set(summary["fitted"]["log_mse"]) == {"cases", "hospitalized", "deaths"}
    assert 0 < summary["fitted"]["serology_share"] < 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["command_kind"] == "calibrate"
    assert manifest["calibration"]["fitted"] == summary["fitted"]
    # the fitted epidemic block loads as the experiment's epidemic
    block = yaml.safe_load((out / "fitted_epidemic.yaml").read_text())["epidemic"]
    assert block["beta_scale"] == pytest.approx(summary["values"]["beta_scale"], rel=2e-3)
    assert len(block["ihr"]) == 10 and [v["lineage"] for v in block["variants"]][-1] == "B.1.617.2"
    # the scale multiplies the experiment's IHR, and starts at 1
    assert block["ihr"][-1] == pytest.approx(start.ihr[-1] * summary["values"]["hospitalisation_scale"], rel=0.01)
    exp = Experiment.from_yaml(ROOT / "experiments/covid_nyc_2021.yaml",
                               [f"epidemic.{k}={json.dumps(v)}" for k, v in block.items()])
    assert exp.config.epidemic.beta_scale == block["beta_scale"]
    # observed against fitted: the observed column is the bundled data, the fitted the runs' mean
    weekly = pd.read_csv(out / "calibration_weekly.csv")
    assert set(weekly["target"]) == {"cases", "hospitalized", "deaths"} and len(weekly) == 3 * 10 * 5
    cases = weekly[weekly["target"] == "cases"]
    assert cases["observed"].sum() == pytest.approx(summary["fitted"]["totals"]["cases"]["observed"], rel=1e-4)
    assert cases["simulated_fitted"].sum() == pytest.approx(summary["fitted"]["totals"]["cases"]["simulated"],
                                                            rel=1e-4)
    for png in ("cases", "hospitalized", "deaths", "loss"):
        assert (out / f"{png}.png").stat().st_size > 0


@pytest.mark.parametrize(("experiment", "overrides", "message"), [
    ("covid_nyc", [], "is for model epidemic\\+vaccination, not 'epidemic'"),
    ("covid_nyc_2021", ["calibration.end=2021-12-31"], "after the run's last day"),
    ("covid_nyc_2021", ["calibration.start=2020-04-01"], "must be the run's start_date"),
    ("covid_nyc_2021", ["calibration.end=2020-03-05"], "leaves no whole week"),
    ("covid_nyc_2021", ["calibration.parameters=[beta_scale]"], "remove it"),
])
def test_a_config_the_whole_period_fit_cannot_take_is_refused(experiment, overrides, message):
    exp = Experiment.from_yaml(ROOT / f"experiments/{experiment}.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        check_period_config(exp.config)


def test_the_cli_refuses_it_with_the_remedy_and_writes_nothing(tmp_path: Path, capsys):
    out = tmp_path / "fit"
    code = main(["calibrate", str(ROOT / "experiments/covid_nyc_2021.yaml"), "--out", str(out), "-q",
                 "--set", "days=100"])
    assert code == 2
    err = capsys.readouterr().err
    assert "calibration.end 2021-06-30 is after the run's last day 2020-06-08" in err and "raise days" in err
    assert not out.exists()
