"""SEIRM epidemic on layered contacts: per-agent state and the daily step (the parameters, with
their sources, are in :mod:`lpm_llm.models.epidemic_params`).

States (``STATES``): S susceptible, E exposed (infected, not yet infectious), I infectious (with a
per-agent symptomatic flag), R removed (recovered, or no longer infectious and awaiting death), M
dead. Hospital admission is an event recorded at symptom onset (plus ``hosp_delay``), not a state.

Natural history of one infection, drawn per agent:
- infection on day t (probability ``1 - exp(-force)``; force from :mod:`lpm_llm.models.contacts` times the
  age band's susceptibility); the agent enters E;
- after a latent period it enters I; at that moment it draws whether it is symptomatic
  (``p_symptomatic`` by age), and if symptomatic whether it will be admitted to hospital
  (``ihr / p_symptomatic``) and whether it will die (``fatality_scale * ifr / p_symptomatic``, the scale of
  the onset's calendar month when it is given by month), so
  that hospitalisations and deaths per infection equal the IHR and IFR by age;
- after an infectious period it leaves I: to R, or, if fated to die, to M ``death_delay`` days later
  (counted in R meanwhile).

Durations are whole days drawn per agent when a state is entered (the agent leaves on day
``t + d``), and a duration parameter is the realized mean of d: with ``duration_distribution="gamma"``
d is a gamma draw (shape ``*_shape``) rounded to the nearest day (at least 1), the gamma's own mean
solved for so that the rounded draws have the stated mean; with ``"exponential"`` d is geometric, a
daily exit probability of ``1 / mean`` (memoryless; the ODE comparison uses it). Durations are sampled
from the exact discretised distribution by inverse CDF (a table of at most a few hundred days).

Random numbers are counter-based (:mod:`lpm_llm.core.rng`): an agent's draw is a function of (seed,
day, stream, its global id), one stream per kind of draw (``_THRESHOLD`` .. ``_LINEAGE``). A draw does
not depend on which other agents draw that day, nor on where the agent is held, so a run is the same on
1 or N ranks of an area-sharded population (``ids``) and a day can be recomputed alone.

An agent who enters I on day s transmits on days
s + 1 .. s + d, so the generation interval (``generation_interval_pmf``) is the latent period plus
a uniform day of the infectious period, weighted by its length.

Issue 15 added, each on its own code path (the methods ``_case_isolated``, ``_isolation_draw``, ``_wane``,
``_attribute_lineage`` of :mod:`lpm_llm.models._mechanisms`, each with its own stream of draws):
- case isolation: at onset a symptomatic agent will be a reported case who isolates with probability
  ``report_rate[borough] * case_isolation_compliance`` (flag 8); from ``case_isolation_delay`` days
  after onset (default ``report_delay``: when the case is known) it emits nothing outside the home;
- infection-acquired immunity wanes: on leaving I an agent stays immune for a geometric number of
  days of mean ``immunity_mean`` (``next_day`` of R), then is susceptible again (flag 16) with
  ``reinfection_susceptibility``, with a fresh Exp(1) threshold over its reduced susceptibility;
- continuous importation: ``EpidemicInputs.importation`` (L,) adds a daily hazard per unit
  susceptibility to every agent's force (no extra random numbers: the threshold takes it);
- lineages: ``lineage`` (N,) int8 per agent (0 resident, 1.. ``params.variants``); an infectious
  agent's infectiousness is x its lineage's ``transmissibility``, its onset's admission and death
  probabilities x ``hospitalisation`` and ``fatality``; a new infection takes its lineage in
  proportion to the hazard each lineage put on it that day (force from that lineage's infectious
  agents, evaluated for the newly infected only, plus its importation). Day-0 seeds are resident.
- area-level policies (cluster zones): ``EpidemicInputs.outside`` scales outside-home contacts on both
  sides of a contact, as isolation does.

Infection uses the exposure-threshold form of the daily Bernoulli draw: each agent draws a threshold
tau ~ Exp(1) once, and is infected on the first day the hazard accumulated since day 0 exceeds it.
Since the exponential is memoryless, P(infected on day t | susceptible until then) = 1 - exp(-force_t)
exactly as with a fresh uniform draw every day, but a day costs one subtraction instead of N random
numbers. Imports on day 0 are separate Bernoulli draws.

Per-agent state (``EpidemicState``): ``disease`` int8, ``next_day`` int16, ``flags`` int8,
``threshold`` float32, ``lineage`` int8, ``onset_day`` int16: 11 bytes. With gradients enabled
float32 columns are added (``weight`` and ``fate`` (N,), ``group_weight`` and ``log_ratio`` (3, N),
see below): 32 bytes more.

Gradients (the estimator's methods are in :mod:`lpm_llm.models._estimator`). Under ``torch.no_grad()``
the step runs a fast path: hard Bernoulli draws, in-place
updates. With gradients enabled the draws stay hard in the forward pass and every agent carries a
path weight ``weight`` (N,) that is exactly 1.0 forward and whose gradient is the score of the
agent's own draws so far: each day a susceptible agent is multiplied by ``p / sg(p)`` if infected and
by ``(1 - p) / sg(1 - p)`` if not (``sg``: stop-gradient), and at onset by the same ratio for the
symptomatic draw. Everything the agent does (its infection count, infectiousness, onset, admission,
death) is counted with its weight, and ``fate`` (N,) carries the ratio of the death draw. The weight
of an infectious agent reaches those it may infect in one of two ways, so that the gradient follows
chains of transmission (a local, causal form of the score-function estimator, DiCE: Foerster et al.
2018):

- in the community and in classrooms and workplaces of more than ``_SMALL_GROUP`` members, its
  infectiousness carries its weight, and with it the infection probabilities of those it meets (the
  tangent). That linearises ``1 - exp(-hazard)`` in the infector's weight, which is biased low where
  one infector puts an O(1) hazard on one contact: households and small workplaces;
- in households, classrooms and workplaces of up to ``_SMALL_GROUP`` members, every member m who has
  been infectious keeps, per layer, the log likelihood ratio ``log_ratio`` (3, N) of the paths of the
  group's other members without and with its emission, and an agent infected in the group takes
  ``(1 - exp(log_ratio[m])) * d group_weight[m]`` from each such m, where ``group_weight`` (3, N) is
  m's weight without the terms of its own members of that group (an influence is not counted twice).
  This is the score function over the group's joint paths with m's absence as control variate:
  unbiased however saturated the group's transmission (a pair that shares two small groups, about 2%
  of the pairs of housemates, is counted in each: a second-order error).

Measured in the calibration tests' 16,700-agent city at seeding 300/100k, beta_scale 1.5 (AD over 100
seeds against central differences over 300, expected reported cases of 7 weeks): d/d(seeding) at
0.90 +- 0.02 of the finite difference and d/d(beta_scale) at 0.94 +- 0.02, against 0.77 and 0.88
with the tangent in every group (0.96 +- 0.03 with the community as the only layer, where the tangent
is exact to first order). The rest is the tangent in larger groups: exact terms in every group give
0.98 +- 0.04, with three times the spread between seeds. Earlier, the straight-through estimator
(backward d/dp through the realised draw only) missed the offspring of agents who were not infected
and underestimated d(infections)/d(beta) by 2-3x and the seeding gradient by ~50x.
The step never modifies its input state in place when gradients are on, and derives its random
numbers from (seed, day) alone, so that segments of days can be recomputed in the backward pass
(:mod:`lpm_llm.models._segments`, which stores a compact state at each segment's start and not the
path weights, whose forward values are 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from lpm_llm.core.rng import Draws
from lpm_llm.models._codes import DEATH_DRAW as _DEATH_DRAW
from lpm_llm.models._codes import DYING as _DYING
from lpm_llm.models._codes import FATED as _FATED
from lpm_llm.models._codes import HOSPITAL_DRAW as _HOSPITAL_DRAW
from lpm_llm.models._codes import HOSPITALIZED as _HOSPITALIZED
from lpm_llm.models._codes import IMMUNITY_DAYS as _IMMUNITY_DAYS
from lpm_llm.models._codes import IMPORT as _IMPORT
from lpm_llm.models._codes import INFECTIOUS_DAYS as _INFECTIOUS_DAYS
from lpm_llm.models._codes import ISOLATES as _ISOLATES
from lpm_llm.models._codes import LATENT_DAYS as _LATENT_DAYS
from lpm_llm.models._codes import PRIOR as _PRIOR
from lpm_llm.models._codes import SYMPTOMATIC as _SYMPTOMATIC
from lpm_llm.models._codes import SYMPTOMATIC_DRAW as _SYMPTOMATIC_DRAW
from lpm_llm.models._codes import THRESHOLD as _THRESHOLD
from lpm_llm.models._codes import E, I, M, R, S
from lpm_llm.models._estimator import GradientTerms, _score_weight
from lpm_llm.models._mechanisms import Mechanisms
from lpm_llm.models.contacts import LAYERS, ContactLayers
from lpm_llm.models.epidemic_params import TENSOR_PARAMS, EpidemicParams
from lpm_llm.population import AGE_BANDS

__all__ = [
    "STATES",
    "EpidemicModel",
    "EpidemicParams",
    "EpidemicState",
    "EpidemicInputs",
    "duration_pmf",
    "generation_interval_pmf",
    "layer_rates",
]

STATES: tuple[str, ...] = ("S", "E", "I", "R", "M")
_MAX_DURATION = 400  # days; longest duration the samplers represent (tail mass folded into it)
_MAX_IMMUNITY = 10_000  # days; the same for the duration of infection-acquired immunity

_A = len(AGE_BANDS)


@dataclass
class EpidemicState:
    """Per-agent disease state (N agents; B x A cells = boroughs x age bands).

    Attributes:
        disease: (N,) int8 code (S=0, E=1, I=2, R=3, M=4; 5 = awaiting death, reported in R).
        next_day: (N,) int16 day of the agent's next transition, -1 for none.
        flags: (N,) int8 bits: 1 symptomatic, 2 hospitalised, 4 fated to die, 8 a reported case who
            isolates, 16 infected before (immunity waned).
        threshold: (N,) float32 hazard a susceptible agent can still take before infection
            (Exp(1) / susceptibility at the start, less the force of every day since); inf once infected.
        infectious: (n_I,) int64 indices of the agents in I (kept up to date from the day's events).
        counts: (B * A, 5) float32 agents per cell and state (S, E, I, R, M), updated from the events.
        weight: (N,) float32 path weight (forward 1.0, gradient: score of the agent's draws), or None.
        fate: (N,) float32 death indicator (forward 0/1, gradient: score of the death draw), or None.
        group_weight: (3, N) float32, per group layer (household, school, workplace), the path weight
            without the terms from the agent's own members of that layer's group, or None; only read
            for agents infected so far (see "Gradients" in the module docstring).
        log_ratio: (3, N) float32, per group layer, log of the likelihood ratio of the paths of the
            agent's group members with its emission in that group removed, or None.
        lineage: (N,) int8 lineage of the agent's current or last infection (0 the resident lineage,
            1.. ``EpidemicParams.variants`` in order).
        onset_day: (N,) int16 day the agent last became infectious, -1 for never.
    """

    disease: torch.Tensor
    next_day: torch.Tensor
    flags: torch.Tensor
    threshold: torch.Tensor
    infectious: torch.Tensor
    counts: torch.Tensor
    weight: torch.Tensor | None = None
    fate: torch.Tensor | None = None
    group_weight: torch.Tensor | None = None
    log_ratio: torch.Tensor | None = None
    lineage: torch.Tensor | None = None
    onset_day: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [
            self.lineage,
            self.onset_day,
            self.disease,
            self.next_day,
            self.flags,
            self.threshold,
            self.infectious,
            self.weight,
            self.fate,
            self.group_weight,
            self.log_ratio,
        ]
        return sum(t.element_size() * t.numel() for t in tensors if t is not None)


@dataclass
class EpidemicInputs:
    """What the outside world gives one daily step.

    Attributes:
        rates: (4,) daily transmission rate per layer (``LAYERS`` order), beta_scale and
            interventions applied.
        seed: base seed; every draw of day t is a function of (seed, t, stream, agent id)
            (:class:`lpm_llm.core.rng.Draws`).
        isolating: (N,) float32 1.0 for agents isolating (straight-through with grad), or None.
        working: (N,) bool agents working (labour model), or None (everyone in a workplace works).
        imports: (N,) float32 probability of an imported infection today, or None (day-0 seeding).
        importation: (L,) float32 daily hazard of an imported infection per unit susceptibility, by
            lineage (resident first), or None: continuous importation.
        report_rate: (B,) float32 share of today's symptomatic onsets that will be reported, by
            borough, or None: no case isolation today.
        outside: (N,) float32 multiplier of each agent's contacts outside the home, on both sides of
            a contact (area-level policies such as cluster zones), or None.
        scored: (N,) bool agents whose infection draw of the day enters the gradient, or None (every
            susceptible agent). The path weight of an agent who is never infected is never read, so
            every agent infected by the end of the run gives the same gradient (checkpointed segments
            pass those, see :mod:`lpm_llm.models._segments`); forward values do not depend on it.
        susceptibility: (N,) float32 multiplier of each agent's force of infection today (e.g.
            ``1 - VE`` of a vaccine, 0 for immune agents), or None (1 for all).
        severity: (N,) float32 multiplier of the hospitalisation and death probabilities of the
            agents whose symptoms start today, or None (1 for all).
    """

    rates: torch.Tensor
    seed: int
    isolating: torch.Tensor | None = None
    working: torch.Tensor | None = None
    imports: torch.Tensor | None = None
    scored: torch.Tensor | None = None
    susceptibility: torch.Tensor | None = None
    severity: torch.Tensor | None = None
    importation: torch.Tensor | None = None
    report_rate: torch.Tensor | None = None
    outside: torch.Tensor | None = None


def _discretised_cdf(kind: str, location: float, shape: float, max_days: int = _MAX_DURATION) -> torch.Tensor:
    """(K,) float64 CDF over whole days 1..K: a geometric distribution of mean `location`
    (``"exponential"``), or a gamma draw of mean `location` rounded to the nearest day, at least 1."""
    days = torch.arange(1, max_days + 1, dtype=torch.float64)
    if kind == "exponential":  # daily exit probability 1 / mean: P(d <= k) = 1 - (1 - 1 / mean)^k
        cdf = 1.0 - (1.0 - 1.0 / location) ** days
    else:  # nearest day of a gamma draw, at least 1: P(d <= k) = F(k + 0.5)
        scale = location / shape
        cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), (days + 0.5) / scale)
    cdf[-1] = 1.0  # fold the tail beyond _MAX_DURATION days into the last day
    return cdf


def _mean_of(cdf: torch.Tensor) -> float:
    """Mean whole-day duration of a (K,) CDF over days 1..K."""
    return float((1.0 - cdf[:-1]).sum()) + 1.0  # E[d] = sum_{k >= 0} P(d > k)


def _duration_cdf(kind: str, mean: float, shape: float) -> torch.Tensor:
    """(K,) float64 CDF over whole days 1..K of the discretised duration distribution whose realized
    mean is `mean` (at least 1 day): geometric for ``"exponential"`` (exact); for ``"gamma"`` the
    gamma's own mean is solved for (bisection) so that the rounded draws have mean `mean`."""
    if mean < 1.0:
        raise ValueError(f"a duration's mean must be at least 1 day (whole-day steps), got {mean}")
    if kind == "exponential" or mean == 1.0:
        return _discretised_cdf("exponential", mean, shape)
    lo, hi = 1e-6, mean + 1.0  # the rounded mean rises with the gamma's mean; at lo it is 1
    while _mean_of(_discretised_cdf(kind, hi, shape)) < mean:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _mean_of(_discretised_cdf(kind, mid, shape)) < mean else (lo, mid)
    return _discretised_cdf(kind, 0.5 * (lo + hi), shape)


