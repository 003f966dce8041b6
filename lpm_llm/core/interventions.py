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
    "InterventionSchedule",
    "Masks",
    "Policy",
    "Reopening",
    "SchoolClosure",
    "StayAtHome",
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


Policy = Annotated[SchoolClosure | StayAtHome | Reopening | Masks, Field(discriminator="kind")]


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

    def active(self, date: DateLike) -> list[str]:
        """Descriptions of the policies in force on `date`, in schedule order (empty if none)."""
        d = _as_date(date)
        return [p.text() for p in self.policies if p.is_active(d)]

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
    """New York City's 2020 policy schedule (dates from official orders; strengths are assumptions).

    Dates:
    - NYC public schools closed 2020-03-16 (Mayor's announcement of 2020-03-15); partial in-person
      (blended) learning from 2020-09-29 (NYC DOE: elementary schools 2020-09-29, middle and high
      schools 2020-10-01).
    - "New York State on PAUSE" (Executive Order 202.8): non-essential workforce at home from
      2020-03-22.
    - NY Forward reopening of New York City: phase 1 on 2020-06-08, phase 2 2020-06-22, phase 3
      2020-07-06, phase 4 2020-07-20.
    - Face coverings in public where distancing is impossible: Executive Order 202.17, in force
      2020-04-17.

    Strengths are modelling assumptions meant to be calibrated: PAUSE removes 60% of workplace and
    50% of community transmission (Google COVID-19 Community Mobility Reports showed New York City
    workplace visits down by roughly 60% in April 2020), each reopening phase gives part of it back;
    blended learning keeps 30% of usual in-person school contact; masks multiply transmission outside
    the home by 0.8.
    """
    return InterventionSchedule(
        policies=(
            SchoolClosure(start="2020-03-16", end="2020-09-29"),
            SchoolClosure(
                start="2020-09-29",
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
            Reopening(start="2020-07-20", phase=4, workplace_reduction=0.25, community_reduction=0.25),
            Masks(
                start="2020-04-17",
                multiplier=0.8,
                description="Face masks required in public where distancing is not possible (Executive Order "
                "202.17, since 2020-04-17)",
            ),
        )
    )
