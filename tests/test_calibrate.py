"""Calibration: bounded parameters, the loss, gradients against finite differences, recovery of known
parameters, checkpointing, and the first-wave entry point on the bundled NYC data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lpm_llm.calibrate import (
    NYC_POPULATION,
    Calibrator,
    FrozenDecisions,
    SimulationObjective,
    calibrate_first_wave,
    first_wave_space,
)
from lpm_llm.calibrate.targets import forecast_scores, log_mse, observed_weekly, simulated_weekly
from lpm_llm.core.behavior import ConstantDecision
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.parameters import Bounded, ParameterSpace
from lpm_llm.core.sim import Simulation
from lpm_llm.models.epidemic import EpidemicParams
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from tests.conftest import epidemic_sim

START = "2020-03-01"


@pytest.fixture(scope="module")
def tiny_nyc():
    """About 16,700 agents (scale 0.002) and their age x sex x borough archetypes."""
    pop = synthesize_nyc(scale=0.002, seed=0)
    return pop, ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)


# -- pieces --------------------------------------------------------------------------------------------


def test_bounded_transform_stays_in_range_and_inverts():
    spec = Bounded(0.2, 5.0, 1.0, log=True)
    raw = torch.tensor([-50.0, -1.0, 0.0, 3.0, 50.0])
    x = spec.forward(raw)
    assert bool(((x >= 0.2) & (x <= 5.0)).all())
    inner = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    assert torch.allclose(spec.forward(spec.inverse(inner)), inner, rtol=1e-9)
    lin = Bounded(-4.0, 4.0, 0.0)
    assert float(lin.forward(torch.tensor(0.0))) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lo > 0"):
        Bounded(0.0, 1.0, 0.5, log=True)


def test_parameter_space_vector_round_trip_and_unknown_names():
    space = ParameterSpace({"a": Bounded(0.1, 10.0, 2.0, log=True), "v": Bounded(0.0, 1.0, [0.2, 0.7], (2,))})
    values = space.to_dict()
    assert values["a"] == pytest.approx(2.0, rel=1e-5) and values["v"] == pytest.approx([0.2, 0.7], rel=1e-5)
    vec = space.get_vector()
    other = copy.deepcopy(space)
    other.set_values({"a": 5.0})
    assert other.to_dict()["a"] == pytest.approx(5.0, rel=1e-5)
    other.set_vector(vec)
    assert other.to_dict()["a"] == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(KeyError, match="known: a, v"):
        space.set_values({"b": 1.0})


def test_log_mse_is_zero_at_the_observations_and_grows_with_the_log_error():
    obs = {"cases": torch.tensor([[100.0, 2000.0]]), "deaths": torch.tensor([[0.0, 30.0]])}
    scale = 0.01
    exact = {k: v * scale for k, v in obs.items()}
    assert float(log_mse(exact, obs, scale)) == pytest.approx(0.0, abs=1e-10)
    double = {"cases": exact["cases"] * 2, "deaths": exact["deaths"]}
    # floor 1/scale = 100 residents: log((200+100)/(100+100))^2 and log((4000+100)/(2000+100))^2, deaths 0
    want = 0.5 * np.mean([np.log(300 / 200) ** 2, np.log(4100 / 2100) ** 2])
    assert float(log_mse(double, obs, scale)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="simulated shape"):
        log_mse({"cases": torch.zeros(2, 2), "deaths": torch.zeros(1, 2)}, obs, scale)


def test_log_mse_noise_correction_puts_the_minimum_at_the_observed_mean():
    """The mean of 2 Poisson draws fitted to an observed mean of 5 on the log scale: the expected plain
    loss is smallest at a simulated mean of 5.4 (+8%: the noise of the mean lowers its log and the
    squared error rewards less relative noise), the corrected one at 5.1 (+2%); and at the truth the
    corrected loss is close to 0 where the plain one is the noise's variance."""
    g = torch.Generator().manual_seed(0)
    observed = {"cases": torch.full((50_000, 1), 5.0)}
    grid = torch.arange(4.0, 7.01, 0.1)
    plain, corrected = [], []
    for mean in grid:
        x = torch.poisson(torch.full((50_000, 2), float(mean)), generator=g)
        simulated = {"cases": x.mean(1, keepdim=True)}
        plain.append(float(log_mse(simulated, observed, 1.0)))
        corrected.append(float(log_mse(simulated, observed, 1.0, variance={"cases": x.var(1, keepdim=True) / 2})))
    assert float(grid[int(np.argmin(plain))]) >= 5.3
    assert float(grid[int(np.argmin(corrected))]) == pytest.approx(5.0, abs=0.15)
    at_truth = int(torch.argmin((grid - 5.0).abs()))
    assert abs(corrected[at_truth]) < 0.1 * plain[at_truth]


