"""Dynamics models: the SEIRM epidemic (``epidemic``) and the labour market (``labor``)."""

from lpm_llm.models.epidemic import STATES, EpidemicModel, EpidemicParams, EpidemicState, StepInputs

__all__ = ["STATES", "EpidemicModel", "EpidemicParams", "EpidemicState", "StepInputs"]
