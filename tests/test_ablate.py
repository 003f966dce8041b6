"""The behaviour ablation (issue 14 section 3): differentiable heuristic and constant decision
sources, the ablation command end to end on a tiny city with a mocked LLM, and forecasts that see
no data after their forecast date."""

from __future__ import annotations

import copy
import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import respx
import torch

from lpm_llm.calibrate import NYC_POPULATION, SimulationObjective
from lpm_llm.calibrate.ablate import (
    ConstantProbability,
    LogisticDecision,
    ablate_first_wave,
    home_population,
    isolation_policy_features,
    with_decision_parameters,
)
from lpm_llm.calibrate.targets import observed_weekly
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.parameters import ParameterSpace
from lpm_llm.data.observed import load_covid
from lpm_llm.models.epidemic import EpidemicParams
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from tests.conftest import epidemic_sim
from tests.regression.cases import ENDPOINT, KEY_ENV, _answer

START = "2020-03-01"


@pytest.fixture(scope="module")
def tiny():
    pop = synthesize_nyc(scale=0.002, seed=0)
    return pop, ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)


def _heuristic(pop, arch):
    policy, names = isolation_policy_features(nyc_2020())
    return LogisticDecision("isolate", home_population(pop, arch), policy, names, intercept=-0.5)


def test_heuristic_reads_cases_and_policies_from_the_context(tiny):
    pop, arch = tiny
    h = _heuristic(pop, arch)
    k = arch.k
    quiet = {"date": "2020-03-01", "cases_week": ["0"] * k}
    busy = {"date": "2020-04-20", "cases_week": ["12,000"] * k}
    x0, x1 = h.features(quiet), h.features(busy)
    assert x0.shape == (k, 4) and torch.all(x0[:, 0] == 1) and torch.all(x0[:, 1] == 0)
    assert torch.all(x0[:, 2:] == 0)  # no order, no masks on 2020-03-01
    assert torch.all(x1[:, 2] == 1) and torch.all(x1[:, 3] == 1)  # PAUSE and masks on 2020-04-20
    pops = torch.tensor(home_population(pop, arch), dtype=torch.float64)
    assert torch.allclose(x1[:, 1].double(), torch.log1p(12_000 / pops * 1e5), rtol=1e-5)
    h.set_parameters({"isolate_heuristic_cases": torch.tensor(0.5), "isolate_heuristic_intercept": torch.tensor(-2.0)})
    assert torch.all(h.probabilities(busy) > h.probabilities(quiet))
    assert torch.allclose(h.probabilities(quiet), torch.sigmoid(torch.tensor(-2.0)).expand(k))


@pytest.mark.parametrize("kind", ["heuristic", "constant"])
def test_heuristic_and_constant_sources_get_gradients_that_agree_with_finite_differences(tiny, kind):
    """The straight-through gradient of the share of agent-days isolating, through the simulation's
    draws, against central differences of the same runs (h = 0.05 in raw space, common random numbers,
    4 seeds), per coefficient, within 10%. Two weeks: the cases that the second decision step sees
    come from infections seeded on day 0, so the context does not depend on the coefficients (the
    gradient, like the LLM's frozen answers, treats the context as given). Then the calibration loss
    itself (log error of weekly cases and deaths) has a finite, non-zero gradient in every coefficient."""
    pop, arch = tiny
    seeds, h = range(4), 0.05
    source = _heuristic(pop, arch) if kind == "heuristic" else ConstantProbability("isolate", arch.k, init=0.3)
    # reports 2 days after onset (6 at the defaults), so that the second step's cases come from day 0's seeds
    params = EpidemicParams(initial_infections_per_100k=(3000.0,) * 5, report_delay=2)
    sim = epidemic_sim(pop, params, archetypes=arch, decisions={"isolate": source}, interventions=nyc_2020(),
                       start_date="2020-04-06", days=14, seed=0)
    space = ParameterSpace(source.parameters())
    if kind == "heuristic":  # away from zero slopes: intercept -1, cases 0.3, stay-at-home 0.5
        space.set_values({"isolate_heuristic_intercept": -1.0, "isolate_heuristic_cases": 0.3,
                          "isolate_heuristic_stay_at_home": 0.5})

    def share(values, seed):
        source.set_parameters(values)
        sim.seed = seed
        return sim.run().series["isolating"].mean()

    for s in seeds:
        (share(space.values(), s) / len(seeds)).backward()
    gradient = torch.cat([space.raw[n].grad.reshape(-1).double() for n in space.names])
    x0 = space.get_vector()

    def share_at(vector):
        probe = copy.deepcopy(space)
        probe.set_vector(vector)
        with torch.no_grad():
            return float(np.mean([float(share(probe.values(), s)) for s in seeds]))

    for i, name in enumerate(space.names):
        if name == "isolate_heuristic_masks":  # no mask order before 2020-04-17: the feature is 0
            assert float(gradient[i]) == 0.0
            continue
        d = torch.eye(len(space.names), dtype=x0.dtype)[i]
        fd = (share_at(x0 + h * d) - share_at(x0 - h * d)) / (2 * h)
        ad = float(gradient @ d)
        message = f"{name}: gradient {ad:.4g}, finite difference {fd:.4g}"
        assert np.sign(ad) == np.sign(fd) and abs(fd) > 1e-3, message
        assert abs(ad - fd) <= 0.1 * abs(fd), message

    observed = {t: v * 0.3 + 1.0 for t, v in observed_weekly("2020-04-06", 2, ("cases", "deaths")).items()}
    objective = with_decision_parameters(SimulationObjective(sim, observed, weeks=2, scale=pop.n / NYC_POPULATION),
                                         [source])
    for raw in space.raw.values():
        raw.grad = None
    objective(space.values(), 0).backward()
    for name in [n for n in space.names if n != "isolate_heuristic_masks"]:
        g = space.raw[name].grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, name


