"""A new model written entirely in this file, with no change to the library: mask wearing.

It has one decision (``mask``: does this person wear a mask this week?, asked per archetype), one
per-agent state column (``wearing``), one calibrated parameter (``habit``: the share of last week's
wearers who keep wearing whatever they answer) and one result series (``masked``: the share of each
borough x age band cell wearing a mask). It is coupled to the epidemic by data: it reads the
epidemic's ``cases_week`` and shows it in its prompt. The test runs it through ``Simulation``,
through the experiment runner (``model: epidemic+mask``, registered here) with a mocked LLM
endpoint, and through one Adam step of the calibration loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import respx
import torch
import yaml

from lpm_llm.calibrate import Calibrator
from lpm_llm.core.behavior import ConstantDecision, PerArchetype
from lpm_llm.core.model import DecisionUse, Model
from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.core.sim import Simulation
from lpm_llm.models import Epidemic, register_model
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.runner.experiment import Experiment
from tests.conftest import logprob_completion

ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers


class MaskModel:
    """Weekly mask decisions; last week's wearers keep wearing with probability ``habit``."""

    name = "mask"
    decisions = (DecisionUse("mask", every_days=7),)
    observes = ()
    publishes = ("wearing",)
    reads = ("cases_week",)
    state = ("wearing",)
    results = ("masked",)

    def __init__(self, habit: float = 0.5):
        self.habit = torch.tensor(habit)
        self.contexts: list[dict] = []

    def parameters(self) -> dict[str, Bounded]:
        return {"habit": Bounded(0.0, 1.0, float(self.habit), doc="share of wearers who keep wearing")}

    def set_parameters(self, values):
        self.habit = values["habit"]

    def setup(self, sim):
        self.sim = sim
        pop = sim.population
        self.cell = (pop["borough"].long() * len(sim.age_bands) + pop["age_band"].long()).to(sim.device)
        self.size = torch.bincount(self.cell, minlength=len(sim.areas) * len(sim.age_bands)).clamp(min=1)

    def init(self, sim):
        self.wearing = torch.zeros(sim.population.n, device=sim.device)
        self.days: list[torch.Tensor] = []

    def observe(self, day):
        return {}

    def context(self, decision, day, date):
        if decision != "mask":
            return {}
        cases = self.sim.data.get("cases_week")  # the epidemic's reported cases per 100k, by borough
        shown = [f"{float(cases[h]):.0f}" if cases is not None else "unknown" for h in self.sim.home]
        return {"cases_per_100k": PerArchetype(shown)}

    def step(self, day, date, inputs):
        if "mask" in inputs.decided:
            answered = inputs.decisions["mask"]  # (N,) draws, straight-through with gradients
            self.wearing = self.habit * self.wearing + (1 - self.habit * self.wearing) * answered
        cells = torch.zeros(self.size.shape, device=self.wearing.device).index_add(0, self.cell, self.wearing)
        self.days.append((cells / self.size).view(len(self.sim.areas), len(self.sim.age_bands)))
        return {"wearing": self.wearing}

    def finish(self):
        return {"masked": torch.stack(self.days)}


def test_the_toy_model_satisfies_the_protocol():
    assert isinstance(MaskModel(), Model)


@pytest.fixture(scope="module")
def city():
    pop = synthesize_nyc(scale=0.002, seed=3)
    arch = ArchetypeSpec(name="age_borough", method="group", attributes=["age_band", "borough"]).assign(pop)
    return pop, arch


class _Recorder(ConstantDecision):
    def __init__(self, p, k):
        super().__init__(p, k=k)
        self.contexts = []

    def probabilities(self, context):
        self.contexts.append(dict(context))
        return super().probabilities(context)


def test_simulation_runs_the_toy_model_beside_the_epidemic(city):
    pop, arch = city
    source = _Recorder(0.4, arch.k)
    with torch.no_grad():
        results = Simulation(pop, [Epidemic(), MaskModel(habit=0.0)], archetypes=arch,
                             decisions={"mask": source, "isolate": ConstantDecision(0.1, k=arch.k)},
                             days=21, seed=2).run()
    # its series is recorded with the epidemic's, by day, borough and age band
    assert results.series["masked"].shape == (21, 5, len(pop.labels("age_band")))
    assert "masked" in results.daily.columns
    # habit 0: the share wearing is a fresh draw of probability 0.4 each week
    share = float((results.daily["masked"] * results.daily["population"]).sum() / results.daily["population"].sum())
    assert share == pytest.approx(0.4, abs=0.02)
    # coupled by data: its prompt context carries the epidemic's cases, and the simulation's own variables
    assert len(source.contexts) == 3 and {"date", "policies", "cases_per_100k"} <= set(source.contexts[0])
    assert source.contexts[0]["cases_per_100k"][0] == "0"  # nothing reported before day 0
    assert float(results.series["reported_cases"].sum()) > 0


