"""The whole-period fit (issue 15): the smoothness penalty and its gradient, the penalty in the objective,
monthly transmission values in the right months, the variants' importation rates and their update, the
vaccination question's first date, and covid_nyc_2021.yaml on a tiny city over the whole period with every
model (the LLM mocked)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import respx
import torch

from lpm_llm.calibrate.fit import SimulationObjective
from lpm_llm.calibrate.period import PeriodObjective, lineage_errors, period_space, update_variant_rates
from lpm_llm.calibrate.targets import observed_weekly, smoothness_penalty
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.model import DecisionUse, decision_day
from lpm_llm.core.sim import Simulation
from lpm_llm.models import Epidemic, EpidemicParams, Vaccination
from lpm_llm.models._codes import FATED
from lpm_llm.models.vaccination import FIRST_QUESTION
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.runner.experiment import Experiment
from tests.conftest import logprob_completion

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers


@pytest.fixture(scope="module")
def tiny():
    return synthesize_nyc(scale=0.001, seed=0)


def test_smoothness_penalty_is_a_random_walk_on_log_transmission_and_its_gradient_is_analytic():
    w = 0.3
    log_c = torch.tensor([0.2, -0.1, -0.1, 0.4, 0.0], dtype=torch.float64, requires_grad=True)
    penalty = smoothness_penalty(torch.exp(log_c), w)
    path = [0.0, *log_c.tolist()]  # month 0 is 1 (log 0)
    steps = [b - a for a, b in zip(path, path[1:], strict=False)]
    assert float(penalty.detach()) == pytest.approx(w * sum(d**2 for d in steps), rel=1e-12)
    (grad,) = torch.autograd.grad(penalty, log_c)
    expected = [2 * w * ((path[m] - path[m - 1]) - (path[m + 1] - path[m] if m + 1 < len(path) else 0.0))
                for m in range(1, len(path))]
    assert grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert float(smoothness_penalty(torch.ones(15), w)) == 0.0  # no change costs nothing
    # one step of x at month 3 costs w x^2 once, wherever it is; a spike up and down costs it twice
    step = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0])
    spike = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0])
    assert float(smoothness_penalty(step, w)) == pytest.approx(w * math.log(2) ** 2, rel=1e-6)
    assert float(smoothness_penalty(spike, w)) == pytest.approx(2 * w * math.log(2) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="smoothness weight"):
        smoothness_penalty(step, -1.0)


def test_the_penalty_enters_the_objective(tiny):
    weeks = 9  # into May 2020: two months of transmission_change
    sim = Simulation(tiny, [Epidemic(EpidemicParams(initial_infections_per_100k=(300.0,) * 5))],
                     interventions=nyc_2020(), start_date="2020-03-01", days=7 * weeks, seed=0)
    obs = observed_weekly("2020-03-01", weeks, ("cases", "deaths"))
    change = torch.tensor([0.5, 0.8], requires_grad=True)
    values = {"transmission_change": change}
    plain = SimulationObjective(sim, obs, weeks=weeks, scale=tiny.scale)
    smooth = SimulationObjective(sim, obs, weeks=weeks, scale=tiny.scale, smoothness=0.4)
    with torch.no_grad():
        gap = float(smooth(values, 2)) - float(plain(values, 2))
    assert gap == pytest.approx(0.4 * (math.log(0.5) ** 2 + math.log(0.8 / 0.5) ** 2), rel=1e-5)
    assert smooth.last is not None and "symptomatic_by_lineage" in smooth.last.series


def test_monthly_transmission_values_enter_their_months(tiny):
    """Over the whole period (487 days from 2020-03-01) each day's layer rates are the schedule's times
    the change of the day's calendar month (March 2020: 1; April 2020: the first value; ...)."""
    change = torch.linspace(0.5, 1.9, 15)
    rates = {}
    for name, tensors in (("flat", None), ("monthly", {"transmission_change": change})):
        model = Epidemic(EpidemicParams(initial_infections_per_100k=(0.0,) * 5), tensors=tensors)
        sim = Simulation(tiny, [model], interventions=nyc_2020(), start_date="2020-03-01", days=487, seed=0)
        sim.day_multipliers = [sim.interventions.multipliers(d) for d in sim.dates]
        model.init(sim)
        rates[name] = model.rates
    ratio = (rates["monthly"] / rates["flat"].clamp(min=1e-12))[:, 0]  # household layer, never 0
    start = dt.date(2020, 3, 1)
    for day, expected in (("2020-03-31", 1.0), ("2020-04-01", change[0]), ("2020-04-30", change[0]),
                          ("2020-05-01", change[1]), ("2020-12-15", change[8]), ("2021-01-01", change[9]),
                          ("2021-06-30", change[14])):
        t = (dt.date.fromisoformat(day) - start).days
        assert float(ratio[t]) == pytest.approx(float(expected), rel=1e-5), day


