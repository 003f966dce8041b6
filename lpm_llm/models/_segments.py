"""Gradient checkpointing of the epidemic in segments of days, with a compact saved state.

A segment is a run of consecutive days of :meth:`EpidemicModel.step` wrapped in one autograd node
(:class:`_Segment`). Its forward pass runs the steps without autograd (the fast path, which also
keeps the log likelihood ratios of the group terms up to date) and saves only what determines the
segment's draws: the integer columns, the infection thresholds, the infectious list, the counts and
the group log-ratios of the agents who have been infectious. Its backward pass re-runs the segment with
gradients from that state and back-propagates through it.

Why this saves memory: the path weights of the estimator (``weight`` (N,), ``group_weight`` (3, N),
``fate`` (N,)) are exactly 1.0 (``fate``: 0/1, the agent's fated-to-die flag) in the forward pass (see
"Gradients" in :mod:`lpm_llm.models.seirm`); only their gradients differ. So they are never stored:
the recomputation starts them from ones (and the flag) as fresh leaves, and the gradient they receive is
handed to the segment before. ``torch.utils.checkpoint`` kept every boundary state whole (40 bytes per
agent, 32 of them these float columns) and recorded the forward pass with gradients (the costlier path)
before recomputing it. Bytes per agent are in the README's "Measured speed" section.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["Horizon", "run_segment"]

_OUTS = ("new_infections", "new_symptomatic", "new_hospitalized", "deaths", "prevalence", "symptomatic_by_lineage")
_GRAD_STATE = ("weight", "fate", "group_weight", "counts")  # differentiable columns of EpidemicState
_FATED = 4  # bit of EpidemicState.flags (lpm_llm.models.seirm._FATED)


@dataclass
class _Saved:
    """What a segment keeps for its backward pass (the state at its start, compact)."""

    disease: torch.Tensor  # (N,) int8
    next_day: torch.Tensor  # (N,) int16
    flags: torch.Tensor  # (N,) int8
    threshold: torch.Tensor  # (N,) float32
    infectious: torch.Tensor  # (n_I,) int64
    counts: torch.Tensor  # (cells, 5) float32
    ever: torch.Tensor  # (n_e,) int64 agents that have been infectious
    log_ratio: torch.Tensor  # (3, n_e) float32 their group log-ratios (0 for every other agent)


def _compact(state: Any) -> _Saved:
    from lpm_llm.models.seirm import _PRIOR, I

    # agents that have been infectious: now or before, including those susceptible again after waning
    ever = ((state.disease >= I) | ((state.flags & _PRIOR) != 0)).nonzero().squeeze(1)
    return _Saved(state.disease, state.next_day, state.flags, state.threshold, state.infectious,
                  state.counts.detach().clone(), ever, state.log_ratio.index_select(1, ever))


def _expand(saved: _Saved, template: Any, leaves: dict[str, torch.Tensor | None]) -> Any:
    """The full state from `saved`, its float columns from `leaves` (or their forward values)."""
    n = saved.disease.numel()
    log_ratio = torch.zeros((saved.log_ratio.shape[0], n), device=saved.disease.device)
    log_ratio.index_copy_(1, saved.ever, saved.log_ratio)
    group_weight = leaves["group_weight"]  # updated in place by the steps: a leaf itself cannot be
    group_weight = group_weight.clone() if group_weight.requires_grad else group_weight
    return replace(template, disease=saved.disease, next_day=saved.next_day, flags=saved.flags,
                   threshold=saved.threshold, infectious=saved.infectious, counts=leaves["counts"],
                   weight=leaves["weight"], fate=leaves["fate"], group_weight=group_weight,
                   log_ratio=log_ratio)


def _forward_values(flags: torch.Tensor, counts: torch.Tensor, n_layers: int) -> dict[str, torch.Tensor]:
    """The forward values of the differentiable columns: weights 1, fate the fated-to-die flag."""
    n, dev = flags.numel(), flags.device
    return {
        "weight": torch.ones(n, device=dev),
        "fate": ((flags & _FATED) != 0).to(torch.get_default_dtype()),
        "group_weight": torch.ones((n_layers, n), device=dev),
        "counts": counts.clone(),
    }


class Horizon:
    """Who is infected by the end of a run, shared by the run's segments: their recomputation scores
    the infection draws of those agents only (``EpidemicInputs.scored``), since the path weight of an
    agent never infected is never read. Until :meth:`close` every susceptible agent is scored."""

    def __init__(self) -> None:
        self.infected: torch.Tensor | None = None

    def close(self, final_state: Any) -> None:
        """Record the agents infected by the end of the run (the state after its last day): those not
        susceptible, and those susceptible again after their immunity waned (flag ``_PRIOR``)."""
        from lpm_llm.models.seirm import _PRIOR, S

        self.infected = (final_state.disease != S) | ((final_state.flags & _PRIOR) != 0)


class _Segment(torch.autograd.Function):
    """One segment of days as one autograd node (see the module docstring).

    ``apply(plan, *tensors)``: `plan` rebuilds the step's arguments from `tensors` (the state's
    differentiable columns, then the parameter tensors, then the days' input tensors)."""

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor):
        state, theta, days = plan.unflatten(tensors, plan.state)
        ctx.plan = plan
        ctx.saved = _compact(state)
        outs = plan.advance(state, theta, days, gradients=False)
        plan.state = None
        new_state = plan.result = outs[0]
        flat_outs = [o[k] for o in outs[1] for k in _OUTS]
        ctx.n_grad_state = len(_GRAD_STATE)
        return (*(getattr(new_state, k) for k in _GRAD_STATE), *flat_outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        plan, saved = ctx.plan, ctx.saved
        leaves: list[torch.Tensor] = []
        values = _forward_values(saved.flags, saved.counts, plan.n_layers)
        state_leaves = {}
        for i, k in enumerate(_GRAD_STATE):
            t = values[k]
            if ctx.needs_input_grad[1 + i]:
                t.requires_grad_(True)
                leaves.append(t)
            state_leaves[k] = t
        other = []
        for j, t in enumerate(plan.inputs):
            t = t.detach()
            if ctx.needs_input_grad[1 + len(_GRAD_STATE) + j]:
                t = t.requires_grad_(True)
                leaves.append(t)
            other.append(t)
        with torch.enable_grad():
            state = _expand(saved, plan.template, state_leaves)
            _, theta, days = plan.unflatten([*(state_leaves[k] for k in _GRAD_STATE), *other], state)
            days = [(t, replace(day, scored=plan.horizon.infected)) for t, day in days]
            new_state, outs = plan.advance(state, theta, days, gradients=True)
            results = [*(getattr(new_state, k) for k in _GRAD_STATE), *(o[k] for o in outs for k in _OUTS)]
        pairs = [(r, g) for r, g in zip(results, grads, strict=True) if g is not None and r.requires_grad]
        found = (torch.autograd.grad([r for r, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                 if pairs and leaves else [None] * len(leaves))
        out: list[torch.Tensor | None] = [None]  # the plan
        it = iter(found)
        for need in ctx.needs_input_grad[1:]:
            out.append(next(it) if need else None)
        return tuple(out)


class _Plan:
    """The non-tensor side of a segment: the engine, the days and how to rebuild their arguments."""

    def __init__(self, engine: Any, state: Any, theta: dict[str, torch.Tensor], days: list[tuple[int, Any]],
                 horizon: Horizon):
        self.engine = engine
        self.horizon = horizon
        self.state = state
        self.template = replace(state, weight=None, fate=None, group_weight=None, log_ratio=None)
        self.n_layers = state.group_weight.shape[0]
        self.theta_keys = list(theta)
        inputs: list[torch.Tensor] = [theta[k] for k in self.theta_keys]
        index: dict[int, int] = {}
        self.day_fields: list[tuple[int, Any, dict[str, int]]] = []
        for t, day in days:
            fields = {}
            for name in ("rates", "isolating", "imports", "susceptibility", "severity", "importation", "report_rate",
                         "outside"):
                x = getattr(day, name)
                if x is None:
                    continue
                if id(x) not in index:  # a week's isolation decisions are one tensor, passed once
                    index[id(x)] = len(inputs)
                    inputs.append(x)
                fields[name] = index[id(x)]
            self.day_fields.append((t, day, fields))
        self.inputs = inputs
        self.result: Any = None

    def flat(self) -> list[torch.Tensor]:
        return [*(getattr(self.state, k) for k in _GRAD_STATE), *self.inputs]

    def unflatten(self, tensors, state):
        k = len(_GRAD_STATE)
        columns = dict(zip(_GRAD_STATE, tensors[:k], strict=True))
        rest = tensors[k:]
        theta = dict(zip(self.theta_keys, rest[: len(self.theta_keys)], strict=True))
        days = [(t, replace(day, **{name: rest[j] for name, j in fields.items()}))
                for t, day, fields in self.day_fields]
        return replace(state, **columns), theta, days

    def advance(self, state, theta, days, *, gradients: bool):
        outs = []
        if gradients:
            for t, inputs in days:
                state, out = self.engine.step(state, t, inputs, theta)
                outs.append(out)
            return state, outs
        # the forward values: the fast path, which keeps `log_ratio` but no path weights
        # every column the fast path writes in place is copied: the segment's start state is the
        # template of its recomputation
        fast = replace(state, weight=None, fate=None, group_weight=None,
                       disease=state.disease.clone(), next_day=state.next_day.clone(), flags=state.flags.clone(),
                       threshold=state.threshold.clone(), lineage=state.lineage.clone(),
                       onset_day=state.onset_day.clone())
        with torch.no_grad():
            for t, inputs in days:
                fast, out = self.engine.step(fast, t, inputs, theta)
                outs.append({k: v.clone() if v._base is not None else v for k, v in out.items()})
            values = _forward_values(fast.flags, fast.counts, self.n_layers)
        return replace(fast, **values), outs


def run_segment(engine: Any, state: Any, theta: dict[str, torch.Tensor], days: list[tuple[int, Any]],
                horizon: Horizon):
    """Run `days` (``[(t, EpidemicInputs)]``) from `state` as one checkpointed segment of the run
    whose end `horizon` will record.

    Returns the state after the last day (its float columns connected to the autograd graph through
    the segment) and the list of each day's outputs, as :meth:`EpidemicModel.step` gives them.
    """
    plan = _Plan(engine, state, theta, days, horizon)
    flat = _Segment.apply(plan, *plan.flat())
    k = len(_GRAD_STATE)
    columns = dict(zip(_GRAD_STATE, flat[:k], strict=True))
    new_state = replace(plan.result, **columns)
    plan.result = None
    outs, per = [], len(_OUTS)
    for i in range(len(days)):
        outs.append(dict(zip(_OUTS, flat[k + i * per: k + (i + 1) * per], strict=True)))
    return new_state, outs
