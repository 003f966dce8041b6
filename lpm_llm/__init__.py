"""lpm_llm: Large Population Models with LLM-driven archetype behaviour.

The public face is small; everything else lives in modules named in the README's module map.

    from lpm_llm import Experiment
    result = Experiment.from_yaml("experiments/covid_nyc.yaml").run()

or piece by piece: ``synthesize_nyc`` -> ``ArchetypeSpec.assign`` -> ``LLMDecision`` ->
``Simulation(population, [Epidemic(params)], ...).run()``.
"""

from lpm_llm.core.behavior import AlignmentMap, ConstantDecision, DecisionSource, PerArchetype, broadcast
from lpm_llm.core.interventions import InterventionSchedule, nyc_2020
from lpm_llm.core.model import DecisionUse, Model
from lpm_llm.core.sim import Results, Simulation
from lpm_llm.llm import LLMDecision, LLMSettings, open_client
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.models import Epidemic, EpidemicParams, Labor, LaborParams, register_model
from lpm_llm.population import AGE_BANDS, BOROUGHS, RACES, SEXES, Population
from lpm_llm.population.archetypes import Archetypes, ArchetypeSpec
from lpm_llm.population.synthesis import synthesize_nyc
from lpm_llm.runner.experiment import Experiment, ExperimentConfig, load_config

__version__ = "0.1.0"

__all__ = [
    "AGE_BANDS",
    "BOROUGHS",
    "RACES",
    "SEXES",
    "AlignmentMap",
    "ArchetypeSpec",
    "Archetypes",
    "ConstantDecision",
    "DecisionSource",
    "DecisionUse",
    "Epidemic",
    "EpidemicParams",
    "Experiment",
    "ExperimentConfig",
    "InterventionSchedule",
    "LLMDecision",
    "Labor",
    "LaborParams",
    "LLMSettings",
    "Model",
    "PerArchetype",
    "Population",
    "PromptSpec",
    "Results",
    "Simulation",
    "broadcast",
    "load_config",
    "nyc_2020",
    "open_client",
    "register_model",
    "synthesize_nyc",
]
