"""The epidemic model: analytic attack rates, determinism, conservation, interventions, isolation,
gradients."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.core.interventions import InterventionSchedule, SchoolClosure
from lpm_llm.core.rng import Draws
from lpm_llm.models.epidemic import STATES, EpidemicParams, duration_pmf
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
from tests.conftest import epidemic_sim

pytestmark = pytest.mark.usefixtures("one_thread")


def population(n_households: int, size: int, *, seed: int = 0, school: int = 0, work: int = 0) -> Population:
    """Households of `size`; every agent in a random one of `school` classrooms / `work` workplaces."""
    n = n_households * size
    g = torch.Generator().manual_seed(seed)
    cols = {
        "borough": torch.randint(0, 5, (n,), generator=g).to(torch.int8),
        "age_band": torch.randint(0, 10, (n,), generator=g).to(torch.int8),
        "household": torch.arange(n_households, dtype=torch.int32).repeat_interleave(size),
        "school": (torch.randint(0, school, (n,), generator=g) if school else torch.full((n,), -1)).to(
            torch.int32
        ),
        "workplace": (torch.randint(0, work, (n,), generator=g) if work else torch.full((n,), -1)).to(
            torch.int32
        ),
    }
    return Population(cols, {"borough": BOROUGHS, "age_band": AGE_BANDS})


class _Arch:
    def __init__(self, pop: Population):
        self.index = pop["borough"].to(torch.int32)
        self.k = len(BOROUGHS)


FLAT = dict(  # no age structure: every agent equally susceptible and infectious
    susceptibility=(1.0,) * 10,
    rel_infectiousness_asymptomatic=1.0,
)


def run(pop, params, **kw):
    with torch.no_grad():
        return epidemic_sim(pop, params, **kw).run()


# -- analytic ---------------------------------------------------------------------------------------
def test_household_secondary_attack_rate():
    """One index case per household, fixed latent 10 d and infectious 5 d: every household member is
    exposed for exactly D = 5 days to force beta_h / (n - 1), so SAR = 1 - exp(-beta_h * D / (n - 1)).
    The latent period (10 d) outlasts the index's infectious period, so no second generation is counted."""
    beta, d = 0.3, 5
    params = EpidemicParams(
        **FLAT,
        beta_household=beta,
        beta_school=0,
        beta_workplace=0,
        beta_community=0,
        latent_mean=10,
        latent_shape=1e5,
        infectious_mean=d,
        infectious_shape=1e5,
    )
    for size, households in ((2, 20000), (3, 15000), (5, 8000)):
        pop = population(households, size, seed=size)
        index = torch.zeros(pop.n, dtype=torch.bool)
        index[::size] = True
        r = run(pop, params, days=10 + d + 1, seed=size, initial_infected=index)
        infected = float(r.series["new_infections"].sum()) - households
        contacts = households * (size - 1)
        sar, expected = infected / contacts, 1 - math.exp(-beta * d / (size - 1))
        se = math.sqrt(expected * (1 - expected) / contacts)
        assert abs(sar - expected) < 4 * se, (size, sar, expected)
        # nobody infected after the index cases stopped being infectious
        assert float(r.series["new_infections"][1:11].sum()) == 0.0


