"""The runner script: ``python experiments/run.py EXPERIMENT.yaml [--out DIR] [--set k=v ...] [--quiet]``.

The same as ``lpm-llm run``; ``python experiments/run.py calibrate EXPERIMENT.yaml`` calibrates.
"""

import sys

from lpm_llm.runner.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("run", "calibrate", "list", "-h", "--help"):
        argv = ["run", *argv]
    sys.exit(main(argv))
