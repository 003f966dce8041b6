"""One well-mixed layer with exponential durations at 1M agents against the SEIR equations.

What is compared (apples to apples): the model steps in whole days with daily hazards, so its mean
is the SEIR system discretised the same way, per day t:

    new_t = S_{t-1} (1 - exp(-beta I_{t-1} / N)),
    E->I: E_{t-1} sigma,  I->R: I_{t-1} gamma

(sigma = 1/latent mean, gamma = 1/infectious mean: the model's "exponential" durations are geometric
with these daily exit probabilities, so that their realized means are the parameters). The mean
over seeds of the agent model must match this map's peak prevalence, peak day and final size
within 3%. The final size is also checked against the continuous
SEIR ODE (scipy) with the same R0 = beta x mean whole-day infectious period, whose final size obeys
the same equation z = 1 - exp(-R0 z).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from lpm_llm.models.epidemic import EpidemicParams
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
from tests.conftest import epidemic_sim

N = 1_000_000
BETA, LATENT, INFECTIOUS = 0.5, 4.0, 7.0
SEEDS_PER_100K = 100.0
DAYS = 150


def _discrete_map(days: int, e0: float) -> np.ndarray:
    """(days, 4) S, E, I, R at the end of each day, day 0 = after seeding."""
    s, e, i, r = N - e0, e0, 0.0, 0.0
    p_e, p_i = 1 / LATENT, 1 / INFECTIOUS
    out = [(s, e, i, r)]
    for _ in range(1, days):
        new = s * (1 - math.exp(-BETA * i / N))
        ei, ir = e * p_e, i * p_i
        s, e, i, r = s - new, e + new - ei, i + ei - ir, r + ir
        out.append((s, e, i, r))
    return np.array(out)


@pytest.mark.slow
def test_well_mixed_matches_seir():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pop = Population(
            {
                "borough": torch.zeros(N, dtype=torch.int8),
                "age_band": torch.full((N,), 4, dtype=torch.int8),
                "household": torch.arange(N, dtype=torch.int32),
            },
            {"borough": BOROUGHS, "age_band": AGE_BANDS},
        )
        params = EpidemicParams(
            beta_household=0,
            beta_school=0,
            beta_workplace=0,
            beta_community=BETA,
            community_matrix=tuple(tuple(float(i == j) for j in range(10)) for i in range(10)),
            susceptibility=(1.0,) * 10,
            rel_infectiousness_asymptomatic=1.0,
            duration_distribution="exponential",
            latent_mean=LATENT,
            infectious_mean=INFECTIOUS,
            initial_infections_per_100k=(SEEDS_PER_100K,) * 5,
            immunity_mean=None,  # SEIR: lifelong immunity
            case_isolation_compliance=0.0,
            variants=(),
        )
        runs = []
        with torch.no_grad():
            for seed in range(3):
                s = epidemic_sim(pop, params, days=DAYS, seed=seed).run().series
                runs.append(torch.stack([s[k].sum((1, 2)) for k in ("S", "E", "I", "R", "M")], 1).double())
        agent = torch.stack(runs).mean(0).numpy()  # (T, 5)
    finally:
        torch.set_num_threads(before)
    e0 = N * SEEDS_PER_100K / 1e5
    ref = _discrete_map(DAYS, e0)
    i_agent, i_ref = agent[:, 2], ref[:, 2]
    assert i_agent.max() == pytest.approx(i_ref.max(), rel=0.03)
    assert int(i_agent.argmax()) == pytest.approx(int(i_ref.argmax()), rel=0.03)
    final_agent = 1 - agent[-1, 0] / N
    final_ref = 1 - ref[-1, 0] / N
    assert final_agent == pytest.approx(final_ref, rel=0.03)
    assert agent[-1, 1] + agent[-1, 2] < 1e-3 * N  # the epidemic is over

    # continuous SEIR with the same R0 (rates 1 / mean whole-day durations)
    gamma = 1 / INFECTIOUS  # 1 / mean of the geometric infectious period
    sigma = 1 / LATENT

    def rhs(_t, y):
        s, e, i, _r = y
        return [-BETA * s * i / N, BETA * s * i / N - sigma * e, sigma * e - gamma * i, gamma * i]

    sol = solve_ivp(rhs, (0, 2000), [N - e0, e0, 0, 0], rtol=1e-8, atol=1e-6)
    final_ode = 1 - sol.y[0, -1] / N
    r0 = BETA / gamma
    assert final_ode == pytest.approx(1 - math.exp(-r0 * final_ode), rel=1e-4)
    assert final_agent == pytest.approx(final_ode, rel=0.03)
