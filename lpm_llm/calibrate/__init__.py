"""Calibration: fit the models' declared parameters to observed series by gradient descent through
the simulation, against a gradient-free baseline; observed targets, the loss and forecast scores.

- :mod:`~lpm_llm.calibrate.fit`: the optimiser loop, frozen decisions, the first-wave fit;
- :mod:`~lpm_llm.calibrate.targets`: weekly targets, the log-scale loss, forecast scores.
"""

from lpm_llm.calibrate.fit import (
    FIRST_WAVE_PARAMETERS,
    NYC_POPULATION,
    CalibrationReport,
    Calibrator,
    FrozenDecisions,
    SimulationObjective,
    calibrate_first_wave,
    first_wave_space,
)
from lpm_llm.calibrate.targets import log_mse
from lpm_llm.core.parameters import Bounded, ParameterSpace

__all__ = [
    "FIRST_WAVE_PARAMETERS",
    "NYC_POPULATION",
    "Bounded",
    "CalibrationReport",
    "Calibrator",
    "FrozenDecisions",
    "ParameterSpace",
    "SimulationObjective",
    "calibrate_first_wave",
    "first_wave_space",
    "log_mse",
]
