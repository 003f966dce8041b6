"""``PrivacySettings``: the ``privacy:`` block of an experiment (see :mod:`lpm_llm.privacy`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PrivacySettings"]


class PrivacySettings(BaseModel):
    """How ``lpm-llm calibrate --nproc H`` keeps each data holder's series to itself.

    ``mode``:

    - ``none``: one process sees all data (the ordinary calibration).
    - ``plain``: holders as ranks, their sums sent in the clear: the protocol without protection,
      to test and measure what the protection costs.
    - ``secure``: each rank is a holder of some boroughs' observed series; the coordinator, rank 0,
      receives only secure sums of the holders' losses and gradients.
    - ``secure+dp``: the same, each holder clipping its contribution and adding its share of
      Gaussian noise first; epsilon and delta go into the manifest.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "plain", "secure", "secure+dp"] = "none"
    noise_multiplier: float = Field(1.0, ge=0, description="noise std of each published sum / clip (secure+dp)")
    clip: float = Field(1.0, gt=0, description="L2 bound of one holder's (loss, gradient) vector per step (secure+dp)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported (secure+dp)")
    frac_bits: int = Field(32, ge=8, le=48, description="fixed-point fractional bits of the secure sum")
    private: list[Literal["cases", "deaths", "hospitalized"]] | None = Field(
        None, description="the calibration targets whose series each holder keeps (its boroughs'); the others "
        "are published data the coordinator holds for every borough; default: every target")
    microdata: bool = Field(
        False, description="each holder also keeps its residents' microdata: the city is sharded by area over the "
        "holders (distributed.shard: area) and only the city-wide community pressure per age band crosses them, "
        "through the secure sum; every target is then private and there are no LLM decisions")
    transcript: bool = Field(True, description="write every message the coordinator receives to transcript.jsonl")