def test_observed_and_simulated_weekly_sums():
    obs = observed_weekly(START, 3, ("cases", "deaths"))
    assert obs["cases"].shape == (3, 5)
    assert float(obs["cases"][2].sum()) > float(obs["cases"][0].sum())  # March 2020 grows
    daily = torch.arange(14 * 5 * 2, dtype=torch.float32).reshape(14, 5, 2)
    w = simulated_weekly(daily, 2)
    assert torch.equal(w[1], daily[7:14].sum((0, 2)))
    with pytest.raises(ValueError, match="fewer than"):
        simulated_weekly(daily, 3)


def test_forecast_scores_against_persistence():
    observed = np.array([[10.0, 100.0], [20.0, 80.0]])
    forecast = np.array([[12.0, 90.0], [18.0, 85.0]])
    s = forecast_scores(forecast, observed, last_week=np.array([5.0, 120.0]), areas=("A", "B"))
    assert s["mae"] == {"A": 2.0, "B": 7.5}
    assert s["persistence_mae"] == {"A": 10.0, "B": 30.0}
    assert s["relative_error"] == pytest.approx(19.0 / 210.0)
    assert s["persistence_relative_error"] == pytest.approx(80.0 / 210.0)


def test_frozen_decisions_ask_each_step_once():
    class Counting:
        calls = 0

        def probabilities(self, context):
            Counting.calls += 1
            return torch.full((3,), 0.1 * Counting.calls)

    frozen = FrozenDecisions(Counting())
    first = frozen.probabilities({"date": "2020-03-01", "cases_week": 5})
    again = frozen.probabilities({"date": "2020-03-01", "cases_week": 500})
    other = frozen.probabilities({"date": "2020-03-08"})
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert frozen.calls == 2 == Counting.calls
    with pytest.raises(KeyError, match="date"):
        frozen.probabilities({"step": 0})


# -- gradients through the discrete simulation -----------------------------------------------------------


def _objective(tiny_nyc, params, weeks, observed=None, decisions=True, persistence=0.0):
    pop, arch = tiny_nyc
    dec = {"isolate": FrozenDecisions(ConstantDecision(0.3, arch.k))} if decisions else None
    sim = epidemic_sim(pop, params, archetypes=arch if decisions else None, decisions=dec,
                       interventions=nyc_2020(), start_date=START, days=7 * weeks, seed=0,
                       persistence={"isolate": persistence} if decisions else None)
    obs = observed if observed is not None else observed_weekly(START, weeks, ("cases", "deaths"))
    return SimulationObjective(sim, obs, weeks=weeks, scale=pop.n / NYC_POPULATION)


