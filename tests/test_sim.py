"""The simulation loop: Results layout, decision steps and their context, couplings, errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lpm_llm.core.behavior import AlignmentMap, ConstantDecision, PerArchetype
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.model import DecisionUse
from lpm_llm.core.sim import Simulation
from lpm_llm.models.epidemic import STATES, Epidemic, EpidemicParams
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
from tests.conftest import epidemic_sim

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pop() -> Population:
    n_households, size = 4000, 3
    n = n_households * size
    g = torch.Generator().manual_seed(0)
    return Population(
        {
            "borough": torch.randint(0, 5, (n,), generator=g).to(torch.int8),
            "age_band": torch.randint(0, 10, (n,), generator=g).to(torch.int8),
            "household": torch.arange(n_households, dtype=torch.int32).repeat_interleave(size),
            "school": torch.randint(-1, 200, (n,), generator=g).to(torch.int32),
            "workplace": torch.randint(-1, 500, (n,), generator=g).to(torch.int32),
        },
        {"borough": BOROUGHS, "age_band": AGE_BANDS},
    )


class Arch:
    """Archetype = age band (10); majority borough is then mixed, so use borough x age instead."""

    def __init__(self, pop: Population):
        self.index = (pop["borough"].int() * 10 + pop["age_band"].int()).to(torch.int32)
        self.k = 50


class Recorder:
    """A decision source that records its contexts."""

    def __init__(self, p: float, k: int):
        self.p, self.k, self.contexts = p, k, []

    def probabilities(self, context):
        self.contexts.append(dict(context))
        return torch.full((self.k,), self.p)


PARAMS = EpidemicParams(initial_infections_per_100k=(500,) * 5, beta_scale=1.5)


def test_results_layout_and_by_area(pop):
    arch = Arch(pop)
    with torch.no_grad():
        r = epidemic_sim(
            pop,
            PARAMS,
            days=30,
            seed=1,
            archetypes=arch,
            interventions=nyc_2020(),
            decisions={"isolate": ConstantDecision(0.25, k=arch.k)},
        ).run()
    d = r.daily
    assert len(d) == 30 * 5 * 10
    assert list(d.columns[:4]) == ["date", "area", "age_band", "population"]
    for col in (
        "new_infections",
        "new_symptomatic",
        "reported_cases",
        "hospitalized",
        "deaths",
        *STATES,
        "isolating",
    ):
        assert col in d.columns
    assert d["date"].dtype == "datetime64[ns]" and d["date"].iloc[0] == pd.Timestamp("2020-03-01")
    assert set(d["area"].astype(str)) == set(BOROUGHS) and set(d["age_band"].astype(str)) == set(AGE_BANDS)
    assert r.series["S"].shape == (30, 5, 10)
    assert d["isolating"].between(0, 1).all() and 0.15 < float(d["isolating"].mean()) < 0.35
    ba = r.by_area()
    assert len(ba) == 30 * 6 and set(ba["area"]) == {*BOROUGHS, "NYC"}
    nyc = ba[ba["area"] == "NYC"].set_index("date")
    boroughs = ba[ba["area"] != "NYC"].groupby("date")[["new_infections", "S", "population"]].sum()
    pd.testing.assert_frame_equal(nyc[["new_infections", "S", "population"]], boroughs, check_dtype=False)
    assert float(nyc["population"].iloc[0]) == pop.n
    iso = (d["isolating"] * d["population"]).groupby(d["date"]).sum() / pop.n
    assert nyc["isolating"].to_numpy() == pytest.approx(iso.to_numpy())
    assert set(r.timings) >= {"decisions", "step", "record", "total"}


def test_reported_cases_are_delayed_onsets_times_monthly_ascertainment(pop):
    params = EpidemicParams(
        initial_infections_per_100k=(500,) * 5, ascertainment=(0.1, 0.4), report_delay=3, hosp_delay=5
    )
    with torch.no_grad():
        r = epidemic_sim(pop, params, days=45, seed=2, start_date="2020-03-10").run()
    s = r.series
    onsets, reported = s["new_symptomatic"], s["reported_cases"]
    assert float(reported[:3].sum()) == 0
    march = 22  # 2020-03-10 .. 2020-03-31
    torch.testing.assert_close(reported[3:march], 0.1 * onsets[: march - 3])
    torch.testing.assert_close(reported[march:], 0.4 * onsets[march - 3 : -3])
    assert float(s["hospitalized"][:5].sum()) == 0 and float(s["hospitalized"].sum()) > 0


def test_decisions_every_k_days_with_context(pop):
    arch = Arch(pop)
    src = Recorder(0.5, arch.k)
    days = []
    sim = epidemic_sim(
        pop,
        PARAMS,
        days=22,
        seed=3,
        archetypes=arch,
        decisions={"isolate": src},
        decision_every=7,
        interventions=nyc_2020(),
        on_day=lambda t, n: days.append((t, n)),
    )
    with torch.no_grad():
        r = sim.run()
    assert days == [(t, 22) for t in range(22)]
    assert [c["step"] for c in src.contexts] == [0, 7, 14, 21]
    assert [c["date"] for c in src.contexts] == ["2020-03-01", "2020-03-08", "2020-03-15", "2020-03-22"]
    assert src.contexts[0]["policies"] == "none"
    assert "Schools are closed" in src.contexts[3]["policies"] and "PAUSE" in src.contexts[3]["policies"]
    ctx = src.contexts[2]
    assert isinstance(ctx["cases_week"], PerArchetype) and len(ctx["cases_week"]) == arch.k
    assert isinstance(ctx["cases_trend"], PerArchetype) and len(ctx["cases_trend"]) == arch.k
    # archetype k lives in borough k // 10: its cases are that borough's, scaled to real residents
    reported = r.series["reported_cases"].sum(2)  # (T, B)
    week = reported[7:14]
    for k in (0, 17, 44):
        b = k // 10
        persons = float(sim.persons_per_agent[b])
        assert ctx["cases_week"][k] == f"{round(float(week[:, b].sum()) * persons):,}"
    # decisions hold between steps; the isolating fraction changes only on decision days
    iso = r.series["isolating"].sum((1, 2))
    for t in range(1, 22):
        if t % 7:
            assert float(iso[t]) == float(iso[t - 1])
    assert len(r.decisions) == 4 * arch.k
    assert set(r.decisions.columns) == {"step", "date", "decision", "archetype", "probability", "aligned"}
    assert (r.decisions["probability"] == 0.5).all()


def test_alignment_map_changes_the_drawn_probability(pop):
    arch = Arch(pop)
    align = AlignmentMap(k=None, a=1.0, b=2.0)
    with torch.no_grad():
        r = epidemic_sim(
            pop,
            PARAMS,
            days=2,
            seed=1,
            archetypes=arch,
            decisions={"isolate": ConstantDecision(0.5, k=50)},
            alignment=align,
        ).run()
    expected = float(torch.sigmoid(torch.tensor(2.0)))
    assert r.decisions["aligned"].to_numpy() == pytest.approx(expected)
    iso = float((r.daily["isolating"] * r.daily["population"]).sum() / r.daily["population"].sum())
    assert iso == pytest.approx(expected, abs=0.02)


class FakeLabour:
    """A model coupled by data: everyone stops working from day 5; it adds a context variable."""

    name = "fake_labour"
    decisions = (DecisionUse("work", every_days=7),)
    observes = ()
    publishes = ("working",)
    reads = ("cases_week",)
    state = ()
    results = ()

    def __init__(self, n: int):
        self.n, self.seen = n, []

    def parameters(self):
        return {}

    def set_parameters(self, values):
        pass

    def setup(self, sim):
        pass

    def init(self, sim):
        pass

    def observe(self, day):
        return {}

    def context(self, decision, day, date):
        return {"unemployment_rate": PerArchetype(["4.0"] * 50)}

    def step(self, day, date, inputs):
        self.seen.append((day, set(inputs.decisions), inputs.data["cases_week"].shape))
        return {"working": torch.full((self.n,), day < 5, dtype=torch.bool)}

    def finish(self):
        return {}


def test_coupling_sets_working_and_context(pop):
    arch = Arch(pop)
    labour = FakeLabour(pop.n)
    src = Recorder(0.5, arch.k)
    betas = dict(beta_household=0.0, beta_school=0.0, beta_community=0.0, beta_workplace=2.0)
    params = EpidemicParams(initial_infections_per_100k=(2000,) * 5, latent_mean=1, latent_shape=1e5, **betas)
    with torch.no_grad():
        r = Simulation(
            pop,
            [Epidemic(params), labour],
            days=20,
            seed=1,
            archetypes=arch,
            decisions={"isolate": ConstantDecision(0.0, k=50), "work": src},
        ).run()
    assert labour.seen[0] == (0, {"work"}, (5,))
    assert src.contexts[0]["unemployment_rate"][0] == "4.0"
    new = r.series["new_infections"].sum((1, 2))
    assert float(new[1:5].sum()) > 0  # workplaces transmit while people work
    assert float(new[5:].sum()) == 0  # and not at all once nobody works


def test_errors(pop):
    arch = Arch(pop)
    with pytest.raises(KeyError, match="unknown decision 'mask'.*isolate"):
        epidemic_sim(pop, archetypes=arch, decisions={"mask": ConstantDecision(0.5, k=50)})
    with pytest.raises(ValueError, match="need archetypes"):
        epidemic_sim(pop, decisions={"isolate": ConstantDecision(0.5, k=50)})
    with pytest.raises(ValueError, match="either seed or generator"):
        epidemic_sim(pop, seed=1, generator=torch.Generator())
    with pytest.raises(KeyError, match="alignment for 'work'"):
        epidemic_sim(
            pop,
            archetypes=arch,
            decisions={"isolate": ConstantDecision(0.5, k=50)},
            alignment={"work": AlignmentMap()},
        )
    with pytest.raises(ValueError, match=r"expected \(50,\)"), torch.no_grad():
        epidemic_sim(pop, archetypes=arch, decisions={"isolate": ConstantDecision(0.5, k=3)}, days=2).run()
    with pytest.raises(ValueError, match="initial_infected must be"):
        epidemic_sim(pop, initial_infected=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="days must be"):
        epidemic_sim(pop, days=0)
    with pytest.raises(Exception, match="beta_comunity"):
        epidemic_sim(pop, {"beta_comunity": 0.1})
    # a generator gives a reproducible base seed
    a = epidemic_sim(pop, generator=torch.Generator().manual_seed(5)).seed
    assert a == epidemic_sim(pop, generator=torch.Generator().manual_seed(5)).seed


def test_small_nyc_runs_with_all_layers(small_nyc):
    """The synthetic city (about 83,000 agents): an epidemic grows, interventions bend it."""
    pop = small_nyc
    params = EpidemicParams(initial_infections_per_100k=(200,) * 5)
    with torch.no_grad():
        free = epidemic_sim(pop, params, days=60, seed=1).run()
        paused = epidemic_sim(pop, params, days=60, seed=1, interventions=nyc_2020()).run()
    a = float(free.series["new_infections"].sum())
    b = float(paused.series["new_infections"].sum())
    assert a > 0.05 * pop.n and b < 0.7 * a
    ba = free.by_area()
    assert float(ba[ba["area"] == "NYC"]["population"].iloc[0]) == pop.n


class DrawRecorder(FakeLabour):
    """A second consumer of the isolation decision that keeps every step's per-agent draws."""

    name = "draw_recorder"
    decisions = (DecisionUse("isolate", every_days=7),)
    publishes = ()
    reads = ()

    def __init__(self):
        self.draws = []

    def context(self, decision, day, date):
        return {}

    def step(self, day, date, inputs):
        if "isolate" in inputs.decided:
            self.draws.append(inputs.decisions["isolate"].clone())
        return {}