def test_the_habit_carries_wearers_over(city):
    pop, arch = city
    with torch.no_grad():
        runs = {h: Simulation(pop, [Epidemic(), MaskModel(habit=h)], archetypes=arch,
                              decisions={"mask": ConstantDecision(0.4, k=arch.k)}, days=8, seed=4).run()
                for h in (0.0, 0.9)}
    last = {h: float(r.series["masked"][-1].mean()) for h, r in runs.items()}
    # two weekly steps (days 0 and 7), independent answers a1, a2 ~ Bernoulli(p):
    # w = h a1 + (1 - h a1) a2, so E[w] = p + h p - h p^2 (habit 0: p)
    p, h = 0.4, 0.9
    assert last[0.0] == pytest.approx(p, abs=0.03)
    assert last[0.9] == pytest.approx(p + h * p - h * p * p, abs=0.03)


def _mask_answer(request: httpx.Request) -> httpx.Response:
    return logprob_completion(json.loads(request.content)["model"], 0.7, prompt_tokens=30)


def test_the_runner_runs_a_registered_toy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    register_model("mask", lambda cfg: MaskModel(**cfg.model_params.get("mask", {})))
    monkeypatch.setenv("LPM_TEST_KEY", "sk-test-not-a-secret")
    (tmp_path / "mask.yaml").write_text(yaml.safe_dump({
        "name": "mask", "answer": "yes_no", "input_variables": ["description", "date", "cases_per_100k"],
        "system": "Reply Yes or No.",
        "user": "It is {date}. You are {description}. Cases per 100,000: {cases_per_100k}. Do you wear a mask?",
    }))
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(
        {"name": "sex_borough", "method": "group", "attributes": ["sex", "borough"]}))
    config = {
        "name": "toy", "model": "epidemic+mask", "model_params": {"mask": {"habit": 0.0}},
        "population": {"source": "nyc", "scale": 0.001, "seed": 1},
        "archetypes": str(tmp_path / "arch.yaml"),
        "llm": {"provider": "openai", "model": "mock-model", "base_url": ENDPOINT, "api_key_env": "LPM_TEST_KEY",
                "cache_mode": "off", "max_retries": 0},
        "decisions": {"mask": {"prompt": str(tmp_path / "mask.yaml"), "every_days": 7}},
        "days": 14, "seeds": [0], "outputs": {"plots": False},
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_mask_answer)
        result = Experiment.from_yaml(tmp_path / "toy.yaml").run(tmp_path / "run")
    assert route.call_count == 2 * 10  # 2 weekly steps x 10 archetypes
    metrics = result.metrics
    share = float((metrics["masked"] * metrics["population"]).sum() / metrics["population"].sum())
    assert share == pytest.approx(0.7, abs=0.05)
    assert (result.decisions["decision"] == "mask").all()


def test_one_calibration_step_moves_the_toy_models_parameter(city):
    pop, arch = city
    sim = Simulation(pop, [Epidemic(), MaskModel(habit=0.2)], archetypes=arch,
                     decisions={"mask": ConstantDecision(0.4, k=arch.k)}, days=15, seed=1)
    declared = sim.parameters()
    assert {"habit", "mask_alignment_a", "mask_alignment_b", "beta_scale"} <= set(declared)
    space = ParameterSpace({k: declared[k] for k in ("habit", "mask_alignment_a", "mask_alignment_b")})
    target = 0.8  # more wearing than the model gives: habit and the alignment shift must both rise

    def objective(values, seeds):
        losses = []
        for s in seeds:
            sim.set_parameters(values)
            sim.seed = s
            losses.append((sim.run().series["masked"][-1].mean() - target) ** 2)
        return torch.stack(losses).mean()

    before = {k: float(v) for k, v in space.values().items()}
    fit = Calibrator(space, method="adam", steps=1, lr=0.1).fit(objective)
    after = fit.params_
    assert after["habit"] > before["habit"] and after["mask_alignment_b"] > before["mask_alignment_b"]
