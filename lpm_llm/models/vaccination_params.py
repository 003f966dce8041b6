"""The vaccination model's settings, with their sources: New York's eligibility schedule, the groups
the synthetic population cannot represent (and how they are approximated), the vaccine mix and dose
intervals, efficacy by dose and its waning, the supply from the city's data, and the prior immunity
of a run that starts after the first wave.

Eligibility (New York State, which set eligibility for New York City; each date is the first day
people in the group could be vaccinated, from the Governor's announcements as reported on the day):

==========  ===============================================================================
2020-12-14  Phase 1a: health care workers (first doses in NYC that day; high-risk hospital staff
            first, all health care workers by 2021-01-04). NYS Governor's press releases,
            December 2020 - January 2021.
2021-01-11  Phase 1b: people aged 75+, and frontline essential workers (teachers and school
            staff, first responders, public safety, public transit, grocery workers).
2021-01-12  People aged 65+ (NYS followed the federal guidance of 2021-01-12 the same day).
2021-02-15  People aged 16-64 with comorbidities or underlying conditions.
2021-03-10  People aged 60+ ("Starting at 8 a.m. Wednesday [March 10]", CBS New York, 2021-03-09,
            https://newyork.cbslocal.com/2021/03/09/ny-covid-vaccine-expansion-60-and-older/).
2021-03-17  Public-facing government and nonprofit workers, building service workers (same source).
2021-03-23  People aged 50+ ("Beginning tomorrow at 8 a.m.", Governor's briefing 2021-03-22;
            https://riverheadlocal.com/2021/03/22/ny-expands-covid-19-vaccine-eligibility-to-everyone-over-age-50/).
2021-03-30  People aged 30+ ("Beginning Tuesday, March 30 at 8 a.m.", Governor's press release
            2021-03-29; https://www.perugazette.com/2021/03/29/nys-announces-30-years-of-age-and-older-will-be-eligible-to-receive-covid-10-vaccine/).
2021-04-06  People aged 16+ (universal adult eligibility, same press release).
2021-05-13  People aged 12-15 (Pfizer; NYS Clinical Advisory Task Force approval the night before,
            "allowed us to begin administering the vaccine to this newly eligible age group today",
            Governor's update of 2021-05-13, https://www.nystia.org/news/nys-coronavirus-update-pfizer-vaccine-expansion-for-12-15-year-olds).
==========  ===============================================================================

What the synthetic population cannot represent, and the approximation used (all drawn once per
population, from ``group_seed``, so that every run of an experiment has the same groups):

- Exact age: agents have age bands. Each agent draws a whole age uniformly within its band (75+ as
  75-89), so that 16-17 are 2/5 of the 13-17 band, 12 is 1/8 of the 5-12 band, and 60-64, 50-54
  and 30-34 are half of their bands (a uniform age distribution within a band).
- Occupation: the population has ``employed`` but no occupation. A share of the employed aged 18-64
  is drawn into each occupational group: health care workers ``share_health_care`` (about 10% of
  employed NYC residents work in hospitals, ambulatory care and nursing facilities; ACS 2015-2019
  DP03 puts 26-30% in "educational services, and health care and social assistance" combined),
  frontline essential workers of phase 1b ``share_essential`` (teachers, first responders, transit
  and grocery workers: NYS estimated phase 1b at about 3.2 million people state-wide including
  1.4 million aged 75+, i.e. roughly 1.8 million workers of 9.5 million employed New Yorkers),
  public-facing workers of 2021-03-17 ``share_public_facing`` (an assumption: 5%).
- Comorbidities: a share of each adult age band ``comorbidity_by_band`` has an eligible condition
  (approximately the age gradient of Adams, Katz and Grandpre, "Population-based estimates of
  chronic conditions affecting risk for complications from coronavirus disease, United States",
  Emerging Infectious Diseases 26(8), 2020: 45.4% of US adults with at least one condition,
  rising steeply with age).
- Nursing home residents (phase 1a from 2020-12-21, about 0.4% of New Yorkers) are not represented.

Efficacy (against infection, i.e. a multiplier ``1 - VE`` of the force of infection, and against
severe outcomes, i.e. hospitalisation and death per exposure), by dose:

- after dose 1 (from day 14 until full protection): infection 0.46, severe 0.74 (Dagan et al.,
  "BNT162b2 mRNA Covid-19 vaccine in a nationwide mass vaccination setting", NEJM 384:1412, 2021:
  days 14-20 after the first dose, documented infection 46%, hospitalisation 74%; Polack et al.,
  NEJM 383:2603, 2020, 52% between doses);
- fully vaccinated with an mRNA vaccine (from 7 days after dose 2): infection 0.92, severe 0.92
  (Dagan et al.: documented infection 92%, severe disease 92%; Polack et al.: 95% against
  symptomatic disease; Baden et al., "Efficacy and safety of the mRNA-1273 SARS-CoV-2 vaccine",
  NEJM 384:403, 2021: 94.1%);
- Janssen (one dose, from day 14): infection 0.66, severe 0.85 (Sadoff et al., NEJM 384:2187, 2021:
  66% against moderate to severe-critical disease, 85% against severe-critical disease from day 28).

Waning: from full protection, ``VE(tau) = VE0 * exp(-rate * tau)`` (tau in days). Against infection
the rate is ``ln(0.92 / 0.70) / 140`` per day (0.92 to about 0.70 after 20 weeks: Goldberg et al.,
"Waning immunity after the BNT162b2 vaccine in Israel", NEJM 385:e85, 2021; Andrews et al.,
"Duration of protection against mild and severe disease by Covid-19 vaccines", NEJM 386:340, 2022:
BNT162b2 against symptomatic disease about 90% at 2-9 weeks and about 70% at 20+ weeks); against
severe outcomes ``ln(0.92 / 0.85) / 140`` (Andrews et al.: protection against hospitalisation
waned little). Dose-1 protection does not wane in the model (it lasts 3-4 weeks).

The severity multiplier handed to the epidemic is conditional on infection: ``(1 - VE_severe) /
(1 - VE_infection)`` (at most 1), so that hospitalisations and deaths per exposure fall by
``VE_severe``.

Vaccine mix: 55% Pfizer-BioNTech (dose 2 after 21 days), 40% Moderna (28 days), 5% Janssen (one
dose, first doses from 2021-03-03) (roughly the US shares of doses administered by June 2021, CDC
COVID Data Tracker; New York City does not publish doses by manufacturer in the bundled data);
before Janssen's first doses the mRNA vaccines keep their 55:40 ratio. Every mRNA recipient takes
the second dose on time (so the fully vaccinated count is an upper bound: about 5-8% of US
recipients missed it).

Supply: the week's first doses are at most ``supply_scale`` times the city-wide increase of
residents with at least one dose (``vaccination_daily.csv``) over the same 7 days, scaled to the
agents: the realised doses are an upper bound of what the city could give (supply and appointments
were the binding limits until April 2021), and a fitted ``supply_scale`` moves it.

Prior immunity (a run that starts after the first wave): each agent has been infected before the
start with its borough's share, estimated from reported cases (cases + probable cases in
``covid_daily.csv``): ``spring_ratio`` infections per case through 2020-04-30 (10.6, which makes the
city-wide share 22.7% at the end of April, the New York State antibody survey of April 2020:
Rosenberg et al., Annals of Epidemiology 48:23, 2020), ``later_ratio`` infections per case after
(4.0, an assumption: testing was widely available from May 2020; cf. Reese et al., Clinical
Infectious Diseases 72:e1010, 2021, about 1 in 4.6 symptomatic illnesses reported in the US to
September 2020). On 2020-12-01 that gives Bronx 38%, Brooklyn 27%, Manhattan 20%, Queens 33%,
Staten Island 38%. Those agents are fully protected against infection for the whole run (the
simplest honest start; the epidemic model's own infection-acquired immunity with waning is not
part of this model).
"""

