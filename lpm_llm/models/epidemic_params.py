"""The epidemic model's parameters: every default with its units, bounds and source.

``EpidemicParams`` is the validated, immutable set a run is configured with (the ``epidemic:`` block of
an experiment); ``TENSOR_PARAMS`` names the float parameters that a simulation may also take as
tensors (for example ``nn.Parameter`` values being calibrated), with their shapes. The dynamics that
use them are in :mod:`lpm_llm.models.seirm`.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lpm_llm.core.parameters import Bounded
from lpm_llm.population import AGE_BANDS

__all__ = ["NYC_VARIANTS", "TENSOR_PARAMS", "EpidemicParams", "Variant"]

_A = len(AGE_BANDS)


def _per_age(values: tuple[float, ...], name: str) -> tuple[float, ...]:
    if len(values) != _A:
        raise ValueError(
            f"{name} needs one value per age band ({_A}: {', '.join(AGE_BANDS)}), got {len(values)}"
        )
    return values


class Variant(BaseModel):
    """A lineage other than the resident one: its transmissibility and severity relative to the
    resident (ancestral, D614G) lineage, and its introduction by importation.

    Infectiousness of an agent infected with it is x ``transmissibility``; its probabilities of
    hospital admission and death (per symptomatic infection) are x ``hospitalisation`` and x
    ``fatality``. From ``introduced`` on, ``importation_per_100k`` infections of this lineage are
    imported per day per 100,000 fully susceptible residents (a calibrated rate; the defaults are
    assumptions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., description="WHO label, e.g. Alpha")
    lineage: str = Field(..., description="Pango lineage as in variants_4weekly.csv, e.g. B.1.1.7")
    transmissibility: float = Field(1.0, gt=0, le=10)
    hospitalisation: float = Field(1.0, gt=0, le=10)
    fatality: float = Field(1.0, gt=0, le=10)
    introduced: date = Field(..., description="first day of importation")
    importation_per_100k: float = Field(0.2, ge=0, le=1e5)
    source: str = ""


# Relative severity of Alpha (and of Gamma, which Ontario counted with it as N501Y-positive) and of
# Delta: Fisman & Tuite 2021, CMAJ 193:E1619 (Ontario, against non-variant infections; adjusted odds
# ratios of hospitalisation 1.52 and 2.08, of death 1.51 and 2.33).
NYC_VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="Iota", lineage="B.1.526", transmissibility=1.15, introduced="2020-11-01",
        source="first sequenced in NYC in November 2020 (Annavajhala et al. 2021, Nature 597:703), 41% of "
        "NYC's sequenced cases in 2021-02-28 .. 03-27 (variants_4weekly.csv); no higher risk of hospitalisation "
        "or death than other lineages (Thompson et al. 2021, MMWR 70:712); relative transmissibility 1.15 is "
        "an assumption (calibrate against the shares)",
    ),
    Variant(
        name="Alpha", lineage="B.1.1.7", transmissibility=1.5, hospitalisation=1.52, fatality=1.51,
        introduced="2020-12-15",
        source="reproduction number 43-90% higher (Davies et al. 2021, Science 372:eabg3055); severity: "
        "Fisman & Tuite 2021 (CMAJ 193:E1619); first New York cases early January 2021",
    ),
    Variant(
        name="Gamma", lineage="P.1", transmissibility=1.7, hospitalisation=1.52, fatality=1.51,
        introduced="2021-02-15",
        source="1.7-2.4 times as transmissible (Faria et al. 2021, Science 372:815; lower end taken, its "
        "immune escape is not modelled); severity as N501Y-positive variants in Fisman & Tuite 2021",
    ),
    Variant(
        name="Delta", lineage="B.1.617.2", transmissibility=1.97, hospitalisation=2.08, fatality=2.33,
        introduced="2021-04-15",
        source="reproduction number 97% higher than non-variant lineages (Campbell et al. 2021, Euro "
        "Surveill 26:2100509); severity: Fisman & Tuite 2021 (CMAJ 193:E1619)",
    ),
)


