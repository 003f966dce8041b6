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
