"""The agents: a table of tensor columns, the synthetic New York that fills it, the archetypes that
group its rows for the LLM, and the industries of its workers.

- :mod:`~lpm_llm.population.table`: :class:`Population` (named 1-D tensor columns with codebooks);
- :mod:`~lpm_llm.population.synthesis`: :func:`synthesize_nyc` (IPF joint table, households,
  classrooms, workplaces);
- :mod:`~lpm_llm.population.archetypes`: :class:`ArchetypeSpec` -> :class:`Archetypes`;
- :mod:`~lpm_llm.population.industry`: industry groups of working-age agents.
"""

from lpm_llm.population.table import (
    AGE_BANDS,
    BOROUGHS,
    RACES,
    SEXES,
    Population,
    smallest_int_dtype,
)

__all__ = ["AGE_BANDS", "BOROUGHS", "RACES", "SEXES", "Population", "smallest_int_dtype"]