def test_duration_distributions():
    geo = duration_pmf("exponential", 4.0)
    k = torch.arange(1, geo.numel() + 1, dtype=torch.float64)
    p = 1 / 4
    torch.testing.assert_close(geo[:50], p * (1 - p) ** (k[:50] - 1))  # a daily exit probability 1 / mean
    gam = duration_pmf("gamma", 5.1, 4.0)
    assert float(gam.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 1 day"):
        duration_pmf("gamma", 0.8, 4.0)


@pytest.mark.parametrize("kind", ["exponential", "gamma"])
@pytest.mark.parametrize("mean", [1.0, 1.3, 2.5, 3.5, 5.0, 7.0])
def test_duration_parameter_is_the_realized_mean(kind, mean):
    """A duration parameter is the mean of the whole-day durations the agents live (the issue: an
    exponential rounded up made `infectious_mean: 5` a realized 5.52 days), both of the discretised
    distribution and of draws from it by the model's own sampler."""
    from lpm_llm.models.seirm import EpidemicModel, _duration_cdf

    pmf = duration_pmf(kind, mean, 4.0)
    k = torch.arange(1, pmf.numel() + 1, dtype=torch.float64)
    assert float((pmf * k).sum()) == pytest.approx(mean, abs=1e-6)
    cdf = _duration_cdf(kind, mean, 4.0).to(torch.float32)
    draws = EpidemicModel._draw_days(cdf, Draws(1, 0).uniform(0, 200_000)).double()
    se = float(draws.std()) / math.sqrt(draws.numel())
    assert abs(float(draws.mean()) - mean) < 4 * se + 1e-9, (float(draws.mean()), mean)


def test_generation_interval_matches_simulation_and_publications():
    """The default generation interval is about 5 days (Ferretti et al. 2020: 5.0 d; Ganyani et al.
    2020: 5.2 d) and the simulated one equals ``generation_interval_pmf``: many index cases in a large
    well-mixed population at a low reproduction number, the day of each secondary infection measured
    (corrected for the few second-generation ones: mean = GI (1 + 2R) / (1 + R) to second order)."""
    from lpm_llm.models.seirm import generation_interval_pmf

    defaults = EpidemicParams()
    pmf = generation_interval_pmf(defaults)
    k = torch.arange(1, pmf.numel() + 1, dtype=torch.float64)
    gi = float((pmf * k).sum())
    assert 4.8 <= gi <= 5.4, gi
    n, n_index = 200_000, 20_000
    beta = 0.05 / defaults.infectious_mean  # R about 0.05 per index case (minus depletion)
    params = EpidemicParams(**FLAT, beta_household=0, beta_school=0, beta_workplace=0, beta_community=beta,
                            community_contacts="stylised", community_assortativity=0.0,
                            case_isolation_compliance=0.0, immunity_mean=None, variants=())
    pop = population(n, 1, seed=3)
    index = torch.zeros(n, dtype=torch.bool)
    index[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:n_index]] = True
    r = run(pop, params, days=40, seed=2, initial_infected=index)
    daily = r.series["new_infections"].sum((1, 2)).double()
    daily[0] -= n_index
    secondary = float(daily.sum())
    days = torch.arange(daily.numel(), dtype=torch.float64)
    mean_day = float((daily * days).sum()) / secondary
    r_eff = secondary / n_index / (1 + secondary / n_index)  # first-generation share, to second order
    measured = mean_day * (1 + r_eff) / (1 + 2 * r_eff)
    sd = math.sqrt(float((pmf * k * k).sum()) - gi**2)
    assert abs(measured - gi) < 4 * sd / math.sqrt(secondary) + 0.05, (measured, gi, secondary)


# -- invariants ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_pop() -> Population:
    return population(6000, 3, school=300, work=800, seed=4)


def test_same_seed_same_result_and_conservation(mixed_pop):
    # lifelong immunity: every infection leaves S for good (waning is tested on its own)
    params = EpidemicParams(initial_infections_per_100k=(300,) * 5, beta_scale=1.5, immunity_mean=None)
    arch = _Arch(mixed_pop)
    kw = dict(days=60, archetypes=arch, decisions={"isolate": ConstantDecision(0.3, k=arch.k)})
    a = run(mixed_pop, params, seed=7, **kw)
    b = run(mixed_pop, params, seed=7, **kw)
    c = run(mixed_pop, params, seed=8, **kw)
    for name in a.series:
        assert torch.equal(a.series[name], b.series[name]), name
    assert not torch.equal(a.series["new_infections"], c.series["new_infections"])
    assert a.daily.equals(b.daily)
    total = sum(a.series[s] for s in STATES)  # (T, B, A)
    size = a.series["S"][0] + a.series["E"][0]
    assert torch.equal(total, size.expand_as(total))
    for name, s in a.series.items():
        assert float(s.min()) >= 0, name
    assert float(a.series["R"][-1].sum()) > 0.2 * mixed_pop.n  # a real epidemic happened
    # the incremental prevalence equals a direct count of the final per-agent state
    st = a.final_state
    code = st.disease.long().clone()
    code[code == 5] = 3  # awaiting death is reported in R
    cell = (mixed_pop["borough"].long() * 10 + mixed_pop["age_band"].long()) * 5 + code
    direct = torch.bincount(cell, minlength=250).view(5, 10, 5).float()
    torch.testing.assert_close(direct, torch.stack([a.series[s][-1] for s in STATES], -1))
    # events add up: cumulative infections = N - S; deaths = M
    torch.testing.assert_close(a.series["new_infections"].sum(0), size - a.series["S"][-1])
    torch.testing.assert_close(a.series["deaths"].sum(0), a.series["M"][-1])


