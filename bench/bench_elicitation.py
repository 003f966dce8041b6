"""Elicitation variants of the embedded model, compared on the sensitivity probe (issue 14).

    python bench/bench_elicitation.py [EXPERIMENT] [--out DIR] [--variants none,cf,fs2,fs2+cf,fs4,fs4+cf]
        [--set llm.provider=openai --set llm.model=... --set llm.base_url=...]

For each variant, ``lpm-llm probe`` of the experiment with ``llm.elicitation`` set accordingly
(answers cached: a rerun asks nothing), then one line per variant: the range of P(isolate) across
the weekly cases levels, the change at the stay-at-home order (schools closed + PAUSE against
schools closed alone), the range across archetypes at the held context, the range across the
age bands, and the least and median yes+no answer mass. Printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _settings(variant: str) -> list[str]:
    out = []
    for part in variant.split("+"):
        if part == "cf":
            out.append("llm.elicitation.calibrate=content_free")
        elif part.startswith("fs"):
            out.append(f"llm.elicitation.few_shot={int(part[2:])}")
        elif part != "none":
            raise SystemExit(f"unknown variant part {part!r}: none, cf, fsN")
    return out


def summarize(report: pd.DataFrame, decision: str = "isolate") -> dict[str, float]:
    r = report[report["decision"] == decision]

    def rng(v: str) -> float:
        p = r[r["variable"] == v]["probability"]
        return float(p.max() - p.min())

    pol = r[r["variable"] == "policies"].set_index("level")["probability"]
    pause = [lv for lv in pol.index if "PAUSE" in lv]
    before = [lv for lv in pol.index if "PAUSE" not in lv and lv != "none"]
    cases = r[r["variable"] == "cases_week"].sort_values("level_index")["probability"].to_numpy()
    return {"cases range": rng("cases_week"), "cases 0 -> 10,000": float(cases[-1] - cases[0]),
            "stay-at-home order": float(pol[pause[0]] - pol[before[-1]]) if pause and before else float("nan"),
            "policies range": rng("policies"), "archetypes range": rng("archetype"), "age range": rng("age_band"),
            "min mass": float(r["answer_mass"].min()), "median mass": float(r["answer_mass"].median())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", nargs="?", default="covid_nyc.yaml")
    ap.add_argument("--out", default="runs/bench_elicitation")
    ap.add_argument("--variants", default="none,cf,fs2,fs2+cf,fs4,fs4+cf")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every variant, e.g. --set llm.provider=openai (repeatable)")
    args = ap.parse_args()
    from lpm_llm.runner.behaviour_run import probe_experiment
    from lpm_llm.runner.experiment import Experiment

    rows = []
    for variant in args.variants.split(","):
        out = Path(args.out) / variant
        exp = Experiment.from_yaml(args.experiment, ["outputs.plots=true", *args.overrides, *_settings(variant)])
        t = time.perf_counter()
        manifest = probe_experiment(exp, out, overwrite=out.exists())
        usage = manifest["llm"]["usage"]
        rows.append({"variant": variant, **summarize(pd.read_csv(out / "behaviour.csv")),
                     "sent": usage["requests"], "wall s": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    cols = list(table.columns)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in table.iterrows():
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")


if __name__ == "__main__":
    main()