def test_gradient_agrees_with_finite_differences_for_every_group(tiny_nyc):
    """d(expected loss)/d(raw), averaged over 32 seeds, against central differences (h = 0.2 in raw
    space) with common random numbers, along the all-ones raw direction of each group, the two
    alignment terms also together. The target is simulated at other parameters, so that every group
    has a clear gradient. Every group within 25%, with matching sign.

    Measured (AD / FD): beta_scale 0.97, seeding 0.95, ascertainment 1.00, fatality 1.11, alignment
    slope 0.99, shift 1.04, both 1.04; over seeds 32-63 and 64-95 the worst are 0.90 (seeding) and
    1.18 (slope). 32 seeds, not 6: the finite difference of few-count runs is the noisy side (its
    spread between seeds is 3-4x the gradient's, so that with 6 seeds its own error is 12-15% for
    seeding and the alignment terms), and h = 0.2 halves its variance against 0.1. Many seeds also
    settle which side was biased before the group terms of the estimator (see "Gradients" in
    lpm_llm.models.seirm): the gradient, at 0.79 of a 100-seed finite difference for seeding.
    """
    weeks, seeds, h = 7, range(32), 0.2
    zeros = {"cases": torch.zeros(weeks, 5), "deaths": torch.zeros(weeks, 5)}
    target = EpidemicParams(initial_infections_per_100k=(100.0,) * 5, ascertainment=0.1)
    maker = _objective(tiny_nyc, target, weeks, observed=zeros)
    with torch.no_grad():
        runs = [maker.weekly({}, 50 + s) for s in range(2)]
    observed = {k: (runs[0][k] + runs[1][k]) / 2 / maker.scale for k in zeros}
    params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5, beta_scale=1.5, ascertainment=0.2,
                            fatality_scale=3.0, ascertainment_by_borough=(2.0, 1.0, 1.0, 1.0, 0.5))
    objective = _objective(tiny_nyc, params, weeks, observed=observed)
    space = first_wave_space(params, n_months=2)
    for s in seeds:
        (objective(space.values(), s) / len(seeds)).backward()

    def loss_at(vector):
        probe = copy.deepcopy(space)
        probe.set_vector(vector)
        with torch.no_grad():
            return float(np.mean([float(objective(probe.values(), s)) for s in seeds]))

    x0, i, offsets = space.get_vector(), 0, {}
    for name in space.names:
        offsets[name] = (i, i + space.raw[name].numel())
        i = offsets[name][1]
    groups = {"beta_scale": ["beta_scale"], "seeding": ["initial_infections_per_100k"],
              "transmission change": ["transmission_change"],
              "ascertainment": ["ascertainment"], "fatality": ["fatality_scale"],
              "alignment slope": ["isolate_alignment_a"], "alignment shift": ["isolate_alignment_b"],
              "alignment": ["isolate_alignment_a", "isolate_alignment_b"],
              # relative ascertainment is scaled to a geometric mean of 1: only contrasts act
              "borough ascertainment": {"ascertainment_by_borough": [1.0, 0.0, 0.0, 0.0, -1.0]}}
    gradient = torch.cat([space.raw[n].grad.reshape(-1).double() for n in space.names])
    for group, names in groups.items():
        pattern = names if isinstance(names, dict) else dict.fromkeys(names, 1.0)
        direction = torch.zeros_like(x0)
        for n, v in pattern.items():
            direction[offsets[n][0]:offsets[n][1]] = torch.as_tensor(v, dtype=direction.dtype)
        fd = (loss_at(x0 + h * direction) - loss_at(x0 - h * direction)) / (2 * h)
        ad = float(gradient @ direction)
        message = f"{group}: gradient {ad:.4g}, finite difference {fd:.4g}"
        assert np.sign(ad) == np.sign(fd) and abs(fd) > 0.05, message
        assert abs(ad - fd) <= 0.25 * abs(fd), message


