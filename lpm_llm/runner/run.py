"""Executes an :class:`~lpm_llm.runner.experiment.Experiment` and writes its run folder.

Order of a run: resolve config -> population -> archetypes -> LLM client -> for each scenario and
seed: simulate -> tables -> plots -> manifest. The manifest is written even when a run fails part
way (with the error), so that nothing already paid for (LLM answers are cached anyway) is lost.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from lpm_llm.core.precision import precision
from lpm_llm.population import Population
from lpm_llm.population.archetypes import Archetypes, ArchetypeSpec
from lpm_llm.resources import resolve_path
from lpm_llm.runner import outputs as _outputs
from lpm_llm.runner.config import ConfigError

if TYPE_CHECKING:
    from lpm_llm.runner.experiment import Experiment, ExperimentConfig

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    """What a run produced (also written to ``out_dir``)."""

    out_dir: Path
    metrics: pd.DataFrame
    decisions: pd.DataFrame
    manifest: dict[str, Any]
    labor: pd.DataFrame | None = None
    plots: list[Path] = field(default_factory=list)

class _Announced:
    """A DecisionSource wrapper that tells the progress bar while the LLM is being asked."""

    def __init__(self, source: Any, bar: Any, desc: str, k: int):
        self.source, self.bar, self.desc, self.k = source, bar, desc, k

    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        self.bar.set_description(f"{self.desc}: asking the LLM ({self.k} archetypes, {context.get('date')})")
        try:
            return self.source.probabilities(context)
        finally:
            self.bar.set_description(self.desc)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.source.records


def build_population(cfg: ExperimentConfig) -> Population:
    """The configured population on the configured device; its ``scale`` (agents per real person)
    is set where it is made (a parquet file without one takes ``population.scale``)."""
    from lpm_llm.population.synthesis import synthesize_nyc

    pc = cfg.population
    if pc.source == "nyc":
        pop = synthesize_nyc(pc.scale, pc.seed, households=pc.households, schools=pc.schools,
                             workplaces=pc.workplaces, device=cfg.device)
        return pop
    path = Path(pc.source).expanduser()
    if path.suffix != ".parquet":
        raise FileNotFoundError(f"population.source must be 'nyc' or a .parquet file, got {pc.source!r}")
    pop = Population.from_parquet(path, device=cfg.device)
    if pop.scale is None:
        pop.scale = pc.scale
    return pop


def build_decisions(cfg: ExperimentConfig, client: Any, archetypes: Archetypes) -> dict[str, Any]:
    """One LLM-backed DecisionSource per enabled decision."""
    from lpm_llm.llm.decision import LLMDecision
    from lpm_llm.llm.prompts import PromptSpec

    out = {}
    for name, dc in cfg.decisions.items():
        if not dc.enabled:
            continue
        prompt = PromptSpec.from_yaml(resolve_path(dc.prompt, "prompts"))
        out[name] = LLMDecision(prompt, client, archetypes, cfg.llm)
    return out


def open_decision(exp: Experiment, run: Any, archetypes: Archetypes, name: str, *, waiting: int = 0) -> Any:
    """Open the run's LLM client (``run.client``, timed as ``llm_start``) and build the decision `name`
    on it, recorded in ``run.sources`` (decisions.csv, the behaviour report). ``waiting``: ranks that
    wait while it answers (:func:`lpm_llm.llm.client.open_client`)."""
    from lpm_llm.llm.client import open_client

    with run.timer.phase("llm_start"):
        client = run.client = open_client(exp.config.llm, http_client=exp.http_client, waiting=waiting)
    source = build_decisions(exp.config, client, archetypes)[name]
    run.sources.append({name: source})
    return source


def build_models(cfg: ExperimentConfig) -> list[Any]:
    """The configured models, in the order of ``model`` (e.g. ``epidemic+labor``), from the registry
    (:func:`lpm_llm.models.register_model`)."""
    from lpm_llm.models import make_model

    return [make_model(name, cfg) for name in cfg.model_names]


def _simulate(cfg: ExperimentConfig, population: Population, archetypes: Archetypes, decisions: dict[str, Any],
              seed: int, tick, shard: Any = None) -> Any:
    """One run of the configured models (on this rank's `shard` of an area-sharded population, if
    given); returns its Results."""
    from lpm_llm.core.behavior import AlignmentMap
    from lpm_llm.core.sim import Simulation

    with torch.no_grad():
        sim = Simulation(
            population, build_models(cfg),
            archetypes=archetypes,
            decisions=decisions,
            decision_every={name: dc.every_days for name, dc in cfg.decisions.items() if dc.enabled
                            and name in decisions and dc.every_days is not None},
            interventions=cfg.interventions.schedule(),
            start_date=cfg.start_date,
            days=cfg.days,
            seed=seed,
            device=cfg.device,
            alignment={name: AlignmentMap(a=dc.alignment[0], b=dc.alignment[1]) for name, dc in cfg.decisions.items()
                       if dc.enabled and dc.alignment is not None and name in decisions},
            on_day=lambda *_: tick(1),
            persistence={name: dc.persistence for name, dc in cfg.decisions.items() if name in decisions},
            shard=shard,
        )
        return sim.run()


def _decisions_frame(decisions: Mapping[str, Any], scenario: str, seed: int) -> pd.DataFrame:
    rows = []
    for name, source in decisions.items():
        for rec in getattr(source, "records", []):
            rows.append({"scenario": scenario, "seed": seed, "decision": name, **rec})
    return pd.DataFrame(rows)


def _prepare(exp: Experiment, timer: _outputs.PhaseTimer, manifest: dict[str, Any]
             ) -> tuple[Population, float, Archetypes]:  # scale: population.scale
    """Population (with industries when a labour model runs) and archetypes, timed and recorded."""
    cfg = exp.config
    setup = exp.progress(total=3, desc="setup: population") if exp.progress else None
    with timer.phase("population"):
        population = build_population(cfg)
        scale = population.scale
        log.info("population: %d agents (scale %g), %.1f bytes/agent", population.n, scale,
                 population.nbytes() / population.n)
        for model in {type(m): m for c in (cfg, *exp.scenarios.values()) for m in build_models(c)}.values():
            if hasattr(model, "prepare_population"):  # columns a model needs (the labour model: industry)
                population = model.prepare_population(population, cfg.population.seed)
    if setup:
        setup.set_description("setup: archetypes")
        setup.update(1)
    with timer.phase("archetypes"):
        archetypes = ArchetypeSpec.from_yaml(cfg.archetypes).assign(population)
    if setup:
        setup.update(1)
        setup.close()
    manifest["population"] = {"agents": population.n, "scale": scale,
                              "bytes_per_agent": population.nbytes() / population.n}
    manifest["archetypes"] = {"name": archetypes.name, "k": archetypes.k}
    return population, scale, archetypes


def run_experiment(exp: Experiment, out_dir: Path, overwrite: bool = False) -> ExperimentResult:
    """Every scenario and seed of ``exp`` into ``out_dir``.

    Started by ``torchrun`` on several ranks: with ``distributed.shard: seed`` each rank runs its
    share of the (scenario, seed) simulations, and rank 0 gathers the results; with ``shard: area``
    every simulation runs on all ranks, each holding the agents of some boroughs
    (:mod:`lpm_llm.distributed.shard`), rank 0 asking the LLM and broadcasting the answers. Either
    way rank 0 writes the run folder, identical to a single process's but for timings and which
    answers were cache hits.
    """
    from lpm_llm.distributed import process_group
    from lpm_llm.llm.client import open_client

    cfg = exp.config
    configs = {"baseline": cfg, **exp.scenarios}
    bar = exp.progress
    with process_group(cfg.distributed, cfg.device) as group, \
            _run_folder(exp, out_dir, overwrite, scenarios=list(configs), write=group.is_main) as run:
        timer = run.timer
        population, scale, archetypes = _prepare(exp, timer, run.manifest)
        area = group.world > 1 and cfg.distributed.shard == "area"
        shard, local, local_archetypes = None, population, archetypes
        if area:
            local, local_archetypes, shard = _area_shard(population, archetypes, group)
            if not group.is_main:  # only rank 0 keeps the whole population (the behaviour report)
                population = archetypes = None
        client = None
        if not area or group.is_main:  # area shards: rank 0 asks, the answers are broadcast
            with timer.phase("llm_start"):
                client = run.client = open_client(cfg.llm, http_client=exp.http_client,
                                                  waiting=group.world - 1 if area else 0)
        runs = [(name, c, seed) for name, c in configs.items() for seed in c.seeds]
        if group.world > 1:
            run.manifest["distributed"] = {"ranks": group.world, "shard": cfg.distributed.shard,
                                           "backend": cfg.distributed.backend}
            if area:
                run.manifest["distributed"]["areas"] = group.gather(list(shard.areas))
        outputs = []
        for i, (name, c, seed) in (list(enumerate(runs)) if area else group.deal(list(enumerate(runs)))):
            if group.world > 1 and torch.device(c.device).type == "cuda":
                c = c.model_copy(update={"device": f"cuda:{group.local_rank}"})  # a GPU per rank
            desc = f"{name} seed {seed} ({i + 1}/{len(runs)})"
            pbar = bar(total=c.days, desc=desc) if bar and group.is_main else None
            decisions = build_decisions(c, client, local_archetypes) if client is not None else {}
            run.sources.append(decisions)
            if pbar:
                decisions = {k: _Announced(v, pbar, desc, local_archetypes.k) for k, v in decisions.items()}
            if area:
                from lpm_llm.distributed.decisions import BroadcastDecisions

                decisions = {k: BroadcastDecisions(decisions.get(k), group)
                             for k, dc in c.decisions.items() if dc.enabled}
            with timer.phase("simulation"):
                results = _simulate(c, local, local_archetypes, decisions, seed,
                                    pbar.update if pbar else (lambda n: None), shard=shard)
            if pbar:
                pbar.close()
            daily = len(results.daily.columns) > 4  # models with daily series by area and age band
            shares = None
            if "symptomatic_by_lineage" in results.series:  # lineage shares where NYC sequenced (2021)
                from lpm_llm.models.lineages import compare_lineage_shares

                shares = compare_lineage_shares(results.series["symptomatic_by_lineage"], c.start_date, c.epidemic)
                shares = shares.assign(scenario=name, seed=seed) if len(shares) else None
            outputs.append((results.daily.assign(scenario=name, seed=seed) if daily else None,
                            results.by_area().assign(scenario=name, seed=seed) if daily else None,
                            results.tables["labor"].assign(scenario=name, seed=seed)
                            if "labor" in results.tables else None,
                            _decisions_frame(decisions, name, seed), shares))
        if area and not group.is_main:  # every rank has the city's results; rank 0 writes them
            return ExperimentResult(out_dir=out_dir, metrics=pd.DataFrame(), decisions=pd.DataFrame(), manifest={})
        if group.world > 1 and not area:
            gathered = group.gather((outputs, _rank_usage(run)))
            if not group.is_main:
                return ExperimentResult(out_dir=out_dir, metrics=pd.DataFrame(), decisions=pd.DataFrame(),
                                        manifest={})
            outputs = group.undeal([share for share, _ in gathered])
            run.other_ranks = [usage for _, usage in gathered[1:]]
        metrics, areas, labor, decisions_tables, lineages = (
            [o[j] for o in outputs if o[j] is not None] for j in range(5))
        if cfg.outputs.behaviour:  # the sensitivity report: the base config's decisions, same client (rank 0)
            from lpm_llm.behaviour.probe import write_behaviour

            with timer.phase("behaviour"):
                run.manifest["behaviour"] = write_behaviour(cfg, client, population, archetypes, out_dir,
                                                            plots=cfg.outputs.plots)
        with timer.phase("outputs"):
            labor_df = pd.concat(labor, ignore_index=True) if labor else None
            # metrics: the epidemic's daily series; for a labour-only run, the monthly labour series
            metrics_df = pd.concat(metrics, ignore_index=True) if metrics else labor_df
            decisions_df = pd.concat(decisions_tables, ignore_index=True) if decisions_tables else pd.DataFrame()
            _outputs.write_table(metrics_df, out_dir, "metrics", parquet=cfg.outputs.parquet)
            if labor_df is not None and metrics:
                _outputs.write_table(labor_df, out_dir, "labor", parquet=cfg.outputs.parquet)
            decisions_df.to_csv(out_dir / "decisions.csv", index=False)
            areas_df = pd.concat(areas, ignore_index=True) if areas else None
            if areas_df is not None:
                ensemble_summary(areas_df).to_csv(out_dir / "summary.csv", index=False)
            if lineages:
                pd.concat(lineages, ignore_index=True).to_csv(out_dir / "lineages.csv", index=False)
            lineages_df = pd.concat(lineages, ignore_index=True) if lineages else None
            plots = (_plots(cfg, areas_df, labor_df, decisions_df, out_dir, scale, lineages_df)
                     if cfg.outputs.plots else [])
    return ExperimentResult(out_dir=out_dir, metrics=metrics_df, decisions=decisions_df, manifest=run.manifest,
                            labor=labor_df, plots=plots)


def _area_shard(population: Population, archetypes: Archetypes, group: Any) -> tuple[Population, Archetypes, Any]:
    """This rank's agents (its boroughs'), their archetypes and its AreaShard."""
    from lpm_llm.distributed.shard import shard_population

    local, shard = shard_population(population, group.rank, group.world)
    local_archetypes = dataclasses.replace(archetypes, index=archetypes.index.index_select(
        0, shard.ids.to(device=archetypes.index.device, dtype=torch.int64)))
    log.info("rank %d: areas %s, %d of %d agents", group.rank, list(shard.areas), local.n, population.n)
    return local, local_archetypes, shard


def _rank_usage(run: _Run) -> dict[str, Any]:
    """This rank's LLM usage and answer masses, for rank 0's manifest."""
    usage = run.client.usage
    return {"usage": usage.as_dict() if hasattr(usage, "as_dict") else dict(vars(usage)),
            "masses": [r.get("answer_mass") for source in run.sources for d in source.values()
                       for r in getattr(d, "records", [])]}


def _add_usage(total: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``total`` plus another rank's usage counters (numbers summed, reported models merged)."""
    out = dict(total)
    for key, value in other.items():
        if isinstance(value, dict):
            merged = dict(out.get(key) or {})
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            out[key] = merged
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


