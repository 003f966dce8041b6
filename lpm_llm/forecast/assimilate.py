"""The weekly stream: each week, add the new week's data, update the fit, forecast, store it.

Every week's update is :meth:`~lpm_llm.forecast.engine.Forecaster.update` warm-started from the
previous week's :class:`~lpm_llm.forecast.engine.FitState` (parameters, Adam's state, the frozen
LLM answers). Each finished week is checkpointed in ``OUT/weeks/<as-of>/`` (``state.pt``, the
forecast files, and a ``done`` marker written last); a rerun into the same folder loads the last
finished week and continues from the next, and redoes a week that was interrupted part way. Every
run's seed is a function of the as-of date, so a resumed stream gives the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lpm_llm.forecast.asof import as_date
from lpm_llm.forecast.engine import FitState, Forecaster, ForecastResult

__all__ = ["assimilate", "forecast_dates"]

log = logging.getLogger(__name__)


def forecast_dates(first: str | dt.date, last: str | dt.date, every: int = 7) -> list[dt.date]:
    """``first``, ``first + every``, ... up to ``last`` (inclusive)."""
    a, b = as_date(first), as_date(last)
    if every < 1 or b < a:
        raise ValueError(f"need every >= 1 and {a} <= {b}")
    return [a + dt.timedelta(days=i) for i in range(0, (b - a).days + 1, every)]


def assimilate(
    forecaster: Forecaster, first: str | dt.date, last: str | dt.date, out_dir: str | Path, *, every: int = 7,
    plots: bool = True, on_week: Callable[[dt.date, ForecastResult | None, bool], None] | None = None,
) -> pd.DataFrame:
    """Run (or resume) the stream into `out_dir`; returns every stored forecast (Hub rows).

    ``on_week(as_of, result, resumed)`` is called after each week (``result`` None for a week
    found finished). ``forecasts.csv`` in `out_dir` collects every week's forecast; ``weeks.json``
    the per-week fit summaries and timings.
    """
    out = Path(out_dir)
    weeks_dir = out / "weeks"
    weeks_dir.mkdir(parents=True, exist_ok=True)
    state: FitState | None = None
    summaries = []
    frames = []
    for as_of in forecast_dates(first, last, every):
        wdir = weeks_dir / as_of.isoformat()
        if (wdir / "done").exists():
            state = FitState.load(wdir / "state.pt")
            frames.append(pd.read_csv(wdir / "forecast.csv"))
            summaries.append(json.loads((wdir / "forecast.json").read_text()))
            log.info("week %s: finished before, loaded", as_of)
            if on_week:
                on_week(as_of, None, True)
            continue
        t0 = time.perf_counter()
        result, state = forecaster.update(as_of, state)
        result.save(wdir, plot=plots)
        state.save(wdir / "state.pt")
        (wdir / "done").write_text(f"{time.perf_counter() - t0:.3f}\n")
        frames.append(result.forecast)
        summaries.append(result.summary())
        log.info("week %s: loss %s, %.1f s", as_of, result.loss_history[-1:] or "-", time.perf_counter() - t0)
        if on_week:
            on_week(as_of, result, False)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table.to_csv(out / "forecasts.csv", index=False)
    (out / "weeks.json").write_text(json.dumps(summaries, indent=2, default=str))
    return table