@pytest.mark.slow
def test_checkpointed_segments_give_the_gradient_of_the_plain_estimator(tiny_nyc):
    """The compact segments (lpm_llm.models._segments: forward without autograd, path weights not stored
    but restarted from their forward values) against plain autograd through every step: the same loss
    and the same gradient of every calibrated parameter (6 weeks of a 1:500 city, isolation
    decisions with their alignment map), whatever the segment length (3 days, a decision week of 7).
    """
    pop, arch = tiny_nyc
    # with continuous importation (a calibrated rate carried through the segments) and waning immunity
    # short enough that agents infected early are susceptible again by the end (the horizon keeps them)
    params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5, beta_scale=1.5, fatality_scale=2.0,
                            importation_per_100k=20.0, immunity_mean=20.0)
    weeks = 6
    observed = observed_weekly(START, weeks, ("cases", "deaths"))
    results = {}
    for chunk in (None, 3, 7):
        sim = epidemic_sim(pop, params, archetypes=arch, decisions={"isolate": FrozenDecisions(
            ConstantDecision(0.3, arch.k))}, interventions=nyc_2020(), start_date=START, days=7 * weeks, seed=0,
            checkpoint_days=chunk)
        objective = SimulationObjective(sim, observed, weeks=weeks, scale=pop.n / NYC_POPULATION)
        space = first_wave_space(params, n_months=2)
        loss = objective(space.values(), 3)
        loss.backward()
        grad = torch.cat([space.raw[n].grad.reshape(-1) for n in space.names]).double()
        results[chunk] = (float(loss.detach()), grad)
        if chunk is None:  # what the segments rely on: the path weights' forward values
            state = sim.model("epidemic").final_state
            fated = ((state.flags & 4) != 0).float()
            assert torch.equal(state.weight.detach(), torch.ones_like(state.weight))
            assert torch.equal(state.group_weight.detach(), torch.ones_like(state.group_weight))
            assert torch.equal(state.fate.detach(), fated) and fated.sum() > 0
    loss0, grad0 = results[None]
    assert (grad0.abs() > 1e-4).sum() >= 12  # every group moves the loss
    for chunk in (3, 7):
        loss, grad = results[chunk]
        assert loss == pytest.approx(loss0, rel=1e-6), chunk
        torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-5 * float(grad0.abs().max()), msg=str(chunk))


# -- recovery of known parameters ------------------------------------------------------------------------