from __future__ import annotations

import datetime as dt
import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ELIGIBILITY", "Eligibility", "VaccinationParams"]


class Eligibility:
    """One step of the schedule: the date and who became eligible (``kind``: ``age`` with a minimum
    age ``min_age`` (and a maximum ``max_age``), or an occupational or medical ``group``)."""

    def __init__(self, date: str, kind: str, label: str, *, min_age: int | None = None, max_age: int | None = None,
                 group: str | None = None):
        self.date = dt.date.fromisoformat(date)
        self.kind, self.label, self.min_age, self.max_age, self.group = kind, label, min_age, max_age, group


ELIGIBILITY: tuple[Eligibility, ...] = (
    Eligibility("2020-12-14", "group", "health care workers", group="health_care"),
    Eligibility("2021-01-11", "age", "people aged 75 and older", min_age=75),
    Eligibility("2021-01-11", "group", "teachers, first responders, transit and grocery workers", group="essential"),
    Eligibility("2021-01-12", "age", "people aged 65 and older", min_age=65),
    Eligibility("2021-02-15", "group", "adults with underlying health conditions", group="comorbidity"),
    Eligibility("2021-03-10", "age", "people aged 60 and older", min_age=60),
    Eligibility("2021-03-17", "group", "public-facing government and nonprofit workers", group="public_facing"),
    Eligibility("2021-03-23", "age", "people aged 50 and older", min_age=50),
    Eligibility("2021-03-30", "age", "people aged 30 and older", min_age=30),
    Eligibility("2021-04-06", "age", "everyone aged 16 and older", min_age=16),
    Eligibility("2021-05-13", "age", "children aged 12 to 15", min_age=12, max_age=15),
)
"""New York's schedule (sources in the module docstring)."""

