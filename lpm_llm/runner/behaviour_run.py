"""``lpm-llm probe`` and ``lpm-llm fidelity``: the behaviour reports of :mod:`lpm_llm.behaviour` as
commands, each writing its own run folder (config.yaml, manifest.json with the LLM usage, its tables)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lpm_llm.behaviour.fidelity import decision_dates, default_sets, fidelity
from lpm_llm.behaviour.plots import plot_fidelity
from lpm_llm.behaviour.probe import write_behaviour
from lpm_llm.population.archetypes import ArchetypeSpec
from lpm_llm.runner import outputs
from lpm_llm.runner.run import build_models, build_population

__all__ = ["fidelity_experiment", "probe_experiment"]


@contextmanager
def _command_folder(exp: Any, out_dir: Path, overwrite: bool, **fields: Any) -> Iterator[tuple[dict, dict]]:
    """The run folder of a behaviour command: config.yaml first; on the way out, always manifest.json
    with the status (ok, failed, interrupted), the LLM usage of the client opened in the block
    (``opened["client"]``, closed here) and the wall time."""
    cfg = exp.config
    outputs.prepare_run_folder(out_dir, overwrite)
    outputs.write_config(out_dir / "config.yaml", cfg.model_dump(mode="json"))
    manifest = outputs.base_manifest(exp.config_path)
    manifest.update({"name": cfg.name, **fields, "status": "running"})
    opened: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        yield manifest, opened
        manifest["status"] = "ok"
    except BaseException as e:
        manifest["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        client = opened.get("client")
        if client is not None:
            manifest["llm"] = {"model": cfg.llm.model_name, "elicitation": cfg.llm.elicitation.model_dump(),
                               "usage": client.usage.as_dict() if hasattr(client.usage, "as_dict")
                               else dict(vars(client.usage)),
                               "fingerprint": getattr(getattr(client, "cache", None), "fingerprint", None)}
            client.close()
        manifest["wall_time_s"] = round(time.perf_counter() - start, 3)
        outputs.write_manifest(out_dir / "manifest.json", manifest)


def _population(cfg: Any) -> Any:
    """The experiment's population with the columns its models add (the labour model: industry)."""
    population = build_population(cfg)
    for model in build_models(cfg):
        if hasattr(model, "prepare_population"):
            population = model.prepare_population(population, cfg.population.seed)
    return population


def probe_experiment(exp: Any, out_dir: Any, overwrite: bool = False,
                     variables: Sequence[str] | None = None) -> dict[str, Any]:
    """``lpm-llm probe``: the experiment's population and archetypes, its client, the probe of every
    decision into ``out_dir`` (behaviour.csv, plots, config.yaml, manifest.json with the LLM usage)."""
    from lpm_llm.llm.client import open_client

    cfg = exp.config
    out_dir = Path(out_dir)
    with _command_folder(exp, out_dir, overwrite, command_kind="probe") as (manifest, opened):
        population = _population(cfg)
        archetypes = ArchetypeSpec.from_yaml(cfg.archetypes).assign(population)
        client = opened["client"] = open_client(cfg.llm, http_client=exp.http_client)
        manifest["behaviour"] = write_behaviour(cfg, client, population, archetypes, out_dir, cfg.outputs.plots,
                                                variables)
    return manifest


def fidelity_experiment(exp: Any, out_dir: Any, overwrite: bool = False, *, sample: int = 500, n_dates: int = 3,
                        sets: str = "default", decision: str | None = None) -> dict[str, Any]:
    """``lpm-llm fidelity``: writes fidelity_sets.csv (one row per archetype set),
    fidelity_archetypes.csv, fidelity_calibration.csv, fidelity_answers.csv, fidelity.png,
    config.yaml and manifest.json (with the LLM usage) into ``out_dir``."""
    from lpm_llm.llm.client import open_client
    from lpm_llm.llm.prompts import PromptSpec
    from lpm_llm.resources import resolve_path

    cfg = exp.config
    name = decision or next(n for n, d in cfg.decisions.items() if d.enabled)
    dc = cfg.decisions[name]
    out_dir = Path(out_dir)
    with _command_folder(exp, out_dir, overwrite, command_kind="fidelity", decision=name,
                         sample=sample) as (manifest, opened):
        population = _population(cfg)
        if sets == "default":
            chosen = default_sets(cfg, population)
        else:
            chosen = {}
            for path in sets.split(","):
                spec = ArchetypeSpec.from_yaml(path.strip())
                chosen[spec.name] = spec.assign(population)
        strata = ArchetypeSpec.from_yaml(cfg.archetypes).assign(population).index
        every = 30 if name == "work" else dc.every_days
        steps = len(range(0, cfg.days, every))
        dates = decision_dates(cfg.start_date, cfg.days, every, n_dates)
        client = opened["client"] = open_client(cfg.llm, http_client=exp.http_client)
        prompt = PromptSpec.from_yaml(resolve_path(dc.prompt, "prompts"))
        report = fidelity(prompt, client, population, chosen, strata=strata, dates=dates,
                          schedule=cfg.interventions.schedule(), steps=steps, sample=sample,
                          seed=cfg.population.seed, settings=cfg.llm)
        for key, frame in report.items():
            frame.to_csv(out_dir / f"fidelity_{key}.csv", index=False)
        if cfg.outputs.plots:
            plot_fidelity(report["sets"], out_dir / "fidelity.png",
                          title=f"{cfg.name}: archetype fidelity ({name}, {len(report['answers']) // len(dates)} "
                                f"agents x {len(dates)} dates) against LLM cost")
        manifest["dates"] = [d.isoformat() for d in dates]
        manifest["sets"] = report["sets"].round(4).to_dict(orient="records")
    return manifest
