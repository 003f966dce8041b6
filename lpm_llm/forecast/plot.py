"""Fan charts of a forecast against what was known on its date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lpm_llm.forecast.hub import LOCATION_OF, TARGET_NAME

__all__ = ["plot_fan"]

_BANDS = ((0.025, 0.975, 0.15), (0.1, 0.9, 0.25), (0.25, 0.75, 0.4))


def plot_fan(result: Any, target: str, path: str | Path) -> Path:
    """One panel per area: observed weeks up to the as-of date (dots), the fitted ensemble median
    (line), and the forecast's median with its 50%, 80% and 95% intervals (bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fc = result.forecast
    fc = fc[fc["target"].str.endswith(TARGET_NAME[target]) & (fc["type"] == "quantile")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, (area, loc) in zip(axes.ravel(), LOCATION_OF.items(), strict=True):
        kn = result.known[(result.known["target"] == target) & (result.known["location"] == loc)]
        fi = result.fitted[(result.fitted["target"] == target) & (result.fitted["location"] == loc)]
        ax.plot(pd.to_datetime(kn["target_end_date"]), kn["value"], "o", ms=3, color="k", label="known on the date")
        ax.plot(pd.to_datetime(fi["target_end_date"]), fi["value"], "-", color="tab:blue", lw=1, label="fitted")
        f = fc[fc["location"] == loc].pivot(index="target_end_date", columns="quantile", values="value")
        f.index = pd.to_datetime(f.index)
        for lo, hi, alpha in _BANDS:
            ax.fill_between(f.index, f[lo], f[hi], color="tab:orange", alpha=alpha, lw=0)
        ax.plot(f.index, f[0.5], "-", color="tab:orange", label="forecast median, 50/80/95%")
        ax.axvline(pd.Timestamp(result.as_of), color="grey", ls=":", lw=1)
        ax.set_title(area)
        ax.tick_params(axis="x", rotation=30)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Weekly {target}: forecast as of {result.as_of} (data after it unseen)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
