"""lpm_llm: Large Population Models with LLM-driven archetype behaviour.

The public face is small; everything else lives in modules named in the README's module map.
"""

from lpm_llm.behavior import AlignmentMap, ConstantDecision, DecisionSource, PerArchetype, broadcast
from lpm_llm.population import AGE_BANDS, BOROUGHS, RACES, SEXES, Population

__version__ = "0.1.0"

__all__ = [
    "AGE_BANDS",
    "BOROUGHS",
    "RACES",
    "SEXES",
    "AlignmentMap",
    "ConstantDecision",
    "DecisionSource",
    "PerArchetype",
    "Population",
    "broadcast",
]
