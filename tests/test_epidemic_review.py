"""Issue 15's disease model: household secondary attack rate, age-specific community contacts, case
isolation, waning infection-acquired immunity and reinfection, variants (growth and lineage shares),
continuous importation."""

from __future__ import annotations

import math

import pytest
import torch

from lpm_llm.models.contacts import prem_community_matrix
from lpm_llm.models.epidemic import EpidemicParams
from lpm_llm.models.epidemic_params import Variant
from lpm_llm.models.seirm import duration_pmf, generation_interval_pmf
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population
from tests.conftest import epidemic_sim

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_LAYER = dict(  # a well-mixed community, no age structure, everybody symptomatic and equally infectious
    beta_household=0, beta_school=0, beta_workplace=0,
    community_matrix=tuple(tuple(float(i == j) for j in range(10)) for i in range(10)),
    susceptibility=(1.0,) * 10, rel_infectiousness_asymptomatic=1.0, p_symptomatic=(1.0,) * 10,
    case_isolation_compliance=0.0, immunity_mean=None, variants=(),
)


def flat_population(n: int) -> Population:
    return Population(
        {"borough": torch.zeros(n, dtype=torch.int8), "age_band": torch.full((n,), 4, dtype=torch.int8),
         "household": torch.arange(n, dtype=torch.int32)},
        {"borough": BOROUGHS, "age_band": AGE_BANDS},
    )


def run(pop, params, **kw):
    with torch.no_grad():
        return epidemic_sim(pop, params, **kw).run()


def index_cases(n: int, k: int, seed: int = 0) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return mask


# -- household secondary attack rate ------------------------------------------------------------------
@pytest.fixture(scope="module")
def nyc_small():
    from lpm_llm.population.synthesis import synthesize_nyc

    return synthesize_nyc(scale=0.003, seed=0)


def test_household_secondary_attack_rate_at_the_defaults(nyc_small):
    """One index case in every household of 2+ of the synthetic NYC, households only, 60 days: the
    share of household contacts infected is within Madewell et al. 2020's 95% CI (14.0-19.3%), as the
    parameter's documentation says; in households of two (no third generation possible) it equals the
    analytic 1 - E[exp(-beta w s D)] over the pairs' ages and the infectious period's pmf."""
    pop = nyc_small
    hh = pop["household"].long()
    size = torch.bincount(hh)[hh]
    order = torch.randperm(pop.n, generator=torch.Generator().manual_seed(0))
    member = torch.full((int(hh.max()) + 1,), -1, dtype=torch.long).scatter_(0, hh[order], order)
    index = torch.zeros(pop.n, dtype=torch.bool)
    index[member] = True
    index &= size > 1
    defaults = EpidemicParams()
    params = defaults.model_copy(update=dict(beta_school=0.0, beta_workplace=0.0, beta_community=0.0,
                                             case_isolation_compliance=0.0, immunity_mean=None, variants=()))
    st = run(pop, params, days=60, seed=1, initial_infected=index).final_state
    infected = st.disease != 0
    many = size > 1
    contacts = int(many.sum()) - int(index.sum())
    sar = (int((infected & many).sum()) - int(index.sum())) / contacts
    assert 0.140 <= sar <= 0.193, sar

    pairs = size == 2
    idx2, con2 = index & pairs, ~index & pairs
    sar2 = int((infected & con2).sum()) / int(con2.sum())
    age = pop["age_band"].long()
    by_hh = torch.zeros(int(hh.max()) + 1, dtype=torch.long)
    a_index = by_hh.clone().index_copy_(0, hh[idx2], age[idx2])[hh[con2]]
    a_contact = age[con2]
    d = duration_pmf(defaults.duration_distribution, defaults.infectious_mean, defaults.infectious_shape)
    days = torch.arange(1, d.numel() + 1, dtype=torch.float64)
    psymp = torch.tensor(defaults.p_symptomatic, dtype=torch.float64)[a_index]
    susc = torch.tensor(defaults.susceptibility, dtype=torch.float64)[a_contact]

    def escape(w):  # (pairs,) P(no infection) for index infectiousness w
        return (d.unsqueeze(0) * torch.exp(-defaults.beta_household * w * susc.unsqueeze(1) * days)).sum(1)

    expected = float((1 - psymp * escape(1.0) - (1 - psymp) * escape(defaults.rel_infectiousness_asymptomatic))
                     .mean())
    se = math.sqrt(expected * (1 - expected) / int(con2.sum()))
    assert abs(sar2 - expected) < 4 * se, (sar2, expected)


