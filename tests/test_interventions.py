"""Policy schedules: dates, multipliers, texts, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lpm_llm.core.interventions import InterventionSchedule, Masks, SchoolClosure, StayAtHome, nyc_2020


def test_nyc_2020_dates_and_multipliers():
    s = nyc_2020()
    assert s.multipliers("2020-03-15") == {
        "household": 1.0,
        "school": 1.0,
        "workplace": 1.0,
        "community": 1.0,
    }
    assert s.active("2020-03-15") == []
    m = s.multipliers("2020-03-16")
    assert m["school"] == 0.0 and m["workplace"] == 1.0 and m["community"] == 1.0
    m = s.multipliers("2020-03-22")
    assert m["workplace"] == pytest.approx(0.4) and m["community"] == pytest.approx(0.5)
    m = s.multipliers("2020-04-17")  # masks multiply the outside layers, never the household
    assert m["workplace"] == pytest.approx(0.4 * 0.8) and m["community"] == pytest.approx(0.5 * 0.8)
    assert m["household"] == 1.0
    phases = {"2020-06-08": 0.5, "2020-06-22": 0.6, "2020-07-06": 0.7, "2020-07-20": 0.75}
    for date, workplace in phases.items():
        assert s.multipliers(date)["workplace"] == pytest.approx(workplace * 0.8), date
    assert s.multipliers("2020-06-07")["workplace"] == pytest.approx(0.4 * 0.8)  # PAUSE still on
    assert s.multipliers("2020-09-28")["school"] == 0.0
    assert s.multipliers("2020-09-29")["school"] == pytest.approx(0.3 * 0.8)
    texts = s.active("2020-04-20")
    assert len(texts) == 3
    assert any("PAUSE" in t for t in texts) and any("202.17" in t for t in texts)
    assert any("Schools" in t for t in texts)
    assert any("phase 2" in t for t in s.active("2020-06-30"))


def test_schedule_from_yaml_like_dict_and_errors():
    s = InterventionSchedule.model_validate(
        {"policies": [{"kind": "masks", "start": "2020-05-01", "end": "2020-06-01", "multiplier": 0.5}]}
    )
    assert s.multipliers("2020-05-31")["community"] == 0.5 and s.multipliers("2020-06-01")["community"] == 1.0
    with pytest.raises(ValidationError, match="strenght"):
        InterventionSchedule.model_validate(
            {"policies": [{"kind": "masks", "start": "2020-05-01", "strenght": 1}]}
        )
    with pytest.raises(ValidationError, match="school_closure"):  # unknown kind lists the valid kinds
        InterventionSchedule.model_validate({"policies": [{"kind": "curfew", "start": "2020-05-01"}]})
    with pytest.raises(ValidationError, match="must be after start"):
        SchoolClosure(start="2020-05-01", end="2020-04-01")
    with pytest.raises(ValidationError):
        StayAtHome(start="2020-05-01", workplace_reduction=1.5)
    with pytest.raises(ValueError, match="ISO date"):
        nyc_2020().active("May 1st")


def test_custom_texts_and_layers():
    m = Masks(start="2020-01-01", multiplier=0.9, layers=("household",))
    s = InterventionSchedule(policies=(m,))
    assert s.multipliers("2020-02-01") == {
        "household": 0.9,
        "school": 1.0,
        "workplace": 1.0,
        "community": 1.0,
    }
    assert s.active("2020-02-01") == [m.text()] and "2020-01-01" in m.text()
    assert "60%" in SchoolClosure(start="2020-01-01", fraction_closed=0.4).text()


def test_second_wave_schedule_applies_on_the_right_dates():
    """Issue 15: cluster zones (borough level), indoor dining closed 2020-12-14 and back at 25% on
    2021-02-12, school buildings closed 2020-11-19 and reopened in stages from 2020-12-07, most
    capacity limits lifted 2021-05-19; each on its day and not the day before."""
    s = nyc_2020()
    boroughs = ["Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"]
    assert s.area_multipliers("2020-10-07", boroughs) == [1.0] * 5
    zones = s.area_multipliers("2020-10-08", boroughs)
    assert zones[1] == pytest.approx(1 - 0.2 * 0.5) and zones[3] == pytest.approx(1 - 0.1 * 0.5)
    assert zones[0] == zones[2] == zones[4] == 1.0
    assert s.area_multipliers("2020-12-14", boroughs) == [1.0] * 5
    assert any("202.68" in t for t in s.active("2020-10-08"))
    # dining: 25% capacity from 2020-09-30 (10% of community transmission at full capacity)
    masks, phase4 = 0.8, 0.75
    community = {
        "2020-09-29": phase4 * masks,
        "2020-09-30": phase4 * masks * (1 - 0.1 * 0.75),
        "2020-12-13": phase4 * masks * (1 - 0.1 * 0.75),
        "2020-12-14": phase4 * masks * 0.9,
        "2021-02-11": phase4 * masks * 0.9,
        "2021-02-12": phase4 * masks * (1 - 0.1 * 0.75),
        "2021-05-18": phase4 * masks * (1 - 0.1 * 0.25),
        "2021-05-19": 0.9 * masks,
    }
    for date, value in community.items():
        assert s.multipliers(date)["community"] == pytest.approx(value), date
    assert any("Indoor dining is closed" in t for t in s.active("2020-12-14"))
    assert s.multipliers("2021-05-18")["workplace"] == pytest.approx(0.75 * masks)
    assert s.multipliers("2021-05-19")["workplace"] == pytest.approx(0.9 * masks)
    assert any("capacity limits lifted" in t for t in s.active("2021-05-19"))
    # schools (masks x 0.8 in school too)
    school = {"2020-11-18": 0.3, "2020-11-19": 0.0, "2020-12-06": 0.0, "2020-12-07": 0.15,
              "2021-02-24": 0.15, "2021-02-25": 0.22, "2021-03-21": 0.22, "2021-03-22": 0.3,
              "2021-06-25": 0.3, "2021-06-26": 0.0}
    for date, value in school.items():
        assert s.multipliers(date)["school"] == pytest.approx(value * masks), date
    # one school policy text at a time
    for date in school:
        assert sum(t.startswith(("Schools", "Public school")) for t in s.active(date)) == 1, date


def test_zones_reach_the_epidemic_for_their_boroughs_only():
    import torch

    from lpm_llm.models.epidemic import Epidemic
    from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
    from tests.conftest import epidemic_sim

    n = 1000
    pop = Population({"borough": (torch.arange(n) % 5).to(torch.int8), "age_band": torch.zeros(n, dtype=torch.int8),
                      "household": torch.arange(n, dtype=torch.int32)}, {"borough": BOROUGHS, "age_band": AGE_BANDS})
    sim = epidemic_sim(pop, {"initial_infections_per_100k": (0.0,) * 5}, start_date="2020-10-06", days=4,
                       interventions=nyc_2020())
    with torch.no_grad():
        sim.run()
    model = next(m for m in sim.models if isinstance(m, Epidemic))
    assert model._area_outside(0) is None and model._area_outside(1) is None  # Oct 6, 7
    factor = model._area_outside(2)  # Oct 8
    by_borough = {BOROUGHS[b]: float(factor[b]) for b in range(5)}
    assert by_borough == pytest.approx({"Bronx": 1.0, "Brooklyn": 0.9, "Manhattan": 1.0, "Queens": 0.95,
                                        "Staten Island": 1.0})
