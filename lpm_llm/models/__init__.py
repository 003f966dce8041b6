"""Domain models, each a :class:`~lpm_llm.core.model.Model`: the SEIRM epidemic (``epidemic``), the
labour market (``labor``) and COVID-19 vaccination (``vaccination``); the registry that lets an
experiment name them (``model: epidemic+labor``).

A new model is one module with a class implementing the protocol, registered with
:func:`register_model` (``tests/test_toy_model.py`` does this from outside the library).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lpm_llm.models.epidemic import STATES, Epidemic, EpidemicInputs, EpidemicModel, EpidemicParams, EpidemicState
from lpm_llm.models.labor import Labor, LaborModel, LaborParams
from lpm_llm.models.vaccination import Vaccination, VaccinationParams

__all__ = [
    "STATES",
    "Epidemic",
    "EpidemicInputs",
    "EpidemicModel",
    "EpidemicParams",
    "EpidemicState",
    "Labor",
    "LaborModel",
    "LaborParams",
    "Vaccination",
    "VaccinationParams",
    "make_model",
    "model_names",
    "register_model",
]

_REGISTRY: dict[str, Callable[[Any], Any]] = {
    "epidemic": lambda cfg: Epidemic(cfg.epidemic),
    "labor": lambda cfg: Labor(cfg.labor),
    "vaccination": lambda cfg: Vaccination(cfg.model_params.get("vaccination")),
}


def register_model(name: str, factory: Callable[[Any], Any]) -> None:
    """Make `name` usable in an experiment's ``model:``; ``factory(config)`` builds the model from
    the validated :class:`~lpm_llm.runner.experiment.ExperimentConfig` (its own settings can live in
    the config's ``model_params[name]``)."""
    if not name or "+" in name:
        raise ValueError(f"a model name must be non-empty and without '+', got {name!r}")
    _REGISTRY[name] = factory


def model_names() -> tuple[str, ...]:
    """The registered model names."""
    return tuple(_REGISTRY)


def make_model(name: str, config: Any) -> Any:
    """The model `name` built from an experiment config."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](config)