def test_variant_importation_rates_are_set_and_updated_towards_the_observed_shares(tiny):
    model = Epidemic(EpidemicParams(importation_per_100k=0.5))
    sim = Simulation(tiny, [model], start_date="2020-10-01", days=240, seed=0)
    model.set_variant_importation([1.0, 2.0, 3.0, 4.0])
    sim.day_multipliers = [sim.interventions.multipliers(d) for d in sim.dates]
    model.init(sim)
    hazard = model.importation  # (T, 1 + variants)
    for j, v in enumerate(model.params.variants):
        t = (v.introduced - sim.start_date).days
        assert float(hazard[t, j + 1]) == pytest.approx((j + 1) / 1e5, rel=1e-6) and float(hazard[t - 1, j + 1]) == 0.0
    assert float(hazard[0, 0]) == pytest.approx(0.5 / 1e5, rel=1e-6)
    with pytest.raises(ValueError, match="one per variant"):
        model.set_variant_importation([1.0])
    # the update: towards the observed share, damped, clipped, within bounds; a variant never sequenced holds
    new = update_variant_rates([1.0, 1.0, 1.0, 50.0], ["A", "B", "C", "D"], {"A": 0.4, "B": -6.0, "D": 5.0},
                               step=0.5, max_move=1.0, bounds=(1e-3, 100.0))
    assert new == pytest.approx([math.exp(0.2), math.exp(-1.0), 1.0, 100.0])


def test_lineage_errors_point_from_simulated_to_observed_shares():
    """A run whose onsets are all of the resident lineage has every variant's share at 0: each variant
    sequenced in its periods gets a positive log ratio (its rate should rise)."""
    params = EpidemicParams()
    start = dt.date(2020, 12, 6)
    onsets = torch.zeros(200, 1 + len(params.variants))
    onsets[:, 0] = 10.0
    loss, ratio = lineage_errors(onsets, start, params)
    assert loss > 0 and set(ratio) == {v.lineage for v in params.variants}
    assert all(r > 0 for r in ratio.values())
    onsets[:, 2] = 1e6  # Alpha everywhere: its share is far above the sequenced one
    _, ratio = lineage_errors(onsets, start, params)
    assert ratio["B.1.1.7"] < 0


def test_the_vaccination_question_is_not_asked_before_its_first_date(tiny):
    use = DecisionUse("vaccinate", every_days=7, first=dt.date(2020, 11, 30))
    assert not decision_day(use, 273, dt.date(2020, 11, 29))  # a cadence day, before the first date
    assert decision_day(use, 280, dt.date(2020, 12, 6))
    assert not decision_day(use, 281, dt.date(2020, 12, 7))  # after it, the cadence holds
    arch = ArchetypeSpec(name="borough", method="group", attributes=["borough"]).assign(tiny)
    sim = Simulation(tiny, [Vaccination({"prior_immunity": False})], archetypes=arch,
                     decisions={"vaccinate": ConstantDecision(0.5, arch.k)}, decision_every={"vaccinate": 7},
                     start_date="2020-03-01", days=300, seed=0)
    results = sim.run()
    asked = sorted(set(results.decisions["date"]))
    assert asked[0] >= FIRST_QUESTION and asked[0] - FIRST_QUESTION < dt.timedelta(days=7)
    assert len(asked) == len(range(280, 300, 7))


