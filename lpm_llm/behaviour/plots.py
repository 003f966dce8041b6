"""PNG plots of the behaviour reports: the probe's sensitivity panels and fidelity against cost."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_probe(report: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """One panel per variable of one decision: P(yes) (dots and line) and the answer's yes+no mass
    (grey, dashed) at each level; the held level is ringed. Archetypes are sorted by P(yes)."""
    variables = list(dict.fromkeys(report["variable"]))
    ncols = 3
    nrows = int(np.ceil(len(variables) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, v in zip(axes.flat, variables, strict=False):
        d = report[report["variable"] == v].sort_values("level_index")
        if v == "archetype":
            d = d.sort_values("probability")
        x = np.arange(len(d))
        ax.plot(x, d["probability"], "o-", color="tab:blue", label="P(yes)")
        if d["answer_mass"].notna().any():
            ax.plot(x, d["answer_mass"].astype(float), "s--", color="grey", alpha=0.7, ms=3, label="yes+no mass")
        held = d["held"].to_numpy(dtype=bool)
        ax.plot(x[held], d["probability"].to_numpy()[held], "o", ms=11, mfc="none", color="tab:red")
        ax.set_ylim(0, 1)
        ax.set_title(f"{v} (range {d['probability'].max() - d['probability'].min():.3f})", fontsize=9)
        if v == "archetype" or len(d) > 10:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(d)} {'archetypes, sorted' if v == 'archetype' else 'levels'}", fontsize=8)
        else:
            ax.set_xticks(x)
            ax.set_xticklabels([textwrap.fill(textwrap.shorten(str(t), 60, placeholder="..."), 20)
                                for t in d["label"]], fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(variables):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "P(yes) as one variable moves, the others held (red ring: held level)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fidelity(table: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Fidelity (R^2 of individual answers explained by archetypes; mean absolute difference)
    against the LLM requests per run, one point per archetype set."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in ((a1, "r2", "share of individual variance explained (R^2)"),
                           (a2, "mad", "mean |P(individual) - P(archetype)|")):
        ax.plot(table["requests_per_run"], table[col], "o")
        for _, r in table.iterrows():
            ax.annotate(r["set"], (r["requests_per_run"], r[col]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("LLM requests per run (K x decision steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Archetype fidelity against LLM cost")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