@pytest.mark.parametrize("r", [0.0, 0.9])
def test_persistent_isolation_keeps_the_same_people_isolating(pop, r):
    arch = Arch(pop)
    recorder = DrawRecorder()
    with torch.no_grad():
        Simulation(pop, [Epidemic(), recorder], archetypes=arch, decisions={"isolate": ConstantDecision(0.5, k=50)},
                   days=15, seed=3, persistence={"isolate": r}).run()
    first, second, third = recorder.draws
    assert float(second.mean()) == pytest.approx(0.5, abs=0.03)
    both = float((first * second).mean())
    expected = 0.25 + math.asin(r) / (2 * math.pi)  # 0.25 for independent draws, 0.428 at r = 0.9
    assert both == pytest.approx(expected, abs=0.02)
    if r == 0.0:  # no persistence: exactly the independent draws of before
        with torch.no_grad():
            plain = DrawRecorder()
            Simulation(pop, [Epidemic(), plain], archetypes=arch, decisions={"isolate": ConstantDecision(0.5, k=50)},
                       days=15, seed=3).run()
        assert all(torch.equal(a, b) for a, b in zip(plain.draws, recorder.draws, strict=True))


def test_precision_sets_and_restores_the_default_dtype():
    from lpm_llm.core.precision import precision

    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError), precision("float64") as dtype:
        assert dtype is torch.float64 and torch.tensor(0.5).dtype is torch.float64
        raise RuntimeError("the block fails")
    assert torch.get_default_dtype() is before
    with pytest.raises(ValueError, match="float32, float64"), precision("float16"):
        pass
