"""The experiment runner: validated YAML configs (:mod:`~lpm_llm.runner.experiment`,
:mod:`~lpm_llm.runner.config`), running and calibrating an experiment (:mod:`~lpm_llm.runner.run`),
the run folder and manifest (:mod:`~lpm_llm.runner.outputs`), plots and the ``lpm-llm`` command."""
