"""``lpm-llm forecast`` and ``lpm-llm assimilate``: an experiment's forecasts as of dates.

The experiment gives the city, archetypes, LLM decisions, models, starting parameters and policy
schedule; :mod:`lpm_llm.forecast` fits and forecasts. ``forecast`` writes one run folder;
``assimilate`` writes a stream folder that a rerun with the same arguments resumes.

Where a fit starts (``start``): ``experiment`` (default) starts the first update from the
experiment's parameters and alignment maps; the bundled experiments' were fitted to data through
July 2020 (the 2020-2021 one's through June 2021), so a forecast before then starts from values that
saw its future. ``prior`` starts from the package's own defaults instead (:func:`prior_config`: every
calibrated epidemic parameter at its :class:`~lpm_llm.models.epidemic.EpidemicParams` default, the IHR
and the variants at their literature values, the vaccine supply scale at 1, every alignment map at the
identity), so
that with a stream's warm start, chained through earlier as-of dates only, nothing a forecast uses
comes from after its as-of date: a clean back-test.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpm_llm.runner import outputs as _outputs
from lpm_llm.runner.run import (
    ExperimentResult,
    _close,
    _llm_manifest,
    _prepare,
    _resolved,
    _run_folder,
    build_decisions,
)

if TYPE_CHECKING:
    from lpm_llm.forecast import Forecaster, ForecastSettings
    from lpm_llm.runner.experiment import Experiment

__all__ = ["START_FROM", "assimilate_experiment", "forecast_experiment", "prior_config"]

START_FROM = ("experiment", "prior")
PRIOR_GRID = (("initial_infections_per_100k", (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)),)
"""The start grid of a ``prior`` start (:attr:`~lpm_llm.forecast.ForecastSettings.start_grid`): the
day-0 seeding, which the data fix first and which no default can know, searched over half decades
on the known weeks before the first fit."""
PRIOR_IMPORTATION = 1.0
"""``importation_per_100k`` of a ``prior`` start where the experiment imports infections continuously
(the package's default, 0, switches importation off): 1 infection a day per 100,000 susceptible
residents, a round guess that :data:`PRIOR_IMPORTATION_GRID` then searches over two decades each way."""
PRIOR_IMPORTATION_GRID = (("importation_per_100k", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),)
"""Added to :data:`PRIOR_GRID` (searched after the seeding) where the experiment imports infections
continuously: the level of importation, which no default can know either."""
PRIOR_MODELS = ("epidemic", "vaccination")
"""The models whose calibrated parameters :func:`prior_config` knows."""

log = logging.getLogger(__name__)


def _settings(exp: Experiment, options: Mapping[str, Any], start: str = "experiment") -> ForecastSettings:
    from lpm_llm.forecast import ForecastSettings

    cal = exp.config.calibration
    kw = {"fit_targets": tuple(cal.targets), "lr": cal.lr, "seeds_per_step": cal.seeds_per_step,
          "parameters": tuple(cal.parameters) if cal.parameters else None, "seed": exp.config.seeds[0],
          "checkpoint_days": cal.checkpoint_days, "loss": cal.loss, "dispersion": cal.dispersion}
    if start == "prior":
        kw["start_grid"] = PRIOR_GRID + (PRIOR_IMPORTATION_GRID if exp.config.epidemic.importation_per_100k > 0 else ())
    kw.update({k: v for k, v in options.items() if v is not None})
    return ForecastSettings(**kw)


def prior_config(cfg: Any) -> Any:
    """`cfg` with what a fit to data may have set put back to the package's defaults and literature
    values, the model's structure kept:

    - every calibrated epidemic parameter (those :func:`~lpm_llm.models.epidemic_params.calibrated_specs`
      declares: transmission scale and monthly change, seeding, ascertainment by month and borough,
      fatality scale) at its :class:`EpidemicParams` default; a fatality scale by month stays by month,
      every month at the default 1;
    - continuous importation: off (the default 0) where the experiment has none, else
      :data:`PRIOR_IMPORTATION` (a start grid searches it, :data:`PRIOR_IMPORTATION_GRID`);
    - the hospitalisation ratio by age (``ihr``, which the whole-period fit scales) at Verity et al.'s;
    - the variants (transmissibility, severity, introduction and importation rate, which the whole-period
      fit calibrates) at the package's literature values, :data:`~lpm_llm.models.epidemic_params.NYC_VARIANTS`
      (matched by lineage; a variant it does not know is refused);
    - the vaccination's calibrated ``supply_scale`` at its default (1);
    - every decision's alignment map removed (the identity).

    Other settings (the disease's other literature values, the policies, the LLM, the vaccination's
    documented settings) are kept. A config with a model other than the epidemic and the vaccination
    (e.g. ``epidemic+labor``), or an epidemic setting outside :class:`EpidemicParams`' defaults that is
    not listed above, is refused rather than started half from its fitted values."""
    from lpm_llm.models.epidemic_params import NYC_VARIANTS, EpidemicParams, calibrated_specs

    if "epidemic" not in cfg.model_names or not set(cfg.model_names) <= set(PRIOR_MODELS):
        raise ValueError(f"start 'prior' knows the calibrated parameters of the {' and '.join(PRIOR_MODELS)} models "
                         f"only, not {cfg.model!r}")
    ep = cfg.epidemic
    fields = EpidemicParams.model_fields
    names = [n for n in calibrated_specs(ep, 2, len(ep.initial_infections_per_100k)) if n in fields]
    update: dict[str, Any] = {n: fields[n].default for n in dict.fromkeys(names)}
    if isinstance(ep.fatality_scale, tuple):
        update["fatality_scale"] = (fields["fatality_scale"].default,)  # by month (the last holds), all at 1
    update["importation_per_100k"] = PRIOR_IMPORTATION if ep.importation_per_100k > 0 else 0.0
    update["ihr"] = fields["ihr"].default
    known = {v.lineage: v for v in NYC_VARIANTS}
    unknown = [v.lineage for v in ep.variants if v.lineage not in known]
    if unknown:
        raise ValueError(f"start 'prior' has no literature values for the variant(s) {unknown}; known: "
                         f"{', '.join(known)}")
    update["variants"] = tuple(known[v.lineage] for v in ep.variants)
    others = sorted(n for n in ep.model_fields_set - set(update)
                    if getattr(ep, n) != (fields[n].default if fields[n].default_factory is None
                                          else fields[n].default_factory()))
    if others:
        raise ValueError(f"start 'prior' does not know whether epidemic setting(s) {others} were fitted; "
                         "remove them from the experiment or start from it (--start experiment)")
    epidemic = ep.model_copy(update=update)
    out: dict[str, Any] = {"epidemic": epidemic}
    if "vaccination" in cfg.model_names:
        from lpm_llm.models.vaccination_params import VaccinationParams

        mp = dict(cfg.model_params)
        vac = dict(mp.get("vaccination") or {})
        vac["supply_scale"] = VaccinationParams.model_fields["supply_scale"].default
        mp["vaccination"] = vac
        out["model_params"] = mp
    out["decisions"] = {k: dc.model_copy(update={"alignment": None}) for k, dc in cfg.decisions.items()}
    return cfg.model_copy(update=out)


def _forecaster(exp: Experiment, run: Any, settings: ForecastSettings, observed: Any = None,
                start: str = "experiment") -> Forecaster:
    """Population, archetypes, LLM decisions and models of the experiment, as a Forecaster; `start`:
    ``experiment`` (its parameters) or ``prior`` (:func:`prior_config`)."""
    from lpm_llm.forecast import Forecaster
    from lpm_llm.llm.client import open_client
    from lpm_llm.runner.run import build_models

    if start not in START_FROM:
        raise ValueError(f"start must be one of {', '.join(START_FROM)}, got {start!r}")
    cfg = prior_config(exp.config) if start == "prior" else exp.config
    if "epidemic" not in cfg.model_names:
        raise ValueError(f"lpm-llm forecast needs an epidemic model (weekly cases, admissions, deaths), "
                         f"got {cfg.model!r}")
    population, scale, archetypes = _prepare(exp, run.timer, run.manifest)
    decisions = {}
    if any(dc.enabled for dc in cfg.decisions.values()):
        with run.timer.phase("llm_start"):
            client = run.client = open_client(cfg.llm, http_client=exp.http_client)
        decisions = build_decisions(cfg, client, archetypes)
        run.sources.append(decisions)
    pbar = exp.progress(total=None, desc="forecast") if exp.progress else None

    def on_step(phase: str, index: int, value: float, seconds: float) -> None:
        if pbar is not None:  # a tqdm without a total has no truth value
            pbar.set_description(f"forecast: {phase}")
            pbar.set_postfix(seconds=f"{seconds:.0f}")
            pbar.update(1)

    return Forecaster(
        population, archetypes, decisions, lambda: build_models(cfg), cfg.interventions.schedule(),
        start=cfg.start_date, scale=scale, settings=settings, observed=observed, device=cfg.device,
        alignment={k: tuple(dc.alignment) for k, dc in cfg.decisions.items() if dc.enabled and dc.alignment},
        sim_kwargs={"decision_every": {k: dc.every_days for k, dc in cfg.decisions.items() if dc.enabled},
                    "persistence": {k: dc.persistence for k, dc in cfg.decisions.items() if dc.enabled}},
        on_step=on_step)


def forecast_experiment(exp: Experiment, as_of: str | dt.date, out_dir: Path, overwrite: bool = False,
                        observed: Any = None, start: str = "experiment", **options: Any) -> ExperimentResult:
    """Fit with the data known on `as_of` and forecast; writes a run folder with ``forecast.csv``
    (the Hub's long format), ``known.csv``, ``fitted.csv``, ``forecast.json``, the fan charts,
    ``config.yaml`` and ``manifest.json``. `start`: where the fit starts (``experiment`` or ``prior``).
    `options`: :class:`~lpm_llm.forecast.ForecastSettings` fields."""
    exp.check_devices()
    with _run_folder(exp, out_dir, overwrite, command_kind="forecast") as run:
        settings = _settings(exp, options, start)
        forecaster = _forecaster(exp, run, settings, observed, start)
        with run.timer.phase("forecast"):
            result, _ = forecaster.update(as_of)
        with run.timer.phase("outputs"):
            paths = result.save(out_dir, plot=exp.config.outputs.plots)
        run.manifest["forecast"] = {**result.summary(), "start": start}
    return ExperimentResult(out_dir=out_dir, metrics=result.forecast, decisions=result.known,
                            manifest=run.manifest, plots=[p for p in paths if p.suffix == ".png"])


def assimilate_experiment(exp: Experiment, first: str | dt.date, last: str | dt.date, out_dir: Path,
                          every: int = 7, observed: Any = None, start: str = "experiment",
                          **options: Any) -> ExperimentResult:
    """Weekly fits and forecasts from `first` to `last` into `out_dir`; a rerun with the same
    experiment and arguments resumes after the last finished week (see
    :func:`lpm_llm.forecast.assimilate`). `start`: where the first week's fit starts (``experiment`` or
    ``prior``; later weeks start from the week before). Writes ``stream.json`` (the arguments), ``config.yaml``,
    ``forecasts.csv``, ``weeks.json``, ``manifest.json`` and ``weeks/<as-of>/``."""
    from lpm_llm.forecast import assimilate

    exp.check_devices()
    settings = _settings(exp, options, start)
    stream = {"config": _resolved(exp.config), "from": str(first), "to": str(last), "every": every, "start": start,
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()
                           if k != "scenario"}}
    stream = json.loads(json.dumps(stream, default=str))
    marker = out_dir / "stream.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != stream:
            raise _outputs.RunFolderError(f"{out_dir} holds a stream with other settings (stream.json); resume it "
                                          "with the same experiment and options, or choose another --out")
        resumed = True
    else:
        _outputs.prepare_run_folder(out_dir, overwrite=False)
        marker.write_text(json.dumps(stream, indent=2))
        _outputs.write_config(out_dir / "config.yaml", _resolved(exp.config))
        resumed = False
    manifest = _outputs.base_manifest(exp.config_path)
    manifest.update({"name": exp.config.name, "command_kind": "assimilate", "resumed": resumed, "status": "running"})
    run = _Stream(exp.config, out_dir, _outputs.PhaseTimer(), manifest)
    weeks: dict[str, str] = {}
    try:
        forecaster = _forecaster(exp, run, settings, observed, start)
        with run.timer.phase("assimilate"):
            table = assimilate(forecaster, first, last, out_dir, every=every, plots=exp.config.outputs.plots,
                               on_week=lambda d, r, done: weeks.__setitem__(
                                   d.isoformat(), "loaded" if done else f"{r.timings['total']:.1f} s"))
        manifest["status"] = "ok"
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        raise
    except BaseException as e:
        manifest["status"], manifest["error"] = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        manifest["weeks"] = weeks
        if run.client is not None:
            manifest["llm"] = _llm_manifest(exp.config, run.client)
            _close(run.client)
        manifest["wall_time_s"] = {**{k: round(v, 3) for k, v in run.timer.seconds.items()},
                                   "total": round(run.timer.total(), 3)}
        _outputs.write_manifest(out_dir / "manifest.json", manifest)
    return ExperimentResult(out_dir=out_dir, metrics=table, decisions=table.iloc[0:0], manifest=manifest)


class _Stream:
    """The run-folder fields :func:`_forecaster` uses (a stream folder is reused, not emptied)."""

    def __init__(self, cfg: Any, out_dir: Path, timer: Any, manifest: dict[str, Any]):
        self.cfg, self.out_dir, self.timer, self.manifest = cfg, out_dir, timer, manifest
        self.client = None
        self.sources: list[Mapping[str, Any]] = []
        self.started = time.time()
