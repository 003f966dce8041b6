"""The floating-point type of a run's simulation and gradients (the config's ``precision:``).

Model code makes its float tensors in torch's default dtype, float32 unless a run asks for
``precision: float64``: twice the memory of the float columns, for checks that must agree beyond
float32's rounding (a float32 difference of 1e-7 in a parameter moves the odd discrete draw, and two
runs that should be equal then diverge; in float64 such differences are about 1e-16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextmanager
def precision(name: str) -> Iterator[torch.dtype]:
    """Make ``name`` ("float32" or "float64") torch's default dtype inside the block; restored after."""
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {name!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[name])
    try:
        yield DTYPES[name]
    finally:
        torch.set_default_dtype(previous)