@dataclass
class _Run:
    """One run folder being written: its phase timer, its manifest, and the LLM client once opened."""

    cfg: ExperimentConfig
    out_dir: Path
    timer: _outputs.PhaseTimer
    manifest: dict[str, Any]
    client: Any = None
    sources: list[Mapping[str, Any]] = field(default_factory=list)  # decision sources, for the manifest
    other_ranks: list[dict[str, Any]] = field(default_factory=list)  # the other ranks' LLM usage (rank 0)


@contextmanager
def _run_folder(exp: Experiment, out_dir: Path, overwrite: bool = False, write: bool = True, **fields: Any):
    """Create the folder and its config.yaml; on the way out, always write manifest.json.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (see
    :func:`~lpm_llm.runner.outputs.prepare_run_folder`). The manifest records ``status`` (ok,
    failed with the error, or interrupted by Ctrl-C or SIGTERM), LLM usage, and wall time per
    phase, so that a failed run still says what it did and what it cost; the LLM client is closed.
    """
    cfg = exp.config
    with precision(cfg.precision):  # float32 unless the config asks for float64
        if not write:  # a rank other than 0: no folder, its usage goes to rank 0
            run = _Run(cfg, out_dir, _outputs.PhaseTimer(), {})
            try:
                yield run
            finally:
                if run.client is not None:
                    _close(run.client)
            return
        _outputs.prepare_run_folder(out_dir, overwrite)
        manifest = _outputs.base_manifest(exp.config_path)
        manifest.update({"name": cfg.name, "seeds": cfg.seeds, "device": cfg.device, **fields, "status": "running"})
        try:
            _outputs.write_config(out_dir / "config.yaml", _resolved(cfg))
        except OSError as e:
            raise _outputs.RunFolderError(f"cannot write into the output folder {out_dir}: {e.strerror or e}; "
                                          "choose a writable --out") from None
        run = _Run(cfg, out_dir, _outputs.PhaseTimer(), manifest)
        try:
            yield run
            manifest["status"] = "ok"
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one by the CLI
            manifest["status"] = "interrupted"
            manifest["error"] = str(e) or "SIGINT (Ctrl-C)"
            raise
        except BaseException as e:
            manifest["status"] = "failed"
            manifest["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            if run.client is not None:
                manifest["llm"] = _llm_manifest(cfg, run.client)
                masses = [r.get("answer_mass") for source in run.sources for d in source.values()
                          for r in getattr(d, "records", [])]
                for other in run.other_ranks:
                    manifest["llm"]["usage"] = _add_usage(manifest["llm"]["usage"], other["usage"])
                    masses += other["masses"]
                if cfg.llm.probability_mode == "logprobs":
                    manifest["llm"]["answer_mass"] = _outputs.summarize_masses(masses, cfg.llm.min_answer_mass)
                _close(run.client)
            manifest["wall_time_s"] = {**{k: round(v, 3) for k, v in run.timer.seconds.items()},
                                       "total": round(run.timer.total(), 3)}
            _outputs.write_manifest(out_dir / "manifest.json", manifest)


def _close(client: Any) -> None:
    """Close the LLM client; a failure to close is logged, never allowed to hide the run's own error."""
    try:
        client.close()
    except Exception as e:  # noqa: BLE001 - closing must not mask the run's outcome
        log.warning("closing the LLM client failed: %s: %s", type(e).__name__, e)


def _llm_manifest(cfg: ExperimentConfig, client: Any) -> dict[str, Any]:
    usage = client.usage
    as_dict = usage.as_dict() if hasattr(usage, "as_dict") else dict(vars(usage))
    prompts = {}
    for name, dc in cfg.decisions.items():
        from lpm_llm.llm.prompts import PromptSpec

        spec = PromptSpec.from_yaml(resolve_path(dc.prompt, "prompts"))
        from lpm_llm.llm.elicitation import elicitation_tag

        prompts[name] = {"file": spec.source.name if hasattr(spec.source, "name") else str(spec.source),
                         "version": spec.version + elicitation_tag(cfg.llm.elicitation)}
    cache = getattr(client, "cache", None)
    return {"provider": cfg.llm.provider, "model": cfg.llm.model_name, "probability_mode": cfg.llm.probability_mode,
            "cache_mode": cfg.llm.cache_mode, "usage": as_dict, "prompts": prompts,
            "fingerprint": getattr(cache, "fingerprint", None)}


def _resolved(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config with every default written out; scenarios kept as the overrides the user wrote."""
    out = cfg.model_dump(mode="json")
    out["scenarios"] = dict(cfg.scenarios)
    return out


def _plots(cfg, per_area: pd.DataFrame | None, labor: pd.DataFrame | None, decisions: pd.DataFrame,
           out_dir: Path, scale: float, lineages: pd.DataFrame | None = None) -> list[Path]:
    """Cases and deaths (and unemployment) against observed data, decision heatmaps, scenario comparison;
    with vaccination, coverage by borough; with lineage shares, their plot; hospital admissions when the
    experiment is fitted to them (``calibration.targets``).

    Simulated counts are divided by `scale` so that they read as counts of the real city.
    """
    from lpm_llm import plots
    from lpm_llm.data.observed import load_covid, load_unemployment

    paths = []
    if labor is not None:
        base = labor[labor["scenario"] == "baseline"]
        observed = load_unemployment() if cfg.outputs.observed else None
        paths.append(plots.plot_monthly(base, observed, out_dir / "unemployment.png",
                                        title=f"{cfg.name}: unemployment rate (%)"))
    if per_area is None:
        paths += _decision_plots(decisions, out_dir)
        return paths
    per_area = per_area.assign(reported_cases=per_area["reported_cases"] / scale, deaths=per_area["deaths"] / scale)
    end = cfg.start_date + dt.timedelta(days=cfg.days - 1)
    observed = load_covid(cfg.start_date.isoformat(), end.isoformat()) if cfg.outputs.observed else None
    base = per_area[per_area["scenario"] == "baseline"]
    paths += [
        plots.plot_epidemic(base, observed, out_dir / "cases.png",
                            title=f"{cfg.name}: weekly reported cases (simulation scaled x{1 / scale:g})"),
        plots.plot_epidemic(base, observed, out_dir / "deaths.png", sim_column="deaths", obs_column="deaths",
                            title=f"{cfg.name}: weekly deaths (simulation scaled x{1 / scale:g})"),
    ]
    if "hospitalized" in cfg.calibration.targets:  # an experiment fitted to admissions plots them too
        paths.append(plots.plot_epidemic(
            base.assign(hospitalized=base["hospitalized"] / scale), observed, out_dir / "hospitalized.png",
            sim_column="hospitalized", obs_column="hospitalized",
            title=f"{cfg.name}: weekly hospital admissions (simulation scaled x{1 / scale:g})"))
    if "vaccinated_1" in base:
        residents = base[base["date"] == base["date"].min()].set_index("area")["population"] / scale
        paths.append(plots.plot_coverage(base, plots.observed_coverage(residents) if cfg.outputs.observed else None,
                                         out_dir / "coverage.png"))
    if lineages is not None and len(lineages):
        paths.append(plots.plot_lineages(lineages[lineages["scenario"] == "baseline"], out_dir / "lineages.png"))
    paths += _decision_plots(decisions, out_dir)
    if per_area["scenario"].nunique() > 1:
        series = {name: g for name, g in per_area.groupby("scenario", sort=False)}
        paths.append(plots.plot_scenarios(series, out_dir / "scenarios.png"))
    return paths


_SUMMARY = ("new_infections", "reported_cases", "hospitalized", "deaths", "isolating")


def ensemble_summary(per_area: pd.DataFrame) -> pd.DataFrame:
    """Mean and 5-95% band over seeds of the daily series by scenario, date and area (NYC included).

    Columns: scenario, date, area, seeds, then ``{metric}_mean``, ``{metric}_p05``, ``{metric}_p95``.
    Counts are of simulated agents (divide by the population scale for the real city).
    """
    g = per_area.groupby(["scenario", "date", "area"], sort=False)[list(_SUMMARY)]
    out = g.mean().add_suffix("_mean")
    out = out.join(g.quantile(0.05).add_suffix("_p05")).join(g.quantile(0.95).add_suffix("_p95"))
    out.insert(0, "seeds", per_area.groupby(["scenario", "date", "area"], sort=False)["seed"].nunique())
    return out.reset_index()


def _decision_plots(decisions: pd.DataFrame, out_dir: Path) -> list[Path]:
    from lpm_llm import plots

    paths = []
    if len(decisions):
        for name, d in decisions[decisions["scenario"] == "baseline"].groupby("decision"):
            first_seed = d[d["seed"] == d["seed"].min()]
            paths.append(plots.plot_decision_heatmap(first_seed, out_dir / f"decisions_{name}.png",
                                                     title=f"P({name}) by archetype, baseline"))
    return paths


def calibrate_experiment(exp: Experiment, out_dir: Path, overwrite: bool = False) -> ExperimentResult:
    """Calibrate the epidemic's parameters to the bundled NYC data (the config's ``calibration`` block).

    Writes config.yaml, manifest.json (with the calibration summary and LLM usage), decisions.csv,
    calibration.json, calibration_daily.csv, calibration_observed.csv and the calibration plots.
    ``model: epidemic+vaccination`` is fitted over the whole period instead
    (:func:`lpm_llm.runner.period_run.calibrate_period`); ``model: labor`` to unemployment.
    """
    from lpm_llm.calibrate import calibrate_first_wave
    from lpm_llm.calibrate.targets import NYC_SEROLOGY_APRIL_2020
    from lpm_llm.distributed import launched_by_torchrun, process_group
    from lpm_llm.llm.client import open_client

    cfg, cal = exp.config, exp.config.calibration
    if cfg.privacy.mode != "none":
        return _calibrate_private(exp, out_dir, overwrite)
    if cfg.model_names == ["labor"]:  # the targets follow the model: monthly unemployment
        if launched_by_torchrun():
            raise ConfigError("the labour calibration runs in one process: drop --nproc")
        return _calibrate_labor(exp, out_dir, overwrite)
    if cfg.model_names == ["epidemic", "vaccination"]:  # the whole period (2020-2021): lpm_llm.runner.period_run
        from lpm_llm.runner.period_run import calibrate_period

        return calibrate_period(exp, out_dir, overwrite)
    if cfg.model_names != ["epidemic"]:
        raise ValueError(f"lpm-llm calibrate has targets for 'epidemic' (cases, deaths), 'epidemic+vaccination' "
                         f"(the whole period) or 'labor' (unemployment), not yet for {cfg.model!r}")
    with process_group(cfg.distributed, cfg.device) as group, \
            _run_folder(exp, out_dir, overwrite, command_kind="calibrate", write=group.is_main) as run:
        timer = run.timer
        population, scale, archetypes = _prepare(exp, timer, run.manifest)
        shard = None
        if group.world > 1:  # rank 0 asks the LLM and broadcasts the answers
            run.manifest["distributed"] = {"ranks": group.world, "shard": cfg.distributed.shard,
                                           "backend": cfg.distributed.backend}
            if cfg.distributed.shard == "area":  # each rank holds some boroughs
                population, archetypes, shard = _area_shard(population, archetypes, group)
                run.manifest["distributed"]["areas"] = group.gather(list(shard.areas))
            else:  # each rank runs some of the seeds of every step and scoring
                from lpm_llm.distributed.shard import Ranks

                shard = Ranks(group.rank, group.world)
        decisions = {}
        if group.is_main:
            with timer.phase("llm_start"):  # the other ranks wait while it answers: their cores are the model's
                client = run.client = open_client(cfg.llm, http_client=exp.http_client, waiting=group.world - 1)
            decisions = {k: v for k, v in build_decisions(cfg, client, archetypes).items() if k == "isolate"}
        run.sources.append(decisions)
        if shard is not None:
            from lpm_llm.distributed.decisions import BroadcastDecisions

            enabled = "isolate" in cfg.decisions and cfg.decisions["isolate"].enabled
            decisions = {"isolate": BroadcastDecisions(decisions.get("isolate"), group)} if enabled else {}
        pbar = exp.progress(total=cal.steps, desc="calibration: adam") if exp.progress and group.is_main else None
        current = ["adam"]

        def on_step(method: str, index: int, loss: float, seconds: float) -> None:
            log.info("calibration %s step %d: loss %.4f (%.1f s)", method, index, loss, seconds)
            if pbar:
                if method != current[0]:
                    current[0] = method
                    if method == "adam":
                        evals, note = cal.steps, ""
                    elif method == "scoring":  # both fits on the evaluation seeds: start, curve, end
                        evals, note = None, " (the fits on the evaluation seeds)"
                    else:  # the baseline: a number of simulations, or as long as Adam ran
                        evals = cal.baseline_budget // cal.seeds_per_step if cal.baseline_budget else None
                        note = "" if evals else " (as long as adam)"
                    pbar.reset(total=evals)
                    pbar.set_description(f"calibration: {method}{note}")
                pbar.set_postfix(loss=f"{loss:.3f}", seconds=f"{seconds:.0f}")
                pbar.update(1)

        with timer.phase("calibration"):
            report = calibrate_first_wave(
                population, archetypes, decisions, cfg.epidemic, cfg.interventions.schedule(),
                start=cal.start, end=cal.end, forecast_weeks=cal.forecast_weeks, targets=cal.targets,
                steps=cal.steps, lr=cal.lr, lr_final=cal.lr_final, seeds_per_step=cal.seeds_per_step,
                baseline_budget=cal.baseline_budget, checkpoint_days=cal.checkpoint_days, scale=scale,
                device=cfg.device, seed=cfg.seeds[0], parameters=cal.parameters, on_step=on_step,
                alignment=cfg.decisions["isolate"].alignment if "isolate" in cfg.decisions else None,
                serology=NYC_SEROLOGY_APRIL_2020 if cal.serology else None, shard=shard,
            )
        if pbar:
            pbar.close()
        if not group.is_main:  # every rank holds the same report; rank 0 writes it
            return ExperimentResult(out_dir=out_dir, metrics=pd.DataFrame(), decisions=pd.DataFrame(), manifest={})
        with timer.phase("outputs"):
            plots = report.save(out_dir, plots=cfg.outputs.plots)
            decisions_df = _decisions_frame(run.sources[0] if shard is not None else decisions, "calibration",
                                            cfg.seeds[0])
            decisions_df.to_csv(out_dir / "decisions.csv", index=False)
        run.manifest["calibration"] = report.to_dict()
    return ExperimentResult(out_dir=out_dir, metrics=report.daily, decisions=decisions_df, manifest=run.manifest,
                            plots=[p for p in plots if p.suffix == ".png"])


def _calibrate_labor(exp: Experiment, out_dir: Path, overwrite: bool = False) -> ExperimentResult:
    """Fit the labour model to monthly unemployment by borough over the run's months, the last 3 held out.

    Writes labor_calibration.json (fitted parameters, loss history, errors against persistence),
    labor_fit.csv (fitted and forecast months) and unemployment_fit.png, with the usual config and manifest.
    """
    from lpm_llm import plots
    from lpm_llm.calibrate.labor_fit import calibrate_labor
    from lpm_llm.data.observed import load_unemployment

    cfg, cal = exp.config, exp.config.calibration
    end = cfg.start_date + dt.timedelta(days=cfg.days - 1)
    with _run_folder(exp, out_dir, overwrite, command_kind="calibrate") as run:
        timer = run.timer
        population, _, archetypes = _prepare(exp, timer, run.manifest)
        work = open_decision(exp, run, archetypes, "work")
        pbar = exp.progress(total=cal.steps, desc="labour calibration") if exp.progress else None

        def on_step(i: int, loss: float) -> None:
            log.info("labour calibration step %d: loss %.4f pp^2", i, loss)
            if pbar:
                pbar.set_postfix(loss=f"{loss:.3f}")
                pbar.update(1)

        with timer.phase("calibration"):
            fit = calibrate_labor(population, archetypes, work, start=cfg.start_date, end=end, holdout=3,
                                  params=cfg.labor, seeds=[cfg.seeds[0] + i for i in range(cal.seeds_per_step)],
                                  iterations=cal.steps, lr=cal.lr, on_step=on_step,
                                  alignment=cfg.decisions["work"].alignment)
        if pbar:
            pbar.close()
        with timer.phase("outputs"):
            summary = {"params": fit.params_.model_dump(mode="json"), "work_alignment": list(fit.alignment_),
                       "loss_history": fit.loss_history_,
                       "train_mae_pp": fit.train_mae_, "holdout_mae_pp": fit.holdout_mae_,
                       "persistence_mae_pp": fit.persistence_mae_, "holdout_months": 3}
            _outputs.write_manifest(out_dir / "labor_calibration.json", summary)
            table = pd.concat([fit.fitted_.assign(split="fit"), fit.forecast_.assign(split="forecast")],
                              ignore_index=True)
            table.to_csv(out_dir / "labor_fit.csv", index=False)
            decisions_df = _decisions_frame({"work": work}, "calibration", cfg.seeds[0])
            decisions_df.to_csv(out_dir / "decisions.csv", index=False)
            paths = []
            if cfg.outputs.plots:
                simulated = table.rename(columns={"simulated": "unemployment_rate"})
                paths.append(plots.plot_monthly(
                    simulated, load_unemployment(), out_dir / "unemployment_fit.png",
                    forecast_from=str(fit.forecast_["date"].min().date()),
                    title=f"{cfg.name}: unemployment rate (%), fitted, then forecast (dashed line)"))
        run.manifest["calibration"] = summary
    return ExperimentResult(out_dir=out_dir, metrics=table, decisions=decisions_df, manifest=run.manifest,
                            plots=paths)


def _calibrate_private(exp: Experiment, out_dir: Path, overwrite: bool = False) -> ExperimentResult:
    """The first-wave calibration with each rank a data holder (``privacy:``; see :mod:`lpm_llm.privacy`).

    Writes (rank 0) config.yaml, manifest.json (the privacy block: holders, rounds, epsilon and
    delta with ``secure+dp``), calibration.json (fitted parameters, published losses) and, with
    ``privacy.transcript``, transcript.jsonl: every message the coordinator received.
    """
    import json

    from lpm_llm.calibrate.fit import FrozenDecisions, weeks_through
    from lpm_llm.core.sim import Simulation
    from lpm_llm.distributed import launched_by_torchrun, process_group
    from lpm_llm.distributed.decisions import BroadcastDecisions
    from lpm_llm.models.epidemic import Epidemic
    from lpm_llm.privacy.calibrate import calibrate_private

    cfg, cal = exp.config, exp.config.calibration
    if not launched_by_torchrun():
        raise ConfigError(f"privacy.mode {cfg.privacy.mode} needs 2 or more data holders: start it with "
                          "lpm-llm calibrate EXPERIMENT --nproc 5 (one holder per borough)")
    if cfg.model_names != ["epidemic"]:
        raise ValueError(f"privacy.mode {cfg.privacy.mode} calibrates the epidemic, not {cfg.model!r}")
    microdata = cfg.privacy.microdata
    if microdata and "isolate" in cfg.decisions and cfg.decisions["isolate"].enabled:
        raise ConfigError("privacy.microdata: the holders take no LLM decisions (the decision contexts would show "
                          "every borough's cases to the coordinator); set decisions.isolate.enabled: false")
    with process_group(cfg.distributed, cfg.device) as group, \
            _run_folder(exp, out_dir, overwrite, command_kind="calibrate", write=group.is_main) as run:
        population, scale, archetypes = _prepare(exp, run.timer, run.manifest)
        shard = holds = None
        if microdata:  # each holder keeps its boroughs' residents; only the city's pressure crosses, secure
            from lpm_llm.privacy.calibrate import PlainSum, secure_city_sum
            from lpm_llm.privacy.secure_sum import SecureSum

            population, archetypes, shard = _area_shard(population, archetypes, group)
            holds = list(shard.areas)
            city_transcript = (out_dir / "transcript.jsonl" if cfg.privacy.transcript and group.is_main else None)
            summer = (SecureSum(group, frac_bits=cfg.privacy.frac_bits, transcript=city_transcript)
                      if cfg.privacy.mode != "plain" else PlainSum(group, cfg.privacy.frac_bits))
            shard.city_sum = secure_city_sum(summer)
        decisions = {}
        if "isolate" in cfg.decisions and cfg.decisions["isolate"].enabled:
            source = None
            if group.is_main:  # only the coordinator talks to the LLM; the answers are broadcast
                source = open_decision(exp, run, archetypes, "isolate", waiting=group.world - 1)
            decisions["isolate"] = FrozenDecisions(BroadcastDecisions(source, group))
        weeks = weeks_through(cal.start, cal.end)
        device = f"cuda:{group.local_rank}" if torch.device(cfg.device).type == "cuda" else cfg.device
        simulation = Simulation(population, [Epidemic(cfg.epidemic)], archetypes=archetypes,
                                decisions=decisions or None, interventions=cfg.interventions.schedule(),
                                start_date=cal.start, days=7 * weeks, seed=cfg.seeds[0], device=device, shard=shard,
                                **({"checkpoint_days": cal.checkpoint_days} if cal.checkpoint_days else {}))
        pbar = exp.progress(total=cal.steps, desc="private calibration") if exp.progress and group.is_main else None

        def on_step(method: str, index: int, loss: float, seconds: float) -> None:
            log.info("private calibration step %d: published loss %.4f (%.1f s)", index, loss, seconds)
            if pbar:
                pbar.set_postfix(loss=f"{loss:.3f}")
                pbar.update(1)

        transcript = out_dir / "transcript.jsonl" if cfg.privacy.transcript and group.is_main else None
        with run.timer.phase("calibration"):
            fit = calibrate_private(
                simulation, cfg.epidemic, group, cfg.privacy, start=cal.start, weeks=weeks, targets=cal.targets,
                scale=scale, steps=cal.steps, lr=cal.lr, lr_final=cal.lr_final, seeds_per_step=cal.seeds_per_step,
                seed=cfg.seeds[0], parameters=cal.parameters, transcript=transcript, on_step=on_step, holds=holds,
                alignment=bool(decisions) and (tuple(cfg.decisions["isolate"].alignment)
                                               if cfg.decisions["isolate"].alignment else True),
            )
        if pbar:
            pbar.close()
        if microdata:  # what the simulation's own secure sums cost (the city's pressure, forward and backward)
            fit.privacy.update(city_sum_rounds=summer.rounds, city_sum_bytes_sent_by_rank0=summer.bytes_sent)
        if group.is_main:
            summary = {"params": fit.params, "published_loss": fit.loss_history, "wall_time": fit.wall_times,
                       "holders": fit.holders, "privacy": fit.privacy}
            (out_dir / "calibration.json").write_text(json.dumps(summary, indent=2))
            run.manifest["privacy"] = {**fit.privacy, "holders": fit.holders,
                                       "transcript": transcript.name if transcript else None}
            run.manifest["calibration"] = {"params": fit.params, "published_loss": fit.loss_history}
    return ExperimentResult(out_dir=out_dir, metrics=pd.DataFrame(), decisions=pd.DataFrame(),
                            manifest=run.manifest if group.is_main else {})
