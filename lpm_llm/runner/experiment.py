"""Experiments: one validated YAML file -> a folder of results, plots and a publishable manifest.

    exp = Experiment.from_yaml("experiments/covid_nyc.yaml", overrides=["days=30"])
    result = exp.run(out_dir="runs/demo")        # ExperimentResult
    result.metrics                               # daily series by scenario, seed, area and age band

The config is a pydantic model (:class:`ExperimentConfig`): an unknown or misspelt key is an error
that names the key and the valid ones. Scenarios are overrides of the base config, validated the
same way; ``seeds`` runs an ensemble of each scenario.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lpm_llm.core.interventions import InterventionSchedule, Policy, nyc_2020
from lpm_llm.distributed.group import DistributedSettings
from lpm_llm.llm.settings import LLMSettings
from lpm_llm.models.epidemic import EpidemicParams
from lpm_llm.models.labor import LaborParams
from lpm_llm.population.synthesis import HouseholdSettings, SchoolSettings, WorkplaceSettings
from lpm_llm.privacy.settings import PrivacySettings
from lpm_llm.resources import resolve_path
from lpm_llm.runner.config import ConfigError, deep_merge, load_yaml, parse_set, validate
from lpm_llm.runner.run import ExperimentResult, calibrate_experiment, run_experiment

log = logging.getLogger(__name__)

_POLICY_KINDS = ("school_closure", "stay_at_home", "reopening", "masks")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PopulationConfig(_Strict):
    """Where the agents come from: the synthetic New York (``source: nyc``) or a parquet file."""

    source: str = Field("nyc", description="'nyc' synthesizes from the bundled marginals; else a .parquet path")
    scale: float = Field(0.01, gt=0, le=1, description="fraction of the real city (nyc source only)")
    seed: int = Field(0, ge=0)
    households: HouseholdSettings = Field(default_factory=HouseholdSettings)
    schools: SchoolSettings = Field(default_factory=SchoolSettings)
    workplaces: WorkplaceSettings = Field(default_factory=WorkplaceSettings)


class DecisionConfig(_Strict):
    """One LLM decision: its prompt file and how often it is taken (the work decision is always monthly)."""

    prompt: str
    every_days: int = Field(7, ge=1, description="days between isolation decisions; decisions hold in between")
    enabled: bool = True
    persistence: float = Field(
        0.0, ge=0.0, lt=1.0, description="week-to-week correlation of each agent's latent propensity "
        "(0: independent draws at every step; 0.9: the same people keep deciding alike)")
    alignment: tuple[float, float] | None = Field(
        None, description="(a, b) of the alignment map logit(p') = a*logit(p) + b applied to the LLM's answers, "
                          "e.g. as fitted by lpm-llm calibrate; None: the answers as they are")

    @field_validator("alignment")
    @classmethod
    def _positive_slope(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] <= 0:
            raise ValueError(f"alignment slope a must be > 0 (it may not reverse the answers), got {v[0]}")
        return v


class InterventionsConfig(_Strict):
    """A preset schedule, minus removed policy kinds, plus added policies.

    Scenario example (no stay-at-home order): ``interventions: {remove: [stay_at_home, reopening]}``.
    """

    preset: Literal["nyc_2020", "none"] = "nyc_2020"
    remove: list[Literal["school_closure", "stay_at_home", "reopening", "masks", "restriction", "indoor_dining",
                         "zones"]] = Field(default_factory=list)
    add: list[Policy] = Field(default_factory=list)

    def schedule(self) -> InterventionSchedule:
        base = nyc_2020().policies if self.preset == "nyc_2020" else ()
        kept = tuple(p for p in base if p.kind not in self.remove)
        return InterventionSchedule(policies=kept + tuple(self.add))


class OutputsConfig(_Strict):
    plots: bool = True
    parquet: bool = True
    observed: bool = Field(True, description="plot the bundled NYC observations beside the simulation")
    behaviour: bool = Field(True, description="write behaviour.csv: P(yes) as each prompt variable moves, the "
                            "others held (lpm_llm.behaviour.probe; about 64 questions, cached)")


class CalibrationConfig(_Strict):
    """The ``calibration:`` block, used by ``lpm-llm calibrate`` (see :mod:`lpm_llm.calibrate`)."""

    start: dt.date = dt.date(2020, 3, 1)
    end: dt.date = dt.date(2020, 7, 31)
    forecast_weeks: int = Field(4, ge=0, le=26)
    targets: list[Literal["cases", "deaths", "hospitalized"]] = Field(default_factory=lambda: ["cases", "deaths"])
    steps: int = Field(40, ge=1, le=10000)
    lr: float = Field(0.05, gt=0)
    lr_final: float | None = Field(None, gt=0, description="learning rate at the last step (geometric decay)")
    seeds_per_step: int = Field(1, ge=1, le=16)
    baseline_budget: int | None = Field(
        None, ge=1, description="simulations for the gradient-free baseline; default: as long as Adam ran"
    )
    checkpoint_days: int | None = Field(7, ge=1, description="with gradients, run the simulation in checkpointed "
                                        "segments of at most this many days (recomputed in the backward pass; "
                                        "null: keep every activation)")
    serology: bool = Field(
        False, description="add New York City's April 2020 antibody survey (22.7%, Rosenberg et al. 2020) to the "
        "loss on its date (lpm_llm.calibrate.targets.NYC_SEROLOGY_APRIL_2020)")
    parameters: list[str] | None = Field(
        None, description="calibrated parameters (lpm_llm.calibrate.first_wave_space names); default: all"
    )
    smoothness: float = Field(
        0.25, ge=0.0, description="the whole-period fit (model epidemic+vaccination): weight of the penalty on the "
        "month-to-month moves of the log monthly transmission_change (lpm_llm.calibrate.targets.smoothness_penalty)")
    fatality_smoothness: float | None = Field(
        None, ge=0.0, description="the whole-period fit: the same on a fatality_scale by month "
        "(epidemic.fatality_scale a list); null: smoothness")
    loss: Literal["log_mse", "poisson", "negbin"] = Field(
        "log_mse", description="the whole-period fit's loss of weekly counts: log_mse (squared error of logs, floor "
        "one agent), poisson or negbin (deviances in agents; lpm_llm.calibrate.targets.count_loss)")
    dispersion: float = Field(
        10.0, gt=0, description="the whole-period fit with loss negbin: the dispersion k (variance mu + mu^2/k in "
        "agents of the scaled city; k = 10 allows a relative error of about 32%)")
    variant_transmissibility: list[str] = Field(
        default_factory=list, description="the whole-period fit: lineages (Pango names, e.g. B.1.1.7, P.1) whose "
        "relative transmissibility is fitted to the growth of their sequenced shares, within "
        "lpm_llm.models.lineages.TRANSMISSIBILITY_RANGE; empty: the configured values stay")

    @field_validator("variant_transmissibility")
    @classmethod
    def _known_ranges(cls, v: list[str]) -> list[str]:
        from lpm_llm.models.lineages import TRANSMISSIBILITY_RANGE

        unknown = [n for n in v if n not in TRANSMISSIBILITY_RANGE]
        if unknown:
            raise ValueError(f"no transmissibility range for {unknown}; known: {', '.join(TRANSMISSIBILITY_RANGE)}")
        return v

    @field_validator("parameters")
    @classmethod
    def _known_parameters(cls, v: list[str] | None) -> list[str] | None:
        from lpm_llm.calibrate import FIRST_WAVE_PARAMETERS

        if v is not None:
            unknown = [n for n in v if n not in FIRST_WAVE_PARAMETERS]
            if unknown or not v:
                raise ValueError(f"unknown or no calibrated parameter(s) {unknown}; known: "
                                 f"{', '.join(FIRST_WAVE_PARAMETERS)}")
        return v


class ExperimentConfig(_Strict):
    """Everything a run needs; see experiments/covid_nyc.yaml for an annotated example."""

    @field_validator("model")
    @classmethod
    def _known_models(cls, v: str) -> str:
        from lpm_llm.models import model_names

        names = v.split("+")
        unknown = [n for n in names if n not in model_names()]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"unknown or repeated model(s) in {v!r}; registered: {', '.join(model_names())}")
        return v

    @property
    def model_names(self) -> list[str]:
        """The models of ``model``, in order."""
        return self.model.split("+")

    name: str
    description: str = ""
    model: str = Field("epidemic", description="the models, joined by '+' (e.g. epidemic+labor); names from "
                       "lpm_llm.models.model_names()")
    model_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="settings of registered models other than epidemic and labor, by name")
    population: PopulationConfig = Field(default_factory=PopulationConfig)
    archetypes: str = "nyc_age_sex_borough.yaml"
    llm: LLMSettings = Field(default_factory=LLMSettings)
    decisions: dict[str, DecisionConfig] = Field(
        default_factory=lambda: {"isolate": DecisionConfig(prompt="isolation.yaml")}
    )
    epidemic: EpidemicParams = Field(default_factory=EpidemicParams)
    labor: LaborParams = Field(default_factory=LaborParams)
    interventions: InterventionsConfig = Field(default_factory=InterventionsConfig)
    start_date: dt.date = dt.date(2020, 3, 1)
    days: int = Field(122, ge=1, le=3650)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: str = "cpu"
    precision: Literal["float32", "float64"] = Field(
        "float32", description="float type of the simulation, its parameters and gradients (lpm_llm.core.precision); "
        "float64 for checks that must agree beyond float32 rounding, at twice the float columns' memory")
    scenarios: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> overrides of this config (baseline is always run)"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings, description="how a run started on several ranks (--nproc, torchrun) "
        "shares its work; ignored in one process")
    privacy: PrivacySettings = Field(
        default_factory=PrivacySettings, description="lpm-llm calibrate with data holders as ranks: secure sums "
        "of their losses and gradients, optionally with differential privacy")


    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            torch.device(v)
        except RuntimeError:
            raise ValueError(f"{v!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
        return v

    @model_validator(mode="after")
    def _scenario_names(self) -> ExperimentConfig:
        from lpm_llm.models import make_model

        uses = {u.name: (name, u) for name in self.model_names for u in make_model(name, self).decisions}
        for d, (m, use) in uses.items():
            if use.required and (d not in self.decisions or not self.decisions[d].enabled):
                raise ValueError(f"model {m!r} needs a {use.cadence} {d} decision: "
                                 f"decisions: {{{d}: {{prompt: {d}.yaml}}}}")
        unknown = sorted(set(self.decisions) - set(uses))
        if unknown:
            raise ValueError(f"unknown decision(s) {unknown}; the models {self.model!r} consume: "
                             + ", ".join(f"{d} ({m})" for d, (m, _) in uses.items()))
        if "baseline" in self.scenarios:
            raise ValueError("scenario name 'baseline' is reserved for the unmodified config")
        sharded = [name for name in self.model_names if not getattr(make_model(name, self), "area_sharded", False)]
        if self.distributed.shard == "area" and sharded:
            raise ValueError(f"distributed.shard: area runs the epidemic model only; model(s) {sharded} "
                             "need distributed.shard: seed")
        return self


# -- loading ------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[ExperimentConfig, dict[str, ExperimentConfig]]:
    """Read, override and validate an experiment and its scenarios.

    Returns:
        (base config, scenario name -> its full config), every scenario validated up front so a
        typo in the last scenario fails before any work is done.
    """
    if (path is None) == (data is None):
        raise ValueError("give exactly one of a config path or a data mapping")
    source = str(path) if path is not None else "<config>"
    raw = load_yaml(resolve_path(path, "experiments")) if path is not None else dict(data)
    raw = deep_merge(raw, parse_set(list(overrides)))
    base = validate(ExperimentConfig, raw, source)
    scenarios = {}
    for name, override in base.scenarios.items():
        if not isinstance(override, Mapping):
            raise ConfigError(f"{source}: scenarios.{name} must be a mapping of overrides")
        if "scenarios" in override:
            raise ConfigError(f"{source}: scenarios.{name} may not define scenarios of its own")
        merged = deep_merge({k: v for k, v in raw.items() if k != "scenarios"}, override)
        scenarios[name] = validate(ExperimentConfig, merged, f"{source} (scenario {name!r})")
    return base, scenarios


def _device_problem(device: torch.device) -> str:
    """Why ``device`` cannot be used here, or '' if it can."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "this machine has no CUDA device (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), numbered from 0"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    elif device.type not in ("cpu", "cuda", "mps"):
        return "lpm_llm runs on cpu, cuda or mps"
    return ""


