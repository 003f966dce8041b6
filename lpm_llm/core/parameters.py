"""Bounded parameters for calibration: an unconstrained ``nn.Parameter`` behind a fixed transform.

Every calibrated value ``x`` lives in a documented range ``[lo, hi]`` and is computed from a raw,
unconstrained parameter ``r`` (what the optimiser moves):

    linear:  x = lo + (hi - lo) * sigmoid(r)
    log:     x = exp(log lo + (log hi - log lo) * sigmoid(r))     (rates, scales, counts)

so that no optimiser step can leave the range, and scale-like quantities move multiplicatively.
:class:`ParameterSpace` holds a named set of them; its flat raw vector (:meth:`~ParameterSpace.get_vector`)
is the space a gradient-free optimiser searches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Bounded", "ParameterSpace"]

_EDGE = 1e-4  # initial values are clipped this far (relative) inside the range, where sigmoid^-1 is finite


@dataclass(frozen=True)
class Bounded:
    """One calibrated parameter: its range, transform, shape, initial value and meaning.

    Attributes:
        lo, hi: the range (``0 < lo`` for ``log=True``).
        init: initial value (scalar, broadcast to ``shape``, or a sequence of that shape).
        shape: () for a scalar, (n,) for a vector (one value per borough, per month, ...).
        log: transform in log space (for positive, scale-like quantities).
        doc: units and meaning, written to the report.
    """

    lo: float
    hi: float
    init: float | Sequence[float]
    shape: tuple[int, ...] = ()
    log: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.lo < self.hi:
            raise ValueError(f"bounds must satisfy lo < hi, got lo={self.lo}, hi={self.hi}")
        if self.log and self.lo <= 0:
            raise ValueError(f"log-scale bounds need lo > 0, got lo={self.lo}")

    def _ends(self) -> tuple[float, float]:
        return (math.log(self.lo), math.log(self.hi)) if self.log else (self.lo, self.hi)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Unconstrained raw -> value in [lo, hi]."""
        a, b = self._ends()
        y = a + (b - a) * torch.sigmoid(raw)
        # the clamp only removes float rounding at the ends (exp(log lo) may land just below lo)
        return torch.exp(y).clamp(self.lo, self.hi) if self.log else y

    def inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Value in [lo, hi] -> raw (values at or beyond the bounds are pulled slightly inside)."""
        a, b = self._ends()
        v = torch.log(value) if self.log else value
        u = ((v - a) / (b - a)).clamp(_EDGE, 1 - _EDGE)
        return torch.logit(u)


class ParameterSpace(nn.Module):
    """A named set of :class:`Bounded` parameters.

    ``space()`` (or :meth:`values`) gives name -> constrained tensor (differentiable in the raw
    parameters); :meth:`to_dict` gives plain floats and lists; :meth:`get_vector` and
    :meth:`set_vector` give the flat unconstrained vector (float64 numpy-friendly) of all raw values.

    Args:
        specs: name -> :class:`Bounded`, in the order used by the flat vector.
        dtype, device: of the raw parameters (dtype default: torch's default dtype, float32 unless the
            experiment sets ``precision: float64``).
    """

    def __init__(
        self,
        specs: Mapping[str, Bounded],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if not specs:
            raise ValueError("a ParameterSpace needs at least one parameter")
        self.specs: dict[str, Bounded] = dict(specs)
        self.raw = nn.ParameterDict()
        for name, spec in self.specs.items():
            init = torch.as_tensor(spec.init, dtype=torch.float64).expand(spec.shape).clone()
            raw = spec.inverse(init).to(dtype=dtype or torch.get_default_dtype(), device=device)
            self.raw[name] = nn.Parameter(raw)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def values(self) -> dict[str, torch.Tensor]:
        """name -> constrained value (shape of its spec), differentiable in the raw parameters."""
        return {name: spec.forward(self.raw[name]) for name, spec in self.specs.items()}

    def forward(self) -> dict[str, torch.Tensor]:
        return self.values()

    def to_dict(self) -> dict[str, float | list[float]]:
        """name -> plain float (scalar) or list of floats (vector)."""
        with torch.no_grad():
            return {k: (float(v) if v.dim() == 0 else [float(x) for x in v.flatten()])
                    for k, v in self.values().items()}

    def set_values(self, values: Mapping[str, float | Sequence[float] | torch.Tensor]) -> None:
        """Set (some) parameters from constrained values; an unknown name is an error."""
        unknown = sorted(set(values) - set(self.specs))
        if unknown:
            raise KeyError(f"unknown parameter(s) {unknown}; known: {', '.join(self.specs)}")
        with torch.no_grad():
            for name, v in values.items():
                spec = self.specs[name]
                t = torch.as_tensor(v, dtype=torch.float64).expand(spec.shape)
                self.raw[name].copy_(spec.inverse(t))

    def get_vector(self) -> torch.Tensor:
        """(P,) float64 concatenation of all raw parameters, in spec order."""
        return torch.cat([self.raw[n].detach().to(torch.float64).reshape(-1) for n in self.specs])

    def set_vector(self, vector: torch.Tensor | Sequence[float]) -> None:
        """Inverse of :meth:`get_vector`."""
        v = torch.as_tensor(vector, dtype=torch.float64)
        size = sum(p.numel() for p in self.raw.values())
        if v.shape != (size,):
            raise ValueError(f"vector must have shape ({size},), got {tuple(v.shape)}")
        with torch.no_grad():
            i = 0
            for name in self.specs:
                p = self.raw[name]
                p.copy_(v[i:i + p.numel()].reshape(p.shape).to(p.dtype))
                i += p.numel()

    def describe(self) -> dict[str, dict[str, object]]:
        """name -> range, transform, shape and meaning (for the report)."""
        return {n: {"lo": s.lo, "hi": s.hi, "transform": "log" if s.log else "linear",
                    "shape": list(s.shape), "doc": s.doc} for n, s in self.specs.items()}
