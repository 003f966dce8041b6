"""The simulation core: the loop over models (:mod:`~lpm_llm.core.sim`), decisions and their
broadcast to agents (:mod:`~lpm_llm.core.behavior`), dated policies
(:mod:`~lpm_llm.core.interventions`) and bounded parameters (:mod:`~lpm_llm.core.parameters`)."""
