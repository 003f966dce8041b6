"""The whole-period fit's count losses (issue 15): Poisson and negative binomial deviances, their use in
:func:`lpm_llm.calibrate.targets.count_loss` and :class:`lpm_llm.calibrate.period.PeriodObjective`."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lpm_llm.calibrate.period import PeriodObjective
from lpm_llm.calibrate.targets import (
    NYC_SEROLOGY_APRIL_2020,
    count_loss,
    negbin_deviance,
    observed_weekly,
    poisson_deviance,
    serology_loss,
    smoothness_penalty,
)
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.sim import Simulation
from lpm_llm.models import Epidemic, EpidemicParams
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.runner.experiment import Experiment

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_deviances_equal_their_definitions_on_hand_computed_values():
    y = torch.tensor([3.0, 0.0, 7.0, 120.0], dtype=F64)
    mu = torch.tensor([5.0, 2.5, 7.0, 80.0], dtype=F64)
    k = 2.0
    # 2 (y log(y/mu) - (y + k) log((y + k)/(mu + k))), with 0 log 0 = 0, by hand
    nb = [2 * (3 * math.log(3 / 5) - 5 * math.log(5 / 7)), 2 * (-2 * math.log(2 / 4.5)), 0.0,
          2 * (120 * math.log(1.5) - 122 * math.log(122 / 82))]
    assert negbin_deviance(y, mu, k).tolist() == pytest.approx(nb, rel=1e-12, abs=1e-12)
    # 2 (y log(y/mu) - (y - mu))
    po = [2 * (3 * math.log(3 / 5) + 2), 2 * 2.5, 0.0, 2 * (120 * math.log(1.5) - 40)]
    assert poisson_deviance(y, mu).tolist() == pytest.approx(po, rel=1e-12, abs=1e-12)
    # the deviance is twice the log-likelihood ratio of the saturated mean to mu (scipy's pmfs: NB with
    # n = k, p = k / (k + mu), i.e. variance mu + mu^2 / k)
    for yi, mi in zip(y.tolist(), mu.tolist(), strict=True):
        yt, mt = torch.tensor(yi, dtype=F64), torch.tensor(mi, dtype=F64)
        ll = stats.nbinom.logpmf(yi, k, k / (k + mi))
        sat = stats.nbinom.logpmf(yi, k, k / (k + yi))
        assert float(negbin_deviance(yt, mt, k)) == pytest.approx(2 * (sat - ll), abs=1e-9)
        llp, satp = stats.poisson.logpmf(yi, mi), stats.poisson.logpmf(yi, max(yi, 1e-300))
        assert float(poisson_deviance(yt, mt)) == pytest.approx(2 * (satp - llp), abs=1e-9)
    # k -> infinity is Poisson; for mu, y >> k it tends to 2k (r - 1 - log r), r = y / mu: about k (log r)^2
    assert negbin_deviance(y, mu, 1e9).tolist() == pytest.approx(po, rel=1e-5, abs=1e-6)
    big_y, big_mu = torch.tensor(5000.0, dtype=F64), torch.tensor(4000.0, dtype=F64)
    assert float(negbin_deviance(big_y, big_mu, 5.0)) == pytest.approx(10 * (1.25 - 1 - math.log(1.25)), rel=2e-3)
    assert float(negbin_deviance(big_y, big_mu, 5.0)) == pytest.approx(5 * math.log(1.25) ** 2, rel=0.1)
    with pytest.raises(ValueError, match="dispersion"):
        negbin_deviance(y, mu, 0.0)


@pytest.mark.parametrize("kind", ["poisson", "negbin"])
def test_count_loss_is_minimised_at_the_observed_count_and_its_gradient_matches_finite_differences(kind):
    scale = 0.01
    obs = {"deaths": torch.tensor([[0.0, 40.0], [310.0, 1200.0]], dtype=F64),
           "cases": torch.tensor([[100.0, 2500.0], [9000.0, 30.0]], dtype=F64)}
    at_obs = {t: o * scale for t, o in obs.items()}  # simulated agents = the observed count's agents
    assert float(count_loss(at_obs, obs, scale, kind=kind)) == pytest.approx(0.0, abs=1e-12)
    # each cell's term is smallest at the observed count: along a grid of factors the minimum is at 1
    for factor in (0.5, 0.9, 0.99, 1.01, 1.1, 2.0):
        moved = {t: s * factor for t, s in at_obs.items()}
        assert float(count_loss(moved, obs, scale, kind=kind)) > 1e-9
    sim = {t: (s * torch.tensor([[1.3, 0.7], [1.1, 0.4]], dtype=F64) + 0.2).requires_grad_() for t, s in at_obs.items()}
    var = {t: torch.tensor([[0.5, 1.0], [2.0, 0.1]], dtype=F64) for t in obs}
    for variance in (None, var):
        loss = count_loss(sim, obs, scale, kind=kind, dispersion=4.0, variance=variance)
        grads = torch.autograd.grad(loss, [sim["deaths"], sim["cases"]])
        # the gradient at the observed count is zero (without the noise correction)
        if variance is None:
            flat = {t: s.detach().clone().requires_grad_() for t, s in at_obs.items()}
            g0 = torch.autograd.grad(count_loss(flat, obs, scale, kind=kind, dispersion=4.0), list(flat.values()))
            assert all(float(g.abs().max()) < 1e-12 for g in g0)
        h = 1e-4  # central differences: truncation O(h^2), rounding O(1e-13 / h)
        for target, grad in zip(("deaths", "cases"), grads, strict=True):
            for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
                up = {t: s.detach().clone() for t, s in sim.items()}
                down = {t: s.detach().clone() for t, s in sim.items()}
                up[target][idx] += h
                down[target][idx] -= h
                fd = (float(count_loss(up, obs, scale, kind=kind, dispersion=4.0, variance=variance))
                      - float(count_loss(down, obs, scale, kind=kind, dispersion=4.0, variance=variance))) / (2 * h)
                assert float(grad[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_negbin_loss_prices_one_agent_in_a_low_week_below_the_log_loss_and_corrects_for_noise():
    """The diagnosis of issue 15: at 1:100 a week of 10 deaths against 1 simulated agent (100 deaths)
    costs the log loss (log 200 - log 110)^2 = 0.36; the negbin loss weighs it by its Poisson noise.
    And the second-order correction brings the deviance of the mean of 2 noisy runs to that of the
    expected count."""
    from lpm_llm.calibrate.targets import log_mse

    scale = 0.01
    obs = {"deaths": torch.tensor([[10.0]], dtype=F64)}
    one = {"deaths": torch.tensor([[1.0]], dtype=F64)}
    assert float(log_mse(one, obs, scale)) == pytest.approx(math.log(200 / 110) ** 2, rel=1e-9)
    assert float(count_loss(one, obs, scale, kind="negbin", dispersion=10.0)) < 0.1
    # noise: 2 runs of Poisson(lam) agents; E[corrected] is the deviance at lam to second order
    g = torch.Generator().manual_seed(0)
    lam, y = 6.0, 400.0  # agents; the observed 400 deaths are 4 agents
    runs = torch.poisson(torch.full((200_000, 2), lam, dtype=F64), generator=g)
    mean, var = runs.mean(1).reshape(-1, 1), (runs.var(1) / 2).reshape(-1, 1)
    o = {"deaths": torch.full_like(mean, y)}
    plain = float(count_loss({"deaths": mean}, o, scale, kind="negbin"))
    corrected = float(count_loss({"deaths": mean}, o, scale, kind="negbin", variance={"deaths": var}))
    exact = float(count_loss({"deaths": torch.tensor([[lam]], dtype=F64)}, {"deaths": torch.tensor([[y]], dtype=F64)},
                             scale, kind="negbin"))
    assert abs(corrected - exact) < 0.25 * abs(plain - exact)


def test_period_objective_with_a_count_loss_is_that_loss_plus_serology_and_penalties():
    tiny = synthesize_nyc(scale=0.001, seed=0)
    weeks = 9
    model = Epidemic(EpidemicParams(initial_infections_per_100k=(300.0,) * 5))
    sim = Simulation(tiny, [model], interventions=nyc_2020(), start_date="2020-03-01", days=7 * weeks, seed=0)
    obs = observed_weekly("2020-03-01", weeks, ("cases", "deaths"))
    values = {"transmission_change": torch.tensor([0.9, 1.1])}
    kw = dict(weeks=weeks, scale=tiny.scale, epidemic=model, serology=NYC_SEROLOGY_APRIL_2020, smoothness=0.3)
    nb = PeriodObjective(sim, obs, loss="negbin", dispersion=5.0, **kw)
    with torch.no_grad():
        stacked = nb._stacked(values, [3, 4])
        got = float(nb.loss(stacked, values))
        mean = {t: stacked[t].mean(0) for t in obs}
        var = {t: stacked[t].var(0) / 2 for t in obs}
        expected = (2 * float(count_loss(mean, obs, tiny.scale, kind="negbin", dispersion=5.0, variance=var))
                    + float(serology_loss(stacked["serology"].mean(), NYC_SEROLOGY_APRIL_2020))) / 3 \
            + float(smoothness_penalty(values["transmission_change"], 0.3))
        assert got == pytest.approx(expected, rel=1e-6)  # float32 runs
        # log_mse (the default) is the parent's loss, and differs
        assert float(PeriodObjective(sim, obs, **kw).loss(stacked, values)) != pytest.approx(got, rel=1e-3)
    with pytest.raises(ValueError, match="unknown loss"):
        PeriodObjective(sim, obs, loss="mse", **kw)


def test_the_loss_is_configured_in_the_calibration_block():
    exp = Experiment.from_yaml("experiments/covid_nyc_2021.yaml", ["calibration.loss=negbin",
                                                                    "calibration.dispersion=20"])
    assert (exp.config.calibration.loss, exp.config.calibration.dispersion) == ("negbin", 20.0)
    assert Experiment.from_yaml("experiments/covid_nyc_2021.yaml").config.calibration.loss == "log_mse"
    with pytest.raises(Exception, match="loss"):
        Experiment.from_yaml("experiments/covid_nyc_2021.yaml", ["calibration.loss=mse"])