def test_period_space_and_hospitalisation_scale(tiny):
    model = Epidemic(EpidemicParams(importation_per_100k=0.5))
    sim = Simulation(tiny, [model], start_date="2020-03-01", days=70, seed=0)
    space = period_space(sim)
    assert {"transmission_change", "importation_per_100k", "hospitalisation_scale"} <= set(space.names)
    obs = observed_weekly("2020-03-01", 10, ("hospitalized",))
    objective = PeriodObjective(sim, obs, weeks=10, scale=tiny.scale, epidemic=model)
    values = space.values()
    values["hospitalisation_scale"] = torch.tensor(2.0)
    with torch.no_grad():
        objective(values, 0)
    assert model.tensor_overrides["ihr"].tolist() == pytest.approx([2 * x for x in model.params.ihr])


@pytest.mark.slow
def test_the_2021_experiment_covers_the_whole_period_with_every_model(tmp_path: Path, monkeypatch):
    """covid_nyc_2021.yaml loads; on a 1:1000 city with a mocked LLM it runs 2020-03-01 .. 2021-06-30 with
    the epidemic (importation, lineages, waning) and vaccination, asks only from 2020-11-30, and writes
    lineage shares and the plots of cases, admissions, deaths, coverage and lineages."""
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret")
    (tmp_path / "arch.yaml").write_text("{name: borough, method: group, attributes: [borough]}\n")
    exp = Experiment.from_yaml(ROOT / "experiments/covid_nyc_2021.yaml", [
        "population.scale=0.001", f"archetypes={tmp_path / 'arch.yaml'}", "llm.provider=openai",
        "llm.model=mock-model", f"llm.base_url={ENDPOINT}",
        "llm.api_key_env=LPM_TEST_KEY", "llm.cache_mode='off'", "llm.max_retries=0", "outputs.behaviour=false"])
    cfg = exp.config
    assert cfg.start_date == dt.date(2020, 3, 1) and cfg.days == 487 and cfg.model_names == ["epidemic", "vaccination"]
    assert cfg.epidemic.importation_per_100k > 0 and len(cfg.epidemic.transmission_change) == 15

    def answer(request):
        return logprob_completion(json.loads(request.content)["model"], 0.6, prompt_tokens=40)

    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=answer)
        result = exp.run(tmp_path / "run")
    m = result.metrics
    assert m["date"].min() == pd.Timestamp("2020-03-01") and m["date"].max() == pd.Timestamp("2021-06-30")
    last = m[m["date"] == m["date"].max()]
    assert float(last["vaccinated_1"].sum()) > 0
    assert float(m["new_infections"].sum()) > 0
    asked = pd.to_datetime(result.decisions["date"]).dt.date
    assert asked.min() >= FIRST_QUESTION and asked.nunique() == 30  # 2020-12-06 .. 2021-06-27, weekly
    lineages = pd.read_csv(tmp_path / "run" / "lineages.csv")
    assert set(lineages["variant"]) >= {"B.1.1.7", "B.1.617.2", "Other"}
    assert lineages["period_start"].min() == "2021-01-03"
    for png in ("cases", "hospitalized", "deaths", "coverage", "lineages"):
        assert (tmp_path / "run" / f"{png}.png").stat().st_size > 0


def _fated(tiny, fatality, *, tensors=None, grad=False):
    """A 70-day run from 2020-03-01 (lifelong immunity: who dies changes nobody's later infections);
    returns (onset day, fated) of every agent who had an onset, and the run's deaths series."""
    params = EpidemicParams(initial_infections_per_100k=(400.0,) * 5, fatality_scale=fatality, immunity_mean=None)
    model = Epidemic(params, tensors=tensors)
    sim = Simulation(tiny, [model], interventions=nyc_2020(), start_date="2020-03-01", days=70, seed=3,
                     checkpoint_days=7)
    with torch.set_grad_enabled(grad):
        results = sim.run()
    state = model.final_state
    had = state.onset_day >= 0
    return state.onset_day[had].long(), (state.flags[had] & FATED) != 0, results.series["deaths"]


