"""Scores of quantile forecasts: the weighted interval score (WIS), its decomposition, coverage.

WIS follows Bracher, Ray, Gneiting and Reich (2021), "Evaluating epidemic forecasts in an interval
format", PLoS Comput Biol 17(2): e1008618. For a median m and K central prediction intervals
[l_k, u_k] at levels 1 - alpha_k,

    IS_alpha(l, u; y) = (u - l) + (2 / alpha) (l - y) 1{y < l} + (2 / alpha) (y - u) 1{y > u}
    WIS(y) = 1 / (K + 1/2) * ( 1/2 |y - m| + sum_k alpha_k / 2 * IS_alpha_k(l_k, u_k; y) )

With the Hub's 23 levels, K = 11 (alpha = 0.02, 0.05, 0.1, 0.2, ..., 0.9). WIS is also
``1 / (K + 1/2)`` times the sum of the pinball losses of the 2K + 1 quantiles (:func:`wis_pinball`),
which the tests use as an independent check. With the median alone (K = 0) WIS is |y - m|.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["coverage", "interval_score", "pinball", "wis", "wis_pinball"]


def interval_score(lower, upper, y, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IS_alpha split into (dispersion u - l, overprediction (2/alpha)(l - y)+, underprediction
    (2/alpha)(y - u)+); their sum is the interval score."""
    lower, upper, y = (np.asarray(a, dtype=float) for a in (lower, upper, y))
    disp = upper - lower
    over = 2.0 / alpha * np.clip(lower - y, 0, None)
    under = 2.0 / alpha * np.clip(y - upper, 0, None)
    return disp, over, under


def _pairs(levels: Sequence[float]) -> tuple[int | None, list[tuple[int, int, float]]]:
    """Index of the median and (lower index, upper index, alpha) of every central interval."""
    lv = np.round(np.asarray(levels, dtype=float), 6)
    med = np.flatnonzero(lv == 0.5)
    pairs = []
    for i, a in enumerate(lv):
        if a < 0.5:
            j = np.flatnonzero(np.isclose(lv, 1 - a))
            if len(j) != 1:
                raise ValueError(f"level {a} has no symmetric partner {1 - a} among {list(lv)}")
            pairs.append((i, int(j[0]), float(2 * a)))
    return (int(med[0]) if len(med) else None), pairs


def wis(quantiles, levels: Sequence[float], y) -> dict[str, np.ndarray]:
    """WIS of quantile forecasts and its decomposition.

    Args:
        quantiles: (..., Q) predictive quantiles at `levels` (the last axis).
        levels: (Q,) levels: the median 0.5 (if present) and symmetric pairs (alpha/2, 1 - alpha/2).
        y: (...) observations.

    Returns:
        ``wis``, ``dispersion``, ``overprediction``, ``underprediction`` (... shaped; the last three
        sum to ``wis``, the median's absolute error counted half in over-, half in under-prediction
        as in scoringutils).
    """
    q = np.asarray(quantiles, dtype=float)
    y = np.asarray(y, dtype=float)
    med, pairs = _pairs(levels)
    k = len(pairs)
    disp = np.zeros(y.shape)
    over = np.zeros(y.shape)
    under = np.zeros(y.shape)
    for lo, hi, alpha in pairs:
        d, o, u = interval_score(q[..., lo], q[..., hi], y, alpha)
        disp, over, under = disp + alpha / 2 * d, over + alpha / 2 * o, under + alpha / 2 * u
    w0 = 0.0
    if med is not None:
        m = q[..., med]
        over = over + 0.5 * np.clip(m - y, 0, None)
        under = under + 0.5 * np.clip(y - m, 0, None)
        w0 = 0.5
    norm = k + w0
    if norm == 0:
        raise ValueError("no median and no interval: nothing to score")
    out = {"dispersion": disp / norm, "overprediction": over / norm, "underprediction": under / norm}
    out["wis"] = out["dispersion"] + out["overprediction"] + out["underprediction"]
    return out


def pinball(q, tau: float, y) -> np.ndarray:
    """Quantile (pinball) loss ``(1{y <= q} - tau) (q - y)``."""
    q, y = np.asarray(q, dtype=float), np.asarray(y, dtype=float)
    return ((y <= q).astype(float) - tau) * (q - y)


def wis_pinball(quantiles, levels: Sequence[float], y) -> np.ndarray:
    """WIS computed as ``1 / (K + 1/2)`` times the summed pinball losses of all quantiles (needs the
    median and symmetric pairs); equals :func:`wis`'s ``wis``."""
    q = np.asarray(quantiles, dtype=float)
    total = sum(pinball(q[..., i], float(t), y) for i, t in enumerate(levels))
    k = (len(levels) - 1) / 2
    return total / (k + 0.5)


def coverage(quantiles, levels: Sequence[float], y, interval: float) -> np.ndarray:
    """Whether `y` lies in the central `interval` (0.5, 0.95, ...) prediction interval, ends included."""
    q = np.asarray(quantiles, dtype=float)
    lv = np.round(np.asarray(levels, dtype=float), 6)
    a = (1 - interval) / 2
    lo = int(np.flatnonzero(np.isclose(lv, a))[0])
    hi = int(np.flatnonzero(np.isclose(lv, 1 - a))[0])
    y = np.asarray(y, dtype=float)
    return (q[..., lo] <= y) & (y <= q[..., hi])
