"""Fitting the variants' relative transmissibility to the growth of their sequenced shares (issue 15):
the growth gap, the damped bounded update, and the value reaching the engine."""

from __future__ import annotations

import datetime as dt
import math

import pandas as pd
import pytest
import torch

from lpm_llm.calibrate.period import fit_period, update_transmissibility
from lpm_llm.core.sim import Simulation
from lpm_llm.models import Epidemic, EpidemicParams
from lpm_llm.models.epidemic_params import Variant
from lpm_llm.models.lineages import GENERATION_DAYS, TRANSMISSIBILITY_RANGE, growth_gaps
from tests.test_epidemic_review import ONE_LAYER, flat_population

pytestmark = pytest.mark.usefixtures("one_thread")


def _shares(logits_obs, logits_sim, name="B.1.1.7"):
    """A compare_lineage_shares-like frame: the lineage's shares from logits, 'Other' the rest."""
    rows = []
    for i, (lo, ls) in enumerate(zip(logits_obs, logits_sim, strict=True)):
        start = dt.date(2021, 1, 3) + dt.timedelta(days=28 * i)
        po, ps = 100 / (1 + math.exp(-lo)), 100 / (1 + math.exp(-ls))
        rows += [(start, name, ps, po), (start, "Other", 100 - ps, 100 - po)]
    return pd.DataFrame(rows, columns=["period_start", "variant", "simulated_percent", "observed_percent"])


def test_growth_gap_is_the_difference_of_logit_slopes_over_the_rising_periods():
    # observed: below 1% in period 0, rising by 1.0 a period from period 1 to its peak in period 4, then
    # falling; simulated: rising by 1.6 a period throughout. Only periods 1..4 count.
    obs = [-6.0, -4.0, -3.0, -2.0, -1.0, -3.0]
    sim = [-5.0, -3.4, -1.8, -0.2, 1.4, 3.0]
    gaps = growth_gaps(_shares(obs, sim), ["B.1.1.7", "P.1"])
    assert set(gaps) == {"B.1.1.7"}  # P.1 never sequenced here: no gap
    assert gaps["B.1.1.7"] == pytest.approx((1.0 - 1.6) / 28, rel=1e-9)
    # a lineage observed in a single period before its peak has no growth to compare
    assert growth_gaps(_shares([-6.0, -1.0, -3.0], [-6.0, -1.0, -3.0]), ["B.1.1.7"]) == {}
    # equal growth, different levels: no gap (the level is the importation rate's)
    assert growth_gaps(_shares([-4.0, -3.0, -2.0], [-2.0, -1.0, 0.0]), ["B.1.1.7"])["B.1.1.7"] == pytest.approx(0.0)
    # against the resident lineage ('Other'): a third lineage taking half of the simulated onsets from
    # both alike (their ratio unchanged) does not count
    three = _shares([-4.0, -3.0, -2.0], [-4.0, -3.0, -2.0])
    three["simulated_percent"] /= 2
    third = three[three["variant"] == "Other"].assign(variant="B.1.526", observed_percent=0.0, simulated_percent=50.0)
    both = pd.concat([three, third], ignore_index=True)
    assert both.groupby("period_start")["simulated_percent"].sum().tolist() == pytest.approx([100.0] * 3)
    assert growth_gaps(both, ["B.1.1.7"])["B.1.1.7"] == pytest.approx(0.0, abs=1e-12)


def test_transmissibility_update_moves_log_t_by_the_gap_times_the_generation_interval_within_bounds():
    gap = -0.6 / 28  # simulated logit grows 0.6 a period faster than observed
    new = update_transmissibility({"B.1.1.7": 1.5, "P.1": 1.7}, {"B.1.1.7": gap}, step=0.5, max_move=0.2)
    assert new["B.1.1.7"] == pytest.approx(1.5 * math.exp(0.5 * gap * GENERATION_DAYS), rel=1e-12)
    assert new["P.1"] == 1.7  # no gap: unchanged
    # clipped to max_move, then to the literature range
    assert update_transmissibility({"B.1.1.7": 1.8}, {"B.1.1.7": -1.0}, max_move=0.1)["B.1.1.7"] == pytest.approx(
        1.8 * math.exp(-0.1))
    lo, hi, _ = TRANSMISSIBILITY_RANGE["B.1.1.7"]
    assert update_transmissibility({"B.1.1.7": 1.35}, {"B.1.1.7": -1.0})["B.1.1.7"] == lo
    assert update_transmissibility({"B.1.1.7": 1.85}, {"B.1.1.7": 1.0})["B.1.1.7"] == hi
    assert all(src for *_, src in TRANSMISSIBILITY_RANGE.values())  # every range has its source


def test_a_transmissibility_set_after_setup_runs_as_if_configured():
    """Epidemic.set_variant_transmissibility on a built simulation gives, seed for seed, the run of a
    simulation configured with that value from the start, and a different run from the old value."""
    pop = flat_population(20_000)

    def sim_with(t):
        variant = Variant(name="V", lineage="B.1.1.7", transmissibility=t, introduced="2021-01-03",
                          importation_per_100k=20.0)
        model = Epidemic(EpidemicParams(**{**ONE_LAYER, "variants": (variant,)}, beta_community=0.25,
                                        initial_infections_per_100k=(200.0,) * 5))
        return Simulation(pop, [model], start_date="2021-01-03", days=40, seed=3), model

    with torch.no_grad():
        configured = sim_with(1.9)[0].run().series["symptomatic_by_lineage"]
        sim, model = sim_with(1.5)
        before = sim.run().series["symptomatic_by_lineage"]
        model.set_variant_transmissibility({"B.1.1.7": 1.9})
        after = sim.run().series["symptomatic_by_lineage"]
    assert torch.equal(after, configured)
    assert float(after[:, 1].sum()) > float(before[:, 1].sum())
    assert model.params.variants[0].transmissibility == 1.9
    with pytest.raises(ValueError, match="transmissibilities"):
        model.set_variant_transmissibility({"P.1": 1.9})


def test_fit_period_refuses_a_lineage_without_a_range():
    model = Epidemic(EpidemicParams())
    with pytest.raises(ValueError, match="no transmissibility range"):
        fit_period(None, None, model, steps=1, transmissibility=["B.1.617.2"])


def test_the_fitted_lineages_are_configured_in_the_calibration_block():
    from lpm_llm.runner.experiment import Experiment

    exp = Experiment.from_yaml("experiments/covid_nyc_2021.yaml",
                               ["calibration.variant_transmissibility=[B.1.1.7,P.1]"])
    assert exp.config.calibration.variant_transmissibility == ["B.1.1.7", "P.1"]
    with pytest.raises(Exception, match="no transmissibility range"):
        Experiment.from_yaml("experiments/covid_nyc_2021.yaml", ["calibration.variant_transmissibility=[B.1.617.2]"])