def test_gradient_descent_recovers_transmission_seeding_and_ascertainment(one_thread):
    """Data simulated at known parameters (beta_scale 1.6, 250 initial infections per 100k, ascertainment
    0.25; the mean weekly cases and deaths by borough of 128 runs over 12 weeks, nearly their
    expectation); Adam from beta_scale 1.0, 60 per 100k and ascertainment 0.1, with 2 fresh seeds per
    step, recovers each within 10%. Measured over fit seeds 0, 1 and 2: beta_scale +2.0, +1.6, +2.1%,
    seeding -5.8, -5.3, -2.8%, ascertainment March -1.6, -0.2, -0.9%, April +2.8, +0.8, +3.0%.

    What it takes, measured on this problem: a city of 33,000 agents; the mean of 128 runs as data
    (with 16, the Bronx's data alone were 35% above their expectation); Adam's betas (0.5, 0.9) (see
    Calibrator); a first learning rate of 0.3 (at 0.1 the decaying rate could not carry the seeding
    far enough); the noise correction of log_mse; and 12 weeks, through the peak: over the 8 weeks of
    growth, transmission and seeding trade off along a shallow valley, and the estimator's small
    bias on seeding (0.9 of the finite difference) moved the fit along it, seeding 7-13% low.

    And a last learning rate of 0.02, not 0.005: April's ascertainment is seen only in the weeks after
    the peak (city-wide 160, 25, 4 and 0.6 reported agents a week from 2020-04-05), so its gradient
    is weak and noisy (at 0.22 the mean of the cases term's derivative over pairs of seeds is 0.56 of its
    root mean square, so Adam moves it by about half the learning rate a step), and while transmission
    is still low in the first steps April's cases are too many, which drives it from 0.1 down to 0.07
    by step 5. With the rate decaying to 0.005 it was still climbing at step 60 (0.196, 0.203, 0.207,
    0.2095 at steps 40, 45, 50, 59): about 20% low, which an xfail recorded until this was measured.
    Not a bias of the loss or the estimator: at the true transmission and seeding, the per-pair
    derivative of the noise-corrected cases term in April's ascertainment (32 pairs of runs against
    the 128-run data) crosses 0 between 0.24 and 0.26 in mean and median, and Adam fitting the two
    ascertainments alone from 0.1 returns 0.248 and 0.247.

    Not tested, because it does not hold with a margin here: seeding by borough. Fitted to 150, 250,
    200, 200 and 400 per 100k, it comes back within 10% for the Bronx, Brooklyn and Manhattan but
    5-19% low for Staten Island and up to 11% low for Queens, whose runs start with 4-8 infected
    agents. The infection fatality ratio stays at its published values: in the growth phase seeding,
    ascertainment and fatality can be scaled together without changing cases or deaths.

    One torch thread (measured so; with 2 on the loaded 2-core machine the 128 data runs alone took
    over 15 minutes, against 116 s for the whole test with 1).
    """
    pop = synthesize_nyc(scale=0.004, seed=0)
    weeks, scale = 12, pop.n / NYC_POPULATION
    truth = EpidemicParams(initial_infections_per_100k=(250.0,) * 5, beta_scale=1.6, ascertainment=0.25,
                           fatality_scale=4.0)

    def objective(params, observed):
        sim = epidemic_sim(pop, params, interventions=nyc_2020(), start_date=START, days=7 * weeks, seed=0)
        return SimulationObjective(sim, observed, weeks=weeks, scale=scale)

    zeros = {"cases": torch.zeros(weeks, 5), "deaths": torch.zeros(weeks, 5)}
    maker = objective(truth, zeros)
    with torch.no_grad():
        runs = [maker.weekly({}, 1000 + s) for s in range(128)]
    observed = {k: torch.stack([r[k] for r in runs]).mean(0) / scale for k in zeros}
    start = truth.model_copy(
        update={"beta_scale": 1.0, "ascertainment": 0.1, "initial_infections_per_100k": (60.0,) * 5}
    )
    names = ("beta_scale", "initial_infections_per_100k", "ascertainment")
    space = first_wave_space(start, n_months=2, alignment=False, include=names, seeding_by_borough=False)
    cal = Calibrator(space, steps=60, lr=0.3, lr_final=0.02, seeds_per_step=2, seed=0).fit(objective(start, observed))
    fitted = cal.params_
    assert fitted["beta_scale"] == pytest.approx(1.6, rel=0.10)
    assert fitted["initial_infections_per_100k"] == pytest.approx(250.0, rel=0.10)
    assert fitted["ascertainment"] == pytest.approx([0.25, 0.25], rel=0.10)  # March, then April and after
    assert np.mean(cal.loss_history_[-10:]) < 0.02 * cal.loss_history_[0]
    assert len(cal.wall_times_) == 60 and cal.simulations_[-1] == 120
    assert space.to_dict()["beta_scale"] == pytest.approx(1.0, rel=1e-5)  # the given space is untouched


# -- the optimiser's bookkeeping -------------------------------------------------------------------------


