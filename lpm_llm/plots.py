"""PNG plots written by the runner: epidemic curves vs observed data, decision heatmaps, scenarios.

Every function takes tidy DataFrames and a path, draws with matplotlib's Agg backend (no screen
needed) and returns the path written.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_AREA_ORDER = ("NYC", "Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")


def _areas(df: pd.DataFrame) -> list[str]:
    present = set(df["area"])
    return [a for a in _AREA_ORDER if a in present] + sorted(present - set(_AREA_ORDER))


def _grid(n_panels: int, ncols: int = 3):
    """A figure with one panel per area, three to a row, sharing the date axis."""
    nrows = int(np.ceil(n_panels / ncols))
    return plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False, sharex=True)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG and release the figure."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_grid(fig, axes, n_used: int, title: str, path: str | Path) -> Path:
    for ax in list(axes.flat)[n_used:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _weekly(df: pd.DataFrame, column: str, start: pd.Timestamp) -> pd.DataFrame:
    """Sum a daily series (date, area, column[, seed]) into complete 7-day weeks counted from `start`.

    The week is labelled by its first day; incomplete weeks (at either end) are dropped.
    """
    keys = ["area"] + (["seed"] if "seed" in df.columns else [])
    d = df[df["date"] >= start].assign(_week=lambda x: (x["date"] - start).dt.days // 7)
    g = d.groupby([*keys, "_week"])
    out = g[column].sum().reset_index().merge(g["date"].nunique().rename("_days").reset_index())
    out = out[out["_days"] == 7]
    out["date"] = start + pd.to_timedelta(out["_week"] * 7, unit="D")
    return out.drop(columns=["_week", "_days"])


def plot_epidemic(
    simulated: pd.DataFrame,
    observed: pd.DataFrame | None,
    path: str | Path,
    *,
    sim_column: str = "reported_cases",
    obs_column: str = "cases",
    title: str = "Weekly reported cases",
    forecast_from: str | None = None,
) -> Path:
    """One panel per area: simulated weekly series (mean and 5-95% band over seeds) against observed.

    Args:
        simulated: daily rows with date, area, ``sim_column`` and optionally ``seed``.
        observed: daily rows with date, area, ``obs_column`` (or None).
        forecast_from: date after which the simulation is a forecast (a dashed line marks it).
    """
    start = pd.Timestamp(simulated["date"].min())
    sim_w = _weekly(simulated, sim_column, start)
    areas = _areas(simulated)
    fig, axes = _grid(len(areas))
    for ax, area in zip(axes.flat, areas, strict=False):
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%b %d"))
        s = sim_w[sim_w["area"] == area]
        if "seed" in s.columns and s["seed"].nunique() > 1:
            g = s.groupby("date")[sim_column]
            mean, lo, hi = g.mean(), g.quantile(0.05), g.quantile(0.95)
            ax.fill_between(mean.index, lo.values, hi.values, alpha=0.25, color="C0", label="simulated 5-95%")
        else:
            mean = s.groupby("date")[sim_column].mean()
        ax.plot(mean.index, mean.values, color="C0", label="simulated")
        if observed is not None and len(observed):
            o = _weekly(observed[observed["area"] == area], obs_column, start)
            lo_d, hi_d = mean.index.min(), mean.index.max()
            o = o[(o["date"] >= lo_d) & (o["date"] <= hi_d)]
            ax.plot(o["date"], o[obs_column], "o", ms=3, color="k", label="observed")
        if forecast_from is not None:
            ax.axvline(pd.Timestamp(forecast_from), ls="--", color="gray", lw=1)
        ax.set_title(area)
        ax.tick_params(axis="x", labelrotation=30)
    return _save_grid(fig, axes, len(areas), title, path)


def plot_decision_heatmap(decisions: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmap of the decision probability by archetype (rows) and decision date (columns).

    Args:
        decisions: rows with date, archetype, description, probability (one decision kind).
    """
    table = decisions.pivot_table(index="archetype", columns="date", values="probability", aggfunc="mean")
    labels = decisions.drop_duplicates("archetype").set_index("archetype")["description"].reindex(table.index)
    fig_h = max(3.0, min(0.16 * len(table) + 1.5, 24.0))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * table.shape[1] + 4), fig_h))
    im = ax.imshow(table.to_numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels([str(pd.Timestamp(c).date()) for c in table.columns], rotation=60, fontsize=7)
    step = max(1, len(table) // 60)
    ax.set_yticks(range(0, len(table), step))
    ax.set_yticklabels([str(x)[:40] for x in labels.to_numpy()[::step]], fontsize=6)
    fig.colorbar(im, ax=ax, label="probability")
    ax.set_title(title or "Decision probability by archetype")
    return _save(fig, path)


def plot_scenarios(
    series: dict[str, pd.DataFrame], path: str | Path, *, column: str = "reported_cases", title: str | None = None
) -> Path:
    """City-wide weekly series of several scenarios on one plot (mean and 5-95% band over seeds).

    Args:
        series: scenario name -> daily rows with date, area, ``column`` and optionally seed.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, df) in enumerate(series.items()):
        city = df[df["area"] == "NYC"] if "NYC" in set(df["area"]) else df
        w = _weekly(city.assign(area="NYC"), column, pd.Timestamp(city["date"].min()))
        g = w.groupby("date")[column]
        mean = g.mean()
        if "seed" in w.columns and w["seed"].nunique() > 1:
            ax.fill_between(mean.index, g.quantile(0.05).values, g.quantile(0.95).values, alpha=0.2, color=f"C{i}")
        ax.plot(mean.index, mean.values, color=f"C{i}", label=name)
    ax.set_ylabel(f"weekly {column.replace('_', ' ')}")
    ax.set_title(title or "Scenario comparison, New York City")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path)


def plot_monthly(
    simulated: pd.DataFrame, observed: pd.DataFrame | None, path: str | Path, *, column: str = "unemployment_rate",
    title: str = "Unemployment rate (%)", forecast_from: str | None = None,
) -> Path:
    """One panel per area: a simulated monthly series (mean and band over seeds) against observed."""
    areas = _areas(simulated)
    fig, axes = _grid(len(areas))
    for ax, area in zip(axes.flat, areas, strict=False):
        s = simulated[simulated["area"] == area]
        g = s.groupby("date")[column]
        mean = g.mean()
        if "seed" in s.columns and s["seed"].nunique() > 1:
            ax.fill_between(mean.index, g.quantile(0.05).values, g.quantile(0.95).values, alpha=0.25, color="C0")
        ax.plot(mean.index, mean.values, color="C0", label="simulated")
        if observed is not None:
            o = observed[(observed["area"] == area) & (observed["date"] >= mean.index.min())
                         & (observed["date"] <= mean.index.max())]
            ax.plot(o["date"], o[column], "o-", ms=3, color="k", lw=0.8, label="observed")
        if forecast_from is not None:
            ax.axvline(pd.Timestamp(forecast_from), ls="--", color="gray", lw=1)
        ax.set_title(area)
        ax.tick_params(axis="x", labelrotation=30)
    return _save_grid(fig, axes, len(areas), title, path)


def plot_loss_curves(history: dict[str, dict[str, list[float]]], path: str | Path, *, title: str | None = None) -> Path:
    """Calibration loss against fitting time, one colour per method: the loss each step or
    evaluation saw (thin) and the loss on common evaluation seeds of the fit as it stood (markers).

    Args:
        history: method -> ``wall_time`` and ``loss`` lists, optionally ``eval_wall_time`` and
            ``eval_loss`` (see :class:`lpm_llm.calibrate.CalibrationReport`).
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (method, h) in enumerate(history.items()):
        ax.plot(h["wall_time"], h["loss"], color=f"C{i}", alpha=0.35, lw=1, label=f"{method}: loss seen by the fit")
        if h.get("eval_loss"):
            label = f"{method}: loss on evaluation seeds"
            ax.plot(h["eval_wall_time"], h["eval_loss"], "o-", color=f"C{i}", label=label)
    ax.set_xlabel("fitting time (s)")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=0.01)  # the noise-corrected loss of a few runs can dip below 0
    ax.set_title(title or "Calibration loss against wall time")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_coverage(simulated: pd.DataFrame, observed: pd.DataFrame | None, path: str | Path, *,
                  title: str = "People with at least one vaccine dose (% of residents)") -> Path:
    """One panel per area: simulated coverage (mean and 5-95% band over ``seed``) against observed.

    Args:
        simulated: daily rows with date, area, ``vaccinated_1`` and ``population`` (agents), and
            optionally ``seed`` (any grouping of runs: seeds, or ensemble members x seeds).
        observed: rows with date, area, ``percent`` (or None).
    """
    sim = simulated.assign(percent=100.0 * simulated["vaccinated_1"] / simulated["population"].clip(lower=1))
    areas = _areas(sim)
    fig, axes = _grid(len(areas))
    for ax, area in zip(axes.flat, areas, strict=False):
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%b %d"))
        s = sim[(sim["area"] == area) & (sim["date"] >= pd.Timestamp("2020-12-01"))]
        g = s.groupby("date")["percent"]
        mean = g.mean()
        if "seed" in s.columns and s["seed"].nunique() > 1:
            ax.fill_between(mean.index, g.quantile(0.05).values, g.quantile(0.95).values, alpha=0.25, color="C2",
                            label="simulated 5-95%")
        ax.plot(mean.index, mean.values, color="C2", label="simulated")
        if observed is not None and len(observed):
            o = observed[observed["area"] == area]
            ax.plot(o["date"], o["percent"], color="k", lw=1, label="observed")
        ax.set_title(area)
        ax.tick_params(axis="x", labelrotation=30)
    return _save_grid(fig, axes, len(areas), title, path)


def plot_lineages(shares: pd.DataFrame, path: str | Path, *,
                  title: str = "Lineage shares of symptomatic infections per 4-week period (%)") -> Path:
    """One panel per lineage group: simulated share (mean and 5-95% band over ``seed``) against NYC's
    sequenced share, per 4-week period.

    Args:
        shares: rows as :func:`lpm_llm.models.lineages.compare_lineage_shares` (``period_start``,
            ``variant``, ``simulated_percent``, ``observed_percent``), optionally with ``seed``.
    """
    variants = list(dict.fromkeys(shares["variant"]))
    fig, axes = _grid(len(variants))
    for ax, v in zip(axes.flat, variants, strict=False):
        s = shares[shares["variant"] == v].assign(period=lambda x: pd.to_datetime(x["period_start"]))
        g = s.groupby("period")["simulated_percent"]
        mean = g.mean()
        if "seed" in s.columns and s["seed"].nunique() > 1:
            ax.fill_between(mean.index, g.quantile(0.05).values, g.quantile(0.95).values, alpha=0.25, color="C1",
                            label="simulated 5-95%")
        ax.plot(mean.index, mean.values, "-", color="C1", label="simulated")
        obs = s.groupby("period")["observed_percent"].first()
        ax.plot(obs.index, obs.values, "o", ms=4, color="k", label="sequenced (NYC)")
        ax.set_ylim(0, 100)
        ax.set_title(v)
        ax.tick_params(axis="x", labelrotation=30)
    return _save_grid(fig, axes, len(variants), title, path)


def observed_coverage(areas_population: pd.Series) -> pd.DataFrame:
    """NYC's observed coverage by borough and city-wide: date, area, percent (people with >= 1 dose
    over `areas_population`, residents per area)."""
    from lpm_llm.data.vaccination import load_vaccination

    t = load_vaccination()
    t = t[(t["dimension"] == "borough") & t["group"].isin(areas_population.index)]
    return pd.DataFrame({"date": t["date"], "area": t["group"],
                         "percent": 100.0 * t["people_1plus"] / t["group"].map(areas_population).to_numpy()})
