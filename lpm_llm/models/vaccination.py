"""COVID-19 vaccination as a model of a :class:`~lpm_llm.core.sim.Simulation`: :class:`Vaccination`.

Whether a person gets vaccinated is the LLM's decision: every week each archetype is asked "will
you get a COVID-19 vaccine in the coming week?" (``prompts/vaccination.yaml``), with who is eligible,
the reported cases in its borough, the share of its borough already vaccinated and the date. Among
the eligible and unvaccinated, every agent decides from its archetype's (aligned) probability; the
week's first doses are limited by the supply; a second dose follows after 3 or 4 weeks; protection
against infection and severe outcomes by dose, waning over months, is handed to the epidemic. The
schedule, the approximations and every number with its source are in
:mod:`lpm_llm.models.vaccination_params`.

One week (on the decision's days, every 7 days from day 0, from ``FIRST_QUESTION`` on: two weeks
before the first eligibility date, so that a run from March 2020 asks nothing for nine months; a
run starting later asks from day 0, as before):

1. at risk: agents eligible today (``eligible_day <= t``) who have no first dose (given or scheduled);
2. willingness: agent i of archetype k says yes with probability ``p_k`` (every agent answers every
   week, eligible or not). With ``persistence`` r > 0 the answers of an agent form a two-state
   Markov chain with stationary share ``p_k`` and week-to-week correlation r: yes with probability
   ``p_k + r (1 - p_k)`` after a yes, ``p_k (1 - r)`` after a no. The share saying yes stays ``p_k``
   (when ``p_k`` does not change), but the same people keep refusing (hesitancy), so coverage levels
   off instead of creeping to 100%. (A latent Gaussian propensity, as
   :func:`~lpm_llm.core.behavior.broadcast_persistent`, has no tractable likelihood of the answers,
   which the gradient estimator needs: its score-function gradient was measured 47% too large.)
3. supply: with S first doses for the week (see ``VaccinationParams.supply_scale``) and expected
   demand D (the sum of those probabilities over the agents at risk), each willing agent is served
   with probability ``min(1, S / D)``, and if more are served than S (chance) a random S of them
   are kept;
4. each served agent gets dose 1 on a day drawn uniformly in the week, a vaccine (Pfizer, Moderna,
   Janssen by ``mix``) and, for the mRNA vaccines, dose 2 after ``dose_interval`` days.

Every day it publishes ``susceptibility`` (N,) (``1 - VE_infection``, 0 for agents immune from a
prior infection) and ``severity`` (N,) (``(1 - VE_severe) / (1 - VE_infection)``), which the
epidemic reads (:class:`~lpm_llm.models.seirm.EpidemicInputs`), and records per borough x age band
cell ``vaccinated_1`` (residents-as-agents with >= 1 dose), ``vaccinated_full``, ``doses`` (given
that day) and ``eligible``.

Gradients. With gradients on, every agent carries a path weight (forward 1.0) whose gradient is the
score of its own draws (willingness and service, as in :mod:`lpm_llm.models.seirm`), and the coverage
series count agents with their weights, so that d(coverage)/d(alignment, supply_scale) is an
unbiased score-function estimate (up to the chance cap of step 3, whose effect is left out; the
rationing share uses the realised set at risk). The published susceptibility is detached: the
epidemic's gradients do not reach the vaccination's parameters.

Limitations (documented, not hidden): agents who died of COVID-19 can still be vaccinated (the model
does not read the epidemic's state: deaths in December 2020 - June 2021 were about 0.1% of New
Yorkers); an agent who becomes eligible mid-week waits for the next decision day.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import torch

from lpm_llm.core.behavior import PerArchetype
from lpm_llm.core.model import DecisionUse
from lpm_llm.core.parameters import Bounded
from lpm_llm.core.rng import day_generator
from lpm_llm.models.vaccination_params import BAND_AGES, ELIGIBILITY, JANSSEN_FROM, VaccinationParams

__all__ = ["Vaccination", "VaccinationParams", "prior_infected_share"]

_NEVER = 2**30
_PFIZER, _MODERNA, _JANSSEN = 0, 1, 2
_STREAM = 0x7AC  # mixes the run seed for this model's draws


FIRST_QUESTION = min(e.date for e in ELIGIBILITY) - dt.timedelta(days=14)
"""The vaccination question is not asked before this date (2020-11-30)."""


def _score(p: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward 1.0; backward the score of a Bernoulli(p) draw with outcome `hard` (bool)."""
    pd = p.detach()
    one = torch.ones_like(pd)
    return torch.where(hard, p / torch.where(pd > 0, pd, one), (1.0 - p) / torch.where(pd < 1, 1.0 - pd, one))