class EpidemicModel(GradientTerms, Mechanisms):
    """The SEIRM dynamics of one population on its contact layers; see the module docstring.

    Args:
        params: the model's parameters.
        contacts: the population's contact layers (built on the simulation's device).
        age_band: (N,) int age band code per agent (``AGE_BANDS``).
        borough: (N,) int borough code per agent.
        ids: (N,) global id of each agent when the population is one rank's shard of a larger one
            (its random draws are those of these ids, :mod:`lpm_llm.core.rng`); None: the agents' own
            indices. A shard's contact layers carry the sum over ranks (``contacts.reduce``), which the
            step also applies to its outputs.
    """

    def __init__(
        self, params: EpidemicParams, contacts: ContactLayers, age_band: torch.Tensor, borough: torch.Tensor,
        ids: torch.Tensor | None = None,
    ):
        self.params = params
        self.contacts = contacts
        self.ids = None if ids is None else ids.to(contacts.household.device)
        if self.ids is not None and self.ids.shape != (contacts.n,):
            raise ValueError(f"ids must have shape ({contacts.n},), got {tuple(self.ids.shape)}")
        self.device = contacts.household.device
        b, a = contacts.shape
        if a != _A:
            raise ValueError(f"the epidemic model needs the {_A} age bands {AGE_BANDS}, population has {a}")
        self.age = age_band.to(device=self.device, dtype=torch.int32)
        self.borough = borough.to(device=self.device, dtype=torch.int32)
        self._latent_cdf = _duration_cdf(
            params.duration_distribution, params.latent_mean, params.latent_shape
        )
        self._infectious_cdf = _duration_cdf(
            params.duration_distribution, params.infectious_mean, params.infectious_shape
        )
        self._latent_cdf = self._latent_cdf.to(device=self.device, dtype=torch.get_default_dtype())
        self._infectious_cdf = self._infectious_cdf.to(device=self.device, dtype=torch.get_default_dtype())
        self._immunity_cdf = None
        if params.immunity_mean is not None:  # geometric: a constant daily waning probability
            self._immunity_cdf = _discretised_cdf("exponential", params.immunity_mean, 1.0, _MAX_IMMUNITY).to(
                device=self.device, dtype=torch.get_default_dtype())
        variants = params.variants
        self.n_lineages = 1 + len(variants)
        if self.n_lineages > 127:
            raise ValueError(f"at most 126 variants (int8 lineage codes), got {len(variants)}")
        self.set_params(params)

    def set_params(self, params: EpidemicParams) -> None:
        """Use `params` for the next runs, the variants' per-lineage factors (transmissibility,
        hospitalisation, fatality) with them; the number of variants is the model's own."""
        if 1 + len(params.variants) != self.n_lineages:
            raise ValueError(f"the model was built for {self.n_lineages - 1} variants, got {len(params.variants)}")
        self.params = params
        variants = params.variants
        self._transmissibility = torch.tensor([1.0] + [v.transmissibility for v in variants], device=self.device)
        self._hospitalisation = torch.tensor([1.0] + [v.hospitalisation for v in variants], device=self.device)
        self._fatality = torch.tensor([1.0] + [v.fatality for v in variants], device=self.device)

    # -- parameters as tensors --------------------------------------------------------------------
    def tensors(
        self, overrides: Mapping[str, torch.Tensor] | None = None, n_months: int = 1
    ) -> dict[str, torch.Tensor]:
        """The float parameters as float32 tensors on the model's device (``TENSOR_PARAMS``), with
        `overrides` (for example tensors that require grad) replacing the values of EpidemicParams."""
        p = self.params
        b, _ = self.contacts.shape
        sizes = {"()": (), "A": (_A,), "B": (b,)}
        out: dict[str, torch.Tensor] = {}
        for name in TENSOR_PARAMS:
            value = getattr(p, name)
            if TENSOR_PARAMS[name] == "B" and isinstance(value, float | int):  # one value for every borough
                value = (float(value),) * b
            if TENSOR_PARAMS[name] == "B" and len(value) != b:
                raise ValueError(f"{name} has {len(value)} values, the population {b} boroughs")
            out[name] = torch.as_tensor(value, dtype=torch.get_default_dtype(), device=self.device)
        for name, value in (overrides or {}).items():
            if name not in TENSOR_PARAMS:
                raise KeyError(
                    f"unknown epidemic parameter {name!r}; tensor parameters: {', '.join(TENSOR_PARAMS)}"
                )
            t = torch.as_tensor(value)
            if t.device != torch.device(self.device):
                t = t.to(self.device)
            if t.dtype != torch.get_default_dtype():
                t = t.to(torch.get_default_dtype())
            kind = TENSOR_PARAMS[name]
            if kind == "M":
                if t.dim() > 1 or t.numel() == 0:
                    raise ValueError(
                        f"{name} must be a scalar or a (months,) tensor, got shape {tuple(t.shape)}"
                    )
            elif kind == "B" and t.dim() == 0:
                t = t.expand(b)
            elif tuple(t.shape) != sizes[kind]:
                accepted = "() or " if kind == "B" else ""
                raise ValueError(f"{name} must have shape {accepted}{sizes[kind]}, got {tuple(t.shape)}")
            out[name] = t
        out["ascertainment"] = _by_month(out["ascertainment"], n_months)
        out["fatality_scale"] = _by_month(out["fatality_scale"].reshape(-1), n_months)
        rel = out["ascertainment_by_borough"]
        out["ascertainment_by_borough"] = rel / torch.exp(torch.log(rel.clamp(min=1e-12)).mean())  # geo. mean 1
        change = out["transmission_change"].reshape(-1)
        out["transmission_change"] = _by_month(torch.cat([change.new_ones(1), change]), n_months)  # month 0: 1
        return out

    # -- state ----------------------------------------------------------------------------------
    def initial_state(
        self, theta: Mapping[str, torch.Tensor], seed: int = 0, *, track_gradients: bool = False
    ) -> EpidemicState:
        """Everybody susceptible, with infection thresholds drawn on day -1 (stream ``_THRESHOLD``); with
        `track_gradients` the float columns of the gradient estimator are added.

        The threshold is Exp(1) / susceptibility: the daily step then subtracts the force before
        susceptibility, which saves a per-agent multiplication every day (agents with
        susceptibility 0 get an infinite threshold)."""
        n = self.contacts.n
        uniform = Draws(seed, -1, self.ids, self.device).uniform(_THRESHOLD, n).to(torch.get_default_dtype())
        threshold = uniform.neg_().log1p_().neg_()  # Exp(1)
        threshold.div_(self._susceptibility(theta).detach())
        counts = torch.zeros(self.contacts.cell_size.numel(), len(STATES), device=self.device)
        counts[:, S] = torch.bincount(self.contacts.cell, minlength=counts.shape[0]).to(torch.get_default_dtype())
        state = EpidemicState(
            disease=torch.full((n,), S, dtype=torch.int8, device=self.device),
            next_day=torch.full((n,), -1, dtype=torch.int16, device=self.device),
            flags=torch.zeros(n, dtype=torch.int8, device=self.device),
            threshold=threshold,
            infectious=torch.zeros(0, dtype=torch.int64, device=self.device),
            counts=counts,
            lineage=torch.zeros(n, dtype=torch.int8, device=self.device),
            onset_day=torch.full((n,), -1, dtype=torch.int16, device=self.device),
        )
        if track_gradients:
            state.weight = torch.ones(n, device=self.device)
            state.fate = torch.zeros(n, device=self.device)
            state.group_weight = torch.ones(len(self._small_groups), n, device=self.device)
            state.log_ratio = torch.zeros(len(self._small_groups), n, device=self.device)
        return state

    def _susceptibility(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N,) relative susceptibility of each agent (by age band)."""
        b = self.contacts.shape[0]
        return theta["susceptibility"].repeat(b).index_select(0, self.contacts.cell)

    def importation_hazard(self, theta: Mapping[str, torch.Tensor], dates: list) -> torch.Tensor:
        """(T, L) daily hazard of an imported infection per unit susceptibility, by day (`dates`, the
        run's calendar) and lineage: the resident lineage's ``importation_per_100k`` every day, each
        variant's from its ``introduced`` date."""
        resident = (theta["importation_per_100k"] / 1e5).reshape(1, 1).expand(len(dates), 1)
        rates = [[v.importation_per_100k / 1e5 if d >= v.introduced else 0.0 for v in self.params.variants]
                 for d in dates]
        variants = torch.tensor(rates, dtype=torch.get_default_dtype(), device=self.device).reshape(len(dates), -1)
        return torch.cat([resident, variants], dim=1)

    def import_probability(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N,) per-agent probability of an imported infection on day 0 (``initial_infections_per_100k``)."""
        return (theta["initial_infections_per_100k"] / 1e5).clamp(0.0, 1.0).index_select(0, self.borough)

    # -- the daily step -------------------------------------------------------------------------
    def step(
        self, state: EpidemicState, t: int, inputs: EpidemicInputs, theta: Mapping[str, torch.Tensor]
    ) -> tuple[EpidemicState, dict[str, torch.Tensor]]:
        """One day: transmission from the agents infectious at the start of the day, then progression
        of the agents whose transition falls on day t.

        Returns:
            the new state, and (B, A) float32 tensors ``new_infections``, ``new_symptomatic``,
            ``new_hospitalized`` (by onset day), ``deaths``, plus ``prevalence`` (B, A, 5) at the end
            of the day.
        """
        grad = torch.is_grad_enabled()
        if grad and state.weight is None:
            raise ValueError(
                "gradients are enabled but the state has no `weight`: build it with "
                "initial_state(track_gradients=True), or run under torch.no_grad()"
            )
        gen = Draws(inputs.seed, t, self.ids, self.device)
        c = self.contacts
        b, a = c.shape
        if grad:  # never modify the caller's state: checkpointing re-runs steps from saved inputs
            state = replace(
                state,
                disease=state.disease.clone(),
                next_day=state.next_day.clone(),
                flags=state.flags.clone(),
                threshold=state.threshold,  # replaced functionally below
                lineage=state.lineage.clone(),
                onset_day=state.onset_day.clone(),
            )
        disease, next_day, flags = state.disease, state.next_day, state.flags
        lineage, onset_day = state.lineage, state.onset_day

        # -- transmission ---------------------------------------------------------------------------
        infectious = state.infectious
        inf_flags = flags.index_select(0, infectious)
        symptomatic = (inf_flags & _SYMPTOMATIC) != 0
        w_home = torch.where(symptomatic, 1.0, theta["rel_infectiousness_asymptomatic"]).to(torch.get_default_dtype())
        inf_lineage = None
        if self.n_lineages > 1:  # each lineage's relative transmissibility
            inf_lineage = lineage.index_select(0, infectious).long()
            w_home = w_home * self._transmissibility.index_select(0, inf_lineage)
        compliance = theta["isolation_compliance"]
        outside_factor = None
        w_out = w_home
        if inputs.isolating is not None:
            outside_factor = 1.0 - compliance * inputs.isolating
        if inputs.outside is not None:  # area-level policies, as isolation on both sides of a contact
            outside_factor = inputs.outside if outside_factor is None else outside_factor * inputs.outside
        if outside_factor is not None:
            w_out = w_home * outside_factor.index_select(0, infectious)
        case_isolated = self._case_isolated(inf_flags, onset_day.index_select(0, infectious), t)
        w_out = torch.where(case_isolated, 0.0, w_out)  # known cases who isolate emit only at home
        if state.weight is None:
            pressure = c.pressure(infectious, w_home, w_out, inputs.rates, inputs.working)
        else:
            pressure = self._weighted_pressure(state.weight.index_select(0, infectious), infectious, w_home, w_out,
                                               inputs)
        with torch.no_grad():  # forward values; with gradients, the scored agents' force is taken below
            force = c.force(pressure, outside_factor=outside_factor, working=inputs.working)
            if inputs.importation is not None:  # imported infections: a hazard on every agent, any lineage
                force.add_(inputs.importation.sum())
        # the per-agent multiplier (vaccines) scales the hazard taken today; it enters p and the
        # gradient estimator's hazards below alike
        taken = force if inputs.susceptibility is None else force * inputs.susceptibility.detach()
        # infection when the hazard accumulated since day 0 exceeds the agent's Exp(1) threshold:
        # P(infected on day t | susceptible before) = 1 - exp(-force_t), with no random number per day
        threshold = state.threshold - taken if grad else state.threshold.sub_(taken)
        del taken
        hit = threshold < 0
        seeded = None
        if inputs.imports is not None:
            u = gen.uniform(_IMPORT, c.n)
            seeded = (u < inputs.imports) & (disease == S)  # seeds are of the resident lineage
            hit |= seeded
        new_inf = hit.nonzero().squeeze(1)
        del hit
        group_weight = log_ratio = None
        if grad or state.log_ratio is not None:  # the group terms' log-ratios (see _group_terms)
            susceptibility = self._susceptibility(theta)
            prior = (flags & _PRIOR) != 0  # infected before, immunity waned
            susceptibility = torch.where(prior, susceptibility * theta["reinfection_susceptibility"], susceptibility)
            if inputs.susceptibility is not None:
                susceptibility = susceptibility * inputs.susceptibility
            hazard = force.index_select(0, new_inf).double() * susceptibility.detach().index_select(
                0, new_inf
            )
            if inputs.imports is not None:
                hazard = hazard - torch.log1p(-inputs.imports.detach().index_select(0, new_inf).double())
            group_outside = outside_factor
            if inputs.report_rate is not None:
                # an isolating case emits nothing in school or work either (it never receives: not S)
                group_outside = (torch.ones(c.n, device=self.device) if outside_factor is None
                                 else outside_factor.detach().clone())
                group_outside.index_fill_(0, infectious[case_isolated], 0.0)
        if grad:
            weight = self._infection_scores(state, pressure, new_inf, outside_factor, inputs, susceptibility)
            weight, group_weight, log_ratio = self._group_terms(
                state, weight, new_inf, hazard, infectious, w_home.detach(), group_outside, inputs,
                susceptibility.detach(),
            )
            new_infections = torch.zeros(b * a, device=self.device).index_add(
                0, c.cell.index_select(0, new_inf), weight.index_select(0, new_inf)
            )
            threshold = threshold.index_fill(0, new_inf, math.inf)
        else:
            new_infections = torch.bincount(c.cell.index_select(0, new_inf), minlength=b * a).to(
                torch.get_default_dtype()
            )
            weight = None
            if state.log_ratio is not None:  # a checkpointed segment's forward pass keeps the log-ratios
                log_ratio = self._group_terms(state, None, new_inf, hazard, infectious, w_home, group_outside,
                                              inputs, susceptibility)[2]
            threshold.index_fill_(0, new_inf, math.inf)
        del force

        # -- progression (agents whose transition day is t; today's infections leave later) ----------
        due = (next_day == t).nonzero().squeeze(1)
        due_state = disease.index_select(0, due)
        onset = due[due_state == E]
        leave = due[due_state == I]
        dying = due[due_state == _DYING]
        waned = due[due_state == R]  # immunity waned: susceptible again

        def w(idx: torch.Tensor) -> torch.Tensor:
            if weight is None:
                return torch.ones(idx.shape, device=self.device)
            return weight.index_select(0, idx)

        def per_cell(idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(b * a, device=self.device).index_add(0, c.cell.index_select(0, idx), values)

        # E -> I: symptomatic, hospitalised and fated draws; infectious period
        age = self.age.index_select(0, onset)
        psymp = theta["p_symptomatic"].clamp(1e-6, 1.0)
        p_s = theta["p_symptomatic"].index_select(0, age)
        p_h = (theta["ihr"] / psymp).index_select(0, age)
        # the fatality of onsets in day t's month (``fatality_by_day``, (T,), set by the Epidemic model)
        fatality = theta["fatality_by_day"][t] if "fatality_by_day" in theta else theta["fatality_scale"][0]
        p_d = (fatality * theta["ifr"] / psymp).index_select(0, age)
        if self.n_lineages > 1:  # each lineage's relative severity
            onset_lineage = lineage.index_select(0, onset).long()
            p_h = p_h * self._hospitalisation.index_select(0, onset_lineage)
            p_d = p_d * self._fatality.index_select(0, onset_lineage)
        if inputs.severity is not None:  # per-agent multiplier (vaccines) of the severe outcomes
            severity = inputs.severity.detach().index_select(0, onset)
            p_h, p_d = p_h * severity, p_d * severity
        p_h, p_d = p_h.clamp(max=1.0), p_d.clamp(max=1.0)
        u3 = torch.stack([gen.uniform(s, onset) for s in (_SYMPTOMATIC_DRAW, _HOSPITAL_DRAW, _DEATH_DRAW)])
        symp = u3[0] < p_s.detach()
        hosp = symp & (u3[1] < p_h.detach())
        die = symp & (u3[2] < p_d.detach())
        w_onset = w(onset)
        w_symp = w_onset  # the path weight after the symptomatic draw
        isolates, isolation_score = self._isolation_draw(
            onset, symp, inputs, theta["case_isolation_compliance"], gen, weight is not None)
        if weight is not None:  # the scores of the symptomatic and case-isolation draws, in one update
            score = _score_weight(p_s, symp)
            w_symp = w_onset * score
            both = score if isolation_score is None else score * isolation_score
            weight = weight.index_copy(0, onset, w_symp if isolation_score is None else w_symp * isolation_score)
            group_weight.index_copy_(1, onset, group_weight.index_select(1, onset) * both)  # in place, as there
        new_symptomatic = per_cell(onset, w_symp * symp)
        symptomatic_by_lineage = torch.zeros(self.n_lineages, device=self.device).index_add(
            0, lineage.index_select(0, onset).long(), w_symp * symp)
        new_hospitalized = per_cell(onset, w_symp * (_score_weight(p_h, hosp) if grad else 1.0) * hosp)
        bits = (symp * _SYMPTOMATIC + hosp * _HOSPITALIZED + die * _FATED).to(torch.int8)
        inf_days = self._draw_days(self._infectious_cdf, gen.uniform(_INFECTIOUS_DAYS, onset))
        fate = state.fate
        if fate is not None:  # forward 1 for agents fated to die, backward the score of that draw
            fate = fate.index_copy(0, onset, _score_weight(p_d, die) * die)

        # I -> R, or I -> awaiting death (or M at once when death_delay is 0)
        fated = (flags.index_select(0, leave) & _FATED) != 0
        delay = self.params.death_delay
        to_die_now = leave[fated] if delay == 0 else leave[:0]
        # awaiting death -> M
        deaths_idx = torch.cat([dying, to_die_now])

        w_leave = w(leave)
        w_dead = w(deaths_idx) if fate is None else w(deaths_idx) * fate.index_select(0, deaths_idx)
        ei = per_cell(onset, w_onset)
        ir = per_cell(leave, w_leave)
        deaths = per_cell(deaths_idx, w_dead)
        rs = per_cell(waned, w(waned))

        # -- write the new state --------------------------------------------------------------------
        lat_days = self._draw_days(self._latent_cdf, gen.uniform(_LATENT_DAYS, new_inf))
        disease.index_fill_(0, new_inf, E)
        next_day.index_copy_(0, new_inf, (lat_days + t).to(torch.int16))
        disease.index_fill_(0, onset, I)
        flags.index_copy_(0, onset, bits | (flags.index_select(0, onset) & _PRIOR))
        next_day.index_copy_(0, onset, (inf_days + t).to(torch.int16))
        onset_day.index_fill_(0, onset, t)
        # draws added with issue 15 come after the ones above, so that they leave those unchanged
        recovered_until = torch.full_like(leave, -1)
        if self._immunity_cdf is not None:  # the day infection-acquired immunity wanes
            recovered_until = self._draw_days(self._immunity_cdf, gen.uniform(_IMMUNITY_DAYS, leave)) + t
        if delay == 0:
            disease.index_put_((leave,), torch.where(fated, M, R).to(torch.int8))
            next_day.index_put_((leave,), torch.where(fated, -1, recovered_until).to(torch.int16))
        else:
            disease.index_put_((leave,), torch.where(fated, _DYING, R).to(torch.int8))
            next_day.index_put_((leave,), torch.where(fated, t + delay, recovered_until).to(torch.int16))
        disease.index_fill_(0, dying, M)
        next_day.index_fill_(0, dying, -1)
        threshold = self._wane(waned, disease, next_day, flags, threshold, theta, gen, grad)
        if isolates is not None:
            flags.index_copy_(0, onset, flags.index_select(0, onset) | (isolates.to(torch.int8) * _ISOLATES))
        sharded = c.reduce is not None or c.reduce_city is not None  # every rank attributes (summed pressures)
        if self.n_lineages > 1 and (sharded or (new_inf.numel() and self._lineages_present(inf_lineage, inputs))):
            drawn = self._attribute_lineage(
                new_inf, infectious, inf_lineage, w_home, w_out, inputs, outside_factor, gen)
            if seeded is not None:
                drawn = torch.where(seeded.index_select(0, new_inf), 0, drawn).to(torch.int8)
            lineage.index_copy_(0, new_inf, drawn)

        delta = torch.stack(
            [
                rs - new_infections,
                new_infections - ei,
                ei - ir,
                ir - deaths - rs,
                deaths,
            ],
            dim=1,
        )
        counts = state.counts + delta
        still = infectious[disease.index_select(0, infectious) == I]  # those who did not leave today
        infectious = torch.cat([still, onset])
        new_state = EpidemicState(
            disease, next_day, flags, threshold, infectious, counts, weight, fate, group_weight, log_ratio,
            lineage, onset_day,
        )
        out = {
            "new_infections": new_infections.view(b, a),
            "new_symptomatic": new_symptomatic.view(b, a),
            "new_hospitalized": new_hospitalized.view(b, a),
            "deaths": deaths.view(b, a),
            "prevalence": counts.view(b, a, len(STATES)),
            "symptomatic_by_lineage": symptomatic_by_lineage,
        }
        if c.reduce is not None:  # a shard: the city's series, every cell from the rank holding it
            out = _reduced(out, c.reduce)
        return new_state, out


    @staticmethod
    def _draw_days(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(n,) int64 whole-day durations >= 1 drawn by inverse CDF from the (n,) uniforms `u`."""
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1) + 1

    # -- reporting ------------------------------------------------------------------------------
    @staticmethod
    def reporting_rate(theta: Mapping[str, torch.Tensor], month_index: torch.Tensor) -> torch.Tensor:
        """(T, B) share of symptomatic onsets reported as cases, by day and borough: the month's
        ``ascertainment`` times the borough's ``ascertainment_by_borough``, at most 1."""
        monthly = theta["ascertainment"].index_select(0, month_index).unsqueeze(1)
        return (monthly * theta["ascertainment_by_borough"].unsqueeze(0)).clamp(max=1.0)

    def report(
        self, daily: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor], month_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Stacked daily outputs (T, B, A) -> the recorded series (``records``), all (T, B, A).

        ``reported_cases[t] = reporting_rate[t] * new_symptomatic[t - report_delay]`` (the expected
        value, so that ascertainment gets exact gradients); ``hospitalized[t] =
        new_hospitalized[t - hosp_delay]`` (admissions); days before the delay are 0.
        """
        p = self.params
        asc = self.reporting_rate(theta, month_index).unsqueeze(-1)  # (T, B, 1)
        prevalence = daily["prevalence"]
        series = {
            "new_infections": daily["new_infections"],
            "new_symptomatic": daily["new_symptomatic"],
            "reported_cases": asc * _shift(daily["new_symptomatic"], p.report_delay),
            "hospitalized": _shift(daily["new_hospitalized"], p.hosp_delay),
            "deaths": daily["deaths"],
        }
        if "symptomatic_by_lineage" in daily:
            series["symptomatic_by_lineage"] = daily["symptomatic_by_lineage"]  # (T, L)
        for i, name in enumerate(STATES):
            series[name] = prevalence[..., i]
        return series


def _reduced(out: dict[str, torch.Tensor], reduce) -> dict[str, torch.Tensor]:
    """The day's outputs summed over ranks in one collective (see ``EpidemicModel``'s `ids`)."""
    names = list(out)
    flat = reduce(torch.cat([out[k].reshape(-1) for k in names]))
    parts = flat.split([out[k].numel() for k in names])
    return {k: part.view(out[k].shape) for k, part in zip(names, parts, strict=True)}


def _shift(x: torch.Tensor, days: int) -> torch.Tensor:
    """(T, ...) series delayed by `days` (zeros enter at the start)."""
    if days == 0:
        return x
    pad = torch.zeros((min(days, x.shape[0]), *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([pad, x[: max(x.shape[0] - days, 0)]], dim=0)


def _by_month(values: torch.Tensor, n_months: int) -> torch.Tensor:
    """(m,) values per month -> (max(m, n_months),): the last given month's value holds after it."""
    values = values.reshape(-1)
    if values.numel() < n_months:
        values = torch.cat([values, values[-1:].expand(n_months - values.numel())])
    return values


