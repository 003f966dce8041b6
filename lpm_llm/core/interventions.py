"""Dated policy schedules: what is in force on a date, as text (for prompts) and as per-layer multipliers.

A schedule is a list of policies, each with a ``start`` date (inclusive) and an optional ``end``
date (exclusive, None = open-ended). On a date, the multiplier of a contact layer (``LAYERS``:
household, school, workplace, community) is the product of the multipliers of the active policies.

    schedule = nyc_2020()
    schedule.active("2020-04-20")       # ['Schools closed ...', 'Stay-at-home order ...', 'Face masks ...']
    schedule.multipliers("2020-04-20")  # {'household': 1.0, 'school': 0.0, 'workplace': ..., ...}

Schedules are pydantic models (unknown keys are errors), so that an experiment YAML can carry one:
``{"policies": [{"kind": "masks", "start": "2020-04-17", "multiplier": 0.8}]}``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LAYERS: tuple[str, ...] = ("household", "school", "workplace", "community")
"""The contact layers a policy can scale, in the order of every per-layer tensor."""

__all__ = [
    "IndoorDining",
    "InterventionSchedule",
    "Masks",
    "Policy",
    "Reopening",
    "Restriction",
    "SchoolClosure",
    "StayAtHome",
    "ZoneRestrictions",
    "nyc_2020",
]

DateLike = dt.date | str


class _Dated(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: dt.date
    end: dt.date | None = Field(
        None, description="first day no longer in force (exclusive); None: open-ended"
    )
    description: str | None = Field(
        None, description="text for prompts; a default is written from the fields"
    )

    @model_validator(mode="after")
    def _dates_in_order(self):
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"policy {self.kind!r}: end {self.end} must be after start {self.start}")
        return self

    def is_active(self, date: dt.date) -> bool:
        return self.start <= date and (self.end is None or date < self.end)

    def text(self) -> str:
        return self.description or self._default_text()

    def layer_multipliers(self) -> dict[str, float]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _default_text(self) -> str:  # pragma: no cover
        raise NotImplementedError


class SchoolClosure(_Dated):
    """Schools closed (``fraction_closed=1``) or partly open: school transmission x (1 - fraction_closed)."""

    kind: Literal["school_closure"] = "school_closure"
    fraction_closed: float = Field(
        1.0, ge=0.0, le=1.0, description="share of in-person school contact removed"
    )

    def layer_multipliers(self) -> dict[str, float]:
        return {"school": 1.0 - self.fraction_closed}

    def _default_text(self) -> str:
        if self.fraction_closed >= 1.0:
            return f"Schools are closed (since {self.start})"
        share = 100 * (1 - self.fraction_closed)
        return f"Schools partly open, {share:.0f}% of usual in-person contact (since {self.start})"


class StayAtHome(_Dated):
    """Stay-at-home order: non-essential workplaces closed, gatherings banned."""

    kind: Literal["stay_at_home"] = "stay_at_home"
    workplace_reduction: float = Field(
        0.6, ge=0.0, le=1.0, description="share of workplace transmission removed"
    )
    community_reduction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of community transmission removed"
    )

    def layer_multipliers(self) -> dict[str, float]:
        return {"workplace": 1.0 - self.workplace_reduction, "community": 1.0 - self.community_reduction}

    def _default_text(self) -> str:
        return f"Stay-at-home order: non-essential businesses closed, gatherings banned (since {self.start})"


class Reopening(_Dated):
    """One phase of a phased reopening: the remaining reductions of workplace and community contact."""

    kind: Literal["reopening"] = "reopening"
    phase: int = Field(..., ge=1, description="phase number, 1 = first")
    workplace_reduction: float = Field(
        ..., ge=0.0, le=1.0, description="share of workplace transmission removed"
    )
    community_reduction: float = Field(
        ..., ge=0.0, le=1.0, description="share of community transmission removed"
    )

    def layer_multipliers(self) -> dict[str, float]:
        return {"workplace": 1.0 - self.workplace_reduction, "community": 1.0 - self.community_reduction}

    def _default_text(self) -> str:
        return (
            f"Reopening phase {self.phase}: some businesses open again with restrictions (since {self.start})"
        )


class Masks(_Dated):
    """Face coverings required: transmission outside the home x ``multiplier``."""

    kind: Literal["masks"] = "masks"
    multiplier: float = Field(0.8, ge=0.0, le=1.0, description="transmission multiplier in the masked layers")
    layers: tuple[Literal["household", "school", "workplace", "community"], ...] = (
        "school",
        "workplace",
        "community",
    )

    def layer_multipliers(self) -> dict[str, float]:
        return {layer: self.multiplier for layer in self.layers}

    def _default_text(self) -> str:
        return f"Face masks required in public where distancing is not possible (since {self.start})"


class Restriction(_Dated):
    """A general restriction (or what is left of one): shares of workplace and community transmission
    removed; the description says what it is."""

    kind: Literal["restriction"] = "restriction"
    workplace_reduction: float = Field(0.0, ge=0.0, le=1.0)
    community_reduction: float = Field(0.0, ge=0.0, le=1.0)

    def layer_multipliers(self) -> dict[str, float]:
        return {"workplace": 1.0 - self.workplace_reduction, "community": 1.0 - self.community_reduction}

    def _default_text(self) -> str:
        return f"Restrictions on businesses and gatherings (since {self.start})"


class IndoorDining(_Dated):
    """Indoor dining at ``capacity`` (0: closed): community transmission x (1 - community_share x
    (1 - capacity)), where ``community_share`` is the share of community transmission that happens in
    restaurants and bars at full capacity (an assumption)."""

    kind: Literal["indoor_dining"] = "indoor_dining"
    capacity: float = Field(..., ge=0.0, le=1.0, description="share of usual indoor dining capacity allowed")
    community_share: float = Field(0.1, ge=0.0, le=1.0, description="share of community transmission in dining")

    def layer_multipliers(self) -> dict[str, float]:
        return {"community": 1.0 - self.community_share * (1.0 - self.capacity)}

    def _default_text(self) -> str:
        if self.capacity <= 0:
            return f"Indoor dining is closed (since {self.start})"
        return f"Indoor dining allowed at {100 * self.capacity:.0f}% capacity (since {self.start})"


class ZoneRestrictions(_Dated):
    """Restrictions in zones of some boroughs, approximated at borough level: in borough b, a share
    ``population_share[b]`` of residents lives in the zones, where ``reduction`` of contacts outside
    the home is removed. No city-wide layer multiplier: :meth:`InterventionSchedule.area_multipliers`
    gives each borough ``1 - population_share x reduction``, which the epidemic applies to its
    residents' contacts outside the home."""

    kind: Literal["zones"] = "zones"
    boroughs: tuple[str, ...] = Field(..., min_length=1)
    population_share: tuple[float, ...] = Field(..., description="per borough in `boroughs`")
    reduction: float = Field(0.5, ge=0.0, le=1.0, description="share of outside-home contacts removed in zones")

    @model_validator(mode="after")
    def _one_share_per_borough(self):
        if len(self.population_share) != len(self.boroughs) or any(
                not 0 <= x <= 1 for x in self.population_share):
            raise ValueError("zones: one population_share in [0, 1] per borough")
        return self

    def layer_multipliers(self) -> dict[str, float]:
        return {}

    def area_multiplier(self, area: str) -> float:
        shares = dict(zip(self.boroughs, self.population_share, strict=True))
        return 1.0 - shares.get(area, 0.0) * self.reduction

    def _default_text(self) -> str:
        return f"Cluster zone restrictions in parts of {', '.join(self.boroughs)} (since {self.start})"


