"""``lpm-llm ablate EXPERIMENT.yaml``: the behaviour ablation of :mod:`lpm_llm.calibrate.ablate` on an
experiment's population, archetypes, LLM and calibration settings, written to a run folder."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpm_llm.calibrate.ablate import (
    EPIDEMIC_SOURCES,
    FORECAST_DATES,
    LABOR_SOURCES,
    ablate_first_wave,
    ablate_labor,
)

log = logging.getLogger(__name__)


def ablate_experiment(
    exp: Any,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    *,
    forecast_dates: Sequence[str] | None = None,
    steps: int | None = None,
    sources: Sequence[str] | None = None,
    rounds: int = 3,
    eval_seeds: int = 2,
) -> Any:
    """``lpm-llm ablate EXPERIMENT.yaml``: the epidemic ablation (:func:`ablate_first_wave`) for an
    epidemic experiment, the labour ablation (:func:`ablate_labor`) for a labour one. Settings from
    the config's ``calibration`` block (start, learning rate, seeds per step) and the arguments;
    ``steps`` defaults to 15 for the epidemic and to the calibration block's for the labour model.

    Writes ``ablation_<kind>.csv``, ``.json``, ``.md`` and ``decisions.csv`` (every LLM answer asked),
    with the usual config.yaml and manifest.json.
    """
    from lpm_llm.llm.client import open_client
    from lpm_llm.runner.run import ExperimentResult, _decisions_frame, _prepare, _run_folder, build_decisions

    exp.check_devices()
    cfg, cal = exp.config, exp.config.calibration
    out = Path(out_dir) if out_dir else Path("runs") / f"{cfg.name}-ablate-{time.strftime('%Y%m%d-%H%M%S')}"
    kind = "labor" if cfg.model_names == ["labor"] else "epidemic" if cfg.model_names == ["epidemic"] else None
    if kind is None:
        raise ValueError(f"lpm-llm ablate runs for 'epidemic' or 'labor' experiments, not yet for {cfg.model!r}")
    decision = "work" if kind == "labor" else "isolate"
    with _run_folder(exp, out, overwrite, command_kind="ablate") as run:
        timer = run.timer
        population, scale, archetypes = _prepare(exp, timer, run.manifest)
        with timer.phase("llm_start"):
            client = run.client = open_client(cfg.llm, http_client=exp.http_client)
        built = build_decisions(cfg, client, archetypes)
        if decision not in built:
            raise ValueError(f"the ablation compares sources of the {decision!r} decision; the config has none")
        llm = {decision: built[decision]}
        run.sources.append(llm)
        with timer.phase("ablation"):
            if kind == "epidemic":
                report = ablate_first_wave(
                    population, archetypes, llm["isolate"], cfg.epidemic, cfg.interventions.schedule(),
                    start=cal.start, forecast_dates=forecast_dates or FORECAST_DATES,
                    forecast_weeks=cal.forecast_weeks or 4, sources=sources or EPIDEMIC_SOURCES,
                    targets=cal.targets, steps=steps or 15, lr=cal.lr, seeds_per_step=cal.seeds_per_step,
                    eval_seeds=eval_seeds, rounds=rounds, scale=scale, seed=cfg.seeds[0], device=cfg.device)
            else:
                end = cfg.start_date + dt.timedelta(days=cfg.days - 1)
                report = ablate_labor(
                    population, archetypes, llm["work"], start=cfg.start_date, end=end, holdout=3, params=cfg.labor,
                    alignment=cfg.decisions["work"].alignment, sources=sources or LABOR_SOURCES,
                    steps=steps or cal.steps, lr=cal.lr, seeds=[cfg.seeds[0] + i for i in range(cal.seeds_per_step)])
        with timer.phase("outputs"):
            paths = report.save(out)
            decisions_df = _decisions_frame(llm, "ablation", cfg.seeds[0])
            decisions_df.to_csv(out / "decisions.csv", index=False)
        run.manifest["ablation"] = {"kind": kind, "settings": report.settings,
                                    "rows": report.rows.drop(columns=["params"]).to_dict("records")}
        log.info("ablation written to %s", paths[2])
    return ExperimentResult(out_dir=out, metrics=report.rows, decisions=decisions_df, manifest=run.manifest)
