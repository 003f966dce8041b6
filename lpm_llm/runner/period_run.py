"""``lpm-llm calibrate`` for the whole period: an experiment of ``model: epidemic+vaccination`` (e.g.
``covid_nyc_2021.yaml``) fitted by :func:`lpm_llm.calibrate.period.fit_period`, the same fit as
``bench/fit_2021.py`` (which runs an ensemble of them).

Order: population -> archetypes -> LLM client -> the simulation and its objective
(:func:`period_objective`) -> the starting values scored on :data:`~lpm_llm.calibrate.period.EVALUATION_SEEDS`
(the first run asks the vaccination question of every week; the answers are then frozen,
:class:`~lpm_llm.calibrate.fit.FrozenDecisions`) -> ``calibration.steps`` Adam steps -> the fitted values
scored on the same seeds -> the run folder:

- ``config.yaml``, ``manifest.json`` (as every run; the manifest carries the calibration summary);
- ``calibration.json``: settings, the fitted values and variant importation rates, the scores of the
  start and of the fit (objective, log-MSE per target, totals, share infected by the survey's date,
  lineage loss) and the loss of every step;
- ``fitted_epidemic.yaml``: the ``epidemic:`` block of the fitted values, to paste into the experiment
  (the hospitalisation scale carried as ``ihr``, the variants with their fitted rates);
- ``calibration_weekly.csv``: observed against simulated weekly counts by target and borough, at the
  start and fitted (the evaluation seeds' mean); ``lineages.csv``: the fitted runs' lineage shares;
  ``decisions.csv``: the vaccination answers;
- with ``outputs.plots``: ``cases.png``, ``hospitalized.png``, ``deaths.png`` (fitted, evaluation
  seeds' band, against observed), ``coverage.png`` and ``lineages.png`` (when the run reaches them),
  ``loss.png``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lpm_llm.runner import outputs as _outputs
from lpm_llm.runner.config import ConfigError
from lpm_llm.runner.run import (
    ExperimentResult,
    _Announced,
    _decisions_frame,
    _prepare,
    _run_folder,
    build_models,
    open_decision,
)

if TYPE_CHECKING:
    from lpm_llm.calibrate.period import PeriodObjective
    from lpm_llm.population import Population
    from lpm_llm.population.archetypes import Archetypes
    from lpm_llm.runner.experiment import Experiment, ExperimentConfig

__all__ = ["PERIOD_MODELS", "calibrate_period", "period_objective"]

log = logging.getLogger(__name__)

PERIOD_MODELS = ("epidemic", "vaccination")
"""The model combination that ``lpm-llm calibrate`` fits over the whole period."""


def check_period_config(cfg: ExperimentConfig) -> int:
    """``ConfigError`` (with the remedy) if `cfg` cannot be fitted over the whole period; else the
    number of calibration weeks."""
    cal = cfg.calibration
    if tuple(cfg.model_names) != PERIOD_MODELS:
        raise ConfigError(f"the whole-period fit is for model {'+'.join(PERIOD_MODELS)}, not {cfg.model!r}")
    dc = cfg.decisions.get("vaccinate")
    if dc is None or not dc.enabled:
        raise ConfigError("the whole-period fit needs the vaccination decision: add an enabled decisions.vaccinate "
                          "(see experiments/covid_nyc_2021.yaml)")
    if cal.start != cfg.start_date:
        raise ConfigError(f"calibration.start {cal.start} must be the run's start_date {cfg.start_date} in the "
                          "whole-period fit (its seeding is on day 0): set one to the other")
    weeks = ((cal.end - cal.start).days + 1) // 7
    if weeks < 1:
        raise ConfigError(f"calibration.end {cal.end} leaves no whole week after calibration.start {cal.start}")
    if 7 * weeks > cfg.days:
        last = cfg.start_date + dt.timedelta(days=cfg.days - 1)
        raise ConfigError(f"calibration.end {cal.end} is after the run's last day {last} (days: {cfg.days}): "
                          "raise days or set calibration.end earlier")
    if cal.parameters is not None:
        from lpm_llm.calibrate.period import PERIOD_PARAMETERS

        raise ConfigError("calibration.parameters selects the first-wave fit's parameters; the whole-period fit "
                          f"calibrates {', '.join(PERIOD_PARAMETERS)} and hospitalisation_scale: remove it")
    return weeks


def period_objective(cfg: ExperimentConfig, population: Population, archetypes: Archetypes,
                     decisions: dict[str, Any]) -> tuple[PeriodObjective, Any]:
    """The configured simulation over the whole run and its objective over the calibration weeks
    (targets, April 2020 serology with ``calibration.serology``, smoothness ``calibration.smoothness``);
    returns ``(objective, epidemic)``, the epidemic model being the one whose variants' importation
    rates a fit moves."""
    from lpm_llm.calibrate.period import PeriodObjective
    from lpm_llm.calibrate.targets import NYC_SEROLOGY_APRIL_2020, observed_weekly
    from lpm_llm.core.behavior import AlignmentMap
    from lpm_llm.core.sim import Simulation

    weeks = check_period_config(cfg)
    cal = cfg.calibration
    models = build_models(cfg)
    epidemic = models[cfg.model_names.index("epidemic")]
    enabled = {name: dc for name, dc in cfg.decisions.items() if dc.enabled and name in decisions}
    sim = Simulation(population, models, archetypes=archetypes, decisions=decisions,
                     decision_every={n: dc.every_days for n, dc in enabled.items() if dc.every_days is not None},
                     interventions=cfg.interventions.schedule(), start_date=cal.start, days=cfg.days,
                     seed=cfg.seeds[0], device=cfg.device,
                     alignment={n: AlignmentMap(a=dc.alignment[0], b=dc.alignment[1]) for n, dc in enabled.items()
                                if dc.alignment is not None},
                     persistence={n: dc.persistence for n, dc in enabled.items()},
                     **({"checkpoint_days": cal.checkpoint_days} if cal.checkpoint_days else {}))
    observed = observed_weekly(cal.start, weeks, tuple(cal.targets), device=cfg.device)
    objective = PeriodObjective(sim, observed, weeks=weeks, scale=population.scale,
                                serology=NYC_SEROLOGY_APRIL_2020 if cal.serology else None,
                                smoothness=cal.smoothness, fatality_smoothness=cal.fatality_smoothness,
                                epidemic=epidemic, loss=cal.loss, dispersion=cal.dispersion)
    return objective, epidemic


def fitted_epidemic_block(epidemic_params: Any, values: dict[str, Any], variant_rates: dict[str, float]
                          ) -> dict[str, Any]:
    """The ``epidemic:`` entries of a fit: its values (3 significant figures), ``ihr`` times the fitted
    hospitalisation scale, and the variants with their fitted importation rates (and their transmissibility as
    `epidemic_params` hold it: fitted after a fit with ``calibration.variant_transmissibility``)."""
    def sig(x: Any) -> Any:
        return [sig(v) for v in x] if isinstance(x, list | tuple) else float(f"{float(x):.3g}")

    out = {k: sig(v) for k, v in values.items() if k != "hospitalisation_scale"}
    if "hospitalisation_scale" in values:
        out["ihr"] = sig([x * float(values["hospitalisation_scale"]) for x in epidemic_params.ihr])
    out["variants"] = [{**{k: x for k, x in v.model_dump(mode="json").items() if x != ""},
                        "transmissibility": sig(v.transmissibility),
                        "importation_per_100k": sig(variant_rates[v.lineage])} for v in epidemic_params.variants]
    return out


def calibrate_period(exp: Experiment, out_dir: Path, overwrite: bool = False) -> ExperimentResult:
    """Fit `exp` (``model: epidemic+vaccination``) over its whole calibration period; see the module."""
    from lpm_llm.calibrate.fit import FrozenDecisions
    from lpm_llm.calibrate.period import EVALUATION_SEEDS, evaluate_period, fit_period, period_space
    from lpm_llm.distributed import launched_by_torchrun

    cfg, cal = exp.config, exp.config.calibration
    if launched_by_torchrun():
        raise ConfigError("the whole-period fit runs in one process: drop --nproc")
    check_period_config(cfg)  # before any folder, population or model is made
    with _run_folder(exp, out_dir, overwrite, command_kind="calibrate") as run:
        timer = run.timer
        population, scale, archetypes = _prepare(exp, timer, run.manifest)
        source = open_decision(exp, run, archetypes, "vaccinate")
        pbar = exp.progress(total=cal.steps + 2, desc="whole-period fit: scoring the start") if exp.progress else None
        asked = _Announced(source, pbar, "whole-period fit: scoring the start", archetypes.k) if pbar else source
        objective, epidemic = period_objective(cfg, population, archetypes, {"vaccinate": FrozenDecisions(asked)})
        space = period_space(objective.simulation, device=cfg.device)
        start_rates = [v.importation_per_100k for v in epidemic.params.variants]
        seeds = list(EVALUATION_SEEDS)
        with timer.phase("calibration"):
            start = evaluate_period(objective, epidemic, space.values(), start_rates, seeds)
            log.info("whole-period fit: start objective %.4f on seeds %s", start.summary["objective"], seeds)
            if pbar:
                pbar.set_description("whole-period fit: adam")
                pbar.set_postfix(loss=f"{start.summary['objective']:.3f}")
                pbar.update(1)

            def on_step(i: int, record: dict[str, Any]) -> None:
                if pbar:
                    pbar.set_postfix(loss=f"{record['loss']:.3f}", seconds=f"{record['seconds']:.0f}")
                    pbar.update(1)

            t0 = time.perf_counter()
            fit = fit_period(objective, space, epidemic, steps=cal.steps, lr=cal.lr, lr_final=cal.lr_final,
                             seeds_per_step=cal.seeds_per_step, seed=cfg.seeds[0], on_step=on_step,
                             transmissibility=cal.variant_transmissibility)
            fit_seconds = time.perf_counter() - t0
            if pbar:
                pbar.set_description("whole-period fit: scoring the fit")
            fitted = evaluate_period(objective, epidemic, fit.space.values(), list(fit.variant_rates.values()), seeds)
            if pbar:
                pbar.set_postfix(loss=f"{fitted.summary['objective']:.3f}")
                pbar.update(1)
                pbar.close()
        log.info("whole-period fit: objective %.4f -> %.4f on seeds %s", start.summary["objective"],
                 fitted.summary["objective"], seeds)
        with timer.phase("outputs"):
            summary = {"steps": cal.steps, "lr": cal.lr, "lr_final": cal.lr_final,
                       "seeds_per_step": cal.seeds_per_step, "smoothness": cal.smoothness,
                       "fatality_smoothness": cal.fatality_smoothness, "loss": cal.loss,
                       "dispersion": cal.dispersion, "weeks": objective.weeks, "targets": list(cal.targets),
                       "serology": cal.serology,
                       "evaluation_seeds": seeds, "start": start.summary, "fitted": fitted.summary,
                       "values": fit.values, "variant_rates": fit.variant_rates,
                       "transmissibility": fit.transmissibility, "fit_seconds": round(fit_seconds, 3)}
            _outputs.write_manifest(out_dir / "calibration.json", {**summary, "history": fit.history})
            block = fitted_epidemic_block(epidemic.params, fit.values, fit.variant_rates)
            (out_dir / "fitted_epidemic.yaml").write_text(
                f"# the fitted epidemic of `lpm-llm calibrate` ({cfg.name}, {cal.steps} steps): paste into the "
                "experiment\n" + yaml.safe_dump({"epidemic": block}, sort_keys=False, default_flow_style=None,
                                                width=120))
            weekly = start.weekly.rename(columns={"simulated": "simulated_start"}).assign(
                simulated_fitted=fitted.weekly["simulated"].to_numpy())
            weekly.to_csv(out_dir / "calibration_weekly.csv", index=False)
            if len(fitted.lineages):
                fitted.lineages.to_csv(out_dir / "lineages.csv", index=False)
            decisions_df = _decisions_frame({"vaccinate": source}, "calibration", cfg.seeds[0])
            decisions_df.to_csv(out_dir / "decisions.csv", index=False)
            plots = _plots(cfg, fitted, fit.history, start.summary["objective"], out_dir) if cfg.outputs.plots else []
        run.manifest["calibration"] = summary
    return ExperimentResult(out_dir=out_dir, metrics=weekly, decisions=decisions_df, manifest=run.manifest,
                            plots=plots)


def _plots(cfg: ExperimentConfig, fitted: Any, history: list[dict[str, Any]], start_loss: float,
           out_dir: Path) -> list[Path]:
    """Weekly cases, admissions and deaths of the fitted runs (band over the evaluation seeds) against
    observed; coverage and lineage shares where the run reaches them; the loss by step."""
    import matplotlib.pyplot as plt

    from lpm_llm import plots
    from lpm_llm.data.observed import load_covid

    frames = fitted.frames
    end = cfg.start_date + dt.timedelta(days=cfg.days - 1)
    observed = load_covid(cfg.start_date.isoformat(), end.isoformat()) if cfg.outputs.observed else None
    paths = []
    for target, column in (("cases", "reported_cases"), ("hospitalized", "hospitalized"), ("deaths", "deaths")):
        paths.append(plots.plot_epidemic(frames, observed, out_dir / f"{target}.png", sim_column=column,
                                         obs_column=target, title=f"{cfg.name}: weekly {target}, observed and "
                                         f"fitted ({frames['seed'].nunique()} seeds, 5-95%)"))
    if "vaccinated_1" in frames and float(frames["vaccinated_1"].max()) > 0:
        residents = frames[frames["date"] == frames["date"].min()].groupby("area")["population"].first()
        paths.append(plots.plot_coverage(frames, plots.observed_coverage(residents) if cfg.outputs.observed
                                         else None, out_dir / "coverage.png"))
    if len(fitted.lineages):
        paths.append(plots.plot_lineages(fitted.lineages, out_dir / "lineages.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], "o-", label="step (its own seed)")
    ax.axhline(start_loss, color="grey", ls="--", label="start, evaluation seeds")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "loss.png")
    return paths
