"""Score stored forecasts like the COVID-19 Forecast Hub: WIS, MAE of the median, 50% and 95% coverage,
per target, horizon and borough, and the relative WIS against two baselines computed here from the
data as known on each forecast date: the Hub's baseline and exponential smoothing (statsmodels ETS
on log counts).

    python bench/bench_forecast.py RUN_DIR [RUN_DIR ...] [--out DIR] [--from DATE] [--to DATE]

RUN_DIR: an ``lpm-llm assimilate`` folder (the forecasts of its finished weeks) or an ``lpm-llm
forecast`` folder (``forecast.csv``). Writes ``scores.csv`` (one row per forecast, method, target, horizon, location),
``summary.csv`` and ``relative_wis_by_date.png`` into --out (default: the first RUN_DIR), and prints
the tables (markdown). ``--from`` / ``--to`` keep the forecast dates in that range (to compare two
streams over the same dates). Relative WIS = mean WIS of the model / mean WIS of the baseline over the
same forecasts (< 1: the model is better).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lpm_llm.data.observed import load_covid
from lpm_llm.forecast.asof import complete_weeks, cutoff_date
from lpm_llm.forecast.baselines import ets_baseline, hub_baseline
from lpm_llm.forecast.hub import HUB_LEVELS, area_of, parse_target, weekly_truth
from lpm_llm.forecast.scoring import coverage, wis

LEVELS = np.array(HUB_LEVELS)


def load_forecasts(run_dirs: list[Path]) -> tuple[pd.DataFrame, dt.date, int]:
    """Every stored quantile forecast, the simulation start and the reporting lag of the runs."""
    frames, start, lag = [], None, 0
    for d in run_dirs:
        if (d / "weeks").is_dir():  # a stream: every finished week (also while it is still running)
            files = [w / "forecast.csv" for w in sorted((d / "weeks").iterdir()) if (w / "done").exists()]
        else:
            files = [d / "forecast.csv"]
        frames += [pd.read_csv(f, dtype={"location": str}) for f in files]
        cfg = json.loads((d / "stream.json").read_text()) if (d / "stream.json").exists() else None
        if cfg:
            start = cfg["config"]["start_date"]
            lag = cfg["settings"].get("reporting_lag_days") or 0
        else:
            js = json.loads((d / "forecast.json").read_text())
            start, lag = js["settings"]["start"], js["settings"]["reporting_lag_days"]
    df = pd.concat(frames, ignore_index=True)
    df = df[df["type"] == "quantile"].copy()
    parsed = df["target"].map(parse_target)
    df["horizon"] = parsed.map(lambda x: x[0])
    df["variable"] = parsed.map(lambda x: x[1])
    return df, dt.date.fromisoformat(str(start)), int(lag)


def baseline_forecasts(model: pd.DataFrame, observed: pd.DataFrame, start: dt.date, lag: int) -> pd.DataFrame:
    """The Hub baseline and ETS for every (forecast date, variable, location) the model forecast,
    from the weekly data known on that date (the same complete-week grid as the model)."""
    variables = sorted(model["variable"].unique())
    truth = weekly_truth(observed, start, variables)
    rows = []
    keys = model[["forecast_date", "variable", "location"]].drop_duplicates()
    horizon = int(model["horizon"].max())
    for fd, var, loc in keys.itertuples(index=False):
        weeks = complete_weeks(start, cutoff_date(fd, lag))
        last_end = (start + dt.timedelta(days=7 * weeks - 1)).isoformat()
        hist = truth[(truth["target"] == var) & (truth["location"] == loc) & (truth["target_end_date"] <= last_end)]
        y = hist.sort_values("target_end_date")["value"].to_numpy()
        ends = [(start + dt.timedelta(days=7 * (weeks + h) - 1)).isoformat() for h in range(1, horizon + 1)]
        for method, fn in (("hub_baseline", hub_baseline), ("ets", ets_baseline)):
            q = fn(y, horizon)
            for h in range(horizon):
                rows.append({"forecast_date": fd, "variable": var, "location": loc, "horizon": h + 1,
                             "target_end_date": ends[h], "method": method, "q": q[h]})
    return pd.DataFrame(rows)


def score(model: pd.DataFrame, baselines: pd.DataFrame, observed: pd.DataFrame, start: dt.date) -> pd.DataFrame:
    """One row per (method, forecast date, variable, horizon, location) with a known outcome."""
    wide = model.pivot_table(index=["forecast_date", "variable", "location", "horizon", "target_end_date"],
                             columns="quantile", values="value").reset_index()
    qcols = [c for c in wide.columns if isinstance(c, float)]
    assert np.allclose(sorted(qcols), LEVELS), qcols
    m = wide[["forecast_date", "variable", "location", "horizon", "target_end_date"]].copy()
    m["method"] = "model"
    m["q"] = list(wide[sorted(qcols)].to_numpy())
    allf = pd.concat([m, baselines], ignore_index=True)
    truth = weekly_truth(observed, start, sorted(model["variable"].unique()))
    truth = truth.rename(columns={"target": "variable", "value": "y"})
    allf = allf.merge(truth, on=["variable", "target_end_date", "location"], how="inner")
    q = np.stack(allf["q"].to_numpy())
    y = allf["y"].to_numpy()
    s = wis(q, LEVELS, y)
    out = allf.drop(columns="q")
    for k, v in s.items():
        out[k] = v
    out["ae_median"] = np.abs(q[:, list(LEVELS).index(0.5)] - y)
    out["cov50"] = coverage(q, LEVELS, y, 0.5).astype(float)
    out["cov95"] = coverage(q, LEVELS, y, 0.95).astype(float)
    out["area"] = out["location"].map(area_of)
    return out


def summary(scores: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = scores.pivot_table(index=by, columns="method", values=["wis", "ae_median", "cov50", "cov95"], aggfunc="mean")
    n = scores[scores["method"] == "model"].groupby(by).size().rename("n")
    t = pd.DataFrame({
        "n": n,
        "WIS model": g[("wis", "model")], "WIS hub": g[("wis", "hub_baseline")], "WIS ets": g[("wis", "ets")],
        "rel. WIS vs hub": g[("wis", "model")] / g[("wis", "hub_baseline")],
        "rel. WIS vs ets": g[("wis", "model")] / g[("wis", "ets")],
        "MAE model": g[("ae_median", "model")], "MAE hub": g[("ae_median", "hub_baseline")],
        "cov50 model": g[("cov50", "model")], "cov95 model": g[("cov95", "model")],
        "cov95 hub": g[("cov95", "hub_baseline")], "cov95 ets": g[("cov95", "ets")],
    })
    return t.reset_index()


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.2f}" if abs(v) < 10 else f"{v:,.0f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_by_date(scores: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    g = scores.pivot_table(index=["forecast_date", "variable"], columns="method", values="wis", aggfunc="mean")
    for (var, base), style in zip([(v, b) for v in sorted(scores["variable"].unique())
                                   for b in ("hub_baseline", "ets")], ["-o", "--s", "-^", "--v", "-d", "--x"],
                                  strict=False):
        r = (g["model"] / g[base]).xs(var, level="variable")
        ax.plot(pd.to_datetime(r.index), r.to_numpy(), style, label=f"{var} vs {base}")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("relative WIS (model / baseline), all horizons and locations")
    ax.set_xlabel("forecast date")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--from", dest="first", help="first forecast date scored (ISO; default: all)")
    p.add_argument("--to", dest="last", help="last forecast date scored (ISO; default: all)")
    args = p.parse_args(argv)
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    model, start, lag = load_forecasts(args.runs)
    dates = model["forecast_date"].astype(str)
    keep = (dates >= (args.first or "")) & (dates <= (args.last or "9999"))
    if not keep.any():
        raise SystemExit(f"no forecast dated {args.first or '...'} .. {args.last or '...'} in {args.runs}")
    model = model[keep].copy()
    observed = load_covid()
    base = baseline_forecasts(model, observed, start, lag)
    scores = score(model, base, observed, start)
    scores.to_csv(out / "scores.csv", index=False)
    by_th = summary(scores, ["variable", "horizon"])
    by_t = summary(scores, ["variable"])
    by_area = summary(scores, ["variable", "area"])
    pd.concat([by_th.assign(table="target x horizon"), by_t.assign(table="target"),
               by_area.assign(table="target x area")]).to_csv(out / "summary.csv", index=False)
    plot_by_date(scores, out / "relative_wis_by_date.png")
    dates = sorted(model["forecast_date"].unique())
    sys.stdout.write(f"{len(dates)} forecast dates {dates[0]} .. {dates[-1]}; "
                     f"{int((scores['method'] == 'model').sum())} scored model forecasts "
                     "(locations: 5 boroughs + NYC)\n\n")
    for title, t in (("by target and horizon", by_th), ("by target", by_t), ("by target and borough", by_area)):
        sys.stdout.write(f"### {title}\n\n{markdown(t)}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