# -- age-specific community contacts ------------------------------------------------------------------
def test_community_contacts_by_age_come_from_the_survey():
    """Prem et al. 2017 (USA, other locations): the shipped matrix aggregated to our bands keeps the
    survey's row sums where the bands coincide, and people aged 75+ have far fewer community contacts
    than adults aged 25-34 (the review: they had the same)."""
    m16 = prem_community_matrix(tuple(range(0, 80, 5)) + (100,))  # the survey's own bands
    m = prem_community_matrix()
    assert m16.shape == (16, 16) and m.shape == (10, 10)
    assert float(m16[15].sum()) == pytest.approx(1.6364, abs=1e-3)  # 75+ row of the file
    assert float(m[9].sum()) == pytest.approx(float(m16[15].sum()), rel=1e-6)
    assert float(m[0].sum()) == pytest.approx(float(m16[0].sum()), rel=1e-6)  # 0-4
    # 25-34 is the average of the 25-29 and 30-34 rows; its columns sum the two survey columns
    assert float(m[4].sum()) == pytest.approx(float((m16[5].sum() + m16[6].sum()) / 2), rel=1e-6)
    # a survey column split over our bands keeps its contacts: 5-12 meets 5-9 in full and 3/5 of 10-14
    assert float(m[0, 1]) == pytest.approx(float(m16[0, 1] + 0.6 * m16[0, 2]), rel=1e-6)
    assert float(m[9].sum()) < 0.4 * float(m[4].sum())


def test_older_agents_meet_fewer_people_in_the_community():
    """In a community-only epidemic the attack rate of 75+ (same susceptibility as everyone here) is
    below that of 18-24, because their contact volume is lower; with the stylised matrix they are equal."""
    n = 60_000
    g = torch.Generator().manual_seed(0)
    pop = Population(
        {"borough": torch.zeros(n, dtype=torch.int8),
         "age_band": torch.randint(0, 10, (n,), generator=g).to(torch.int8),
         "household": torch.arange(n, dtype=torch.int32)},
        {"borough": BOROUGHS, "age_band": AGE_BANDS},
    )
    base = dict(ONE_LAYER)
    del base["community_matrix"]
    age = pop["age_band"].long()

    def attack(contacts: str) -> tuple[float, float]:
        p = EpidemicParams(**base, community_contacts=contacts, beta_community=0.5,
                           initial_infections_per_100k=(200.0,) * 5)
        st = run(pop, p, days=120, seed=3).final_state
        inf = (st.disease != 0).double()
        return float(inf[age == 3].mean()), float(inf[age == 9].mean())

    young, old = attack("prem2017_usa")
    assert old < 0.6 * young, (young, old)
    young_s, old_s = attack("stylised")
    assert abs(young_s - old_s) < 0.05, (young_s, old_s)


# -- case isolation -------------------------------------------------------------------------------------
def test_reported_cases_who_isolate_stop_transmitting_outside_the_home():
    """Index cases, all symptomatic, all reported (ascertainment 1), isolating from onset (delay 0):
    community infections scale by 1 - compliance."""
    n, k = 200_000, 20_000
    index = index_cases(n, k)
    pop = flat_population(n)

    def secondary(compliance: float) -> float:
        p = EpidemicParams(**{**ONE_LAYER, "case_isolation_compliance": compliance}, beta_community=0.02,
                           ascertainment=1.0, case_isolation_delay=0)
        daily = run(pop, p, days=20, seed=5, initial_infected=index).series["new_infections"].sum((1, 2))
        return float(daily.sum()) - k

    none, half, full = secondary(0.0), secondary(0.5), secondary(1.0)
    assert full == 0.0
    assert half / none == pytest.approx(0.5, abs=4 * math.sqrt(half) / none), (none, half)