def test_gradient_mode_has_the_same_forward(mixed_pop):
    """Straight-through draws are the hard draws: with and without autograd the numbers agree."""
    params = EpidemicParams(initial_infections_per_100k=(300,) * 5)
    arch = _Arch(mixed_pop)
    kw = dict(days=25, seed=3, archetypes=arch, decisions={"isolate": ConstantDecision(0.4, k=arch.k)})
    fast = run(mixed_pop, params, **kw)
    slow = epidemic_sim(
        mixed_pop, params, tensors={"beta_scale": torch.tensor(1.0, requires_grad=True)}, **kw
    ).run()
    assert slow.series["new_infections"].requires_grad
    for name in fast.series:
        torch.testing.assert_close(fast.series[name], slow.series[name].detach(), msg=name)


# -- interventions and isolation ------------------------------------------------------------------------
def _only(layer: str, **extra) -> EpidemicParams:
    betas = dict.fromkeys(("beta_household", "beta_school", "beta_workplace", "beta_community"), 0.0)
    betas[f"beta_{layer}"] = 0.6
    return EpidemicParams(**FLAT, **betas, initial_infections_per_100k=(500,) * 5, **extra)


def test_school_closure_zeroes_school_and_nothing_else(mixed_pop):
    closure = InterventionSchedule(policies=(SchoolClosure(start="2020-03-05"),))
    open_ = run(mixed_pop, _only("school"), days=30, seed=1)
    closed = run(mixed_pop, _only("school"), days=30, seed=1, interventions=closure)
    assert float(open_.series["new_infections"][5:].sum()) > 100
    # after the closure (day 4 = 2020-03-05) no new infections at all
    assert float(closed.series["new_infections"][4:].sum()) == 0.0
    # with schools closed, a workplace-only epidemic is bit-for-bit unchanged
    work_open = run(mixed_pop, _only("workplace"), days=30, seed=1)
    work_closed = run(mixed_pop, _only("workplace"), days=30, seed=1, interventions=closure)
    assert float(work_open.series["new_infections"][5:].sum()) > 100
    for name in work_open.series:
        assert torch.equal(work_open.series[name], work_closed.series[name]), name


def test_isolation_reduces_outside_transmission_by_compliance(mixed_pop):
    arch = _Arch(mixed_pop)
    c = 0.6

    # household-only: isolation changes nothing, bit for bit
    for layer in ("household",):
        a = run(
            mixed_pop,
            _only(layer),
            days=20,
            seed=5,
            archetypes=arch,
            decisions={"isolate": ConstantDecision(0.0, k=arch.k)},
        )
        b = run(
            mixed_pop,
            _only(layer),
            days=20,
            seed=5,
            archetypes=arch,
            decisions={"isolate": ConstantDecision(1.0, k=arch.k)},
        )
        assert torch.equal(a.series["new_infections"], b.series["new_infections"])
    # community-only with everyone isolating: the force drops by (1 - c) on each side of a contact
    from lpm_llm.models.contacts import ContactLayers

    layers = ContactLayers.from_population(mixed_pop)
    g = torch.Generator().manual_seed(0)
    infectious = torch.nonzero(torch.rand(mixed_pop.n, generator=g) < 0.05).squeeze(1)
    w = torch.ones(infectious.numel())
    with torch.no_grad():
        for layer_i in (1, 2, 3):
            rates = torch.zeros(4)
            rates[layer_i] = 0.6
            base = layers.force(layers.pressure(infectious, w, w, rates))
            factor = torch.full((mixed_pop.n,), 1 - c)
            iso = layers.force(layers.pressure(infectious, w, w * (1 - c), rates), outside_factor=factor)
            torch.testing.assert_close(iso, base * (1 - c) ** 2)
        rates = torch.tensor([0.6, 0, 0, 0])
        base = layers.force(layers.pressure(infectious, w, w, rates))
        iso = layers.force(
            layers.pressure(infectious, w, w * (1 - c), rates),
            outside_factor=torch.full((mixed_pop.n,), 1 - c),
        )
        torch.testing.assert_close(iso, base)
    # and in a full run, complete isolation with compliance 1 stops community transmission
    stop = run(
        mixed_pop,
        _only("community", isolation_compliance=1.0),
        days=20,
        seed=5,
        archetypes=arch,
        decisions={"isolate": ConstantDecision(1.0, k=arch.k)},
    )
    assert float(stop.series["new_infections"][1:].sum()) == 0.0
    go = run(
        mixed_pop,
        _only("community", isolation_compliance=1.0),
        days=20,
        seed=5,
        archetypes=arch,
        decisions={"isolate": ConstantDecision(0.0, k=arch.k)},
    )
    assert float(go.series["new_infections"][1:].sum()) > 100


