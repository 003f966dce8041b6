"""Counter-based seeds: every draw of a run is a function of (seed, day), so that a day can be
recomputed alone (checkpointing) and runs reproduce exactly."""

from __future__ import annotations

import torch

__all__ = ["day_generator"]


def day_generator(seed: int, t: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of day t: a pure function of (seed, t) (splitmix64 of the pair)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(t) + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return torch.Generator(device=device).manual_seed(z & 0x7FFFFFFFFFFFFFFF)
