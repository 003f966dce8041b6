"""Distributed differential privacy for what the coordinator publishes.

Each holder clips its contribution (the vector it sends to the secure sum) to L2 norm ``clip`` and
adds Gaussian noise of standard deviation ``noise_multiplier * clip / sqrt(holders)`` before
masking, so the sum carries Gaussian noise of standard deviation ``noise_multiplier * clip``: the
Gaussian mechanism with sensitivity ``clip`` under the addition or removal of one holder's
contribution (holder-level privacy), while no single holder's noise is enough on its own
(distributed DP; e.g. Kairouz et al., "The Distributed Discrete Gaussian Mechanism", ICML 2021, with
continuous noise here). Every release is one step of the accountant: opacus' RDP accountant with
sampling rate 1 (every holder in every round).
"""

from __future__ import annotations

import math
import secrets

import numpy as np

__all__ = ["GaussianNoise", "epsilon"]


class GaussianNoise:
    """One holder's clipping and share of the noise; its generator is seeded from the OS, never shared."""

    def __init__(self, clip: float, noise_multiplier: float, holders: int):
        if clip <= 0 or noise_multiplier < 0 or holders < 1:
            raise ValueError(f"need clip > 0, noise_multiplier >= 0, holders >= 1; got {clip}, "
                             f"{noise_multiplier}, {holders}")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.holders = int(holders)
        self.std = self.noise_multiplier * self.clip / math.sqrt(self.holders)
        self._rng = np.random.default_rng(secrets.randbits(128))

    def clipped(self, x: np.ndarray) -> np.ndarray:
        """``x`` scaled down to L2 norm ``clip`` if it is longer."""
        x = np.asarray(x, dtype=np.float64)
        norm = float(np.linalg.norm(x))
        return x * (self.clip / norm) if norm > self.clip else x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.clipped(x)
        return x + self._rng.normal(0.0, self.std, size=x.shape)


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``releases`` Gaussian releases of noise ``noise_multiplier`` x sensitivity
    (opacus' RDP accountant, sampling rate 1)."""
    from opacus.accountants import RDPAccountant

    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, releases)]
    return float(accountant.get_epsilon(delta=delta))
