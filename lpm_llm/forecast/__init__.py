"""Forecasts as of a date, weekly assimilation, and their scoring by the COVID-19 Forecast Hub's rules.

- :mod:`~lpm_llm.forecast.asof`: the data, the incomplete week and the policies as of a date;
- :mod:`~lpm_llm.forecast.engine`: one weekly update: warm-started fit, Laplace parameter
  uncertainty, ensemble, negative binomial reporting noise, Hub quantiles;
- :mod:`~lpm_llm.forecast.assimilate`: the weekly stream, checkpointed and resumable;
- :mod:`~lpm_llm.forecast.hub`: the Hub's 23 levels, target names, long CSV format;
- :mod:`~lpm_llm.forecast.scoring`: WIS (Bracher et al. 2021), its decomposition, coverage;
- :mod:`~lpm_llm.forecast.baselines`: the Hub's baseline and exponential smoothing.
"""

from lpm_llm.forecast.asof import complete_weeks, cutoff_date, observed_as_of, schedule_as_of
from lpm_llm.forecast.assimilate import assimilate
from lpm_llm.forecast.engine import FitState, Forecaster, ForecastResult, ForecastSettings
from lpm_llm.forecast.hub import HUB_LEVELS, check_hub_frame, hub_frame
from lpm_llm.forecast.scoring import coverage, interval_score, wis

__all__ = [
    "HUB_LEVELS", "FitState", "ForecastResult", "ForecastSettings", "Forecaster", "assimilate",
    "check_hub_frame", "complete_weeks", "coverage", "cutoff_date", "hub_frame", "interval_score",
    "observed_as_of", "schedule_as_of", "wis",
]