Policy = Annotated[
    SchoolClosure | StayAtHome | Reopening | Masks | Restriction | IndoorDining | ZoneRestrictions,
    Field(discriminator="kind"),
]


def _as_date(date: DateLike) -> dt.date:
    if isinstance(date, dt.datetime):
        return date.date()
    if isinstance(date, dt.date):
        return date
    try:
        return dt.date.fromisoformat(str(date))
    except ValueError:
        raise ValueError(f"date {date!r} is not an ISO date (YYYY-MM-DD)") from None


class InterventionSchedule(BaseModel):
    """A dated list of policies; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: tuple[Policy, ...] = ()

    def as_of(self, date: DateLike, scenario: tuple[Policy, ...] | list[Policy] = ()) -> InterventionSchedule:
        """The schedule as known on `date`, held at its state on that date, plus a scenario.

        Policies starting after `date` are removed; those in force on `date` lose their end date
        (held open-ended); those that ended on or before it stay as they were. `scenario`: policies
        assumed for the future (added as given)."""
        d = _as_date(date)
        kept = []
        for p in self.policies:
            if p.start > d:
                continue
            if p.end is not None and p.end > d:
                p = p.model_copy(update={"end": None})
            kept.append(p)
        return InterventionSchedule(policies=tuple(kept) + tuple(scenario))

    def active(self, date: DateLike) -> list[str]:
        """Descriptions of the policies in force on `date`, in schedule order (empty if none)."""
        d = _as_date(date)
        return [p.text() for p in self.policies if p.is_active(d)]

    def area_multipliers(self, date: DateLike, areas: tuple[str, ...] | list[str]) -> list[float]:
        """Per area (borough name), the multiplier of its residents' contacts outside the home from
        area-level policies (:class:`ZoneRestrictions`) on `date`; 1.0 where none applies."""
        d = _as_date(date)
        out = [1.0] * len(areas)
        for p in self.policies:
            if isinstance(p, ZoneRestrictions) and p.is_active(d):
                out = [m * p.area_multiplier(a) for m, a in zip(out, areas, strict=True)]
        return out

    def multipliers(self, date: DateLike) -> dict[str, float]:
        """Transmission multiplier per layer (``LAYERS`` order) on `date`; 1.0 where nothing applies."""
        d = _as_date(date)
        out = dict.fromkeys(LAYERS, 1.0)
        for p in self.policies:
            if p.is_active(d):
                for layer, m in p.layer_multipliers().items():
                    out[layer] *= m
        return out


def nyc_2020() -> InterventionSchedule:
    """New York City's policy schedule, March 2020 to June 2021 (dates from official orders; strengths
    are assumptions).

    Dates, 2020:
    - NYC public schools closed 2020-03-16 (Mayor's announcement of 2020-03-15); partial in-person
      (blended) learning from 2020-09-29 (NYC DOE: elementary schools 2020-09-29, middle and high
      schools 2020-10-01).
    - "New York State on PAUSE" (Executive Order 202.8): non-essential workforce at home from
      2020-03-22.
    - NY Forward reopening of New York City: phase 1 on 2020-06-08, phase 2 2020-06-22, phase 3
      2020-07-06, phase 4 2020-07-20.
    - Face coverings in public where distancing is impossible: Executive Order 202.17, in force
      2020-04-17.

    The second wave (issue 15):
    - Cluster Action Initiative (Executive Order 202.68, 2020-10-06): red, orange and yellow zones in
      parts of Brooklyn (Borough Park, Midwood, Flatbush, Williamsburg) and Queens (Far Rockaway, Kew
      Gardens Hills, Forest Hills) from 2020-10-08: schools and non-essential businesses closed in red
      zones, gatherings limited. **Approximated at borough level**: zones held about 20% of Brooklyn's
      and 10% of Queens' residents (an estimate from the zone maps, not a census count), where half
      of contacts outside the home are removed; ended here on 2020-12-14, when the city-wide dining
      closure took over (the zones were redrawn repeatedly, a Staten Island zone from late November is
      left out).
    - Indoor dining (Governor's announcements): reopened at 25% on 2020-09-30; closed 2020-12-14;
      reopened at 25% on 2021-02-12, 35% on 2021-02-26, 50% on 2021-03-19, 75% on 2021-05-07.
    - Public school buildings closed 2020-11-19 (citywide 7-day positivity above 3%); 3-K, pre-K,
      elementary schools and District 75 reopened 2020-12-07, middle schools 2021-02-25, high schools
      2021-03-22 (NYC DOE); the school year ended 2021-06-25.
    - Most capacity limits lifted (businesses, gatherings, dining) on 2021-05-19 (Governor's
      announcement of 2021-05-03).

    Strengths are modelling assumptions meant to be calibrated: PAUSE removes 60% of workplace and
    50% of community transmission (Google COVID-19 Community Mobility Reports showed New York City
    workplace visits down by roughly 60% in April 2020), each reopening phase gives part of it back;
    blended learning keeps 30% of usual in-person school contact (15% with elementary schools only,
    22% with middle schools too); masks multiply transmission outside the home by 0.8; dining is 10%
    of community transmission at full capacity; after 2021-05-19 10% of workplace and community
    transmission stays removed.
    """
    return InterventionSchedule(
        policies=(
            SchoolClosure(start="2020-03-16", end="2020-09-29"),
            SchoolClosure(
                start="2020-09-29",
                end="2020-11-19",
                fraction_closed=0.7,
                description="Schools partly open with blended in-person and remote learning "
                "(since 2020-09-29)",
            ),
            StayAtHome(
                start="2020-03-22",
                end="2020-06-08",
                workplace_reduction=0.6,
                community_reduction=0.5,
                description="NY State on PAUSE stay-at-home order: non-essential businesses closed, "
                "gatherings banned (since 2020-03-22)",
            ),
            Reopening(
                start="2020-06-08",
                end="2020-06-22",
                phase=1,
                workplace_reduction=0.5,
                community_reduction=0.45,
            ),
            Reopening(
                start="2020-06-22",
                end="2020-07-06",
                phase=2,
                workplace_reduction=0.4,
                community_reduction=0.35,
            ),
            Reopening(
                start="2020-07-06",
                end="2020-07-20",
                phase=3,
                workplace_reduction=0.3,
                community_reduction=0.3,
            ),
            Reopening(start="2020-07-20", end="2021-05-19", phase=4, workplace_reduction=0.25,
                      community_reduction=0.25),
            Masks(
                start="2020-04-17",
                multiplier=0.8,
                description="Face masks required in public where distancing is not possible (Executive Order "
                "202.17, since 2020-04-17)",
            ),
            # -- the second wave (issue 15) --
            IndoorDining(start="2020-09-30", end="2020-12-14", capacity=0.25),
            ZoneRestrictions(
                start="2020-10-08", end="2020-12-14", boroughs=("Brooklyn", "Queens"), population_share=(0.2, 0.1),
                reduction=0.5,
                description="Cluster zone restrictions in parts of Brooklyn and Queens: schools and "
                "non-essential businesses closed in red zones, gatherings limited (Executive Order 202.68, "
                "since 2020-10-08)",
            ),
            SchoolClosure(
                start="2020-11-19", end="2020-12-07",
                description="Public school buildings closed, all classes remote (since 2020-11-19)",
            ),
            SchoolClosure(
                start="2020-12-07", end="2021-02-25", fraction_closed=0.85,
                description="Public schools partly open: 3-K, pre-K, elementary and District 75 "
                "in person part of the week, other grades remote (since 2020-12-07)",
            ),
            SchoolClosure(
                start="2021-02-25", end="2021-03-22", fraction_closed=0.78,
                description="Public schools partly open: elementary and middle schools in person part of "
                "the week, high schools remote (since 2021-02-25)",
            ),
            SchoolClosure(
                start="2021-03-22", end="2021-06-26", fraction_closed=0.7,
                description="Public schools partly open: every grade in person part of the week "
                "(since 2021-03-22)",
            ),
            SchoolClosure(
                start="2021-06-26", description="Schools closed for the summer (since 2021-06-26)",
            ),
            IndoorDining(start="2020-12-14", end="2021-02-12", capacity=0.0),
            IndoorDining(start="2021-02-12", end="2021-02-26", capacity=0.25),
            IndoorDining(start="2021-02-26", end="2021-03-19", capacity=0.35),
            IndoorDining(start="2021-03-19", end="2021-05-07", capacity=0.5),
            IndoorDining(start="2021-05-07", end="2021-05-19", capacity=0.75),
            Restriction(
                start="2021-05-19", workplace_reduction=0.1, community_reduction=0.1,
                description="Most capacity limits lifted for businesses, gatherings and dining "
                "(since 2021-05-19)",
            ),
        )
    )