class _Quadratic:
    """objective(values, seeds) = (x - 2)^2 for a bounded x, taking `delay` seconds per simulation."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, 0

    def __call__(self, values, seeds):
        import time

        self.calls += len(seeds)
        time.sleep(self.delay * len(seeds))
        return (values["x"] - 2.0) ** 2


def test_time_limit_stops_nelder_mead_and_space_at_replays_the_fit():
    space = ParameterSpace({"x": Bounded(0.1, 10.0, 0.5, log=True)})
    objective = _Quadratic(delay=0.02)
    fit = Calibrator(space, method="nelder-mead", budget=10**6, time_limit=0.5).fit(objective)
    assert 0.5 <= fit.wall_times_[-1] < 1.0 and fit.simulations_[-1] == objective.calls < 50
    assert fit.params_["x"] == pytest.approx(fit.best_params_["x"])  # the best point, not the last
    assert fit.space_at(0.0).to_dict()["x"] == pytest.approx(0.5, rel=1e-6)  # before the first entry: the start
    halfway = fit.space_at(fit.wall_times_[len(fit.wall_times_) // 2]).to_dict()["x"]
    assert abs(halfway - 2.0) >= abs(fit.params_["x"] - 2.0)  # the best point only gets better
    adam = Calibrator(space, steps=80, lr=0.2, lr_final=0.002).fit(_Quadratic())
    assert adam.params_["x"] == pytest.approx(2.0, rel=0.05)
    assert adam.space_at(adam.wall_times_[-1]).to_dict() == adam.params_
    assert len(adam.vector_history_) == 80 and adam.space_at(adam.wall_times_[0]).to_dict() != adam.params_
    with pytest.raises(ValueError, match="time_limit"):
        Calibrator(space, time_limit=0.0).fit(objective)
    with pytest.raises(ValueError, match=r"betas must be two values in \[0, 1\)"):
        Calibrator(space, betas=(0.9, 1.0)).fit(objective)


def test_transmission_change_multiplies_the_rates_of_later_months_only(tiny_nyc):
    pop, _ = tiny_nyc
    runs = {}
    for change in (1.0, 0.3):
        params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5, transmission_change=change)
        sim = epidemic_sim(pop, params, start_date="2020-03-20", days=25, seed=3)
        with torch.no_grad():
            runs[change] = sim.run().series["new_infections"].sum((1, 2))
    march = 12  # 2020-03-20 .. 2020-03-31
    assert torch.equal(runs[1.0][:march], runs[0.3][:march])
    assert float(runs[0.3][march + 5:].sum()) < 0.6 * float(runs[1.0][march + 5:].sum())
    space = first_wave_space(EpidemicParams(transmission_change=(0.5, 2.0)), n_months=4)
    assert space.to_dict()["transmission_change"] == pytest.approx([0.5, 2.0, 2.0], rel=1e-5)  # last holds
    with pytest.raises(ValueError, match="transmission_change"):
        EpidemicParams(transmission_change=-1.0)


def test_ascertainment_by_borough_moves_reported_cases_between_boroughs_only(tiny_nyc):
    pop, _ = tiny_nyc
    runs = {}
    for rel in (1.0, (4.0, 1.0, 1.0, 1.0, 1.0)):
        # without case isolation: reported cases who isolate would make reporting change the epidemic
        params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5, ascertainment=0.1,
                                ascertainment_by_borough=rel, case_isolation_compliance=0.0)
        with torch.no_grad():
            runs[rel] = epidemic_sim(pop, params, days=28, seed=2).run().series
    even, bronx = runs[1.0], runs[(4.0, 1.0, 1.0, 1.0, 1.0)]
    assert torch.equal(even["deaths"], bronx["deaths"])  # reporting does not change the epidemic
    ratio = bronx["reported_cases"].sum((0, 2)) / even["reported_cases"].sum((0, 2))
    g = 4.0 ** (1 / 5)  # the values are scaled to a geometric mean of 1
    assert ratio.tolist() == pytest.approx([4.0 / g] + [1 / g] * 4, rel=1e-5)
    with pytest.raises(ValueError, match="ascertainment_by_borough"):
        EpidemicParams(ascertainment_by_borough=(1.0, 0.0, 1.0, 1.0, 1.0))


# -- the first-wave entry point --------------------------------------------------------------------------


def test_calibrate_first_wave_on_bundled_data(tiny_nyc, tmp_path):
    pop, arch = tiny_nyc
    methods = []
    report = calibrate_first_wave(
        pop, arch, {"isolate": ConstantDecision(0.2, arch.k)},
        EpidemicParams(initial_infections_per_100k=(100.0,) * 5), nyc_2020(),
        start=START, end="2020-03-28", forecast_weeks=1, steps=2, seeds_per_step=1, baseline_budget=3,
        eval_seeds=1, lr=0.1, on_step=lambda method, *_: methods.append(method),
    )
    # 3 + 2 x 8 points are scored (one more: Nelder-Mead at Adam's simulations), but a point already scored
    # is not simulated again: Adam's last curve point is its fit, and Nelder-Mead's best over 3
    # simulations stands at several curve times
    nm_curve = report.history["nelder-mead"]["eval_loss"]
    assert methods.count("scoring") <= 4 + 2 * 8 - 1 - (len(nm_curve) - len(set(nm_curve)))
    assert report.settings["fit_weeks"] == 4 and report.settings["cutoff"] == "2020-03-29"
    assert report.settings["decision_steps_asked"] == 5  # decision days 0, 7, 14, 21 and 28: once each
    assert len(report.history["adam"]["loss"]) == 2 and len(report.history["nelder-mead"]["loss"]) == 3
    assert "transmission_change" not in report.params  # a fit within one calendar month has no month 2
    assert len(report.history["adam"]["eval_loss"]) == 8 == len(report.history["nelder-mead"]["eval_wall_time"])
    assert report.history["adam"]["eval_wall_time"][-1] == pytest.approx(report.history["adam"]["wall_time"][-1])
    assert report.losses["adam"] == pytest.approx(report.history["adam"]["eval_loss"][-1], rel=1e-6)
    assert all(np.isfinite(v) for v in report.losses.values())
    cases = report.forecast["adam"]["cases"]
    assert set(cases["mae"]) == {"Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"}
    assert cases["persistence_mae_total"] > 0
    assert set(report.daily["date"].dt.strftime("%Y-%m-%d")) >= {"2020-03-01", "2020-04-04"}
    paths = report.save(tmp_path)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["params"]["beta_scale"] == pytest.approx(report.params["beta_scale"])
    assert (tmp_path / "calibration_cases.png").stat().st_size > 0 and len(paths) == 6
    assert (tmp_path / "calibration_loss.png").stat().st_size > 0
    with pytest.raises(ValueError, match="complete week"):
        calibrate_first_wave(pop, None, None, EpidemicParams(), None, start=START, end="2020-03-07")


def test_one_calibration_loop_fits_the_coupled_epidemic_and_labour_models():
    """The parameter space of a coupled simulation collects both models' declarations and both
    decisions' alignment maps; one Adam step of the shared Calibrator gives every one of them a
    finite gradient and moves them (cases by borough and unemployment by borough in one loss)."""
    from lpm_llm.models import Epidemic, Labor, LaborParams
    from lpm_llm.population.industry import assign_industry

    pop = synthesize_nyc(scale=0.002, seed=5)
    pop = assign_industry(pop, torch.Generator().manual_seed(0))
    arch = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(pop)
    sim = Simulation(pop, [Epidemic(EpidemicParams(initial_infections_per_100k=(500.0,) * 5)), Labor(LaborParams())],
                     archetypes=arch, decisions={"isolate": ConstantDecision(0.3, arch.k),
                                                 "work": ConstantDecision(0.9, arch.k)},
                     interventions=nyc_2020(), start_date="2020-03-01", days=62, seed=0)
    declared = sim.parameters()
    names = ("beta_scale", "job_finding", "shock", "isolate_alignment_a", "isolate_alignment_b",
             "work_alignment_a", "work_alignment_b")
    assert set(names) <= set(declared)
    space = ParameterSpace({n: declared[n] for n in names})

    def objective(values, seeds):
        sim.set_parameters(values)
        sim.seed = seeds[0]
        s = sim.run().series
        cases = s["reported_cases"].sum((0, 2))  # by borough
        return ((cases / 100.0 - 1.0) ** 2).mean() + ((s["labor_unemployment_rate"][1:] - 10.0) ** 2).mean()

    loss = objective(space.values(), [0])
    loss.backward()
    for name in names:
        grad = space.raw[name].grad
        assert grad is not None and torch.isfinite(grad).all() and bool((grad != 0).any()), name
    before = space.get_vector().clone()
    fit = Calibrator(space, method="adam", steps=1, lr=0.05).fit(objective)
    assert not torch.equal(fit.space_.get_vector(), before)


@pytest.mark.slow
def test_alignment_gradient_with_persistent_isolation_agrees_with_finite_differences(tiny_nyc):
    """As above, for the alignment terms only, when each agent's isolation propensity persists
    from week to week (correlation 0.9): the straight-through gradient of the persistent draws
    against central differences over 32 seeds, within 25% with matching sign."""
    weeks, seeds, h = 7, range(32), 0.2
    zeros = {"cases": torch.zeros(weeks, 5), "deaths": torch.zeros(weeks, 5)}
    target = EpidemicParams(initial_infections_per_100k=(100.0,) * 5, ascertainment=0.1)
    maker = _objective(tiny_nyc, target, weeks, observed=zeros, persistence=0.9)
    with torch.no_grad():
        runs = [maker.weekly({}, 50 + s) for s in range(2)]
    observed = {k: (runs[0][k] + runs[1][k]) / 2 / maker.scale for k in zeros}
    params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5, beta_scale=1.5, ascertainment=0.2)
    objective = _objective(tiny_nyc, params, weeks, observed=observed, persistence=0.9)
    space = first_wave_space(params, n_months=2, include=["isolate_alignment_a", "isolate_alignment_b"])
    for s in seeds:
        (objective(space.values(), s) / len(seeds)).backward()
    gradient = torch.cat([space.raw[n].grad.reshape(-1).double() for n in space.names])
    x0 = space.get_vector()

    def loss_at(vector):
        probe = copy.deepcopy(space)
        probe.set_vector(vector)
        with torch.no_grad():
            return float(np.mean([float(objective(probe.values(), s)) for s in seeds]))

    for group, direction in {"slope": [1.0, 0.0], "shift": [0.0, 1.0], "both": [1.0, 1.0]}.items():
        d = torch.tensor(direction, dtype=x0.dtype)
        fd = (loss_at(x0 + h * d) - loss_at(x0 - h * d)) / (2 * h)
        ad = float(gradient @ d)
        message = f"alignment {group}: gradient {ad:.4g}, finite difference {fd:.4g}"
        assert np.sign(ad) == np.sign(fd) and abs(fd) > 0.05, message
        assert abs(ad - fd) <= 0.25 * abs(fd), message


def test_default_fit_leaves_to_behaviour_what_behaviour_explains(tiny_nyc):
    """With an isolation decision fitted, the default parameters hold transmission_change at 1 (the
    behaviour, not a free monthly change, explains the change beyond the schedule), even when the
    config carries other values; without a decision, or when named, it is fitted."""
    pop, arch = tiny_nyc
    common = dict(start=START, end="2020-04-11", forecast_weeks=0, steps=1, seeds_per_step=1, baseline_budget=1,
                  eval_seeds=1, curve_points=0)
    params = EpidemicParams(initial_infections_per_100k=(100.0,) * 5, transmission_change=0.6)
    behaviour = calibrate_first_wave(pop, arch, {"isolate": ConstantDecision(0.2, arch.k)}, params, nyc_2020(),
                                     **common)
    assert "transmission_change" not in behaviour.params and "isolate_alignment_a" in behaviour.params
    assert behaviour.settings["held_fixed"] == {"transmission_change": 1.0}
    assert behaviour.settings["fit_weeks"] == 6  # two calendar months: the change would have been fitted
    named = calibrate_first_wave(pop, arch, {"isolate": ConstantDecision(0.2, arch.k)}, params, nyc_2020(),
                                 parameters=["beta_scale", "transmission_change"], **common)
    assert named.params["transmission_change"] == pytest.approx([0.6], rel=0.5) and not named.settings["held_fixed"]
    alone = calibrate_first_wave(pop, None, None, params, nyc_2020(), **common)
    assert "transmission_change" in alone.params and not alone.settings["held_fixed"]
