"""WIS, the Hub format and the two baselines against hand-computed and known answers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from lpm_llm.forecast.baselines import ets_baseline, hub_baseline
from lpm_llm.forecast.hub import HUB_LEVELS, check_hub_frame, hub_frame, parse_target, weekly_truth
from lpm_llm.forecast.scoring import coverage, interval_score, wis, wis_pinball

LEVELS5 = (0.1, 0.25, 0.5, 0.75, 0.9)
Q5 = (4.0, 6.0, 8.0, 12.0, 15.0)


def test_wis_equals_the_definition_on_hand_computed_examples():
    # y = 10 inside both intervals: (1/2 |10 - 8| + 0.25 * 6 + 0.1 * 11) / 2.5 = 3.6 / 2.5
    assert wis(Q5, LEVELS5, 10.0)["wis"] == pytest.approx(1.44, abs=1e-12)
    # y = 20 above both: median 6, 50%: 0.25 * (6 + 4 * 8) = 9.5, 80%: 0.1 * (11 + 10 * 5) = 6.1
    s = wis(Q5, LEVELS5, 20.0)
    assert s["wis"] == pytest.approx(21.6 / 2.5, abs=1e-12)
    assert s["dispersion"] == pytest.approx((1.5 + 1.1) / 2.5, abs=1e-12)
    assert s["underprediction"] == pytest.approx((6 + 8 + 5) / 2.5, abs=1e-12)
    assert s["overprediction"] == 0.0
    # y = 1 below both: median 3.5, 50%: 0.25 * (6 + 4 * 5) = 6.5, 80%: 0.1 * (11 + 10 * 3) = 4.1
    assert wis(Q5, LEVELS5, 1.0)["overprediction"] == pytest.approx((3.5 + 6.5 + 4.1 - 1.5 - 1.1) / 2.5)
    # the median alone: the absolute error
    for y in (0.0, 3.0, 8.0, 11.5):
        assert wis([8.0], (0.5,), y)["wis"] == pytest.approx(abs(y - 8.0))


def test_interval_score_terms():
    d, o, u = interval_score(2.0, 5.0, 7.0, 0.1)
    assert (float(d), float(o), float(u)) == (3.0, 0.0, pytest.approx(40.0))
    d, o, u = interval_score(2.0, 5.0, 1.0, 0.5)
    assert (float(d), float(o), float(u)) == (3.0, 4.0, 0.0)


def test_wis_equals_its_pinball_form_and_approaches_the_crps():
    rng = np.random.default_rng(0)
    q = np.sort(rng.gamma(2.0, 50.0, size=(200, 23)), axis=1)
    y = rng.gamma(2.0, 50.0, size=200)
    np.testing.assert_allclose(wis(q, HUB_LEVELS, y)["wis"], wis_pinball(q, HUB_LEVELS, y), rtol=1e-12)
    # many equally spaced levels: WIS -> CRPS (here of a normal, against properscoring's closed form)
    ps = pytest.importorskip("properscoring")
    levels = np.arange(1, 400) / 400
    from scipy.stats import norm

    for y0 in (-1.3, 0.2, 2.5):
        ours = wis(norm.ppf(levels, 0.0, 1.5), levels, y0)["wis"]
        assert ours == pytest.approx(ps.crps_gaussian(y0, 0.0, 1.5), rel=0.01)


def test_coverage():
    q = np.array(HUB_LEVELS) * 100  # quantile at level p is 100 p
    assert bool(coverage(q, HUB_LEVELS, 30.0, 0.5)) and not bool(coverage(q, HUB_LEVELS, 20.0, 0.5))
    assert bool(coverage(q, HUB_LEVELS, 3.0, 0.95)) and not bool(coverage(q, HUB_LEVELS, 2.0, 0.95))


def test_hub_frame_has_23_monotone_levels_and_a_point():
    rng = np.random.default_rng(1)
    samples = {"cases": rng.poisson(50, size=(400, 2, 6)), "deaths": rng.poisson(3, size=(400, 2, 6))}
    df = hub_frame(samples, dt.date(2020, 4, 4), [dt.date(2020, 4, 11), dt.date(2020, 4, 18)])
    check_hub_frame(df)
    assert len(HUB_LEVELS) == 23 and HUB_LEVELS[0] == 0.01 and HUB_LEVELS[-1] == 0.99
    q = df[df["type"] == "quantile"]
    assert len(q) == 2 * 2 * 6 * 23 and set(q["quantile"].round(3)) == set(np.round(HUB_LEVELS, 3))
    assert parse_target(df["target"].iloc[0]) == (1, "cases")
    assert set(df["target_end_date"]) == {"2020-04-11", "2020-04-18"}
    bad = df.copy()
    i = bad.index[(bad["type"] == "quantile") & (bad["quantile"] == 0.99)][0]
    bad.loc[i, "value"] = -1.0 if bad.loc[i, "value"] == 0 else 0.0  # below the 0.975 quantile
    with pytest.raises(ValueError):
        check_hub_frame(bad)


def test_weekly_truth_sums_complete_weeks_and_the_city():
    days = pd.date_range("2020-03-01", periods=15)
    rows = [{"date": d, "area": a, "cases": 1.0, "deaths": 0.0} for d in days
            for a in ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")]
    t = weekly_truth(pd.DataFrame(rows), "2020-03-01", ["cases"])
    assert sorted(set(t["target_end_date"])) == ["2020-03-07", "2020-03-14"]  # day 15 is an incomplete week
    assert set(t.loc[t["location"] == "NYC", "value"]) == {35.0}
    assert set(t.loc[t["location"] == "36005", "value"]) == {7.0}


def test_hub_baseline_known_answer():
    # changes all +3: symmetrized {+3, -3}, each with probability 1/2
    q = hub_baseline(np.arange(20) * 3.0, horizon=2)
    last = 57.0
    lv = np.array(HUB_LEVELS)
    np.testing.assert_allclose(q[0, lv < 0.5], last - 3)
    np.testing.assert_allclose(q[0, lv > 0.5], last + 3)
    assert q[0, lv == 0.5] == last and q[1, lv == 0.5] == last
    # two weeks: -6, 0, +6 with probabilities 1/4, 1/2, 1/4
    np.testing.assert_allclose(q[1, lv <= 0.2], last - 6)
    np.testing.assert_allclose(q[1, (lv >= 0.3) & (lv <= 0.7)], last)
    np.testing.assert_allclose(q[1, lv >= 0.8], last + 6)
    # truncated at 0
    assert (hub_baseline([10.0, 0.0, 10.0, 0.0], 1) >= 0).all()


def test_ets_baseline_continues_exponential_growth():
    rng = np.random.default_rng(1)
    r = 0.2
    y = 100 * np.exp(r * np.arange(15) + rng.normal(0, 0.01, 15))
    q = ets_baseline(y, 4, damped=False)
    expected = y[-1] * np.exp(r * np.arange(1, 5))
    np.testing.assert_allclose(q[:, HUB_LEVELS.index(0.5)], expected, rtol=0.02)
    assert (np.diff(q, axis=1) >= 0).all()
    # damped: between persistence and the undamped continuation
    med = ets_baseline(y, 4)[:, HUB_LEVELS.index(0.5)]
    assert (med > y[-1]).all() and (med < expected * 1.01).all()
    # a flat noisy series: the 95% interval covers the level
    flat = ets_baseline(50 + rng.normal(0, 2, 20), 1)
    assert flat[0, HUB_LEVELS.index(0.025)] < 50 < flat[0, HUB_LEVELS.index(0.975)]