def prior_infected_share(date: dt.date, residents: Mapping[str, float], spring_ratio: float,
                         later_ratio: float) -> dict[str, float]:
    """Borough -> share of residents infected before `date`: reported cases (cases + probable) to
    2020-04-30 times `spring_ratio`, after it times `later_ratio` (see
    :mod:`~lpm_llm.models.vaccination_params`), at most 0.95."""
    from lpm_llm.data.observed import load_covid

    df = load_covid(end=str(date - dt.timedelta(days=1)))
    df = df.assign(c=df["cases"] + df["probable_cases"])
    spring = df[df["date"] <= "2020-04-30"].groupby("area")["c"].sum()
    later = df[df["date"] > "2020-04-30"].groupby("area")["c"].sum()
    return {b: min(0.95, (spring_ratio * float(spring.get(b, 0.0)) + later_ratio * float(later.get(b, 0.0)))
                   / residents[b]) for b in residents}


class Vaccination:
    """COVID-19 vaccination decided by the LLM's archetypes (see the module docstring).

    Consumes the ``vaccinate`` decision (weekly, as (K,) archetype probabilities). Reads
    ``cases_week`` (the epidemic's reported cases per 100,000 by borough) for its prompt; without an
    epidemic model the prompt shows the observed cases of the bundled data. Publishes
    ``susceptibility`` and ``severity`` (N,) every day.

    Args:
        params: settings (:class:`VaccinationParams`, a mapping, or None for the defaults).
    """

    name = "vaccination"
    decisions = (DecisionUse("vaccinate", every_days=7, as_draws=False, required=True, first=FIRST_QUESTION),)
    observes = ()
    publishes = ("susceptibility", "severity")
    reads = ("cases_week",)
    state = ("age_years", "eligible_day", "dose1_day", "full_day", "product", "last_yes", "weight")
    results = ("vaccinated_1", "vaccinated_full", "doses", "eligible")

    def __init__(self, params: VaccinationParams | Mapping[str, Any] | None = None):
        self.params = params if isinstance(params, VaccinationParams) else VaccinationParams.model_validate(
            params or {})
        self.supply_scale: torch.Tensor = torch.tensor(float(self.params.supply_scale))
        self.sim: Any = None
        self.known_on: dt.date | None = None
        self.eligibility = ELIGIBILITY

    def cut_at(self, date: dt.date) -> None:
        """Use only what was known on `date` (a forecast as of it; call before the simulation is built):
        the city's first doses after `date` are held at their mean over the last 7 known days
        (:func:`~lpm_llm.data.vaccination.city_first_doses`), and eligibility steps dated after it are
        not known, so they do not open (nor appear in the prompt)."""
        self.known_on = date
        self.eligibility = tuple(e for e in ELIGIBILITY if e.date <= date)

    # -- declarations -----------------------------------------------------------------------------
    def parameters(self) -> dict[str, Bounded]:
        """``vaccine_supply_scale``: weekly first doses at most this times the city's observed ones."""
        return {"vaccine_supply_scale": Bounded(0.5, 2.0, min(max(float(self.params.supply_scale), 0.5), 2.0),
                                                log=True, doc="weekly first-dose supply relative to the "
                                                "city's observed weekly first doses")}

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        if "vaccine_supply_scale" in values:
            self.supply_scale = torch.as_tensor(values["vaccine_supply_scale"], dtype=torch.get_default_dtype())

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, sim: Any) -> None:
        """Per-agent ages within bands, groups and eligibility days (fixed for the population), the
        supply per day in agents, and the agents immune from a prior infection."""
        from lpm_llm.data.vaccination import city_first_doses

        self.sim = sim
        pop, p = sim.population, self.params
        for col in ("age_band", "borough"):
            if col not in pop:
                raise ValueError(f"the vaccination model needs a {col!r} column; population has {list(pop.columns)}")
        if len(sim.age_bands) != len(BAND_AGES):
            raise ValueError(f"the vaccination model needs the {len(BAND_AGES)} age bands, population has "
                             f"{sim.age_bands}")
        n, dev = pop.n, sim.device
        gen = torch.Generator().manual_seed(p.group_seed)
        band = pop["age_band"].long().cpu()
        lo = torch.tensor([a for a, _ in BAND_AGES])[band]
        width = torch.tensor([b - a + 1 for a, b in BAND_AGES])[band]
        age = lo + (torch.rand(n, generator=gen) * width).long().clamp(max=width - 1)
        adult = (age >= 18) & (age <= 64)
        employed = pop["employed"].bool().cpu() if "employed" in pop else torch.ones(n, dtype=torch.bool)
        u = torch.rand(n, generator=gen)
        s1, s2, s3 = p.share_health_care, p.share_essential, p.share_public_facing
        worker = adult & employed
        groups = {
            "health_care": worker & (u < s1),
            "essential": worker & (u >= s1) & (u < s1 + s2),
            "public_facing": worker & (u >= s1 + s2) & (u < s1 + s2 + s3),
            "comorbidity": (age >= 16) & (age <= 64)
            & (torch.rand(n, generator=gen) < torch.tensor(p.comorbidity_by_band)[band]),
        }
        eligible = torch.full((n,), _NEVER, dtype=torch.int64)
        for e in self.eligibility:
            if e.kind == "age":
                mask = (age >= e.min_age) & (age <= (e.max_age if e.max_age is not None else 200))
            else:
                mask = groups[e.group]
            first = torch.tensor((e.date - sim.start_date).days)
            eligible = torch.where(mask, torch.minimum(eligible, first), eligible)
        self.age_years = age.to(dev)
        self.groups = {k: v.to(dev) for k, v in groups.items()}
        self.eligible_day = eligible.to(dev)
        self.borough = pop["borough"].long().to(dev)
        a = len(sim.age_bands)
        self.cell = (self.borough * a + pop["age_band"].long().to(dev))
        self.n_cells = len(sim.areas) * a
        self.borough_agents = torch.bincount(self.borough, minlength=len(sim.areas)).to(torch.get_default_dtype())
        self.borough_agents = self.borough_agents.clamp(min=1)
        self.residents = {b: float(r) for b, r in zip(sim.areas, (sim.persons_per_agent.double()
                                                                    * self.borough_agents.double().cpu()).tolist(),
                                                       strict=True)}
        agents_per_person = n / sum(self.residents.values())
        doses = city_first_doses(sim.start_date, sim.days, as_of=self.known_on)
        self.supply_day = torch.tensor(doses) * agents_per_person  # (T,)
        first_day = self.eligible_day.clamp(min=0)
        soon = first_day < sim.days
        eligible_cells = torch.zeros(sim.days, self.n_cells, device=dev).index_put_(
            (first_day[soon], self.cell[soon]), torch.ones(int(soon.sum()), device=dev), accumulate=True)
        self.eligible_cells = eligible_cells.cumsum(0)  # (T, cells) agents eligible on each day
        self.prior = torch.zeros(n, dtype=torch.bool, device=dev)
        if p.prior_immunity:
            share = prior_infected_share(sim.start_date, self.residents, p.spring_ratio, p.later_ratio)
            self.prior_share = share
            per_agent = torch.tensor([share[b] for b in sim.areas])[self.borough.cpu()]
            self.prior = (torch.rand(n, generator=gen) < per_agent).to(dev)
        self._observed_cases: dict[dt.date, list[float]] = {}

    def init(self, sim: Any) -> None:
        """Nobody vaccinated; path weights when gradients are on."""
        n, dev = sim.population.n, sim.device
        self.dose1_day = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.dose2_day = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.full_day = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.product = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.scheduled = torch.zeros(0, dtype=torch.int64, device=dev)  # agents given (or booked) dose 1
        self.last_yes: torch.Tensor | None = None  # (N,) bool each agent's last answer
        self.grad = torch.is_grad_enabled()
        self.weight = torch.ones(n, device=dev) if self.grad else None
        # (days + 35, cells) doses by the day they are given, booked at the decision (a booked agent's
        # path weight no longer changes); the extra rows take doses booked past the last day
        rows = sim.days + 35
        self.booked = {k: torch.zeros(rows, self.n_cells, device=dev) for k in ("first", "full", "doses")}
        self.weeks: list[dict[str, float]] = []  # per decision step: at risk, demand, supply, served
        # whether a model reads the protection (else it is not computed)
        self.publish = any(set(self.publishes) & set(m.reads) for m in sim.models if m is not self)

    # -- context ----------------------------------------------------------------------------------
    def eligible_groups(self, date: dt.date) -> str:
        """Who is eligible on `date`, as the prompt says it."""
        labels = [e.label for e in self.eligibility if e.date <= date]
        return "; ".join(labels) if labels else "nobody yet (vaccines are not yet available)"

    def _cases_per_100k(self, date: dt.date) -> list[float]:
        cases = self.sim.data.get("cases_week")
        if cases is not None:
            return [float(x) for x in torch.as_tensor(cases).reshape(-1).tolist()]
        if date not in self._observed_cases:
            from lpm_llm.data.vaccination import observed_cases_per_100k

            obs = observed_cases_per_100k(date, self.residents)
            self._observed_cases[date] = [obs[b] for b in self.sim.areas]
        return self._observed_cases[date]

    def context(self, decision: str, day: int, date: dt.date) -> dict[str, Any]:
        if decision != "vaccinate":
            return {}
        cases = self._cases_per_100k(date)
        done = ((self.dose1_day >= 0) & (self.dose1_day < day)).to(torch.get_default_dtype())
        share = (torch.zeros_like(self.borough_agents).index_add(0, self.borough, done)
                 / self.borough_agents * 100).tolist()
        home = self.sim.home
        return {
            "eligible_groups": self.eligible_groups(date),
            "cases_per_100k": PerArchetype(f"{round(cases[h])}" for h in home),
            "vaccinated_share": PerArchetype(f"{round(share[h])}%" for h in home),
        }

    def observe(self, day: int) -> dict[str, Any]:
        return {}

    # -- the week's draw --------------------------------------------------------------------------
    def _decide(self, day: int, date: dt.date, probs: torch.Tensor) -> None:
        sim, p, dev = self.sim, self.params, self.sim.device
        gen = day_generator(sim.seed ^ _STREAM, day, dev)
        at_risk = (self.eligible_day <= day) & (self.dose1_day < 0)
        q = probs.to(dev).index_select(0, sim.index.long())
        r = p.persistence
        if r > 0 and self.last_yes is not None:  # a two-state Markov chain: stationary share q, correlation r
            p_yes = torch.where(self.last_yes, q + r * (1.0 - q), q * (1.0 - r))
        else:
            p_yes = q
        yes = torch.rand(q.shape, generator=gen, device=dev) < p_yes.detach()
        self.last_yes = yes
        supply = self.supply_day[day:day + 7].sum().to(dev) * self.supply_scale.to(dev)
        demand = (p_yes * at_risk).sum()
        share = torch.clamp(supply / demand.clamp(min=1e-9), max=1.0)
        served = at_risk & yes & (torch.rand(q.shape, generator=gen, device=dev) < share.detach())
        if self.weight is not None:  # every unvaccinated agent's answer shapes its next ones: all are scored
            factor = _score(p_yes, yes) * torch.where(at_risk & yes, _score(share.expand_as(q), served), 1.0)
            self.weight = torch.where(self.dose1_day < 0, self.weight * factor, self.weight)
        cap = int(math.floor(float(supply.detach()) + float(torch.rand((), generator=gen, device=dev))))
        idx = served.nonzero().squeeze(1)
        if idx.numel() > cap:  # more served than doses by chance: keep a random `cap` of them
            idx = idx[torch.randperm(idx.numel(), generator=gen, device=dev)[:cap]]
        self.weeks.append({"day": day, "at_risk": float(at_risk.sum()), "demand": float(demand.detach()),
                           "supply": float(supply.detach()), "served": float(idx.numel())})
        if idx.numel() == 0:
            return
        offset = torch.randint(0, 7, (idx.numel(),), generator=gen, device=dev)
        v = torch.rand(idx.numel(), generator=gen, device=dev)
        m0, m1, _ = p.mix
        if date >= JANSSEN_FROM:
            product = torch.where(v < m0, _PFIZER, torch.where(v < m0 + m1, _MODERNA, _JANSSEN))
        else:
            product = torch.where(v < m0 / (m0 + m1), _PFIZER, _MODERNA)
        d1 = day + offset
        interval = torch.tensor([p.dose_interval[0], p.dose_interval[1], 0], device=dev).index_select(0, product)
        d2 = torch.where(product == _JANSSEN, -1, d1 + interval)
        self.dose1_day = self.dose1_day.index_copy(0, idx, d1)
        self.dose2_day = self.dose2_day.index_copy(0, idx, d2)
        self.full_day = self.full_day.index_copy(0, idx, torch.where(product == _JANSSEN, d1, d2))  # as `full`
        self.product = self.product.index_copy(0, idx, product)
        self.scheduled = torch.cat([self.scheduled, idx])
        w = self.weight.index_select(0, idx) if self.weight is not None else torch.ones(idx.numel(), device=dev)
        cell = self.cell.index_select(0, idx)
        full = torch.where(product == _JANSSEN, d1, d2)
        mrna = product != _JANSSEN
        for name, when, who in (("first", d1, None), ("full", full, None), ("doses", d1, None), ("doses", d2, mrna)):
            at, c, v = (when, cell, w) if who is None else (when[who], cell[who], w[who])
            self.booked[name] = self.booked[name].index_put((at, c), v, accumulate=True)

    # -- protection -------------------------------------------------------------------------------
    def protection(self, day: int, who: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vaccine effectiveness against infection and against severe outcomes on `day` of the agents
        `who` (indices; None: all (N,)), by dose and time since full protection (see
        :mod:`~lpm_llm.models.vaccination_params`)."""
        p = self.params
        onset1, onset2, onset_j = p.onset_days
        pick = (lambda x: x) if who is None else (lambda x: x.index_select(0, who))
        product, dose1, full_day = pick(self.product), pick(self.dose1_day), pick(self.full_day)
        jans = product == _JANSSEN
        partial = (product >= 0) & ~jans & (dose1 >= 0) & (day >= dose1 + onset1)
        start = full_day + torch.where(jans, onset_j, onset2)
        full = (full_day >= 0) & (day >= start)
        tau = (day - start).clamp(min=0).to(torch.get_default_dtype())
        ve_inf = torch.where(full, torch.where(jans, p.ve_infection[2], p.ve_infection[1])
                             * torch.exp(-p.waning_infection * tau), torch.where(partial, p.ve_infection[0], 0.0))
        ve_sev = torch.where(full, torch.where(jans, p.ve_severe[2], p.ve_severe[1])
                             * torch.exp(-p.waning_severe * tau), torch.where(partial, p.ve_severe[0], 0.0))
        return ve_inf, ve_sev

    # -- the day ----------------------------------------------------------------------------------
    def step(self, day: int, date: dt.date, inputs: Any) -> dict[str, Any]:
        if "vaccinate" in inputs.decided:
            self._decide(day, date, inputs.decisions["vaccinate"])
        if not self.publish:
            return {}
        ve_inf, ve_sev = self.protection(day, self.scheduled)
        susceptibility = (~self.prior).to(torch.get_default_dtype()).index_copy(
            0, self.scheduled, torch.where(self.prior.index_select(0, self.scheduled), 0.0, 1.0 - ve_inf))
        severity = torch.ones_like(susceptibility).index_copy(
            0, self.scheduled, ((1.0 - ve_sev) / (1.0 - ve_inf).clamp(min=1e-6)).clamp(max=1.0))
        return {"susceptibility": susceptibility, "severity": severity}

    def finish(self) -> dict[str, torch.Tensor]:
        t, b, a = self.sim.days, len(self.sim.areas), len(self.sim.age_bands)
        out = {
            "vaccinated_1": self.booked["first"][:t].cumsum(0).view(t, b, a),
            "vaccinated_full": self.booked["full"][:t].cumsum(0).view(t, b, a),
            "doses": self.booked["doses"][:t].view(t, b, a),
            "eligible": self.eligible_cells.view(t, b, a),
        }
        self.final_state = {"dose1_day": self.dose1_day, "dose2_day": self.dose2_day, "full_day": self.full_day,
                            "product": self.product, "eligible_day": self.eligible_day, "prior": self.prior}
        return out
