"""Bundled New York City data (``nyc/``, sources in its README) and loaders of the observed series
(:mod:`~lpm_llm.data.observed`)."""
