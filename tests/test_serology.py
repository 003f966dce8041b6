"""The April 2020 serology survey as a calibration target: its loss, and that it enters the objective
on its date with a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from lpm_llm.calibrate.fit import SimulationObjective
from lpm_llm.calibrate.targets import NYC_SEROLOGY_APRIL_2020, log_mse, observed_weekly, serology_loss
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.core.sim import Simulation
from lpm_llm.models.epidemic import Epidemic, EpidemicParams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serology_loss_is_zero_inside_the_interval_and_log_squared_outside():
    t = NYC_SEROLOGY_APRIL_2020
    assert (t.share, t.lower, t.upper) == (0.227, 0.215, 0.240)
    for p in (0.215, 0.227, 0.2399):
        assert float(serology_loss(torch.tensor(p), t)) == 0.0
    assert float(serology_loss(torch.tensor(0.10), t)) == pytest.approx(math.log(0.215 / 0.10) ** 2, rel=1e-5)
    assert float(serology_loss(torch.tensor(0.42), t)) == pytest.approx(math.log(0.42 / 0.240) ** 2, rel=1e-5)


def test_serology_target_enters_the_loss_on_its_date():
    """The objective with the survey is (n x weekly loss + serology term) / (n + 1), the simulated
    share being the agents infected by 2020-04-24 less 18 days; its gradient lowers seeding when the
    simulated share is above the survey's interval."""
    from lpm_llm.population.synthesis import synthesize_nyc

    pop = synthesize_nyc(scale=0.002, seed=0)
    weeks = 8
    params = EpidemicParams(initial_infections_per_100k=(300.0,) * 5)
    sim = Simulation(pop, [Epidemic(params)], interventions=nyc_2020(), start_date="2020-03-01", days=7 * weeks,
                     seed=0)
    obs = observed_weekly("2020-03-01", weeks, ("cases", "deaths"))
    plain = SimulationObjective(sim, obs, weeks=weeks, scale=pop.scale)
    with_sero = SimulationObjective(sim, obs, weeks=weeks, scale=pop.scale, serology=NYC_SEROLOGY_APRIL_2020)
    assert with_sero._serology_day == 54 - 18  # 2020-04-24 is day 54 from 2020-03-01; infections by day 36
    seeding = torch.tensor([300.0] * 5, requires_grad=True)
    values = {"initial_infections_per_100k": seeding}
    with torch.no_grad():
        base = plain(values, 3)
        weekly = with_sero.weekly(values, 3)
        share = weekly["serology"]
        full = with_sero(values, 3)
    assert float(log_mse({k: weekly[k] for k in obs}, obs, pop.scale)) == pytest.approx(float(base), rel=1e-6)
    assert float(share) > 0.240  # the default transmission without isolation decisions: above the survey
    expected = (2 * base + serology_loss(share, NYC_SEROLOGY_APRIL_2020)) / 3
    assert float(full) == pytest.approx(float(expected), rel=1e-6)
    assert float(full) > float(base) * 2 / 3  # the term is not zero here
    # the survey's term alone pulls seeding down
    weekly = with_sero.weekly(values, 3)
    (grad,) = torch.autograd.grad(serology_loss(weekly["serology"], NYC_SEROLOGY_APRIL_2020), seeding)
    assert float(grad.sum()) > 0