class _Responsive:
    """A stand-in for the LLM: P(isolate) rises with the cases in the context (as the prompt shows them)."""

    def __init__(self):
        self.contexts = []

    def probabilities(self, context):
        self.contexts.append(context)
        cases = torch.tensor([float(str(c).replace(",", "")) for c in context["cases_week"]])
        return torch.sigmoid(-1.0 + cases / 2000.0)


FIRST_WAVE = EpidemicParams(initial_infections_per_100k=(1000.0,) * 5, beta_scale=1.4)


@pytest.mark.slow
def test_forecasts_never_see_data_after_their_forecast_date(tiny):
    """Poison every observation on or after the forecast date (x 50 and shifted): the fits, their
    parameters and their fit-window scores are unchanged for every source; only the forecast scores,
    which compare with those observations, move."""
    pop, arch = tiny
    clean = load_covid()
    poisoned = clean.copy()
    later = pd.to_datetime(poisoned["date"]) >= pd.Timestamp("2020-03-22")
    for col in ("cases", "deaths"):
        poisoned.loc[later, col] = poisoned.loc[later, col] * 50 + 7
    reports = []
    for observed in (clean, poisoned):
        llm = _Responsive()
        reports.append(ablate_first_wave(pop, arch, llm, FIRST_WAVE, nyc_2020(), forecast_dates=["2020-03-22"],
                                         forecast_weeks=1, sources=("llm", "heuristic", "constant"), steps=1,
                                         rounds=2, eval_seeds=1, observed=observed))
        assert max(dt.date.fromisoformat(c["date"]) for c in llm.contexts) <= dt.date(2020, 3, 28)
    a, b = (r.rows.set_index("source") for r in reports)
    fit_cols = ["fit_loss", "fit_mae_cases", "fit_mae_deaths", "steps", "rounds"]
    pd.testing.assert_frame_equal(a[fit_cols], b[fit_cols])
    for source in a.index:
        params = [json.dumps(frame.loc[source, "params"], sort_keys=True) for frame in (a, b)]
        assert params[0] == params[1], source
        assert b.loc[source, "forecast_mae_cases"] > 10 * a.loc[source, "forecast_mae_cases"]


@pytest.mark.slow
def test_forecasts_never_see_policies_announced_after_their_forecast_date(tiny):
    """A fictitious lockdown from the day after the forecast date changes nothing (the schedule is cut
    at the date: later policies removed, those in force held open-ended): fits, forecasts and scores
    are identical for the heuristic (which reads the policies) and the LLM (whose prompts show them).
    The control: the same lockdown from the day before the date changes the forecast."""
    from lpm_llm.core.interventions import InterventionSchedule, StayAtHome

    pop, arch = tiny

    def with_lockdown(start):
        lockdown = StayAtHome(start=start, workplace_reduction=0.99, community_reduction=0.99, description="fictitious")
        return InterventionSchedule(policies=(*nyc_2020().policies, lockdown))

    def rows(schedule):
        report = ablate_first_wave(pop, arch, _Responsive(), FIRST_WAVE, schedule, forecast_dates=["2020-03-15"],
                                   forecast_weeks=2, sources=("llm", "heuristic"), steps=1, rounds=1, eval_seeds=1)
        return report.rows.drop(columns=["seconds"]).set_index("source")

    plain, later, earlier = rows(nyc_2020()), rows(with_lockdown("2020-03-16")), rows(with_lockdown("2020-03-14"))
    pd.testing.assert_frame_equal(plain, later)
    for source in plain.index:
        assert earlier.loc[source, "forecast_loss"] != plain.loc[source, "forecast_loss"], source


@pytest.mark.slow
def test_ablate_command_runs_end_to_end_with_a_mocked_llm(tmp_path, monkeypatch):
    """``lpm-llm ablate`` on a 1:500 city, its LLM a mocked endpoint (answers a fixed function of the
    prompt): every source is fitted and scored, the table, JSON and answers are written, and the
    LLM was re-asked at the fitted trajectory (more answers than the first run's decision steps)."""
    from lpm_llm.runner.cli import main

    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret")
    out = tmp_path / "ablation"
    args = ["ablate", "covid_nyc.yaml", "--out", str(out), "--forecast-date", "2020-03-22", "--steps", "1",
            "--rounds", "2", "-q"]
    for key in ("population.scale=0.002", "calibration.forecast_weeks=1", "outputs.plots=false",
                "llm.provider=openai", "llm.model=mock", f"llm.base_url={ENDPOINT}", f"llm.api_key_env={KEY_ENV}",
                'llm.cache_mode="off"', "llm.max_retries=0"):
        args += ["--set", key]
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
        assert main(args) == 0
    table = pd.read_csv(out / "ablation_epidemic.csv")
    assert list(table["source"]) == ["llm", "heuristic", "constant", "none"]
    assert sorted(table["rank"]) == sorted(table["forecast_loss"].rank(method="min").astype(int))
    assert table["steps"].nunique() == 1  # the same budget for every source
    assert np.isfinite(table[["fit_loss", "forecast_loss", "forecast_mae_cases"]].to_numpy()).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["ablation"]["kind"] == "epidemic"
    answers = pd.read_csv(out / "decisions.csv")
    k = answers["archetype"].nunique()
    # 3 fit weeks + 1 forecast week: the first run asks 3 steps; each re-ask 4 steps more
    assert route.call_count == len(answers) >= (3 + 4) * k
    assert "| llm |" in (out / "ablation_epidemic.md").read_text()
