"""The vaccination model: eligibility on New York's dates, conservation of doses (eligible people,
supply, coverage, second-dose intervals), efficacy and waning in their analytic forms through the
epidemic, the runner with a mocked LLM, and gradients to the vaccination alignment against finite
differences."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import httpx
import pytest
import respx
import torch
import yaml

from lpm_llm.core.behavior import ConstantDecision, align
from lpm_llm.core.sim import Simulation
from lpm_llm.data.vaccination import city_first_doses, load_vaccination
from lpm_llm.models import Epidemic, EpidemicParams, Vaccination
from lpm_llm.models.vaccination_params import ELIGIBILITY, VaccinationParams
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.runner.experiment import Experiment
from tests.conftest import logprob_completion

pytestmark = pytest.mark.usefixtures("one_thread")

START = dt.date(2020, 12, 1)
ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers


@pytest.fixture(scope="module")
def city():
    pop = synthesize_nyc(scale=0.002, seed=3)
    arch = ArchetypeSpec(name="age_borough", method="group", attributes=["age_band", "borough"]).assign(pop)
    return pop, arch


def _vaccination_sim(city, p=0.6, *, start=START, days=212, seed=0, params=None, alignment=None):
    pop, arch = city
    return Simulation(pop, [Vaccination(params)], archetypes=arch, decisions={"vaccinate": ConstantDecision(p, arch.k)},
                      start_date=start, days=days, seed=seed, alignment=alignment)


def _day(iso: str) -> int:
    return (dt.date.fromisoformat(iso) - START).days


# -- eligibility ------------------------------------------------------------------------------------
def test_eligibility_follows_the_schedule(city):
    sim = _vaccination_sim(city, days=7)
    v = sim.model("vaccination")
    age, day, g = v.age_years, v.eligible_day, v.groups
    job = g["health_care"] | g["essential"] | g["public_facing"]
    plain = ~job & ~g["comorbidity"]
    # by age alone, each age on its own date
    for lo, hi, iso in ((75, 200, "2021-01-11"), (65, 74, "2021-01-12"), (60, 64, "2021-03-10"),
                        (50, 59, "2021-03-23"), (30, 49, "2021-03-30"), (16, 29, "2021-04-06"),
                        (12, 15, "2021-05-13")):
        sel = plain & (age >= lo) & (age <= hi)
        assert int(sel.sum()) > 0 and bool((day[sel] == _day(iso)).all()), (lo, hi)
    assert bool((day[age < 12] > 10_000).all())  # children under 12: never in this period
    # groups: the earlier of the group's date and the age's date
    assert bool((day[g["health_care"]] == _day("2020-12-14")).all())
    assert bool((day[g["essential"] & ~g["health_care"]] == _day("2021-01-11")).all())
    assert bool((day[g["comorbidity"] & ~job & (age < 60)] == _day("2021-02-15")).all())
    assert bool((day[g["public_facing"] & ~g["comorbidity"] & (age < 50)] == _day("2021-03-17")).all())
    assert not bool((g["health_care"] & ((age < 18) | (age > 64))).any())
    # ages within bands are uniform: 16-17 are 2/5 of the 13-17 band
    teen = sim.population["age_band"].long() == AGE_BANDS.index("13-17")
    assert float((age[teen] >= 16).float().mean()) == pytest.approx(0.4, abs=0.04)


def test_the_eligible_series_moves_only_on_schedule_dates(city):
    r = _vaccination_sim(city, p=0.0).run()
    total = r.series["eligible"].sum((1, 2))
    changed = {START + dt.timedelta(days=int(t)) for t in torch.nonzero(torch.diff(total)).squeeze(1) + 1}
    assert changed == {e.date for e in ELIGIBILITY}


def test_answers_persist_as_a_markov_chain(city):
    """Every agent answers every week; with persistence r the share saying yes stays p and the share
    saying yes twice is p^2 + r p (1 - p) (a two-state chain with stationary share p, correlation r)."""
    p, r = 0.3, 0.8
    sim = _vaccination_sim(city, p=p, days=8, params={"persistence": r})  # from 2020-12-01: nobody eligible
    v = sim.model("vaccination")
    seen, decide = [], v._decide

    def spy(day, date, probs):
        decide(day, date, probs)
        seen.append(v.last_yes.clone().float())

    v._decide = spy
    with torch.no_grad():
        sim.run()
    n = sim.population.n
    first, second = seen
    for share, expected in ((first.mean(), p), (second.mean(), p), ((first * second).mean(), p * p + r * p * (1 - p))):
        assert float(share) == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))


# -- conservation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eager(city):
    """High willingness (supply binds for months), default persistence, Dec 2020 - Jun 2021."""
    with torch.no_grad():
        sim = _vaccination_sim(city, p=0.6, seed=5)
        return sim, sim.run()


def test_doses_never_exceed_eligible_people_or_the_supply(eager):
    sim, r = eager
    v = sim.model("vaccination")
    first, full, eligible = r.series["vaccinated_1"], r.series["vaccinated_full"], r.series["eligible"]
    assert bool((first <= eligible).all())  # in every borough x age band cell, every day
    assert bool((full <= first).all())
    assert bool((torch.diff(first, dim=0) >= 0).all()) and bool((torch.diff(full, dim=0) >= 0).all())
    for week in v.weeks:
        assert week["served"] <= math.floor(week["supply"]) + 1 and week["served"] <= week["at_risk"]
    # first doses given by each day never exceed the supply of the weeks decided so far (+1 rounding each)
    given = first.sum((1, 2))
    for i, week in enumerate(v.weeks):
        end = min(week["day"] + 6, sim.days - 1)
        allowed = sum(w["supply"] for w in v.weeks[: i + 1]) + (i + 1)
        assert float(given[end]) <= allowed
    # the supply bound: the city's first doses scaled to the agents
    residents = sum(v.residents.values())
    observed = sum(city_first_doses(START, sim.days)) * sim.population.n / residents
    assert float(given[-1]) <= observed + len(v.weeks)
    assert float(given[-1]) > 0.5 * observed  # willingness 0.6 with persistence: the supply was used


def test_second_doses_follow_the_interval(eager):
    sim, _ = eager
    s = sim.model("vaccination").final_state
    given = s["dose1_day"] >= 0
    product = s["product"][given]
    gap = (s["dose2_day"] - s["dose1_day"])[given]
    assert bool((gap[product == 0] == 21).all()) and bool((gap[product == 1] == 28).all())
    assert bool((s["dose2_day"][given][product == 2] == -1).all())
    # Janssen only from 2021-03-03 (booked from the first decision on or after it)
    assert int((product == 2).sum()) > 0
    assert bool((s["dose1_day"][given][product == 2] >= _day("2021-03-03")).all())
    # dose 1 only on or after the agent's eligibility
    assert bool((s["dose1_day"][given] >= s["eligible_day"][given]).all())


def test_coverage_is_the_supply_when_everyone_is_willing(city):
    """Willingness 1 and no persistence: every week the supply (the city's first doses) binds, so the
    simulated city-wide coverage tracks the observed one (up to the lag of the weekly bookings)."""
    with torch.no_grad():
        r = _vaccination_sim(city, p=0.999, days=121, params={"persistence": 0.0}).run()  # to 2021-03-31
    pop = city[0]
    table = load_vaccination()
    obs = table[(table["dimension"] == "borough") & (table["group"] == "NYC") & (table["date"] == "2021-03-31")]
    observed_share = float(obs["people_1plus"].iloc[0]) / sum(pop.residents)
    simulated_share = float(r.series["vaccinated_1"][-1].sum()) / pop.n
    assert simulated_share == pytest.approx(observed_share, rel=0.06)


# -- efficacy and waning ------------------------------------------------------------------------------
def test_protection_has_its_analytic_form():
    v = Vaccination()
    p = v.params
    day = 300
    # 0: unvaccinated; 1: dose 1 ten days ago; 2: dose 1 twenty days ago (Pfizer, dose 2 tomorrow);
    # 3: full Moderna 100 days after protection; 4: Janssen 50 days after protection
    v.product = torch.tensor([-1, 0, 0, 1, 2])
    v.dose1_day = torch.tensor([-1, day - 10, day - 20, day - 135, day - 64])
    v.full_day = torch.tensor([-1, day + 11, day + 1, day - 107, day - 64])
    ve_inf, ve_sev = v.protection(day)
    expected_inf = [0.0, 0.0, p.ve_infection[0], p.ve_infection[1] * math.exp(-p.waning_infection * 100),
                    p.ve_infection[2] * math.exp(-p.waning_infection * 50)]
    expected_sev = [0.0, 0.0, p.ve_severe[0], p.ve_severe[1] * math.exp(-p.waning_severe * 100),
                    p.ve_severe[2] * math.exp(-p.waning_severe * 50)]
    torch.testing.assert_close(ve_inf, torch.tensor(expected_inf), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ve_sev, torch.tensor(expected_sev), rtol=1e-5, atol=1e-6)
    # 20 weeks after full protection: about 0.70 against infection (Andrews et al. 2022)
    assert p.ve_infection[1] * math.exp(-p.waning_infection * 140) == pytest.approx(0.70, abs=1e-6)


class _Protected:
    """Publishes fixed susceptibility and severity multipliers (what Vaccination publishes)."""

    name = "protected"
    decisions = ()
    observes = ()
    publishes = ("susceptibility", "severity")
    reads = ()
    state = ()
    results = ()

    def __init__(self, susceptibility, severity):
        self.out = {"susceptibility": susceptibility, "severity": severity}

    def parameters(self):
        return {}

    def set_parameters(self, values):
        pass

    def setup(self, sim):
        pass

    def init(self, sim):
        pass

    def context(self, decision, day, date):
        return {}

    def observe(self, day):
        return {}

    def step(self, day, date, inputs):
        return self.out

    def finish(self):
        return {}


def test_efficacy_and_waning_reproduce_their_analytic_forms_in_the_epidemic():
    """Households of two, one index case each, fixed latent 10 d and infectious 5 d: the contact is
    exposed to force beta for exactly D = 5 days, so its attack rate is 1 - exp(-m beta D) with m its
    susceptibility multiplier. Contacts in boroughs 0-1 are vaccinated (full Moderna, 100 days after
    protection: m = 1 - VE(100)); hospitalisations per symptomatic infection fall by the severity
    multiplier."""
    v = Vaccination()
    v.product, v.dose1_day, v.full_day = torch.tensor([1]), torch.tensor([0]), torch.tensor([28])
    ve_inf, ve_sev = (float(x) for x in v.protection(28 + 7 + 100))
    m = 1.0 - ve_inf
    severity = (1.0 - ve_sev) / (1.0 - ve_inf)
    households, beta, d = 30000, 0.3, 5
    n = 2 * households
    borough = (torch.arange(households) % 5).repeat_interleave(2)
    pop = Population({"borough": borough.to(torch.int8), "age_band": torch.full((n,), 5, dtype=torch.int8),
                      "household": torch.arange(households, dtype=torch.int32).repeat_interleave(2),
                      "school": torch.full((n,), -1, dtype=torch.int32),
                      "workplace": torch.full((n,), -1, dtype=torch.int32)},
                     {"borough": BOROUGHS, "age_band": AGE_BANDS})
    vaccinated = borough < 2
    susceptibility = torch.where(vaccinated, m, 1.0)
    sev = torch.where(vaccinated, severity, 1.0)
    params = EpidemicParams(susceptibility=(1.0,) * 10, rel_infectiousness_asymptomatic=1.0, beta_household=beta,
                            beta_school=0, beta_workplace=0, beta_community=0, latent_mean=10, latent_shape=1e5,
                            infectious_mean=d, infectious_shape=1e5, p_symptomatic=(1.0,) * 10, ihr=(0.5,) * 10,
                            hosp_delay=0)
    index = torch.zeros(n, dtype=torch.bool)
    index[::2] = True
    with torch.no_grad():
        r = Simulation(pop, [_Protected(susceptibility, sev), Epidemic(params, initial_infected=index)],
                       days=10 + d + 1 + 11, seed=3).run()
    infected = r.series["new_infections"][1:].sum((0, 2))  # (B,) contacts infected
    contacts = torch.bincount(borough[1::2], minlength=5).to(torch.float32)
    for group, mult in ((torch.tensor([0, 1]), m), (torch.tensor([2, 3, 4]), 1.0)):  # vaccinated: boroughs 0-1
        k = float(contacts[group].sum())
        sar, expected = float(infected[group].sum()) / k, 1 - math.exp(-mult * beta * d)
        assert abs(sar - expected) < 4 * math.sqrt(expected * (1 - expected) / k), (mult, sar, expected)
    hosp = r.series["hospitalized"].sum((0, 2))
    symp = r.series["new_symptomatic"].sum((0, 2))
    ratio_v = float(hosp[:2].sum() / symp[:2].sum())
    ratio_u = float(hosp[2:].sum() / symp[2:].sum())
    assert ratio_u == pytest.approx(0.5, abs=0.02)
    assert ratio_v == pytest.approx(0.5 * severity, abs=4 * math.sqrt(0.25 * severity / float(symp[:2].sum())) + 0.005)


def test_protection_in_gradient_mode_has_the_same_forward_and_a_gradient():
    """With gradients on, the susceptibility multiplier enters the infection probability of the score
    weights: the forward is the fast path's, and d(infections)/d(beta) is finite and positive."""
    from tests.test_epidemic import population

    pop = population(2000, 3, school=50, work=100, seed=2)
    g = torch.Generator().manual_seed(0)
    susceptibility = torch.where(torch.rand(pop.n, generator=g) < 0.5, 0.2, 1.0)
    severity = torch.full((pop.n,), 0.5)
    index = torch.zeros(pop.n, dtype=torch.bool)
    index[::50] = True

    def run(beta):
        sim = Simulation(pop, [_Protected(susceptibility, severity),
                               Epidemic(EpidemicParams(), tensors={"beta_scale": beta}, initial_infected=index)],
                         days=25, seed=1)
        return sim.run().series["new_infections"]

    with torch.no_grad():
        fast = run(torch.tensor(1.5))
    beta = torch.tensor(1.5, requires_grad=True)
    slow = run(beta)
    torch.testing.assert_close(slow.detach(), fast)
    (grad,) = torch.autograd.grad(slow.sum(), beta)
    assert math.isfinite(float(grad)) and float(grad) > 0


# -- the runner with a mocked LLM ------------------------------------------------------------------------
def _answer(request: httpx.Request) -> httpx.Response:
    return logprob_completion(json.loads(request.content)["model"], 0.6, prompt_tokens=40)


def test_the_runner_runs_epidemic_and_vaccination_with_a_mocked_llm(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret")
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    config = {
        "name": "vacc", "model": "epidemic+vaccination",
        "population": {"source": "nyc", "scale": 0.001, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": ENDPOINT, "api_key_env": "LPM_TEST_KEY",
                "cache_mode": "off", "max_retries": 0},
        "decisions": {"vaccinate": {"prompt": "vaccination.yaml"}},
        "epidemic": {"initial_infections_per_100k": [500.0] * 5},
        "interventions": {"preset": "none"},
        "start_date": "2021-01-05", "days": 21, "seeds": [0], "outputs": {"plots": False},
    }
    (tmp_path / "vacc.yaml").write_text(yaml.safe_dump(config))
    prompts = []

    def answer(request):
        prompts.append(json.loads(request.content)["messages"][-1]["content"])
        return _answer(request)

    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=answer)
        result = Experiment.from_yaml(tmp_path / "vacc.yaml").run(tmp_path / "run")
    assert route.call_count == 3 * 10  # 3 weekly steps x 10 archetypes
    assert any("people aged 65 and older" in p for p in prompts[10:])  # eligible from 2021-01-12
    assert "per 100,000" in prompts[0] and "% of residents" in prompts[0]
    m = result.metrics
    assert {"vaccinated_1", "vaccinated_full", "doses", "eligible"} <= set(m.columns)
    assert float(m[m["date"] == m["date"].max()]["vaccinated_1"].sum()) > 0
    assert (result.decisions["decision"] == "vaccinate").all()


# -- gradients ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gradient_reaches_the_vaccination_alignment(city):
    """d(first doses by day 34)/d(alignment shift b), AD (score function over the agents' willingness
    and service draws, persistence 0.9) against central differences of the same seeds (common random
    numbers). March 2021: broad eligibility, low willingness, so the supply does not bind. Measured:
    AD 442.0, FD 453.3 +- 9.7 (a latent Gaussian propensity instead of the Markov chain gave AD 887, FD 604)."""
    seeds, b0, h = range(8), -1.0, 0.3
    start = dt.date(2021, 3, 1)

    def run(b, seed):
        sim = _vaccination_sim(city, p=0.1, start=start, days=35, seed=seed,
                               alignment={"vaccinate": lambda q: align(q, 1.0, b)})
        return sim.run().series["vaccinated_1"][-1].sum()

    ad, fd = [], []
    for s in seeds:
        b = torch.tensor(b0, requires_grad=True)
        (g,) = torch.autograd.grad(run(b, s), b)
        ad.append(float(g))
        with torch.no_grad():
            fd.append((float(run(torch.tensor(b0 + h), s)) - float(run(torch.tensor(b0 - h), s))) / (2 * h))
    ad_t, fd_t = torch.tensor(ad), torch.tensor(fd)
    se = float(torch.sqrt(ad_t.var() / len(ad) + fd_t.var() / len(fd)))
    assert float(fd_t.mean()) > 10 * se  # the check can tell a wrong gradient apart
    # central difference of a smooth expectation over +-0.3 in b: curvature error within a few %
    assert abs(float(ad_t.mean() - fd_t.mean())) < 4 * se + 0.05 * float(fd_t.mean()), (ad, fd)


def test_params_validation():
    with pytest.raises(ValueError, match="mix"):
        VaccinationParams(mix=(0.5, 0.4, 0.2))
    with pytest.raises(ValueError, match="comorbidity_by_band"):
        VaccinationParams(comorbidity_by_band=(0.1,) * 3)
    with pytest.raises(ValueError, match="extra"):
        Vaccination({"efficacy": 0.9})
