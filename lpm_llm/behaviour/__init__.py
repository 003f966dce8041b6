"""Is the behaviour any good? Reports on an experiment's LLM decisions.

=========  ======================================================================================
module     responsibility
=========  ======================================================================================
context    levels of the prompts' context variables (probe), observed values on a date (fidelity)
probe      the sensitivity report: P(yes) as one prompt variable moves, the others held
fidelity   how well archetypes stand in for individuals: the same question with each agent's own
           attributes, compared with their archetype's answer
plots      the probe's panels and fidelity against LLM cost
=========  ======================================================================================
"""

from lpm_llm.behaviour.probe import probe, probe_decisions, spread, typical_profile

__all__ = ["probe", "probe_decisions", "spread", "typical_profile"]
