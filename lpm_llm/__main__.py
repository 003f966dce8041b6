"""``python -m lpm_llm``: the ``lpm-llm`` command."""

import sys

from lpm_llm.runner.cli import main

sys.exit(main())
