"""Privacy-preserving calibration: secure sums, distributed DP, and the holders' calibration.

The mathematics first (masks cancel, holders' losses and gradients sum to the city's, the accountant
is opacus'), then a calibration of 2 holders started by ``lpm-llm calibrate --nproc 2`` against the
same fit in one process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpm_llm.calibrate.fit import Calibrator, SimulationObjective, first_wave_space
from lpm_llm.calibrate.targets import observed_weekly
from lpm_llm.core.sim import Simulation, months_between
from lpm_llm.distributed import Group
from lpm_llm.models.epidemic import Epidemic, EpidemicParams
from lpm_llm.population import BOROUGHS
from lpm_llm.privacy.calibrate import HolderObjective
from lpm_llm.privacy.dp import GaussianNoise, epsilon
from lpm_llm.privacy.secure_sum import FixedPoint, PairwiseMasks
from lpm_llm.runner.cli import main

# -- secure sum -------------------------------------------------------------------------------------


def test_fixed_point_round_trips_and_sums_modulo_2_64():
    codec = FixedPoint(32, parties=3)
    x = np.array([0.0, -1.5, 3.25e-9, 12345.678, -2.0**20])
    assert np.allclose(codec.decode(codec.encode(x)), x, rtol=0, atol=2.0**-32)
    parts = [np.array([-7.5, 1e6]), np.array([2.25, -3e6]), np.array([5.0, 1e6])]
    total = sum((codec.encode(p) for p in parts), np.zeros(2, dtype=np.uint64))
    assert np.allclose(codec.decode(total), [-0.25, -1e6], atol=2.0**-31)
    with pytest.raises(ValueError, match="fixed-point range"):
        codec.encode(np.array([2.0**40]))
    with pytest.raises(ValueError, match="not finite"):
        codec.encode(np.array([np.nan]))


def _holders(n: int) -> list[PairwiseMasks]:
    holders = [PairwiseMasks(r) for r in range(n)]
    public = [h.public_bytes for h in holders]
    for h in holders:
        h.agree(public)
    return holders


def test_pairwise_masks_agree_cancel_and_change_every_round():
    holders = _holders(4)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert holders[i].shared_key(j) == holders[j].shared_key(i)
    assert len({holders[0].shared_key(j) for j in (1, 2, 3)}) == 3  # one key per pair
    n = 1000
    for round_ in (0, 1, 7):
        total = sum((h.mask(n, round_) for h in holders), np.zeros(n, dtype=np.uint64))
        assert not total.any()  # the masks cancel exactly in the sum
    m0, m1 = holders[0].mask(n, 0), holders[0].mask(n, 1)
    assert not np.isin(m1, m0).any()  # rounds never reuse (or shift) the keystream


def test_a_masked_vector_alone_looks_uniform_whatever_it_holds():
    holders = _holders(3)
    codec = FixedPoint(32, parties=3)
    n = 20_000
    for content in (np.zeros(n), np.full(n, 123.456)):
        masked = codec.encode(content) + holders[1].mask(n, 0)
        bits = np.unpackbits(masked.view(np.uint8)).mean()
        top = (masked >> np.uint64(63)).mean()
        assert abs(bits - 0.5) < 0.01 and abs(top - 0.5) < 0.02  # 5 sigma: 0.0013 and 0.018
        assert np.abs(codec.decode(masked)).mean() > 1e8  # decodes to noise across the whole range


# -- distributed differential privacy ----------------------------------------------------------------


def test_clipping_and_the_noise_of_the_sum():
    noise = GaussianNoise(clip=2.0, noise_multiplier=1.5, holders=4)
    x = np.array([3.0, 4.0])
    assert np.isclose(np.linalg.norm(noise.clipped(x)), 2.0) and np.allclose(noise.clipped(x / 5), x / 5)
    # the sum over 4 holders of their noise has std noise_multiplier * clip = 3
    sums = sum(GaussianNoise(2.0, 1.5, 4)(np.zeros(40_000)) for _ in range(4))
    assert abs(sums.std() - 3.0) < 0.05 and abs(sums.mean()) < 0.05


def test_epsilon_is_opacus_rdp_and_grows_with_releases():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(20):
        accountant.step(noise_multiplier=3.0, sample_rate=1.0)
    assert epsilon(3.0, 20, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert epsilon(3.0, 10, 1e-5) < epsilon(3.0, 20, 1e-5) < epsilon(1.5, 20, 1e-5)
    assert epsilon(3.0, 0, 1e-5) == 0.0


# -- the holders' objective ------------------------------------------------------------------------

START = dt.date(2020, 3, 1)
WEEKS = 4


def _simulation(population) -> Simulation:
    return Simulation(population, [Epidemic(EpidemicParams())], start_date=START, days=7 * WEEKS, seed=0)


@pytest.fixture(scope="module")
def tiny_nyc():
    from lpm_llm.population.synthesis import synthesize_nyc

    return synthesize_nyc(scale=0.002, seed=0)


def test_holders_losses_and_gradients_sum_to_the_citys(tiny_nyc):
    targets = ("cases", "deaths")
    scale = tiny_nyc.scale
    space = first_wave_space(EpidemicParams(), months_between(START, START + dt.timedelta(days=7 * WEEKS - 1)) + 1,
                             alignment=False)

    def loss_and_grad(objective) -> tuple[float, torch.Tensor]:
        space.zero_grad()
        loss = objective(space.values(), [3, 4])
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in space.parameters()])

    whole = SimulationObjective(_simulation(tiny_nyc), observed_weekly(START, WEEKS, targets), weeks=WEEKS,
                                scale=scale)
    loss, grad = loss_and_grad(whole)
    losses, grads = [], []
    for rank in range(2):
        mine = Group(rank, 2).deal(list(range(len(BOROUGHS))))
        obs = observed_weekly(START, WEEKS, targets, areas=[BOROUGHS[b] for b in mine])
        holder = HolderObjective(_simulation(tiny_nyc), obs, boroughs=mine, n_boroughs=len(BOROUGHS),
                                 weeks=WEEKS, scale=scale)
        part_loss, part_grad = loss_and_grad(holder)
        losses.append(part_loss)
        grads.append(part_grad)
    assert sum(losses) == pytest.approx(loss, rel=1e-5)
    assert grad.abs().max() > 0
    torch.testing.assert_close(sum(grads), grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


# -- holders as ranks: lpm-llm calibrate --nproc 2 ----------------------------------------------------


def _config(tmp_path: Path, mode: str, steps: int = 3) -> Path:
    config = {
        "name": "private",
        "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "enabled": False}},
        "seeds": [5],
        "calibration": {"start": "2020-03-01", "end": "2020-03-28", "steps": steps, "lr": 0.1,
                        "seeds_per_step": 2},
        "privacy": {"mode": mode, "noise_multiplier": 0.0 if mode == "secure" else 2.0, "clip": 10.0},
        "distributed": {"timeout_s": 60},
        "outputs": {"plots": False},
    }
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_private_calibration_needs_holders(tmp_path, capsys):
    assert main(["calibrate", str(_config(tmp_path, "secure")), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--nproc" in capsys.readouterr().err


def _calibrate(path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lpm_llm", "calibrate", str(path), "--out", str(out), "--quiet",
                           "--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "calibration.json").read_text())


@pytest.mark.slow
def test_two_holders_fit_what_one_process_fits_and_the_coordinator_sees_only_sums(tmp_path):
    from lpm_llm.runner.experiment import Experiment
    from lpm_llm.runner.run import build_population

    path = _config(tmp_path, "secure", steps=2)
    private = _calibrate(path, tmp_path / "secure")
    # the same Adam fit in one process, on the whole city's loss
    cfg = Experiment.from_yaml(path).config
    population = build_population(cfg)
    sim = Simulation(population, [Epidemic(cfg.epidemic)], interventions=cfg.interventions.schedule(),
                     start_date=START, days=7 * WEEKS, seed=5)
    objective = SimulationObjective(sim, observed_weekly(START, WEEKS, cfg.calibration.targets), weeks=WEEKS,
                                    scale=population.scale)
    space = first_wave_space(cfg.epidemic, months_between(START, START + dt.timedelta(days=7 * WEEKS - 1)) + 1,
                             alignment=False)
    fit = Calibrator(space, method="adam", steps=2, lr=0.1, seeds_per_step=2, seed=5).fit(objective)
    assert private["published_loss"] == pytest.approx(fit.loss_history_, rel=1e-5)
    for name, value in fit.params_.items():
        assert np.allclose(private["params"][name], value, rtol=1e-4), name
    assert private["holders"]["0"] == [BOROUGHS[b] for b in (0, 2, 4)]  # dealt out in turn
    assert sorted(private["holders"]["0"] + private["holders"]["1"]) == sorted(BOROUGHS)
    # the transcript: public keys, then per step the masked vectors, which decode to noise, and their sum
    records = [json.loads(line) for line in (tmp_path / "secure" / "transcript.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "public_keys" and len(records) == 1 + 2
    codec = FixedPoint(32, parties=2)
    for step, record in enumerate(records[1:]):
        received = [np.array(m, dtype=np.uint64) for m in record["from_ranks"]]
        assert all(abs(codec.decode(m)[0]) > 1e3 for m in received)  # a holder's loss is < 100
        assert codec.decode(received[0] + received[1])[0] == pytest.approx(private["published_loss"][step])
    manifest = json.loads((tmp_path / "secure" / "manifest.json").read_text())
    assert manifest["privacy"]["mode"] == "secure" and manifest["privacy"]["rounds"] == 2


@pytest.mark.slow
def test_secure_dp_reports_the_accountants_epsilon(tmp_path):
    private = _calibrate(_config(tmp_path, "secure+dp", steps=1), tmp_path / "dp")
    assert private["privacy"]["epsilon"] == pytest.approx(epsilon(2.0, 1, 1e-5))
    assert private["privacy"]["delta"] == 1e-5 and private["privacy"]["clip"] == 10.0
