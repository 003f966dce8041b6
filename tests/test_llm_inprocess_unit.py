"""Parts of the in-process backend that need no model."""

from __future__ import annotations

import numpy as np

from lpm_llm.llm.inprocess import _top


def test_top_logprobs_are_ordered_as_llama_cpp_python_orders_them():
    """The n largest (logprob, token id), ties broken by the larger id, as a full sort gives them."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        x = rng.normal(size=5000).astype(np.float32)
        if trial % 2:
            x = np.round(x, 1)  # many ties, some across the n-th place
        n = int(rng.integers(1, 25))
        assert _top(x, n) == sorted(zip(x.tolist(), range(len(x)), strict=True), reverse=True)[:n]
    assert _top(np.zeros(3, dtype=np.float32), 5) == [(0.0, 2), (0.0, 1), (0.0, 0)]
    assert _top(np.zeros(3, dtype=np.float32), 0) == []


def test_threads_default_to_every_core_only_on_an_idle_machine(monkeypatch):
    from lpm_llm.llm import inprocess

    monkeypatch.setattr(inprocess.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(inprocess.os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert inprocess.auto_threads() == 8
    monkeypatch.setattr(inprocess.os, "getloadavg", lambda: (3.1, 1.0, 1.0))
    assert inprocess.auto_threads() == 1


def test_threads_count_the_waiting_ranks_cores_as_free(monkeypatch):
    """Rank 0 of a 2-rank run asks while rank 1 waits: the two ranks' own recent work (load about
    1.2) leaves both cores to the model, another job's load on top does not."""
    from lpm_llm.llm import inprocess

    monkeypatch.setattr(inprocess.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(inprocess.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert inprocess.auto_threads() == 1
    assert inprocess.auto_threads(waiting=1) == 2
    monkeypatch.setattr(inprocess.os, "getloadavg", lambda: (2.3, 1.0, 1.0))
    assert inprocess.auto_threads(waiting=1) == 1
    backend = inprocess.InProcessBackend(waiting=1)
    assert backend.waiting == 1 and backend.n_threads is None  # decided when the model loads
