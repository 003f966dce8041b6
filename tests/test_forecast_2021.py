"""Forecasts of the 2020-2021 model (``covid_nyc_2021.yaml``: epidemic with lineages, waning and
importation, plus vaccination decided by archetypes): nothing after the as-of date reaches a forecast,
and a resumed stream equals an uninterrupted one.

A 1:5000 city (about 1,700 agents) started on 2020-11-01 (the leakage is about the data near the
as-of date, and ten weeks of history keep the runs short), a mocked vaccination decision whose answer
is a fixed function of the whole decision context (what the LLM is shown), 1 Adam step, 2 members,
horizon 2.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pytest
import torch

from lpm_llm.data.vaccination import city_first_doses, load_vaccination
from lpm_llm.forecast import Forecaster, ForecastSettings, assimilate, check_hub_frame
from tests.test_forecast import ContextAnswers

SCALE = 0.0002
AS_OF = dt.date(2021, 1, 16)  # 65+ eligible since 01-12: the supply binds, so the doses data matter
START = ["start_date=2020-11-01", "days=242"]


@pytest.fixture(scope="module")
def city(one_thread):
    from lpm_llm.population.archetypes import ArchetypeSpec
    from lpm_llm.population.synthesis import synthesize_nyc
    from lpm_llm.runner.experiment import load_config

    cfg, _ = load_config("experiments/covid_nyc_2021.yaml", overrides=[f"population.scale={SCALE}", *START])
    pop = synthesize_nyc(SCALE, 0)
    return cfg, pop, ArchetypeSpec.from_yaml(cfg.archetypes).assign(pop)


def forecaster(city, *, cfg=None, schedule=None, **settings) -> Forecaster:
    from lpm_llm.runner.run import build_models

    base, pop, arch = city
    cfg = cfg or base
    kw = dict(horizon=2, steps=1, seeds_per_step=1, members=2, draws=20, laplace_seeds=1,
              fit_targets=("cases", "hospitalized", "deaths"), smoothness=0.25,
              parameters=("beta_scale",))
    kw.update(settings)
    return Forecaster(pop, arch, {"vaccinate": ContextAnswers(arch.k)}, lambda: build_models(cfg),
                      schedule if schedule is not None else cfg.interventions.schedule(), start=cfg.start_date,
                      scale=pop.scale, settings=ForecastSettings(**kw),
                      sim_kwargs={"decision_every": {"vaccinate": 7},
                                  "persistence": {"vaccinate": cfg.decisions["vaccinate"].persistence}})


def poisoned_data(tmp_path, as_of: dt.date, *, last_week_doses: bool = False):
    """A copy of the bundled NYC data with every value dated after `as_of` changed in every file the
    2021 model reads (daily cases, admissions, deaths; vaccinations; sequenced lineage shares), or
    (`last_week_doses`) with the doses of the week up to `as_of` changed instead (the control)."""
    from lpm_llm.resources import resource_dir

    root = tmp_path / ("control" if last_week_doses else "poisoned")
    shutil.copytree(resource_dir("data"), root)
    nyc = root / "nyc"
    day = pd.Timestamp(as_of)
    if last_week_doses:
        v = pd.read_csv(nyc / "vaccination_daily.csv")
        when = pd.to_datetime(v["date"])
        v.loc[(when > day - pd.Timedelta(days=3)) & (when <= day), "people_1plus"] *= 3
        v.to_csv(nyc / "vaccination_daily.csv", index=False)
        return root
    c = pd.read_csv(nyc / "covid_daily.csv")
    after = pd.to_datetime(c["date"]) > day
    for col in ("cases", "probable_cases", "hospitalized", "deaths"):
        c.loc[after, col] = c.loc[after, col] * 1000 + 12345
    c.to_csv(nyc / "covid_daily.csv", index=False)
    v = pd.read_csv(nyc / "vaccination_daily.csv")
    after = pd.to_datetime(v["date"]) > day
    for col in ("people_1plus", "people_fully"):
        v.loc[after, col] = v.loc[after, col].fillna(0) * 50 + 1_000_000
    v.to_csv(nyc / "vaccination_daily.csv", index=False)
    s = pd.read_csv(nyc / "variants_4weekly.csv")
    after = pd.to_datetime(s["period_end"]) > day
    s.loc[after, "percent"] = 100 - s.loc[after, "percent"]
    s.loc[after, "sequenced_count"] = s.loc[after, "sequenced_count"] * 7
    s.to_csv(nyc / "variants_4weekly.csv", index=False)
    return root


def test_doses_after_the_as_of_date_are_held_at_the_last_weeks_rate():
    table = load_vaccination()
    start, days = dt.date(2020, 12, 1), 90
    full = city_first_doses(start, days, table)
    cut = city_first_doses(start, days, table, as_of=AS_OF)
    k = (AS_OF - start).days
    assert cut[: k + 1] == full[: k + 1]
    rate = sum(full[k - 6: k + 1]) / 7
    assert cut[k + 1:] == pytest.approx([rate] * (days - k - 1)) and rate > 0
    assert full[k + 20] != pytest.approx(rate)  # the real supply moved on (the cut is not a no-op)
    assert city_first_doses(start, days, table, as_of=dt.date(2020, 12, 5)) == [0.0] * days  # nothing known


@pytest.mark.slow
def test_a_2021_forecast_does_not_change_when_everything_after_the_as_of_date_is_poisoned(city, tmp_path,
                                                                                         monkeypatch):
    """Poisoned data files (every value after the date, in every file the model reads), a fictitious
    lockdown, a fictitious eligibility step and a fictitious variant after the date: the forecast is
    bit-identical. The controls: the same variant a day before the date, and more doses in the last
    known days, change it."""
    import lpm_llm.models.vaccination as vaccination
    import lpm_llm.resources as resources
    from lpm_llm.core.interventions import InterventionSchedule, StayAtHome
    from lpm_llm.models.epidemic_params import Variant
    from lpm_llm.models.vaccination_params import Eligibility

    cfg, _, _ = city
    a, _ = forecaster(city).update(AS_OF)
    check_hub_frame(a.forecast)
    assert set(a.forecast["target_end_date"]) == {"2021-01-23", "2021-01-30"}

    real = resources.resource_dir
    poisoned = poisoned_data(tmp_path, AS_OF)
    monkeypatch.setattr(resources, "resource_dir", lambda kind: poisoned if kind == "data" else real(kind))
    everyone = Eligibility("2021-01-18", "age", "everyone aged 16 and older", min_age=16)
    monkeypatch.setattr(vaccination, "ELIGIBILITY", (*vaccination.ELIGIBILITY, everyone))
    lockdown = StayAtHome(start="2021-01-19", workplace_reduction=0.99, community_reduction=0.99,
                          description="poisoned future lockdown")
    schedule = InterventionSchedule(policies=(*cfg.interventions.schedule().policies, lockdown))

    def with_variant(introduced: str):
        later = Variant(name="Fictitious", lineage="X.1", transmissibility=5.0, hospitalisation=3.0, fatality=3.0,
                        introduced=introduced, importation_per_100k=500.0)
        return cfg.model_copy(update={"epidemic": cfg.epidemic.model_copy(
            update={"variants": (*cfg.epidemic.variants, later)})})

    b, _ = forecaster(city, cfg=with_variant("2021-01-17"), schedule=schedule).update(AS_OF)
    pd.testing.assert_frame_equal(a.forecast, b.forecast, check_exact=True)
    pd.testing.assert_frame_equal(a.known, b.known, check_exact=True)

    c, _ = forecaster(city, cfg=with_variant("2021-01-15")).update(AS_OF)
    assert not a.forecast["value"].equals(c.forecast["value"])
    # the doses are read up to the date: more doses in its last days raise the supply held after it (in
    # two weeks the extra doses barely protect anyone yet, so this is checked on the model's supply)

    def supply(data):
        monkeypatch.setattr(resources, "resource_dir", lambda kind: data if kind == "data" else real(kind))
        f = forecaster(city)
        sim = f._simulation(7 * 13, cfg.interventions.schedule(), f._frozen(None), 0, AS_OF)
        model = next(m for m in sim.models if m.name == "vaccination")
        assert [e.date for e in model.eligibility] == [e.date for e in vaccination.ELIGIBILITY
                                                         if e.date <= AS_OF]
        return model.supply_day

    day = (AS_OF - dt.date(2020, 11, 1)).days
    held, more = supply(poisoned), supply(poisoned_data(tmp_path, AS_OF, last_week_doses=True))
    assert torch.equal(held[: day - 2], more[: day - 2]) and bool((more[day + 1:] > 2 * held[day + 1:]).all())
    assert bool((held[day + 1:] == held[day + 1]).all())


@pytest.mark.slow
def test_a_resumed_2021_assimilation_equals_an_uninterrupted_one(city, tmp_path):
    """Stopped in week 2's Adam step, after its line searches (``track_weeks``), and resumed."""
    first, last = "2021-01-09", "2021-01-16"
    tracked = {"track_weeks": 4, "parameters": ("beta_scale", "transmission_change", "importation_per_100k",
                                                "hospitalisation_scale")}
    whole = assimilate(forecaster(city, **tracked), first, last, tmp_path / "whole", plots=False)
    assert sorted(set(whole["forecast_date"])) == [first, last]
    import json

    week2 = json.loads((tmp_path / f"whole/weeks/{last}/forecast.json").read_text())["settings"]
    assert set(week2["track"]) >= {"transmission_change", "importation_per_100k", "hospitalisation_scale", "seconds"}
    week2 = json.loads((tmp_path / f"whole/weeks/{last}/forecast.json").read_text())
    assert "hospitalisation_scale" in week2["params"] and "hospitalisation_scale" in week2["laplace_sd"]

    broken = forecaster(city, **tracked)
    calls = {"fit": 0}

    def interrupt(phase, index, value, seconds):
        calls[phase] = calls.get(phase, 0) + 1
        if phase == "fit" and calls["fit"] == 2:  # week 2's Adam step
            raise KeyboardInterrupt

    broken.on_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        assimilate(broken, first, last, tmp_path / "resumed", plots=False)
    assert (tmp_path / f"resumed/weeks/{first}/done").exists()
    assert not (tmp_path / f"resumed/weeks/{last}/done").exists()
    seen = []
    assimilate(forecaster(city, **tracked), first, last, tmp_path / "resumed", plots=False,
               on_week=lambda d, r, resumed: seen.append((d.isoformat(), resumed)))
    assert seen == [(first, True), (last, False)]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole/forecasts.csv"),
                                  pd.read_csv(tmp_path / "resumed/forecasts.csv"), check_exact=True)


