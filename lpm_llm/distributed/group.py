"""The process group of a run: one process (the default), or several started by ``torchrun``.

Everything that crosses processes goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU);
this module only decides when to join a group, with which backend and timeout, and gives the few
collectives the runner needs a name. A process started by ``torchrun`` finds ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in its environment; anything else is a group of one, with no
``torch.distributed`` call at all.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["DistributedSettings", "Group", "launched_by_torchrun", "process_group"]


class DistributedSettings(BaseModel):
    """The ``distributed:`` block of an experiment.

    ``shard: seed`` gives each rank whole simulations (the scenarios x seeds of a run, dealt out
    in turn); ``shard: area`` runs every simulation on all ranks, each holding the agents of some
    boroughs (:mod:`lpm_llm.distributed.shard`; the epidemic model only). Either way the run folder is
    the same as one process's. ``timeout_s`` bounds every collective:
    a rank that stops answering makes the others fail with an error after that long instead of
    waiting forever (under ``torchrun`` a rank that exits with an error stops the others at once).
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when the run's device is CUDA, else gloo")
    shard: Literal["seed", "area"] = Field(
        "seed", description="seed: each rank runs whole simulations (scenarios x seeds); "
                            "area: each rank holds the agents of some boroughs of every simulation")
    timeout_s: float = Field(300.0, gt=0, description="seconds a collective may wait for the other ranks")


@dataclass(frozen=True)
class Group:
    """Rank ``rank`` of ``world`` processes (``local_rank`` on this machine); ``Group()`` is one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that asks shared questions and writes outputs."""
        return self.rank == 0

    def deal(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th item from position ``rank``."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (pickled), in rank order, on rank 0; None on the other ranks."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def undeal(self, shares: Sequence[Sequence[T]]) -> list[T]:
        """The inverse of :meth:`deal`: rank-ordered shares back into the original order."""
        out: list[T] = []
        for i in range(max((len(s) for s in shares), default=0)):
            out.extend(s[i] for s in shares if i < len(s))
        return out


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(settings: DistributedSettings, device: str | torch.device) -> str:
    """The backend to use for ``settings`` when the run's tensors live on ``device``."""
    if settings.backend != "auto":
        return settings.backend
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def process_group(settings: DistributedSettings | None = None, device: str | torch.device = "cpu"
                  ) -> Iterator[Group]:
    """Join the ``torchrun`` group for the duration of the block (a group of one outside ``torchrun``).

    Raises:
        ValueError: NCCL asked for without CUDA, or a CUDA device while ``torchrun`` gave more
            ranks per machine than there are GPUs.
    """
    settings = settings or DistributedSettings()
    if not launched_by_torchrun():
        yield Group()
        return
    if dist.is_initialized():  # a caller (a test, an outer runner) already joined: use its group
        yield Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return
    _die_with_parent()
    backend = backend_for(settings, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("distributed.backend is nccl but this machine has no CUDA device; use gloo")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {local_rank} on this machine has no GPU of its own "
                             f"({torch.cuda.device_count()} visible): start at most that many ranks per machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=settings.timeout_s))
    group = Group(dist.get_rank(), dist.get_world_size(), local_rank)
    log.info("rank %d of %d (%s)", group.rank, group.world, backend)
    try:
        yield group
    finally:
        dist.destroy_process_group()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this rank when its launcher dies (Linux), so no rank outlives the run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