# -- gradients ------------------------------------------------------------------------------------------
def test_ascertainment_gradient_is_exact(mixed_pop):
    # without case isolation ascertainment only scales the reports (with it, it changes the paths too)
    params = EpidemicParams(initial_infections_per_100k=(300,) * 5, case_isolation_compliance=0.0)

    def loss(asc: torch.Tensor) -> torch.Tensor:
        sim = epidemic_sim(mixed_pop, params, days=45, seed=9, tensors={"ascertainment": asc})
        return sim.run().series["reported_cases"].pow(2).sum()

    asc = torch.tensor([0.1, 0.3], requires_grad=True)  # March, April
    (grad,) = torch.autograd.grad(loss(asc), asc)
    h = 1e-2
    for m in range(2):
        e = torch.zeros(2)
        e[m] = h
        with torch.no_grad():
            fd = (loss(asc.detach() + e) - loss(asc.detach() - e)) / (2 * h)
        assert float(grad[m]) == pytest.approx(float(fd), rel=1e-3)
        assert float(grad[m]) > 0


def test_one_day_gradient_is_unbiased_for_the_expected_count(mixed_pop):
    """Averaged over seeds, d(new infections on day 2)/d beta equals d/d beta of the expected count
    sum_j (1 - exp(-force_j)) from each seed's own infectious set (the estimator is unbiased).

    Seeds are infected on day 0 with a latent period of exactly 1 day: infectious from the end of day 1.
    """
    params = _only("community", latent_mean=1, latent_shape=1e5)
    grads, expected_grads = [], []
    for seed in range(30):
        beta = torch.tensor(0.6, requires_grad=True)
        sim = epidemic_sim(mixed_pop, params, days=3, seed=seed, tensors={"beta_community": beta})
        r = sim.run()
        assert float(r.series["new_infections"][1].detach().sum()) == 0.0
        (grad,) = torch.autograd.grad(r.series["new_infections"][2].sum(), beta)
        grads.append(float(grad))
        with torch.no_grad():  # the expectation from the state at the end of day 1
            state = epidemic_sim(mixed_pop, params, days=2, seed=seed).run().final_state
        infectious = torch.nonzero(state.disease == 2).squeeze(1)
        susceptible = state.disease == 0
        layers = sim.model("epidemic").contacts

        def expected(b: float, infectious=infectious, susceptible=susceptible, layers=layers) -> float:
            w = torch.ones(infectious.numel(), dtype=torch.float32)
            f = layers.force(layers.pressure(infectious, w, w, torch.tensor([0, 0, 0, b])))
            return float((-torch.expm1(-f.double()))[susceptible].sum())

        with torch.no_grad():
            expected_grads.append((expected(0.6 + 1e-3) - expected(0.6 - 1e-3)) / 2e-3)
    g, e = torch.tensor(grads), torch.tensor(expected_grads)
    se = float(g.std() / len(grads) ** 0.5)
    gap = abs(float(g.mean() - e.mean()))
    assert gap < 4 * se + 1e-3 * float(e.mean()), (float(g.mean()), float(e.mean()))
    assert float(e.mean()) > 10 * se  # the test can tell a wrong gradient (e.g. 0 or half) apart


