"""Rewrite the regression baseline (``tests/regression/*.parquet``) from the current code.

    python tests/regression/update_baseline.py            # every case
    python tests/regression/update_baseline.py labor_nyc  # one case

Only on purpose: when a change is meant to alter the numbers (a new generator, a fixed bug), say
which and why in the commit that updates the baseline.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.regression.cases import CASES, KEY_ENV, baseline_path, run_case  # noqa: E402


def main(names: list[str]) -> None:
    os.environ.setdefault(KEY_ENV, "sk-regression-not-a-secret")
    for name in names or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            tables = run_case(name, Path(tmp) / name)
        for table, frame in tables.items():
            path = baseline_path(name, table)
            frame.to_parquet(path, index=False)
            print(f"wrote {path} ({len(frame)} rows)")


if __name__ == "__main__":
    main(sys.argv[1:])