# -- results ------------------------------------------------------------------------------------


class Experiment:
    """A validated experiment; :meth:`run` executes every scenario and seed and writes the folder.

    Args:
        config: the base config.
        scenarios: scenario name -> full config (see :func:`load_config`).
        config_path: the YAML file it came from (recorded in the manifest).
        http_client: an ``httpx.AsyncClient`` for the LLM (tests pass one that respx intercepts).
        progress: a factory of progress bars (``tqdm``-like: ``progress(total=, desc=)``), or None.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        scenarios: dict[str, ExperimentConfig] | None = None,
        *,
        config_path: str | Path | None = None,
        http_client: Any = None,
        progress: Callable[..., Any] | None = None,
    ):
        self.config = config
        self.scenarios = scenarios or {}
        self.config_path = Path(config_path) if config_path else None
        self.http_client = http_client
        self.progress = progress

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Experiment:
        base, scenarios = load_config(path, overrides=overrides)
        return cls(base, scenarios, config_path=resolve_path(path, "experiments"), **kwargs)

    def run(self, out_dir: str | Path | None = None, overwrite: bool = False) -> ExperimentResult:
        """Run every scenario and seed into ``out_dir`` (default ``runs/NAME-TIMESTAMP``).

        A non-empty ``out_dir`` is refused unless ``overwrite``, which empties it first (a run
        folder only): files of two runs never mix.
        """
        self.check_devices()
        out = Path(out_dir) if out_dir else Path("runs") / f"{self.config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return run_experiment(self, out, overwrite)

    def calibrate(self, out_dir: str | Path | None = None, overwrite: bool = False):
        self.check_devices()
        out = Path(out_dir) if out_dir else Path("runs") / f"{self.config.name}-calib-{time.strftime('%Y%m%d-%H%M%S')}"
        return calibrate_experiment(self, out, overwrite)

    def check_devices(self) -> None:
        """``ConfigError`` if a configured device (base or scenario) does not exist on this machine."""
        for name, cfg in {"": self.config, **self.scenarios}.items():
            where = f"scenarios.{name}.device" if name else "device"
            problem = _device_problem(torch.device(cfg.device))
            if problem:
                raise ConfigError(f"{where} is {cfg.device!r} but {problem}; use --set {where}=cpu")


__all__ = [
    "CalibrationConfig",
    "ConfigError",
    "DecisionConfig",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "InterventionsConfig",
    "PopulationConfig",
    "load_config",
]
