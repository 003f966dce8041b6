"""Counter-based random numbers: every draw of a run is a pure function of (seed, day, stream, agent).

An agent's uniform draw of a day and stream is a hash of its global id and a key made of (seed,
day, stream): no generator state is carried from one draw to the next, so

- a day can be recomputed alone (checkpointed gradient segments re-run steps in the backward pass);
- the agents can be split over processes in any way (:mod:`lpm_llm.distributed`): an agent draws
  the same number whichever rank holds it and whichever other agents draw that day, so a run gives
  the same result on 1, 2 or N ranks;
- runs reproduce exactly on any device (integer arithmetic only).

The hash is the splitmix64 mixing function (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; constants of Stafford's variant 13) applied to ``id * golden + key``; a
uniform is its top 24 bits, as float32 ``k / 2**24`` in [0, 1) (the resolution of ``torch.rand``'s
float32). It costs about five times ``torch.rand`` per number, which matters only for draws over
every agent (the thresholds of day 0, a decision step): a few tenths of a second for 8.3 million.

``day_generator`` (a seeded ``torch.Generator`` per (seed, day)) remains for the models that are
not sharded by area (labour, vaccination).
"""

from __future__ import annotations

import torch

__all__ = ["Draws", "day_generator", "stream_key", "uniform"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores (two's complement)."""
    x &= _MASK
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return z ^ (z >> 31)


def stream_key(seed: int, day: int, stream: int) -> int:
    """The 64-bit key of the draws of (seed, day, stream): splitmix64 applied in turn."""
    return _splitmix(_splitmix(_splitmix(int(seed) * _GOLDEN) + int(day) + 1) + int(stream))


def uniform(key: int, ids: torch.Tensor) -> torch.Tensor:
    """(n,) float32 uniforms in [0, 1), one per global agent id in `ids` (any int dtype), for the
    key of :func:`stream_key`; the same id and key give the same number on any device."""
    z = ids.to(torch.int64, copy=True)
    z.mul_(_signed(_GOLDEN)).add_(_signed(key))  # int64 arithmetic wraps modulo 2**64
    t = torch.empty_like(z)
    for shift, mix in ((30, _MIX1), (27, _MIX2)):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)  # a logical shift: torch shifts int64 arithmetically
        z.bitwise_xor_(t).mul_(_signed(mix))
    # the top 24 bits (the final xor-shift of splitmix64 leaves them unchanged)
    torch.bitwise_right_shift(z, 40, out=t)
    return t.bitwise_and_(0xFFFFFF).to(torch.float32).mul_(2.0**-24)


class Draws:
    """The draws of one day of a run: ``uniform(stream, agents)`` for local agent indices.

    Args:
        seed: the run's base seed; day: the day (-1 for the draws before day 0).
        ids: (N,) global id of each local agent (a shard of a larger population), or None when the
            local index is the global id (one process).
        device: where the draws are made when `ids` is None.
    """

    def __init__(self, seed: int, day: int, ids: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        self.seed, self.day, self.ids = int(seed), int(day), ids
        self.device = ids.device if ids is not None else torch.device(device)

    def uniform(self, stream: int, agents: torch.Tensor | int) -> torch.Tensor:
        """(n,) float32 uniforms of the (n,) local agents `agents`, or of agents 0..agents-1 if an int."""
        if isinstance(agents, int):
            global_ids = self.ids if self.ids is not None else torch.arange(agents, device=self.device)
        else:
            global_ids = agents if self.ids is None else self.ids.index_select(0, agents)
        return uniform(stream_key(self.seed, self.day, stream), global_ids)


def day_generator(seed: int, t: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of day t: a pure function of (seed, t) (splitmix64 of the pair)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(t) + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return torch.Generator(device=device).manual_seed(z & 0x7FFFFFFFFFFFFFFF)
