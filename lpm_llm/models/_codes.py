"""State codes, flag bits and random-draw streams of the epidemic (:mod:`lpm_llm.models.seirm`)."""

from __future__ import annotations

S, E, I, R, M = 0, 1, 2, 3, 4
DYING = 5  # internal code: no longer infectious, will die; reported in R
SYMPTOMATIC, HOSPITALIZED, FATED = 1, 2, 4  # bits of `flags`
ISOLATES = 8  # bit of `flags`: a reported case who isolates (case isolation)
PRIOR = 16  # bit of `flags`: infected before (susceptible again after waning immunity)

# streams of the counter-based draws (lpm_llm.core.rng): each a function of (seed, day, stream, agent id)
THRESHOLD, IMPORT, SYMPTOMATIC_DRAW, HOSPITAL_DRAW, DEATH_DRAW = 0, 1, 2, 3, 4
INFECTIOUS_DAYS, LATENT_DAYS, IMMUNITY_DAYS, REINFECTION, CASE_ISOLATION, LINEAGE = 5, 6, 7, 8, 9, 10