# Every value of covid_nyc_2021.yaml that bench/fit_2021.py fitted to the data through 2021-06, replaced (as if a
# fit had seen other data): the epidemic's calibrated parameters, the IHR (carries the fitted hospitalisation
# scale), the variants' transmissibility, severity and importation rates, the supply scale and the alignment map.
LATER_FIT = [
    "epidemic.beta_scale=3.0", "epidemic.transmission_change=[2.0, 0.5]", "epidemic.ascertainment=[0.9, 0.5]",
    "epidemic.initial_infections_per_100k=[4000, 3000, 2000, 1000, 500]",
    "epidemic.ascertainment_by_borough=[2, 1, 1, 1, 0.5]", "epidemic.fatality_scale=[5.0, 4.0, 3.0]",
    "epidemic.importation_per_100k=40.0", "epidemic.ihr=[0, 0.001, 0.001, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]",
    "epidemic.variants=[{name: Iota, lineage: B.1.526, transmissibility: 3.0, introduced: 2020-11-01, "
    "importation_per_100k: 50}, {name: Alpha, lineage: B.1.1.7, transmissibility: 1.1, hospitalisation: 4.0, "
    "fatality: 4.0, introduced: 2020-11-10, importation_per_100k: 30}, {name: Gamma, lineage: P.1, transmissibility: "
    "0.5, introduced: 2020-11-05, importation_per_100k: 20}, {name: Delta, lineage: B.1.617.2, transmissibility: 5.0, "
    "hospitalisation: 0.5, fatality: 0.5, introduced: 2020-11-03, importation_per_100k: 10}]",
    "model_params.vaccination.supply_scale=1.8", "decisions.vaccinate.alignment=[2.0, 1.5]",
]


