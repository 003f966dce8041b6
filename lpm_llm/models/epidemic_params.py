"""The epidemic model's parameters: every default with its units, bounds and source.

``EpidemicParams`` is the validated, immutable set a run is configured with (the ``epidemic:`` block of
an experiment); ``TENSOR_PARAMS`` names the float parameters that a simulation may also take as
tensors (for example ``nn.Parameter`` values being calibrated), with their shapes. The dynamics that
use them are in :mod:`lpm_llm.models.seirm`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lpm_llm.core.parameters import Bounded
from lpm_llm.population import AGE_BANDS

__all__ = ["TENSOR_PARAMS", "EpidemicParams"]

_A = len(AGE_BANDS)


def _per_age(values: tuple[float, ...], name: str) -> tuple[float, ...]:
    if len(values) != _A:
        raise ValueError(
            f"{name} needs one value per age band ({_A}: {', '.join(AGE_BANDS)}), got {len(values)}"
        )
    return values


class EpidemicParams(BaseModel):
    """Every parameter of the epidemic model, with default, bounds, units and source.

    Age-specific values are tuples in ``AGE_BANDS`` order (0-4, 5-12, 13-17, 18-24, 25-34, 35-44,
    45-54, 55-64, 65-74, 75+). Published figures come in 10-year bands; a band of ours that straddles
    two published bands takes their average weighted by years covered.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- transmission ---------------------------------------------------------------------------
    beta_household: float = Field(
        0.10,
        ge=0,
        le=10,
        description=(
            "per day: daily transmission rate of one (symptomatic) infectious agent spread over the other "
            "household members. Chosen so that the secondary attack rate 1 - exp(-beta*D*susc/(n-1)) is "
            "about 0.15-0.35 for households of 2-4 with D=7 d, in line with the household SAR of 16.6% "
            "(Madewell et al. 2020, JAMA Netw Open 3:e2031756); calibrate"
        ),
    )
    beta_school: float = Field(
        0.40, ge=0, le=10, description="per day, spread over the classroom; assumption, calibrate"
    )
    beta_workplace: float = Field(
        0.40, ge=0, le=10, description="per day, spread over the workplace; assumption, calibrate"
    )
    beta_community: float = Field(
        0.35,
        ge=0,
        le=10,
        description=(
            "per day, at 100% prevalence of infectious contacts; assumption, calibrate. With the other "
            "defaults the synthetic NYC grows at about 0.13/day without interventions (R0 about 3)"
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
    community_assortativity: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "share of community contacts within one's own age band (stylised POLYMOD, Mossong et al. 2008)"
        ),
    )
    community_matrix: tuple[tuple[float, ...], ...] | None = Field(
        None, description=("(A, A) row-stochastic age contact matrix replacing the stylised one")
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
        4.0,
        ge=0.5,
        le=60,
        description=(
            "days from infection to infectiousness; incubation median 5.1 d (Lauer et al. 2020, Ann Intern "
            "Med 172:577) less about 1 day of presymptomatic infectiousness (He et al. 2020, Nat Med 26:672)"
        ),
    )
    latent_shape: float = Field(4.0, gt=0, le=1e5, description="gamma shape of the latent period")
    infectious_mean: float = Field(
        7.0,
        ge=0.5,
        le=60,
        description=(
            "days infectious; CDC Pandemic Planning Scenarios: from 2 days before to about 10 days "
            "after onset "
            "for mild cases, most transmission in the first week"
        ),
    )
    infectious_shape: float = Field(4.0, gt=0, le=1e5, description="gamma shape of the infectious period")

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
    fatality_scale: float = Field(
        1.0, ge=0, le=10, description="multiplier of the IFR (calibrated: care, variants)"
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
        3, ge=0, le=60, description="days from symptom onset to a reported case; assumption"
    )
    hosp_delay: int = Field(
        7,
        ge=0,
        le=60,
        description=(
            "days from symptom onset to hospital admission; CDC Pandemic Planning "
            "Scenarios (median about 6-7 d)"
        ),
    )
    death_delay: int = Field(
        11,
        ge=0,
        le=120,
        description=(
            "days from the end of infectiousness to death: onset to death 17.8 d (Verity et al. 2020) less "
            "the infectious days after onset"
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
    "fatality_scale": "()",
    "initial_infections_per_100k": "B",
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
        "fatality_scale": Bounded(0.1, 10.0, clip(params.fatality_scale, 0.1, 10.0), log=True,
                                  doc="multiplier of the infection fatality ratio by age"),
    }
    if n_months < 2:
        del specs["transmission_change"]
    return specs