# -- waning immunity and reinfection ---------------------------------------------------------------------
def test_waning_immunity_has_its_analytic_form():
    """Everybody infected on day 0 with 1-day latent and infectious periods recovers on day 2; the
    share still immune k days later is (1 - 1/m)^k (a geometric duration of mean m)."""
    n, m = 100_000, 20.0
    p = EpidemicParams(**{**ONE_LAYER, "immunity_mean": m}, beta_community=0.0, latent_mean=1, infectious_mean=1)
    r = run(flat_population(n), p, days=60, seed=2, initial_infected=torch.ones(n, dtype=torch.bool))
    immune = r.series["R"].sum((1, 2)).double()[2:] / n
    expected = (1 - 1 / m) ** torch.arange(immune.numel(), dtype=torch.float64)
    se = torch.sqrt(expected * (1 - expected) / n) + 1e-12
    assert float(((immune - expected).abs() / se).max()) < 4.5
    susceptible = r.series["S"].sum((1, 2)).double()[2:] / n
    dead = r.series["M"].sum((1, 2)).double()[2:] / n
    torch.testing.assert_close(susceptible, 1 - immune - dead)  # waned agents are susceptible again


def test_reinfection_susceptibility_scales_the_hazard():
    """After waning, agents take a constant importation hazard h at reinfection_susceptibility rho:
    daily infection probability 1 - exp(-rho h) against 1 - exp(-h) for agents never infected."""
    n, h, rho = 200_000, 0.02, 0.4
    first = torch.zeros(n, dtype=torch.bool)
    first[: n // 2] = True
    p = EpidemicParams(**{**ONE_LAYER, "immunity_mean": 1.0, "reinfection_susceptibility": rho},
                       beta_community=0.0, latent_mean=1, infectious_mean=1, importation_per_100k=h * 1e5)
    pop = flat_population(n)
    pop["borough"][: n // 2] = 1  # the first half in its own cell
    daily = run(pop, p, days=5, seed=4, initial_infected=first).series["new_infections"].sum(2).double()  # (T, B)
    # the first half: E day 0, I day 1, R day 2, susceptible again at the end of day 3, exposed on day 4;
    # the other half takes h on each of days 0-4
    naive = float(daily[:, 0].sum()) / (n / 2)
    assert naive == pytest.approx(1 - math.exp(-5 * h), abs=4 * math.sqrt(5 * h / (n / 2)))
    assert float(daily[1:4, 1].sum()) == 0.0
    again = float(daily[4, 1]) / (n / 2)
    assert again == pytest.approx(1 - math.exp(-rho * h), abs=4 * math.sqrt(rho * h / (n / 2)))


# -- variants --------------------------------------------------------------------------------------------
def _euler_lotka_rate(r0: float, gi: torch.Tensor) -> float:
    """Growth rate r with 1 = R0 sum_k g_k exp(-r k) (discrete generation interval pmf g)."""
    k = torch.arange(1, gi.numel() + 1, dtype=torch.float64)
    lo, hi = -1.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if r0 * float((gi * torch.exp(-mid * k)).sum()) > 1 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.slow
def test_a_more_transmissible_variant_grows_at_the_analytic_rate():
    """Well mixed: the resident lineage at R = 1, a variant with 1.5x transmissibility imported from
    day 0. log(variant / resident onsets) grows at r(1.5) - r(1.0) from the Euler-Lotka equation
    with the model's generation interval (depletion, under 15%, lowers both lineages' R alike)."""
    n = 400_000
    infectious = 3.5
    beta = 1.0 / infectious
    variant = Variant(name="V", lineage="X", transmissibility=1.5, introduced="2020-03-01", importation_per_100k=1.0)
    p = EpidemicParams(**{**ONE_LAYER, "variants": (variant,)}, beta_community=beta,
                       initial_infections_per_100k=(300.0,) * 5)
    r = run(flat_population(n), p, days=75, seed=6, start_date="2020-03-01")
    by_lineage = r.series["symptomatic_by_lineage"].double()  # (T, 2)
    assert float(r.series["new_infections"].sum()) < 0.15 * n
    window = slice(30, 75)
    y = torch.log(by_lineage[window, 1] / by_lineage[window, 0])
    t = torch.arange(y.numel(), dtype=torch.float64)
    slope = float(((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum())
    gi = generation_interval_pmf(p)
    expected = _euler_lotka_rate(1.5, gi) - _euler_lotka_rate(1.0, gi)
    assert slope == pytest.approx(expected, rel=0.1), (slope, expected)


def test_lineage_severity_and_shares():
    """A variant with 2x hospitalisation is admitted twice as often per symptomatic infection, and
    simulated lineage shares per 4-week period add up to 100 and follow the onsets by lineage."""
    from lpm_llm.models.lineages import simulated_lineage_shares

    n = 100_000
    variant = Variant(name="V", lineage="B.1.1.7", transmissibility=1.0, hospitalisation=2.0,
                      introduced="2021-01-03", importation_per_100k=300.0)
    p = EpidemicParams(**{**ONE_LAYER, "variants": (variant,)}, beta_community=0.0,
                       ihr=(0.05,) * 10, hosp_delay=0, importation_per_100k=300.0)
    r = run(flat_population(n), p, days=56, seed=8, start_date="2021-01-03")
    sym = r.series["symptomatic_by_lineage"].sum(0)
    # equal importation: about half the onsets each; admissions in proportion 1 : 2
    assert float(sym[1] / sym.sum()) == pytest.approx(0.5, abs=0.03)
    st = r.final_state
    hosp = ((st.flags & 2) != 0)
    lin = st.lineage.long()
    rate = [float(hosp[lin == i].sum()) / float(((st.flags & 1) != 0)[lin == i].sum()) for i in (0, 1)]
    assert rate[1] / rate[0] == pytest.approx(2.0, rel=0.2), rate
    shares = simulated_lineage_shares(r.series["symptomatic_by_lineage"], "2021-01-03", p)
    assert set(shares.columns) >= {"period_start", "period_end", "variant", "simulated_percent"}
    for _, group in shares.groupby("period_start"):
        assert float(group["simulated_percent"].sum()) == pytest.approx(100.0)
    first = shares[shares.period_start == shares.period_start.min()].set_index("variant")["simulated_percent"]
    expected = float(r.series["symptomatic_by_lineage"][:28, 1].sum() / r.series["symptomatic_by_lineage"][:28].sum())
    assert float(first["B.1.1.7"]) == pytest.approx(100 * expected)
    assert float(first["Other"]) == pytest.approx(100 * (1 - expected))


@pytest.mark.slow
def test_a_run_into_2021_writes_lineage_shares_beside_the_observed(tmp_path, monkeypatch):
    """An experiment that reaches NYC's sequencing periods writes lineages.csv: per 4-week period the
    simulated and the observed shares (each period's simulated shares add up to 100)."""
    import respx

    from lpm_llm.runner.experiment import Experiment
    from tests.regression.cases import ENDPOINT, KEY_ENV, _answer

    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-secret")
    overrides = ["population.scale=0.002", "start_date=2021-01-03", "days=28", "outputs.plots=false",
                 "llm.provider=openai", "llm.model=mock", f"llm.base_url={ENDPOINT}", f"llm.api_key_env={KEY_ENV}",
                 'llm.cache_mode="off"', "llm.max_retries=0", "epidemic.importation_per_100k=5.0"]
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
        Experiment.from_yaml("covid_nyc.yaml", overrides).run(tmp_path / "run")
    import pandas as pd

    table = pd.read_csv(tmp_path / "run" / "lineages.csv")
    assert list(table["period_start"].unique()) == ["2021-01-03"]  # the one complete period in the run
    assert table["simulated_percent"].sum() == pytest.approx(100.0)
    observed = table.set_index("variant")["observed_percent"]
    assert observed["B.1.526"] == pytest.approx(100 * (73 + 225) / 2565, rel=1e-6)  # both B.1.526 rows
    assert observed["Other"] == pytest.approx(100 * (22 + 44 + 2146) / 2565, rel=1e-6)
