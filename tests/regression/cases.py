"""The regression runs: every bundled experiment on a small city, its LLM a mocked endpoint whose
answer is a fixed function of the prompt text (so a change in the prompts, the decision context, the
draws or the dynamics changes the numbers).

``tests/test_regression.py`` compares these runs with the stored baseline in ``tests/regression/``;
``python tests/regression/update_baseline.py`` rewrites the baseline on purpose (say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pandas as pd
import respx

from lpm_llm.runner.experiment import Experiment
from tests.conftest import logprob_completion

BASELINE = Path(__file__).resolve().parent
ENDPOINT = "http://127.0.0.1:9/v1"  # never contacted: respx answers
KEY_ENV = "LPM_REGRESSION_KEY"

#: experiment -> overrides that make it small: a 1:500 city (1:1000 for 2020-2021), fewer days, no plots, the
#: mocked LLM.
CASES: dict[str, list[str]] = {
    "covid_nyc": ["population.scale=0.002", "days=63"],
    "covid_nyc_scenarios": ["population.scale=0.002", "days=42", "seeds=[0,1]"],
    "covid_labor_nyc": ["population.scale=0.002", "days=92"],
    "labor_nyc": ["population.scale=0.002"],
    "covid_vaccination_nyc": ["population.scale=0.002", "days=42"],
    # 1:1000, 2020-10-01 .. 2021-05-31 (seeded on the first day): waning and reinfection, importation, vaccination
    # asked weekly from 2020-12-06, and all four variants (Delta from 2021-04-15); its lineage shares are compared too
    "covid_nyc_2021": ["population.scale=0.001", "start_date=2020-10-01", "days=243"],
}
#: experiment -> tables read back from the run folder (CSV) besides the result's
FILES: dict[str, tuple[str, ...]] = {"covid_nyc_2021": ("lineages",)}


def _answer(request: httpx.Request) -> httpx.Response:
    """P(yes) in [0.05, 0.95], a fixed function of the whole prompt."""
    body = json.loads(request.content)
    text = "\n".join(m["content"] for m in body["messages"])
    p = 0.05 + 0.9 * int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return logprob_completion(body["model"], p)


def run_case(name: str, out_dir: Path) -> dict[str, pd.DataFrame]:
    """Run one bundled experiment small; returns its tables: ``metrics``, ``decisions`` (the answers)
    and, if any, ``labor``."""
    overrides = [*CASES[name], "outputs.plots=false", "llm.provider=openai", "llm.model=mock",
                 f"llm.base_url={ENDPOINT}", f"llm.api_key_env={KEY_ENV}", 'llm.cache_mode="off"',
                 "llm.max_retries=0"]
    with respx.mock(assert_all_mocked=True) as mock:
        mock.post(f"{ENDPOINT}/chat/completions").mock(side_effect=_answer)
        result = Experiment.from_yaml(f"{name}.yaml", overrides).run(out_dir)
    decisions = result.decisions[["scenario", "seed", "decision", "date", "archetype", "probability"]]
    tables = {"metrics": result.metrics, "decisions": decisions}
    if result.labor is not None:
        tables["labor"] = result.labor
    for table in FILES.get(name, ()):
        tables[table] = pd.read_csv(out_dir / f"{table}.csv")
    return {k: v.reset_index(drop=True) for k, v in tables.items()}


def baseline_path(name: str, table: str) -> Path:
    return BASELINE / f"{name}.{table}.parquet"