@pytest.mark.slow
def test_the_2021_prior_start_carries_no_fitted_value_of_the_experiment(tmp_path, monkeypatch, one_thread):
    """``start="prior"`` for the 2020-2021 model, through the runner (mocked LLM endpoint): every fitted value
    of the experiment replaced (:data:`LATER_FIT`) gives the same prior config and a bit-identical first
    forecast (its start grid over seeding and importation included); the prior holds the package's
    defaults and literature values. Controls: from the experiment's parameters the poisoned config's
    forecast differs from the original's, and the original's differs from the prior start's."""
    import json

    import numpy as np
    import respx

    from lpm_llm.models.epidemic_params import NYC_VARIANTS, EpidemicParams
    from lpm_llm.models.vaccination_params import VaccinationParams
    from lpm_llm.runner.experiment import Experiment
    from lpm_llm.runner.forecast_run import PRIOR_IMPORTATION, forecast_experiment, prior_config
    from tests.regression.cases import ENDPOINT, KEY_ENV, _answer

    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret")
    base = [f"population.scale={SCALE}", *START, "outputs.plots=false", "llm.provider=openai", "llm.model=mock",
            f"llm.base_url={ENDPOINT}", f"llm.api_key_env={KEY_ENV}", 'llm.cache_mode="off"', "llm.max_retries=0"]
    as_of = "2020-11-28"  # 4 known weeks; the 2 forecast weeks reach the first vaccination question (12-06)
    options = dict(horizon=2, first_steps=1, seeds_per_step=1, members=2, draws=20, laplace_seeds=1,
                   parameters=("beta_scale", "initial_infections_per_100k", "importation_per_100k"))

    def forecast(name, overrides, start, **kw):
        exp = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", [*base, *overrides])
        with respx.mock(assert_all_mocked=True) as mock:
            mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
            forecast_experiment(exp, as_of, tmp_path / name, start=start, **{**options, **kw})
        return pd.read_csv(tmp_path / name / "forecast.csv")

    cfg = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", base).config
    other = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", [*base, *LATER_FIT]).config
    prior = prior_config(cfg)
    assert prior_config(other) == prior
    ep, defaults = prior.epidemic, EpidemicParams()
    for n in ("beta_scale", "transmission_change", "initial_infections_per_100k", "ascertainment",
              "ascertainment_by_borough", "ihr"):
        assert getattr(ep, n) == getattr(defaults, n), n
    assert ep.fatality_scale == (1.0,)  # by month (the last holds), as the experiment's
    assert ep.importation_per_100k == PRIOR_IMPORTATION
    assert ep.variants == NYC_VARIANTS
    assert prior.model_params["vaccination"]["supply_scale"] == VaccinationParams().supply_scale
    assert prior.decisions["vaccinate"].alignment is None

    a = forecast("a", [], "prior")
    b = forecast("b", LATER_FIT, "prior")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    grid = json.loads((tmp_path / "a" / "forecast.json").read_text())["settings"]["start_grid"]
    assert list(grid) == ["initial_infections_per_100k", "importation_per_100k"]
    for g in grid.values():
        assert g["best"] == g["values"][int(np.argmin(g["losses"]))] and len(set(g["losses"])) > 1
    c = forecast("c", [], "experiment", first_steps=0)  # the controls forecast from the experiment's values
    d = forecast("d", LATER_FIT, "experiment", first_steps=0)
    assert not np.allclose(c["value"], d["value"]) and not np.allclose(a["value"], c["value"])