# whole ages spanned by each age band (AGE_BANDS order: 0-4 ... 75+; 75+ as 75-89)
BAND_AGES: tuple[tuple[int, int], ...] = (
    (0, 4), (5, 12), (13, 17), (18, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, 74), (75, 89),
)
JANSSEN_FROM = dt.date(2021, 3, 3)


class VaccinationParams(BaseModel):
    """Settings of :class:`~lpm_llm.models.vaccination.Vaccination` (in a config:
    ``model_params: {vaccination: {...}}``); sources in the module docstring."""

    model_config = ConfigDict(extra="forbid")

    supply_scale: float = Field(1.0, gt=0, description="weekly first doses at most this times the city's "
                                "observed weekly increase of people with >= 1 dose (calibrated)")
    persistence: float = Field(0.9, ge=0.0, lt=1.0, description="week-to-week correlation of each agent's "
                               "answers (a two-state Markov chain; 0: a fresh draw every week)")
    share_health_care: float = Field(0.10, ge=0, le=1, description="employed 18-64 who are health care workers")
    share_essential: float = Field(0.10, ge=0, le=1, description="employed 18-64 in phase 1b occupations")
    share_public_facing: float = Field(0.05, ge=0, le=1, description="employed 18-64, public-facing (2021-03-17)")
    comorbidity_by_band: tuple[float, ...] = Field(
        (0.0, 0.0, 0.10, 0.20, 0.25, 0.30, 0.40, 0.55, 0.0, 0.0),
        description="share of each age band eligible for a condition (16-64 only; 13-17: the 16-17 part)")
    mix: tuple[float, float, float] = Field((0.55, 0.40, 0.05), description="Pfizer, Moderna, Janssen shares")
    dose_interval: tuple[int, int] = Field((21, 28), description="days to dose 2: Pfizer, Moderna")
    ve_infection: tuple[float, float, float] = Field(
        (0.46, 0.92, 0.66), description="against infection: after dose 1, full mRNA, Janssen")
    ve_severe: tuple[float, float, float] = Field(
        (0.74, 0.92, 0.85), description="against hospitalisation and death: after dose 1, full mRNA, Janssen")
    onset_days: tuple[int, int, int] = Field(
        (14, 7, 14), description="days to protection: after dose 1, after dose 2, after Janssen")
    waning_infection: float = Field(math.log(0.92 / 0.70) / 140, ge=0, description="per day, against infection")
    waning_severe: float = Field(math.log(0.92 / 0.85) / 140, ge=0, description="per day, against severe outcomes")
    prior_immunity: bool = Field(True, description="agents infected before the start are immune (see docstring)")
    spring_ratio: float = Field(10.6, gt=0, description="infections per reported case to 2020-04-30")
    later_ratio: float = Field(4.0, gt=0, description="infections per reported case after 2020-04-30")
    group_seed: int = Field(0, ge=0, description="seed of the per-agent ages within bands and groups")

    @field_validator("mix")
    @classmethod
    def _mix(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"mix must be three non-negative shares summing to 1, got {v}")
        return v

    @field_validator("comorbidity_by_band")
    @classmethod
    def _bands(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != len(BAND_AGES) or min(v) < 0 or max(v) > 1:
            raise ValueError(f"comorbidity_by_band needs {len(BAND_AGES)} shares in [0, 1], got {v}")
        return v