def test_fatality_by_month_applies_to_the_onsets_of_its_month(tiny):
    """With the same draws, a fatality of (2, 0) by month fates exactly the agents a constant 2 fates
    among March's onsets (days 0-30) and none after; (2, 2) is the constant 2, bit for bit."""
    onset, fated_const, deaths_const = _fated(tiny, 2.0)
    onset_m, fated_month, deaths_month = _fated(tiny, (2.0, 0.0))
    assert torch.equal(onset, onset_m)  # the same epidemic
    march = onset <= 30
    assert int(fated_const[~march].sum()) > 5 and int(fated_const[march].sum()) > 5  # both months have some
    assert torch.equal(fated_month[march], fated_const[march]) and not bool(fated_month[~march].any())
    assert float(deaths_month.sum()) < float(deaths_const.sum())
    assert torch.equal(_fated(tiny, (2.0, 2.0))[2], deaths_const)
    with pytest.raises(ValueError, match="fatality_scale must be"):
        EpidemicParams(fatality_scale=(1.0, 11.0))


def test_fatality_by_month_is_calibrated_with_gradients_for_each_month(tiny):
    """A monthly fatality_scale is a (months,) parameter (the last value held), its gradient reaches each
    month through the checkpointed segments, and its moves pay the unanchored smoothness penalty."""
    model = Epidemic(EpidemicParams(fatality_scale=(0.5, 0.8)))
    sim = Simulation(tiny, [model], start_date="2020-03-01", days=100, seed=0)
    spec = period_space(sim, hospitalisation=False).to_dict()["fatality_scale"]
    assert spec == pytest.approx([0.5, 0.8, 0.8, 0.8])  # March .. June, the last value held
    fatality = torch.tensor([2.0, 2.0, 2.0], requires_grad=True)
    _, _, deaths = _fated(tiny, 1.0, tensors={"fatality_scale": fatality}, grad=True)
    (grad,) = torch.autograd.grad(deaths.sum(), fatality)
    assert bool(torch.isfinite(grad).all()) and bool((grad[:2] > 0).all())  # March's and April's onsets die by May
    w, values = 0.3, torch.tensor([2.0, 1.0, 1.0, 0.5])
    path = values.log()
    assert float(smoothness_penalty(values, w, anchored=False)) == pytest.approx(
        w * float(path.diff().pow(2).sum()), rel=1e-6)
    weeks = 9
    sim = Simulation(tiny, [Epidemic(EpidemicParams(initial_infections_per_100k=(300.0,) * 5))],
                     interventions=nyc_2020(), start_date="2020-03-01", days=7 * weeks, seed=0)
    obs = observed_weekly("2020-03-01", weeks, ("cases", "deaths"))
    monthly = {"fatality_scale": torch.tensor([1.5, 1.0, 0.5])}
    plain = SimulationObjective(sim, obs, weeks=weeks, scale=tiny.scale)
    smooth = SimulationObjective(sim, obs, weeks=weeks, scale=tiny.scale, smoothness=w)  # the same weight
    own = SimulationObjective(sim, obs, weeks=weeks, scale=tiny.scale, smoothness=w, fatality_smoothness=0.05)
    with torch.no_grad():
        base = float(plain(monthly, 2))
        gap, own_gap = float(smooth(monthly, 2)) - base, float(own(monthly, 2)) - base
        scalar = {"fatality_scale": torch.tensor(1.5)}
        assert float(smooth(scalar, 2)) == float(plain(scalar, 2))  # one value: nothing to smooth
    assert gap == pytest.approx(w * (math.log(1.5) ** 2 + math.log(2.0) ** 2), rel=1e-5)
    assert own_gap == pytest.approx(0.05 * (math.log(1.5) ** 2 + math.log(2.0) ** 2), rel=1e-5)