def layer_rates(
    theta: Mapping[str, torch.Tensor], multipliers: torch.Tensor, month_index: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, 4) daily rates per layer: beta_L * beta_scale * intervention multiplier (T, 4), times
    ``transmission_change`` of each day's month when `month_index` (T,) is given."""
    betas = torch.stack([theta[f"beta_{layer}"] for layer in LAYERS])
    rates = multipliers.to(betas.device) * (betas * theta["beta_scale"]).unsqueeze(0)
    if month_index is not None:
        rates = rates * theta["transmission_change"].index_select(0, month_index).unsqueeze(1)
    return rates


def duration_pmf(kind: str, mean: float, shape: float = 1.0) -> torch.Tensor:
    """(K,) float64 probability of a duration of 1..K whole days, as the model draws it."""
    cdf = _duration_cdf(kind, mean, shape)
    return torch.diff(cdf, prepend=torch.zeros(1, dtype=cdf.dtype))


def generation_interval_pmf(params: EpidemicParams) -> torch.Tensor:
    """(K,) float64 probability that an infectee is infected k = 1..K days after its infector, at
    constant infectiousness and without depletion: ``P(L + j = k)`` with L the latent period and j
    uniform on 1..D given the infectious period D, D weighted by its length (long infections
    transmit more)."""
    latent = duration_pmf(params.duration_distribution, params.latent_mean, params.latent_shape)
    infectious = duration_pmf(params.duration_distribution, params.infectious_mean, params.infectious_shape)
    k = torch.arange(1, infectious.numel() + 1, dtype=torch.float64)
    # P(j = i) = sum_{D >= i} P(D) / E[D]: the survival function of D, normalised
    survival = torch.flip(torch.cumsum(torch.flip(infectious, [0]), 0), [0])
    j = survival / float((k * infectious).sum())
    pmf = torch.zeros(latent.numel() + j.numel() + 1, dtype=torch.float64)
    for lat in range(latent.numel()):  # a convolution over the (short) latent support
        if latent[lat] > 0:
            pmf[lat + 2: lat + 2 + j.numel()] += latent[lat] * j
    return pmf[1:]
