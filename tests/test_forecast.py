"""Forecasts as of a date: no leakage, the Hub format, a resumable assimilation, calibrated intervals.

A 1:2000 city (about 4,200 agents) and a mocked decision source whose answer is a fixed function of
the whole decision context (so a change in what the LLM is shown changes the numbers).
"""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from lpm_llm.core.interventions import InterventionSchedule, StayAtHome, nyc_2020
from lpm_llm.data.observed import load_covid
from lpm_llm.forecast import (
    Forecaster,
    ForecastSettings,
    assimilate,
    check_hub_frame,
    complete_weeks,
    observed_as_of,
    schedule_as_of,
)
from lpm_llm.forecast.hub import HUB_LEVELS, parse_target, weekly_truth
from lpm_llm.forecast.scoring import coverage

SCALE = 0.0005


@pytest.fixture(scope="module")
def city(one_thread):
    from lpm_llm.population.archetypes import ArchetypeSpec
    from lpm_llm.population.synthesis import synthesize_nyc
    from lpm_llm.runner.experiment import load_config

    cfg, _ = load_config("experiments/covid_nyc.yaml", overrides=[f"population.scale={SCALE}"])
    pop = synthesize_nyc(SCALE, 0)
    return cfg, pop, ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)


class ContextAnswers:
    """P(yes) per archetype, a fixed function of the decision context's text; counts the calls."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def probabilities(self, context):
        self.calls += 1
        text = repr(sorted((key, str(v) if isinstance(v, str | int | float) else list(map(str, v)))
                           for key, v in context.items()))
        h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return torch.full((self.k,), 0.05 + 0.6 * h)


def forecaster(city, *, observed=None, schedule=None, **settings):
    from lpm_llm.runner.run import build_models

    cfg, pop, arch = city
    kw = dict(horizon=2, steps=2, seeds_per_step=1, members=3, draws=40, laplace_seeds=1,
              targets=("cases", "hospitalized", "deaths"),
              parameters=("beta_scale", "transmission_change", "ascertainment"))
    kw.update(settings)
    return Forecaster(pop, arch, {"isolate": ContextAnswers(arch.k)}, lambda: build_models(cfg),
                      schedule if schedule is not None else cfg.interventions.schedule(), start=cfg.start_date,
                      scale=pop.scale, settings=ForecastSettings(**kw), observed=observed,
                      alignment={"isolate": tuple(cfg.decisions["isolate"].alignment)})


def test_data_as_of_a_date():
    d = load_covid(as_of="2020-04-04")
    assert d["date"].max() == pd.Timestamp("2020-04-04")
    assert observed_as_of("2020-04-04", load_covid())["date"].max() == pd.Timestamp("2020-04-04")
    assert complete_weeks("2020-03-01", "2020-04-04") == 5 and complete_weeks("2020-03-01", "2020-04-03") == 4
    held = schedule_as_of(nyc_2020(), "2020-06-10")
    kinds = {(p.kind, getattr(p, "phase", None)): p for p in held.policies}
    assert ("reopening", 1) in kinds and kinds[("reopening", 1)].end is None  # in force: held open-ended
    assert ("reopening", 2) not in kinds  # starts after the date: unknown
    assert kinds[("stay_at_home", None)].end == dt.date(2020, 6, 8)  # ended before: as it was
    assert held.multipliers("2020-09-01") == held.multipliers("2020-06-10")


@pytest.mark.slow
def test_forecast_does_not_change_when_everything_after_the_as_of_date_is_poisoned(city, tmp_path):
    as_of = dt.date(2020, 4, 4)
    clean = load_covid("2020-02-29", "2020-06-30")
    poisoned = clean.copy()
    after = poisoned["date"] > pd.Timestamp(as_of)
    for col in ("cases", "probable_cases", "hospitalized", "deaths"):
        poisoned.loc[after, col] = poisoned.loc[after, col] * 1000 + 12345
    schedule = nyc_2020()
    future = StayAtHome(start="2020-04-20", workplace_reduction=0.99, community_reduction=0.99,
                        description="poisoned future lockdown")
    poisoned_schedule = InterventionSchedule(policies=(*schedule.policies, future))

    a, _ = forecaster(city, observed=clean, steps=1).update(as_of)
    b, _ = forecaster(city, observed=poisoned, schedule=poisoned_schedule, steps=1).update(as_of)
    check_hub_frame(a.forecast)
    pd.testing.assert_frame_equal(a.forecast, b.forecast, check_exact=True)
    pd.testing.assert_frame_equal(a.known, b.known, check_exact=True)
    # the control: poisoning the last known day does change it (the test can fail)
    last = poisoned.copy()
    last.loc[last["date"] == pd.Timestamp(as_of), "cases"] += 5000
    c, _ = forecaster(city, observed=last, steps=1).update(as_of)
    assert not a.forecast["value"].equals(c.forecast["value"])

    f = a.forecast
    assert set(f["forecast_date"]) == {"2020-04-04"}
    assert {parse_target(t) for t in f["target"]} == {(h, t) for h in (1, 2) for t in ("cases", "hospitalized",
                                                                                         "deaths")}
    assert set(f["target_end_date"]) == {"2020-04-11", "2020-04-18"}
    assert len(f[f["type"] == "quantile"]) == 2 * 3 * 6 * len(HUB_LEVELS)
    paths = a.save(tmp_path)
    assert {p.name for p in paths} >= {"forecast.csv", "fan_cases.png", "fan_deaths.png", "fan_hospitalized.png"}
    check_hub_frame(pd.read_csv(tmp_path / "forecast.csv", dtype={"location": str}))


@pytest.mark.slow
def test_a_resumed_assimilation_equals_an_uninterrupted_one(city, tmp_path):
    whole = assimilate(forecaster(city), "2020-03-21", "2020-03-28", tmp_path / "whole", plots=False)
    assert sorted(set(whole["forecast_date"])) == ["2020-03-21", "2020-03-28"]

    broken = forecaster(city)
    calls = {"n": 0}

    def interrupt(phase, index, value, seconds):
        if phase == "fit":
            calls["n"] += 1
            if calls["n"] == 4:  # week 2's second Adam step
                raise KeyboardInterrupt

    broken.on_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        assimilate(broken, "2020-03-21", "2020-03-28", tmp_path / "resumed", plots=False)
    assert (tmp_path / "resumed/weeks/2020-03-21/done").exists()
    assert not (tmp_path / "resumed/weeks/2020-03-28/done").exists()
    seen = []
    again = forecaster(city)
    table = assimilate(again, "2020-03-21", "2020-03-28", tmp_path / "resumed", plots=False,
                       on_week=lambda d, r, resumed: seen.append((d.isoformat(), resumed)))
    assert seen == [("2020-03-21", True), ("2020-03-28", False)]
    a = pd.read_csv(tmp_path / "whole/forecasts.csv")
    b = pd.read_csv(tmp_path / "resumed/forecasts.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(table) == len(whole)


@pytest.mark.slow
def test_95_percent_intervals_cover_outcomes_simulated_by_the_model(city):
    """Observations simulated by the model at its own parameters: forecast without fitting (the true
    parameters), 95% intervals cover at least 90% of the outcomes (borough and city, weeks, targets)."""
    from lpm_llm.core.behavior import AlignmentMap
    from lpm_llm.core.sim import Simulation
    from lpm_llm.runner.run import build_models

    cfg, pop, arch = city
    a, b = cfg.decisions["isolate"].alignment
    with torch.no_grad():
        sim = Simulation(pop, build_models(cfg), archetypes=arch, decisions={"isolate": ContextAnswers(arch.k)},
                         interventions=cfg.interventions.schedule(), start_date=cfg.start_date, days=84, seed=777,
                         alignment={"isolate": AlignmentMap(a=a, b=b)})
        daily = sim.run().by_area()
    daily = daily[daily["area"] != "NYC"]
    obs = pd.DataFrame({"date": daily["date"], "area": daily["area"],
                        "cases": daily["reported_cases"] / SCALE, "hospitalized": daily["hospitalized"] / SCALE,
                        "deaths": daily["deaths"] / SCALE})
    hits = []
    for as_of in ("2020-04-11", "2020-04-25"):
        r, _ = forecaster(city, observed=obs, steps=0, members=8, horizon=3).update(as_of)
        truth = weekly_truth(obs, cfg.start_date, ["cases", "hospitalized", "deaths"])
        q = r.forecast[r.forecast["type"] == "quantile"].copy()
        q["h_target"] = q["target"].map(lambda t: parse_target(t)[1])
        wide = q.pivot_table(index=["h_target", "target_end_date", "location"], columns="quantile", values="value")
        joined = wide.join(truth.set_index(["target", "target_end_date", "location"])["value"].rename_axis(
            ["h_target", "target_end_date", "location"]), how="inner")
        assert len(joined) == 3 * 3 * 6
        hits.extend(coverage(joined[list(HUB_LEVELS)].to_numpy(), HUB_LEVELS, joined["value"].to_numpy(), 0.95))
    assert np.mean(hits) >= 0.9, np.mean(hits)


@pytest.mark.slow
def test_cli_assimilate_resumes_its_folder(tmp_path, capsys):
    """``lpm-llm assimilate`` twice into one folder (in-process, through the CLI's ``main``): the second
    run loads the finished week and adds the new one; other settings into the same folder are refused."""
    import json

    from lpm_llm.runner.cli import main

    out = tmp_path / "stream"
    base = ["assimilate", "experiments/covid_nyc.yaml", "--from", "2020-03-21", "--horizon", "1", "--steps", "1",
            "--members", "2", "--out", str(out), "-q", "--set", f"population.scale={SCALE}",
            "--set", "decisions.isolate.enabled=false", "--set", "outputs.plots=false",
            "--parameters", "beta_scale,ascertainment", "--smoothness", "0.1"]
    assert main([*base, "--to", "2020-03-21"]) == 0
    assert main([*base, "--to", "2020-03-28"]) == 2  # --to is part of the stream's settings
    assert "other settings" in capsys.readouterr().err
    settings = json.loads((out / "stream.json").read_text())["settings"]
    assert settings["parameters"] == ["beta_scale", "ascertainment"] and settings["smoothness"] == 0.1
    (out / "stream.json").write_text(json.dumps({**json.loads((out / "stream.json").read_text()),
                                                 "to": "2020-03-28"}))
    base.remove("-q")  # with the progress bar (its forecast bar has no total)
    assert main([*base, "--to", "2020-03-28"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["resumed"] is True
    assert manifest["weeks"]["2020-03-21"] == "loaded" and manifest["weeks"]["2020-03-28"].endswith(" s")
    table = pd.read_csv(out / "forecasts.csv", dtype={"location": str})
    check_hub_frame(table)
    assert sorted(set(table["forecast_date"])) == ["2020-03-21", "2020-03-28"]


@pytest.mark.slow
def test_a_clean_back_test_starts_from_the_prior_and_never_sees_data_after_its_date(tmp_path, monkeypatch):
    """``start="prior"`` through the runner (mocked LLM endpoint): the stream's first fit starts from the
    package's defaults, so a config whose fitted parameters and alignment map are replaced by other
    values (as if fitted to later data) and observations after the last as-of date multiplied by 1000
    give bit-identical forecasts for every week, the starting-parameter fit included. The control: the
    same stream started from the experiment's parameters differs."""
    import json

    import respx

    from lpm_llm.models.epidemic import EpidemicParams
    from lpm_llm.runner.experiment import Experiment
    from lpm_llm.runner.forecast_run import assimilate_experiment, prior_config
    from tests.regression.cases import ENDPOINT, KEY_ENV, _answer

    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret")
    base = [f"population.scale={SCALE}", "outputs.plots=false", "llm.provider=openai", "llm.model=mock",
            f"llm.base_url={ENDPOINT}", f"llm.api_key_env={KEY_ENV}", 'llm.cache_mode="off"', "llm.max_retries=0"]
    later_fit = ["epidemic.beta_scale=3.0", "epidemic.fatality_scale=5.0", "epidemic.ascertainment=[0.9, 0.5]",
                 "epidemic.initial_infections_per_100k=[4000, 3000, 2000, 1000, 500]",
                 "epidemic.ascertainment_by_borough=[2, 1, 1, 1, 0.5]", "decisions.isolate.alignment=[2.0, 1.5]"]
    first, last = dt.date(2020, 3, 21), dt.date(2020, 3, 28)
    clean = load_covid("2020-02-29", "2020-06-30")
    poisoned = clean.copy()
    after = poisoned["date"] > pd.Timestamp(last)
    for col in ("cases", "probable_cases", "hospitalized", "deaths"):
        poisoned.loc[after, col] = poisoned.loc[after, col] * 1000
    options = dict(horizon=2, steps=1, first_steps=2, members=2, draws=20, targets=("cases", "hospitalized", "deaths"))

    def stream(name, overrides, observed, start, to=last):
        exp = Experiment.from_yaml("experiments/covid_nyc.yaml", [*base, *overrides])
        with respx.mock(assert_all_mocked=True) as mock:
            mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
            assimilate_experiment(exp, first, to, tmp_path / name, observed=observed, start=start, **options)
        return pd.read_csv(tmp_path / name / "forecasts.csv")

    cfg = Experiment.from_yaml("experiments/covid_nyc.yaml", base).config
    other = Experiment.from_yaml("experiments/covid_nyc.yaml", [*base, *later_fit]).config
    assert prior_config(cfg).epidemic == EpidemicParams() == prior_config(other).epidemic
    assert prior_config(other).decisions["isolate"].alignment is None
    a = stream("a", [], clean, "prior")
    b = stream("b", later_fit, poisoned, "prior")
    assert sorted(set(a["forecast_date"])) == [first.isoformat(), last.isoformat()]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    weeks = json.loads((tmp_path / "a" / "weeks.json").read_text())
    grid = weeks[0]["settings"]["start_grid"]["initial_infections_per_100k"]  # the cold start searched the seeding
    assert grid["best"] == grid["values"][int(np.argmin(grid["losses"]))] and len(set(grid["losses"])) > 1
    assert "start_grid" not in weeks[1]["settings"] and weeks[1]["settings"]["warm_start"]
    c = stream("c", [], clean, "experiment", to=first)
    first_a = a[a["forecast_date"] == first.isoformat()].reset_index(drop=True)
    assert len(c) == len(first_a) and not np.allclose(c["value"], first_a["value"])