def test_gradients_reach_every_calibrated_parameter(mixed_pop):
    arch = _Arch(mixed_pop)
    from lpm_llm.core.behavior import AlignmentMap

    theta = {
        "beta_scale": torch.tensor(1.0, requires_grad=True),
        "beta_workplace": torch.tensor(0.4, requires_grad=True),
        "initial_infections_per_100k": torch.full((5,), 300.0, requires_grad=True),
        "fatality_scale": torch.tensor(5.0, requires_grad=True),
        "ascertainment": torch.tensor([0.1, 0.2], requires_grad=True),
    }
    align = AlignmentMap(k=arch.k)
    sim = epidemic_sim(
        mixed_pop,
        EpidemicParams(death_delay=2),
        days=40,
        seed=2,
        tensors=theta,
        archetypes=arch,
        decisions={"isolate": ConstantDecision(0.5, k=arch.k)},
        alignment=align,
    )
    s = sim.run().series
    loss = s["reported_cases"].sum() + s["deaths"].sum() + s["hospitalized"].sum()
    loss.backward()
    for name, t in theta.items():
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0, name
    assert align.b.grad is not None and float(align.b.grad.abs().sum()) > 0
    # seeding: the score estimator gives d(day-0 infections in b)/d seeds_b = (seeded in b) / seeds_b,
    # whose expectation is the exact (agents in b) / 1e5
    seeds = torch.full((5,), 300.0, requires_grad=True)
    sim = epidemic_sim(
        mixed_pop, EpidemicParams(), days=1, seed=2, tensors={"initial_infections_per_100k": seeds}
    )
    s = sim.run().series
    (g,) = torch.autograd.grad(s["new_infections"][0].sum(), seeds)
    seeded = s["new_infections"][0].detach().sum(1)
    torch.testing.assert_close(g, seeded / 300.0)
    per_borough = torch.bincount(mixed_pop["borough"].long(), minlength=5).float() / 1e5
    # one run's seed count is binomial(N, 300/1e5): the expectation within 4 of its standard errors
    expected_seeds = float(per_borough.sum()) * 300.0
    assert abs(float(seeded.sum()) - expected_seeds) < 4 * math.sqrt(expected_seeds)


def test_gradient_mode_needs_a_gradient_state(mixed_pop):
    sim = epidemic_sim(mixed_pop, days=2)
    with torch.no_grad():
        theta = sim.model("epidemic").engine.tensors()
        state = sim.model("epidemic").engine.initial_state(theta)
    from lpm_llm.models.epidemic import EpidemicInputs

    with pytest.raises(ValueError, match="track_gradients"):
        sim.model("epidemic").engine.step(state, 0, EpidemicInputs(rates=torch.ones(4), seed=0), theta)


# -- parameters ----------------------------------------------------------------------------------------
def test_params_validation():
    with pytest.raises(ValidationError, match="beta_houshold"):
        EpidemicParams(beta_houshold=0.1)
    with pytest.raises(ValidationError, match="one value per age band"):
        EpidemicParams(ifr=(0.1, 0.2))
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        EpidemicParams(ascertainment=(0.1, 1.5))
    with pytest.raises(ValidationError):
        EpidemicParams(beta_community=-1)
    sim = epidemic_sim(population(10, 2), days=2)
    with pytest.raises(KeyError, match="unknown epidemic parameter 'beta'.*beta_household"):
        sim.model("epidemic").engine.tensors({"beta": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"susceptibility must have shape \(10,\)"):
        sim.model("epidemic").engine.tensors({"susceptibility": torch.ones(3)})
    # a per-borough parameter also takes one value for every borough, and keeps its gradient
    seeding = torch.tensor(40.0, requires_grad=True)
    theta = sim.model("epidemic").engine.tensors({"initial_infections_per_100k": seeding})
    boroughs = sim.model("epidemic").contacts.shape[0]
    assert theta["initial_infections_per_100k"].tolist() == [40.0] * boroughs
    theta["initial_infections_per_100k"].sum().backward()
    assert float(seeding.grad) == boroughs
    with pytest.raises(ValueError, match=r"initial_infections_per_100k must have shape \(\) or \(\d+,\)"):
        sim.model("epidemic").engine.tensors({"initial_infections_per_100k": torch.ones(boroughs + 1)})
    assert set(EpidemicParams.model_fields) >= {
        "beta_household",
        "ifr",
        "ihr",
        "p_symptomatic",
        "ascertainment",
    }