class EpidemicParams(BaseModel):
    """Every parameter of the epidemic model, with default, bounds, units and source.

    Age-specific values are tuples in ``AGE_BANDS`` order (0-4, 5-12, 13-17, 18-24, 25-34, 35-44,
    45-54, 55-64, 65-74, 75+). Published figures come in 10-year bands; a band of ours that straddles
    two published bands takes their average weighted by years covered.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- transmission ---------------------------------------------------------------------------
    beta_household: float = Field(
        0.20,
        ge=0,
        le=10,
        description=(
            "per day: daily transmission rate of one (symptomatic) infectious agent spread over the other "
            "household members (frequency-dependent: a contact in a household of n takes beta/(n-1)). "
            "Measured at the defaults (tests/test_epidemic_review.py, one index case per household of the "
            "synthetic NYC, household contacts infected over the following 60 days): secondary attack rate "
            "0.18 over all household contacts, 0.35 in households of two. Published: 16.6% (95% CI "
            "14.0-19.3) over household contacts, 37.8% to spouses (Madewell et al. 2020, JAMA Netw Open "
            "3:e2031756). beta_scale multiplies it as every layer; calibrate"
        ),
    )
    beta_school: float = Field(
        0.80, ge=0, le=10, description="per day, spread over the classroom; assumption, calibrate"
    )
    beta_workplace: float = Field(
        0.80, ge=0, le=10, description="per day, spread over the workplace; assumption, calibrate"
    )
    beta_community: float = Field(
        0.70,
        ge=0,
        le=10,
        description=(
            "per day for an agent with the population's mean community contacts, at 100% prevalence of "
            "infectious contacts; assumption, calibrate. The school, workplace and community rates were "
            "doubled with issue 15 when the infectious period went from 7 to 3.5 days, so that each "
            "layer's reproduction number stays what it was"
        ),
    )
    beta_scale: float = Field(1.0, ge=0, le=10, description="dimensionless multiplier of every layer's rate")
    transmission_change: float | tuple[float, ...] = Field(
        1.0,
        description=(
            "multiplier of every layer's rate in the second, third, ... calendar month from the start date, "
            "relative to the first month (one value, or one per month; the last one holds after). It carries "
            "what the intervention schedule and the isolation decisions leave out: voluntary distancing, "
            "masks, the pace of reopening, infections imported from outside the city. 1.0: none; calibrate"
        ),
    )
    community_contacts: Literal["prem2017_usa", "stylised"] = Field(
        "prem2017_usa",
        description=(
            "age structure of community contacts: 'prem2017_usa', the United States' contacts at other "
            "locations by age (Prem, Cook & Jit 2017, PLoS Comput Biol 13:e1005697; shipped in "
            "lpm_llm/data/contacts with its source), with age-specific volumes (75+: 1.6 contacts a day, "
            "25-34: 4.5); 'stylised': every band the same volume, `community_assortativity` of it in "
            "one's own band (the model before issue 15)"
        ),
    )
    community_assortativity: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "with community_contacts 'stylised': share of community contacts within one's own age band"
        ),
    )
    community_matrix: tuple[tuple[float, ...], ...] | None = Field(
        None, description=("(A, A) age contact matrix (contacts per day) replacing community_contacts")
    )
    cross_borough_share: float = Field(
        0.1, ge=0, le=1, description="share of community contacts outside one's borough; assumption"
    )
    isolation_compliance: float = Field(
        0.7,
        ge=0,
        le=1,
        description=(
            "share of school, work and community contacts an isolating agent drops; assumption, calibrate"
        ),
    )

    # -- susceptibility and infectiousness --------------------------------------------------------
    susceptibility: tuple[float, ...] = Field(
        (0.40, 0.39, 0.38, 0.67, 0.82, 0.83, 0.81, 0.85, 0.81, 0.74),
        description="relative susceptibility by age band; Davies et al. 2020, Nat Med 26:1205, "
        "Fig. 1 posterior means "
        "(0-9: 0.40, 10-19: 0.38, 20-29: 0.79, 30-39: 0.86, 40-49: 0.80, 50-59: 0.82, "
        "60-69: 0.88, 70+: 0.74)",
    )
    rel_infectiousness_asymptomatic: float = Field(
        0.75,
        ge=0,
        le=1,
        description=(
            "infectiousness of asymptomatic relative to symptomatic cases; CDC COVID-19 Pandemic Planning "
            "Scenarios (2020), best estimate 75%"
        ),
    )

    # -- natural history ------------------------------------------------------------------------
    duration_distribution: Literal["gamma", "exponential"] = "gamma"
    latent_mean: float = Field(
        2.5,
        ge=1,
        le=60,
        description=(
            "days from infection to infectiousness (the realized mean of the whole-day draws; an agent "
            "transmits from the next day). Incubation median 5.1 d (Lauer et al. 2020, Ann Intern Med "
            "172:577) less 2.3 d of presymptomatic infectiousness (He et al. 2020, Nat Med 26:672) is "
            "about 2.8 d; 2.5 d with infectious_mean 3.5 d gives a generation interval of 5.2 d (SD 2.1), "
            "the published ancestral-strain estimates: 5.0 d (SD 1.9; Ferretti et al. 2020, Science "
            "368:eabb6936), 5.20 d (Singapore; Ganyani et al. 2020, Euro Surveill 25:2000257)"
        ),
    )
    latent_shape: float = Field(4.0, gt=0, le=1e5, description="gamma shape of the latent period")
    infectious_mean: float = Field(
        3.5,
        ge=1,
        le=60,
        description=(
            "days infectious (realized mean of the whole-day draws), at constant infectiousness: the "
            "effective infectious period, about 2.3 d before to 1-2 d after symptom onset, where He et al. "
            "2020 (Nat Med 26:672) put most transmission (44% presymptomatic). With latent_mean 2.5 d the "
            "generation interval is 5.2 d (see latent_mean; `generation_interval_pmf`)"
        ),
    )
    infectious_shape: float = Field(4.0, gt=0, le=1e5, description="gamma shape of the infectious period")

    # -- infection-acquired immunity ----------------------------------------------------------------
    immunity_mean: float | None = Field(
        365.0,
        ge=1,
        le=10000,
        description=(
            "days of full protection after an infection (realized mean; a geometric duration, i.e. a "
            "constant daily waning probability 1/mean), after which the agent is susceptible again with "
            "`reinfection_susceptibility`; None: lifelong. With 0.5 below, protection against reinfection "
            "6 months after infection is 1 - (1 - exp(-182/365)) x 0.5 = 80%: Hansen et al. 2021 (Lancet "
            "397:1204) measured 80.5% (95% CI 75.4-84.5) in Denmark in 2020, Hall et al. 2021 (SIREN, "
            "Lancet 397:1459) 84% (74-90) over a median 7 months. Assumption within those, calibrate"
        ),
    )
    reinfection_susceptibility: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "susceptibility of an agent whose infection-acquired immunity has waned, relative to one never "
            "infected (see immunity_mean for the sources it is chosen against); assumption"
        ),
    )

    # -- importation and variants --------------------------------------------------------------------
    importation_per_100k: float = Field(
        0.0,
        ge=0,
        le=1e5,
        description=(
            "infections imported from outside the city per day per 100,000 fully susceptible residents "
            "(a daily hazard of importation_per_100k / 1e5, times the agent's susceptibility), of the "
            "resident lineage, every day of the run (day-0 seeding is initial_infections_per_100k). 0: "
            "none. Unknown: calibrate (a value > 0 makes it a calibrated parameter)"
        ),
    )
    variants: tuple[Variant, ...] = Field(
        default_factory=lambda: NYC_VARIANTS,
        description="lineages other than the resident one, introduced by importation (see Variant)",
    )

    # -- case isolation ---------------------------------------------------------------------------------
    case_isolation_compliance: float = Field(
        0.43,
        ge=0,
        le=1,
        description=(
            "share of reported cases who isolate (drop every school, work and community contact) from "
            "the day they are known until the end of their infectious period: self-reported full "
            "adherence to self-isolation, 42.5% (95% CI 39.7-45.3), Smith et al. 2021, BMJ 372:n608 "
            "(UK CORSAIR surveys). Which cases are reported follows `ascertainment`; calibrate"
        ),
    )
    case_isolation_delay: int | None = Field(
        None,
        ge=0,
        le=60,
        description=(
            "days from the start of infectiousness to a reported case's isolation; None: report_delay "
            "(a case isolates when it is known)"
        ),
    )

    # -- severity by age ------------------------------------------------------------------------
    p_symptomatic: tuple[float, ...] = Field(
        (0.29, 0.26, 0.21, 0.25, 0.30, 0.37, 0.45, 0.56, 0.66, 0.69),
        description="probability that an infection is symptomatic (clinical fraction), "
        "Davies et al. 2020, Fig. 1 "
        "(0-9: 0.29, 10-19: 0.21, 20-29: 0.27, 30-39: 0.33, 40-49: 0.40, 50-59: 0.49, "
        "60-69: 0.63, 70+: 0.69)",
    )
    ihr: tuple[float, ...] = Field(
        (0.0, 0.00015, 0.00041, 0.0075, 0.0224, 0.0384, 0.0621, 0.0998, 0.142, 0.175),
        description="infections admitted to hospital, by age; Verity et al. 2020, "
        "Lancet Infect Dis 20:669, Table 3 "
        "(0-9: 0%, 10-19: 0.04%, 20-29: 1.0%, 30-39: 3.4%, 40-49: 4.3%, 50-59: 8.2%, 60-69: 11.8%, "
        "70-79: 16.6%, 80+: 18.4%)",
    )
    ifr: tuple[float, ...] = Field(
        (7.3e-06, 1.59e-05, 3.48e-05, 7.19e-05, 0.0002, 0.00067, 0.00224, 0.00748, 0.025, 0.106),
        description="infection fatality ratio by age; Levin et al. 2020, Eur J Epidemiol 35:1123: "
        "log10(IFR %) = -3.27 + 0.0524 * age, at band mid-ages 2.5, 9, 15.5, 21.5, 30, 40, 50, 60, 70, 82",
    )
    fatality_scale: float | tuple[float, ...] = Field(
        1.0, description="multiplier of the IFR (calibrated: care, variants): one value, or one per calendar month "
        "of symptom onset from the start date's month (the last one holds after; the whole-period fit: the "
        "first wave's fatality was not the later months')"
    )

    # -- seeding, reporting and delays ------------------------------------------------------------
    initial_infections_per_100k: tuple[float, ...] = Field(
        (10.0, 10.0, 10.0, 10.0, 10.0),
        description=(
            "infections imported on day 0 per 100,000 residents, by borough (BOROUGHS order); the number "
            "of undetected infections in NYC on 1 March 2020 is unknown: calibrate"
        ),
    )
    ascertainment: float | tuple[float, ...] = Field(
        0.1,
        description=(
            "share of symptomatic onsets reported as cases: one value, or one per calendar month from the "
            "start date's month (the last one holds after). About 0.1 in spring 2020: "
            "NYC reported ~2% of its "
            "residents as cases by late April while serology found 22.7% infected (Rosenberg et al. 2020, "
            "Ann Epidemiol 48:23)"
        ),
    )
    ascertainment_by_borough: float | tuple[float, ...] = Field(
        1.0,
        description=(
            "relative ascertainment by borough (BOROUGHS order; one value: the same everywhere), scaled to a "
            "geometric mean of 1 so that the city-wide level stays in `ascertainment`: access to testing "
            "differed by borough in 2020; calibrate"
        ),
    )
    report_delay: int = Field(
        6,
        ge=0,
        le=60,
        description=(
            "days from the start of infectiousness (the model's onset event) to a reported case: symptom "
            "onset about 2.6 d later (incubation 5.1 d less latent_mean 2.5 d) plus 3 d to a report "
            "(assumption)"
        ),
    )
    hosp_delay: int = Field(
        10,
        ge=0,
        le=60,
        description=(
            "days from the start of infectiousness to hospital admission: symptom onset 2.6 d later (see "
            "report_delay) plus onset to admission, median about 6-7 d (CDC Pandemic Planning Scenarios)"
        ),
    )
    death_delay: int = Field(
        17,
        ge=0,
        le=120,
        description=(
            "days from the end of infectiousness to death: infection to death 22.9 d (incubation 5.1 d, "
            "Lauer et al. 2020, plus onset to death 17.8 d, Verity et al. 2020) less latent_mean and "
            "infectious_mean (6 d)"
        ),
    )

    @field_validator("susceptibility", "p_symptomatic", "ihr", "ifr")
    @classmethod
    def _one_per_age_band(cls, v: tuple[float, ...], info) -> tuple[float, ...]:
        _per_age(v, info.field_name)
        if any(x < 0 or x > 1 for x in v) and info.field_name != "susceptibility":
            raise ValueError(f"{info.field_name} values must lie in [0, 1]")
        if any(x < 0 for x in v):
            raise ValueError(f"{info.field_name} values must be >= 0")
        return v

    @field_validator("initial_infections_per_100k")
    @classmethod
    def _one_per_borough(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x < 0 or x > 1e5 for x in v):
            raise ValueError("initial_infections_per_100k values must lie in [0, 100000]")
        return v

    @field_validator("ascertainment")
    @classmethod
    def _fraction(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = (v,) if isinstance(v, float | int) else v
        if not values or any(x < 0 or x > 1 for x in values):
            raise ValueError("ascertainment must be a value in [0, 1] or a non-empty list of them")
        return v

    @field_validator("ascertainment_by_borough")
    @classmethod
    def _relative(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = (v,) if isinstance(v, float | int) else v
        if not values or any(not 0 < x <= 100 for x in values):
            raise ValueError("ascertainment_by_borough must be a value in (0, 100] or a non-empty list of them")
        return v

    @field_validator("fatality_scale")
    @classmethod
    def _fatality(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = (v,) if isinstance(v, float | int) else v
        if not values or any(not 0 <= x <= 10 for x in values):
            raise ValueError("fatality_scale must be a value in [0, 10] or a non-empty list of them (one per month)")
        return v

    @field_validator("transmission_change")
    @classmethod
    def _multipliers(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = (v,) if isinstance(v, float | int) else v
        if not values or any(not 0 <= x <= 100 for x in values):
            raise ValueError("transmission_change must be a value in [0, 100] or a non-empty list of them")
        return v

    @field_validator("community_matrix")
    @classmethod
    def _matrix(cls, v: tuple[tuple[float, ...], ...] | None) -> tuple[tuple[float, ...], ...] | None:
        if v is not None and (len(v) != _A or any(len(row) != _A for row in v)):
            raise ValueError(f"community_matrix must be {_A} x {_A} (AGE_BANDS x AGE_BANDS)")
        return v


#: parameters that may be given as tensors (with requires_grad) to override EpidemicParams; shapes:
#: () scalar, "A" one per age band, "B" one per borough (or a scalar: the same in every borough),
#: "M" one per month (or a scalar; ``transmission_change`` one per month after the first).
TENSOR_PARAMS: dict[str, str] = {
    "beta_household": "()",
    "beta_school": "()",
    "beta_workplace": "()",
    "beta_community": "()",
    "beta_scale": "()",
    "transmission_change": "M",
    "isolation_compliance": "()",
    "rel_infectiousness_asymptomatic": "()",
    "susceptibility": "A",
    "p_symptomatic": "A",
    "ihr": "A",
    "ifr": "A",
    "fatality_scale": "M",
    "initial_infections_per_100k": "B",
    "importation_per_100k": "()",
    "reinfection_susceptibility": "()",
    "case_isolation_compliance": "()",
    "ascertainment": "M",
    "ascertainment_by_borough": "B",
}


def calibrated_specs(
    params: EpidemicParams, n_months: int, n_boroughs: int, *, seeding_by_borough: bool = True
) -> dict[str, Bounded]:
    """The epidemic's calibrated parameters (see :func:`lpm_llm.calibrate.first_wave_space` for the
    table of names, shapes, ranges and meanings), initialised from `params` clipped into range."""
    asc = params.ascertainment if isinstance(params.ascertainment, tuple) else (params.ascertainment,)
    asc = list(asc[:n_months]) + [asc[-1]] * max(0, n_months - len(asc))
    change = params.transmission_change
    change = change if isinstance(change, tuple) else (change,)
    change = list(change[: n_months - 1]) + [change[-1]] * max(0, n_months - 1 - len(change))
    rel = params.ascertainment_by_borough
    rel = [float(rel)] * n_boroughs if isinstance(rel, float | int) else list(rel)
    fatality = params.fatality_scale  # one value (the first-wave fits), or one per month
    if isinstance(fatality, tuple):
        fatality = list(fatality[:n_months]) + [fatality[-1]] * max(0, n_months - len(fatality))
    seeds = list(params.initial_infections_per_100k)
    if len(seeds) != n_boroughs:
        raise ValueError(f"initial_infections_per_100k has {len(seeds)} values, expected {n_boroughs}")

    def clip(x, lo, hi):
        return np.clip(np.asarray(x, dtype=float), lo, hi).tolist()

    specs = {
        "beta_scale": Bounded(0.2, 5.0, clip(params.beta_scale, 0.2, 5.0), log=True,
                              doc="multiplier of every layer's transmission rate (layer ratios fixed)"),
        "transmission_change": Bounded(0.1, 10.0, clip(change, 0.1, 10.0), (n_months - 1,), log=True,
                                       doc="multiplier of transmission in months 2..M relative to month 1"),
        "initial_infections_per_100k": (
            Bounded(1.0, 5000.0, clip(seeds, 1.0, 5000.0), (n_boroughs,), log=True,
                    doc="infections on day 0 per 100,000 residents, by borough")
            if seeding_by_borough else
            Bounded(1.0, 5000.0, clip(float(np.mean(seeds)), 1.0, 5000.0), log=True,
                    doc="infections on day 0 per 100,000 residents, the same in every borough")
        ),
        "ascertainment": Bounded(0.01, 1.0, clip(asc, 0.01, 1.0), (n_months,), log=True,
                                 doc="share of symptomatic onsets reported as cases, per calendar month"),
        "ascertainment_by_borough": Bounded(0.2, 5.0, clip(rel, 0.2, 5.0), (n_boroughs,), log=True,
                                            doc="relative ascertainment by borough (scaled to geometric mean 1)"),
        "fatality_scale": (
            Bounded(0.1, 10.0, clip(fatality, 0.1, 10.0), (n_months,), log=True,
                    doc="multiplier of the infection fatality ratio by age, per calendar month of onset")
            if isinstance(fatality, list) else
            Bounded(0.1, 10.0, clip(fatality, 0.1, 10.0), log=True,
                    doc="multiplier of the infection fatality ratio by age")
        ),
    }
    if params.importation_per_100k > 0:  # continuous importation is fitted where a run enables it
        specs["importation_per_100k"] = Bounded(
            0.01, 100.0, clip(params.importation_per_100k, 0.01, 100.0), log=True,
            doc="infections imported per day per 100,000 susceptible residents (resident lineage)")
    if n_months < 2:
        del specs["transmission_change"]
    return specs
