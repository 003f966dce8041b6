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
    first, last = "2021-01-09", "2021-01-16"
    whole = assimilate(forecaster(city), first, last, tmp_path / "whole", plots=False)
    assert sorted(set(whole["forecast_date"])) == [first, last]

    broken = forecaster(city)
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
    assimilate(forecaster(city), first, last, tmp_path / "resumed", plots=False,
               on_week=lambda d, r, resumed: seen.append((d.isoformat(), resumed)))
    assert seen == [(first, True), (last, False)]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole/forecasts.csv"),
                                  pd.read_csv(tmp_path / "resumed/forecasts.csv"), check_exact=True)
