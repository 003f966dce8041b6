"""Decisions asked once, by rank 0, and broadcast: every rank of a replicated or sharded simulation
reaches each decision step with the same context, and only rank 0 holds an LLM client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lpm_llm.distributed.group import Group

__all__ = ["BroadcastDecisions"]


class BroadcastDecisions:
    """A DecisionSource whose probabilities rank 0 asks of ``source`` and sends to every rank.

    Every rank must call :meth:`probabilities` at the same decision steps, in the same order (the
    simulation's calendar does this); ``source`` is None on the other ranks.
    """

    def __init__(self, source: Any | None, group: Group):
        if group.is_main and source is None:
            raise ValueError("rank 0 needs the decision source it broadcasts")
        self.source = source
        self.group = group

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        p = self.source.probabilities(context) if self.group.is_main else None
        return self.group.broadcast(p)

    @property
    def records(self) -> list[dict[str, Any]]:
        return getattr(self.source, "records", []) if self.source is not None else []
