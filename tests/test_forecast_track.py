"""A warm update's line searches (``ForecastSettings.track_weeks``, issue 16) on a known loss: each
direction moves to its minimum within the searches' resolution, only the recent months' entries move,
the bounds hold, and the loss never rises."""
from __future__ import annotations

import datetime as dt
import math

import pytest
import torch

from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.forecast import Forecaster, ForecastSettings
from lpm_llm.forecast.engine import TRACK_DIRECTIONS

START = dt.date(2020, 3, 1)
WEEKS = 20  # 2020-03-01 .. 2020-07-18: months 0-4 (March-July); the last 4 weeks touch June and July


class _Simulation:
    def __init__(self):
        days = [START + dt.timedelta(days=d) for d in range(7 * WEEKS)]
        self.month_index = [(d.year - START.year) * 12 + d.month - START.month for d in days]

    def parameters(self):
        return {"transmission_change": None, "importation_per_100k": None, "ascertainment": None}


class _Quadratic:
    """sum over the directions of (log mean of the recent entries - log target)^2, plus the earlier
    entries' distance from their start (which the searches must not move)."""

    def __init__(self, targets):
        self.simulation = _Simulation()
        self.targets, self.calls, self.seeds = targets, 0, set()

    def __call__(self, values, seeds):
        self.calls += 1
        self.seeds.add(tuple(seeds))
        tc, imp, asc = values["transmission_change"], values["importation_per_100k"], values["ascertainment"]
        t_tc, t_imp, t_asc = (math.log(x) for x in self.targets)
        return ((tc[2:].log().mean() - t_tc) ** 2 + (imp.log() - t_imp) ** 2 + (asc[3:].log().mean() - t_asc) ** 2
                + (tc[:2] - 0.8).pow(2).sum() + (asc[:3] - 0.3).pow(2).sum())


def _space(ascertainment=0.3):
    return ParameterSpace({
        "transmission_change": Bounded(0.1, 10.0, [0.8] * 4, (4,), log=True),
        "importation_per_100k": Bounded(0.01, 100.0, 1.0, log=True),
        "ascertainment": Bounded(0.01, 1.0, [ascertainment] * 5, (5,), log=True),
    })


def _forecaster(**settings):
    return Forecaster(None, None, None, list, None, start=START, scale=1.0,
                      settings=ForecastSettings(track_weeks=4, seeds_per_step=2, **settings))


def test_each_direction_reaches_its_minimum_and_only_the_recent_months_move():
    space, objective = _space(), _Quadratic(targets=(1.2, 3.0, 0.45))
    before = float(objective(space.values(), [0]).detach())
    track = _forecaster()._track(space, objective, WEEKS, seed0=5000)
    v = space.to_dict()
    # the searches' lattice is exp(0.1 k) for the 0.2 steps and exp(0.25 k) for importation's 0.5
    assert v["transmission_change"][:2] == pytest.approx([0.8, 0.8], rel=1e-5)  # April, May: before the window
    assert v["transmission_change"][2:] == pytest.approx([0.8 * math.exp(0.4)] * 2, rel=1e-4)  # 1.19 for 1.2
    assert math.log(v["importation_per_100k"] / 3.0) == pytest.approx(0.0, abs=0.125)
    assert v["ascertainment"][:3] == pytest.approx([0.3] * 3, rel=1e-5)
    assert v["ascertainment"][3:] == pytest.approx([0.3 * math.exp(0.4)] * 2, rel=1e-4)  # 0.448 for 0.45
    assert track["transmission_change"]["entries"] == [2, 3] and track["ascertainment"]["entries"] == [3, 4]
    after = float(objective(space.values(), [0]).detach())
    assert after < 0.01 * before
    searched = [name for name, _ in TRACK_DIRECTIONS if name in space.specs]
    assert len(searched) == 3 and set(track) == {*searched, *(f"{n}:1" for n in searched), "seconds"}
    for name in searched:  # every round's best is no worse than where it started (factor 1)
        for key in (name, f"{name}:1"):
            losses = dict(zip(track[key]["factors"], track[key]["losses"], strict=True))
            assert min(losses.values()) == losses[track[key]["best"]] <= losses[1.0]
    assert objective.seeds == {(5700, 5701), (0,)}  # common seeds for every candidate


def test_the_searches_respect_the_bounds_and_stay_put_at_the_minimum():
    space, objective = _space(ascertainment=0.8), _Quadratic(targets=(0.8, 1.0, 2.0))  # 2: above the bound 1
    _forecaster()._track(space, objective, WEEKS, seed0=0)
    v = space.to_dict()
    assert v["transmission_change"] == pytest.approx([0.8] * 4, rel=1e-5)
    assert v["importation_per_100k"] == pytest.approx(1.0, rel=1e-5)
    assert max(v["ascertainment"]) <= 1.0 and v["ascertainment"][3:] == pytest.approx([1.0, 1.0], rel=1e-3)
    assert v["ascertainment"][:3] == pytest.approx([0.8] * 3, rel=1e-5)


def test_a_direction_that_is_not_fitted_is_skipped_and_negative_weeks_are_refused():
    space = ParameterSpace({"importation_per_100k": Bounded(0.01, 100.0, 1.0, log=True)})
    calls = []

    def loss(values, seeds):
        calls.append(float(values["importation_per_100k"]))
        return (torch.log(values["importation_per_100k"]) - math.log(3.0)) ** 2

    objective = type("Objective", (), {"simulation": _Simulation(), "__call__": lambda self, v, s: loss(v, s)})()
    track = _forecaster()._track(space, objective, WEEKS, seed0=0)
    assert set(track) == {"importation_per_100k", "importation_per_100k:1", "seconds"}
    assert calls[0] == pytest.approx(1.0)  # the current value is tried first
    with pytest.raises(ValueError, match="track_weeks"):
        ForecastSettings(track_weeks=-1)
