"""The calibration loop: :class:`Calibrator` fits a :class:`~lpm_llm.core.parameters.ParameterSpace`
to an objective with Adam on its gradient or with Nelder-Mead without one (the baseline).

Every fit of the package goes through it: the first wave (:mod:`lpm_llm.calibrate.fit`), the labour
market, the whole period, the forecasts' weekly updates and the private calibration.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lpm_llm.core.parameters import ParameterSpace

__all__ = ["Calibrator"]

log = logging.getLogger(__name__)


class _TimeUp(Exception):
    """Raised inside a fit when its ``time_limit`` has passed."""


class Calibrator:
    """Fit a :class:`ParameterSpace` to an objective, scikit-learn style.

    ``fit(objective)`` minimises ``objective(values, seeds)`` (for example the loss of the mean of
    the simulations with these seeds), where ``values`` is name -> constrained tensor. The space
    given here is not modified: it is copied into ``space_``.

    Methods:
        ``adam``: gradient descent (Adam) on the raw parameters; step i uses the fresh seeds
            ``seed + i * seeds_per_step + j``, j < seeds_per_step (stochastic gradients), or with
            ``resample_seeds=False`` the same seeds ``seed + j`` every step (common random numbers: a
            deterministic objective, a sample-average approximation). ``steps`` steps; the learning
            rate goes geometrically from ``lr`` to ``lr_final`` (default: constant ``lr``). Adam's
            ``betas`` default to (0.5, 0.9), not PyTorch's (0.9, 0.999): a calibration is tens of
            noisy steps whose gradients shrink by 10-100x as the fit closes in. With beta2 = 0.999 the
            second-moment estimate remembers the first steps' gradients and beta1 = 0.9 carries the
            iterate past the minimum; on the recovery test (tests/test_calibrate.py) every parameter
            then moved in step, overshot beta_scale by 13% and seeding by 40%, and the decayed rate
            left them there.
        ``nelder-mead``: scipy's Nelder-Mead (adaptive) on the flat raw vector, with the fixed
            seeds ``seed + j`` (common random numbers, so the function it sees is
            deterministic), no gradients; at most ``budget`` simulations (default: what ``adam``
            would use, ``steps * seeds_per_step``), initial simplex of size ``simplex_step``.

    ``time_limit`` (seconds) stops either method once its fit has run that long.
    ``optimizer_state``: an ``optimizer_state_`` of an earlier ``adam`` fit of the same parameters
    (moment estimates and step count), so that a few steps of a warm-started fit continue it.

    ``aggregate`` (``adam`` only): called after each backward pass as ``aggregate(loss, parameters)``;
    it may replace the parameters' ``.grad`` in place and returns the loss to record. A fit whose
    loss is a sum of terms held by several processes uses it to combine them (e.g. the secure sum of
    :mod:`lpm_llm.privacy`), so that every process takes the same step.

    Fitted attributes:
        params_: name -> fitted value (float or list of floats). For ``adam`` the last iterate; for
            ``nelder-mead`` the best point found.
        loss_history_: the loss of each step (``adam``, before its update) or evaluation
            (``nelder-mead``).
        wall_times_: seconds from the start of ``fit`` to the end of each entry of ``loss_history_``.
        simulations_: simulations run up to each entry.
        best_loss_, best_params_: the lowest entry of ``loss_history_`` and the parameters it was
            measured at (with fresh seeds each step this minimum is optimistic: prefer ``params_``).
        space_: the fitted ParameterSpace.
        optimizer_state_: (``adam``) the optimiser's ``state_dict()`` after the last step.
        vector_history_: the raw parameter vector after each entry of ``loss_history_`` (Adam's
            iterate after its update, Nelder-Mead's best point so far), to score the fit as it went
            (:meth:`space_at`).
    """

    def __init__(
        self,
        space: ParameterSpace,
        *,
        method: Literal["adam", "nelder-mead"] = "adam",
        steps: int = 40,
        lr: float = 0.05,
        lr_final: float | None = None,
        seeds_per_step: int = 1,
        betas: tuple[float, float] = (0.5, 0.9),
        budget: int | None = None,
        simplex_step: float = 0.5,
        resample_seeds: bool = True,
        seed: int = 0,
        time_limit: float | None = None,
        on_step: Callable[[str, int, float, float], None] | None = None,
        aggregate: Callable[[torch.Tensor, list[torch.Tensor]], float] | None = None,
        optimizer_state: Mapping[str, Any] | None = None,
    ):
        self.space = space
        self.optimizer_state = optimizer_state  # Adam's state_dict to continue from (a warm start)
        self.method = method
        self.steps = steps
        self.lr = lr
        self.lr_final = lr_final
        self.seeds_per_step = seeds_per_step
        self.betas = betas
        self.budget = budget
        self.simplex_step = simplex_step
        self.resample_seeds = resample_seeds
        self.seed = seed
        self.time_limit = time_limit
        self.on_step = on_step
        self.aggregate = aggregate

    def _check(self) -> None:
        if self.method not in ("adam", "nelder-mead"):
            raise ValueError(f"method must be 'adam' or 'nelder-mead', got {self.method!r}")
        if self.steps < 1 or self.seeds_per_step < 1:
            raise ValueError(f"steps and seeds_per_step must be >= 1: {self.steps}, {self.seeds_per_step}")
        if self.budget is not None and self.budget < self.seeds_per_step:
            raise ValueError(f"budget {self.budget} < one evaluation ({self.seeds_per_step} simulations)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.aggregate is not None and self.method != "adam":
            raise ValueError("aggregate combines gradients: it needs method 'adam'")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds or None, got {self.time_limit}")

    def fit(self, objective: Callable[[Mapping[str, torch.Tensor], list[int]], torch.Tensor]) -> Calibrator:
        """Minimise `objective`; returns self."""
        self._check()
        self.space_ = copy.deepcopy(self.space)
        self.loss_history_: list[float] = []
        self.wall_times_: list[float] = []
        self.simulations_: list[int] = []
        self.best_loss_, self.best_params_ = float("inf"), {}
        self.vector_history_: list[torch.Tensor] = []
        self._t0 = time.perf_counter()
        self._best_vector: torch.Tensor | None = None
        try:
            if self.method == "adam":
                self._fit_adam(objective)
            else:
                self._fit_nelder_mead(objective)
        except _TimeUp:
            pass
        if self.method == "nelder-mead" and self._best_vector is not None:
            self.space_.set_vector(self._best_vector)
        self.params_ = self.space_.to_dict()
        return self

    @property
    def optimizer_state_(self) -> dict[str, Any]:
        """(``adam``) a copy of the optimiser's ``state_dict()`` as it stands (after the last step)."""
        if getattr(self, "_optimizer", None) is None:
            raise AttributeError("optimizer_state_ exists after an adam fit")
        return copy.deepcopy(self._optimizer.state_dict())

    def space_at(self, seconds: float) -> ParameterSpace:
        """The fit as it stood `seconds` into fitting (the last entry at or before it; the start
        before the first): a copy of ``space_`` holding that vector."""
        probe = copy.deepcopy(self.space_)
        i = int(np.searchsorted(np.asarray(self.wall_times_), seconds, side="right"))
        probe.set_vector(self.vector_history_[i - 1] if i > 0 else self.space.get_vector())
        return probe

    def _record(self, loss: float, sims: int) -> None:
        self.loss_history_.append(loss)
        self.wall_times_.append(time.perf_counter() - self._t0)
        self.simulations_.append(sims)
        best = self._best_vector if self.method == "nelder-mead" else None
        self.vector_history_.append(best.clone() if best is not None else self.space_.get_vector())
        if self.on_step is not None:
            self.on_step(self.method, len(self.loss_history_) - 1, loss, self.wall_times_[-1])
        if self.time_limit is not None and self.wall_times_[-1] >= self.time_limit:
            raise _TimeUp

    def _fit_adam(self, objective) -> None:
        opt = torch.optim.Adam(self.space_.parameters(), lr=self.lr, betas=tuple(self.betas))
        if self.optimizer_state is not None:
            opt.load_state_dict(copy.deepcopy(dict(self.optimizer_state)))
        self._optimizer = opt
        k = self.seeds_per_step
        ratio = (self.lr_final if self.lr_final is not None else self.lr) / self.lr
        for i in range(self.steps):
            for group in opt.param_groups:
                group["lr"] = self.lr * ratio ** (i / max(self.steps - 1, 1))
            opt.zero_grad()
            first = self.seed + (i * k if self.resample_seeds else 0)
            loss = objective(self.space_.values(), list(range(first, first + k)))
            loss.backward()
            if self.aggregate is None:
                total = float(loss.detach())
            else:
                total = float(self.aggregate(loss.detach(), list(self.space_.parameters())))
            if total < self.best_loss_:
                self.best_loss_, self.best_params_ = total, self.space_.to_dict()
            if not np.isfinite(total):
                raise FloatingPointError(f"loss is {total} at step {i}, parameters {self.space_.to_dict()}")
            opt.step()
            self._record(total, (i + 1) * k)

    def _fit_nelder_mead(self, objective) -> None:
        from scipy.optimize import minimize

        k = self.seeds_per_step
        budget = self.budget if self.budget is not None else self.steps * k
        seeds = [self.seed + j for j in range(k)]
        best = {"loss": np.inf, "x": None}

        def f(x: np.ndarray) -> float:
            self.space_.set_vector(torch.as_tensor(x))
            with torch.no_grad():
                values = self.space_.values()
                loss = float(objective(values, seeds))
            if not np.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {loss}; parameters: {self.space_.to_dict()}")
            if loss < best["loss"]:
                best.update(loss=loss, x=np.array(x))
                self._best_vector = torch.as_tensor(np.array(x))
                self.best_loss_, self.best_params_ = loss, self.space_.to_dict()
            self._record(loss, len(self.loss_history_) * k + k)
            return loss

        x0 = self.space_.get_vector().numpy()
        simplex = np.vstack([x0, x0 + self.simplex_step * np.eye(x0.size)])
        max_evals = max(1, budget // k)
        if max_evals > x0.size + 1:
            minimize(f, x0, method="Nelder-Mead",
                     options={"maxfev": max_evals, "initial_simplex": simplex, "adaptive": True,
                              "xatol": 1e-6, "fatol": 1e-9})
        else:  # too few evaluations for a simplex: evaluate its first vertices only
            for x in simplex[:max_evals]:
                f(x)

    def to_dict(self) -> dict[str, Any]:
        """Settings and fitted values as plain JSON-able data."""
        return {
            "method": self.method, "steps": self.steps, "lr": self.lr, "lr_final": self.lr_final,
            "seeds_per_step": self.seeds_per_step, "betas": list(self.betas), "resample_seeds": self.resample_seeds,
            "budget": self.budget, "seed": self.seed, "bounds": self.space.describe(),
            "params": self.params_, "loss_history": self.loss_history_, "wall_times": self.wall_times_,
            "simulations": self.simulations_, "time_limit": self.time_limit,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to `path`."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


# -- New York's first wave ----------------------------------------------------------------------------