@pytest.mark.slow
def test_the_count_loss_reaches_the_weekly_fit(city):
    """``ForecastSettings.loss``: the same update's first Adam loss under ``negbin`` is the count
    deviance of the whole-period fit, not the log loss; an unknown loss is refused."""
    losses = {}
    for kind in ("log_mse", "negbin"):
        result, _ = forecaster(city, loss=kind, dispersion=10.0).update("2021-01-09")
        losses[kind] = result.loss_history[0]
    assert losses["negbin"] != pytest.approx(losses["log_mse"], rel=1e-3)
    assert losses["negbin"] > 0
    with pytest.raises(ValueError, match="loss must be"):
        ForecastSettings(loss="mse")


@pytest.mark.slow
def test_the_forecast_ensemble_runs_with_the_fitted_hospitalisation_scale(city):
    """``hospitalisation_scale`` reaches the ensemble's runs (a model's ``set_parameters`` replaces its
    tensor overrides, so the IHR must be set after the other values): the same state with the scale
    at 0.1 and at 10 gives admissions far apart, and cases alike."""
    from lpm_llm.forecast.engine import FitState

    totals = {}
    for scale in (0.1, 10.0):
        f = forecaster(city, steps=0, parameters=("beta_scale", "hospitalisation_scale"))
        state = FitState("2021-01-02", {"beta_scale": 1.0, "hospitalisation_scale": scale}, None, {})
        result, _ = f.update("2021-01-09", state)
        fitted = result.fitted[result.fitted.location == "NYC"]
        totals[scale] = {t: fitted[fitted.target == t].value.sum() for t in ("hospitalized", "cases")}
    assert totals[10.0]["hospitalized"] > 20 * max(totals[0.1]["hospitalized"], 1.0)
    assert totals[10.0]["cases"] == pytest.approx(totals[0.1]["cases"], rel=0.5)
