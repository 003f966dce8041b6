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
from lpm_llm.core.precision import precision
from lpm_llm.core.sim import Simulation, months_between
from lpm_llm.distributed import Group
from lpm_llm.models.epidemic import Epidemic, EpidemicParams
from lpm_llm.population import BOROUGHS
from lpm_llm.privacy.calibrate import HolderObjective, holder_columns
from lpm_llm.privacy.dp import GaussianNoise, epsilon
from lpm_llm.privacy.secure_sum import FixedPoint, PairwiseMasks, SecureSum
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


@pytest.mark.parametrize("private", [None, ["cases"]])
def test_holders_losses_and_gradients_sum_to_the_citys(tiny_nyc, private):
    """Every target private (each holder its boroughs), or deaths published (held by rank 0 for all)."""
    targets = ("cases", "deaths")
    scale = tiny_nyc.scale
    # seeded in every borough (the default 10 per 100,000 is under 2 agents of this city: a holder's
    # boroughs may have no epidemic, and then no gradient)
    space = first_wave_space(EpidemicParams(initial_infections_per_100k=(300.0,) * 5),
                             months_between(START, START + dt.timedelta(days=7 * WEEKS - 1)) + 1, alignment=False)

    def loss_and_grad(objective) -> tuple[float, torch.Tensor]:
        space.zero_grad()
        loss = objective(space.values(), [3, 4])
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in space.parameters()]
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    whole = SimulationObjective(_simulation(tiny_nyc), observed_weekly(START, WEEKS, targets), weeks=WEEKS,
                                scale=scale)
    loss, grad = loss_and_grad(whole)
    losses, grads = [], []
    for rank in range(2):
        columns = holder_columns(rank, 2, targets, private)
        obs = {t: observed_weekly(START, WEEKS, [t], areas=[BOROUGHS[b] for b in c])[t] for t, c in columns.items()
               if c}
        holder = HolderObjective(_simulation(tiny_nyc), obs, columns=columns, n_boroughs=len(BOROUGHS),
                                 n_targets=len(targets), weeks=WEEKS, scale=scale)
        part_loss, part_grad = loss_and_grad(holder)
        losses.append(part_loss)
        grads.append(part_grad)
    assert sum(losses) == pytest.approx(loss, rel=1e-5)
    assert grad.abs().max() > 0 and all(g.abs().max() > 0 for g in grads)
    torch.testing.assert_close(sum(grads), grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


def test_the_coordinators_view_does_not_depend_on_any_single_holder():
    """Two holders' inputs change with their sum unchanged: the sum is identical and every message
    is uniform on the ring either way (a chi-square test on its bytes)."""
    from scipy.stats import chisquare

    masks = _holders(3)
    n = 16_384
    rng = np.random.default_rng(0)
    x = [rng.normal(0, 10, n) for _ in range(3)]
    d = rng.normal(0, 1000, n)
    changed = [x[0] + d, x[1] - d, x[2]]
    views = []
    for inputs in (x, changed):
        sums = [SecureSum(Group(r, 3), masks=masks[r]) for r in range(3)]
        messages = [s.message(v) for s, v in zip(sums, inputs, strict=True)]
        for m in messages:
            counts = np.bincount(m.view(np.uint8), minlength=256)
            assert chisquare(counts).pvalue > 1e-4
        views.append(sums[0].combine(messages))
    assert np.allclose(views[0], views[1], rtol=0, atol=4 * 2.0**-32)
    assert np.allclose(views[0], x[0] + x[1] + x[2], rtol=0, atol=1e-8)


# -- holders as ranks: lpm-llm calibrate --nproc 2 ----------------------------------------------------


def _config(tmp_path: Path, mode: str, steps: int = 3, dtype: str = "float32", frac_bits: int = 32) -> Path:
    config = {
        "name": "private",
        "precision": dtype,
        "population": {"source": "nyc", "scale": 0.002, "seed": 1},
        "decisions": {"isolate": {"prompt": "isolation.yaml", "enabled": False}},
        "seeds": [5],
        "calibration": {"start": "2020-03-01", "end": "2020-03-28", "steps": steps, "lr": 0.1},
        "privacy": {"mode": mode, "noise_multiplier": 0.0 if mode == "secure" else 2.0, "clip": 10.0,
                    "frac_bits": frac_bits},
        "distributed": {"timeout_s": 240},  # generous: 5 ranks on 2 loaded cores
        "outputs": {"plots": False},
    }
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_private_calibration_needs_holders(tmp_path, capsys):
    assert main(["calibrate", str(_config(tmp_path, "secure")), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--nproc" in capsys.readouterr().err


def _calibrate(path: Path, out: Path, nproc: int = 2) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lpm_llm", "calibrate", str(path), "--out", str(out), "--quiet",
                           "--nproc", str(nproc)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "calibration.json").read_text())


def _centralized_fit(path: Path, steps: int) -> Calibrator:
    """The same Adam fit in one process, on the whole city's loss."""
    from lpm_llm.runner.experiment import Experiment
    from lpm_llm.runner.run import build_population

    cfg = Experiment.from_yaml(path).config
    population = build_population(cfg)
    sim = Simulation(population, [Epidemic(cfg.epidemic)], interventions=cfg.interventions.schedule(),
                     start_date=START, days=7 * WEEKS, seed=5)
    objective = SimulationObjective(sim, observed_weekly(START, WEEKS, cfg.calibration.targets), weeks=WEEKS,
                                    scale=population.scale)
    space = first_wave_space(cfg.epidemic, months_between(START, START + dt.timedelta(days=7 * WEEKS - 1)) + 1,
                             alignment=False)
    return Calibrator(space, method="adam", steps=steps, lr=0.1, seed=5).fit(objective)


@pytest.mark.slow
def test_two_holders_fit_what_one_process_fits_and_the_coordinator_sees_only_sums(tmp_path):
    # in float64: the holders' sum of gradients and the gradient of one sum then differ by about 1e-16
    # relative, and the fixed-point encoding by 2^-32 absolute, too little to move a discrete draw (in
    # float32 their 1e-7 moves a few draws within 10 steps, and the fits drift apart by about 1e-4)
    path = _config(tmp_path, "secure", steps=10, dtype="float64", frac_bits=44)
    private = _calibrate(path, tmp_path / "secure")
    plain = _calibrate(_config(tmp_path, "plain", steps=10, dtype="float64", frac_bits=44), tmp_path / "plain")
    # the masks change nothing: the same fit, bit for bit, as the holders' sums in the clear
    assert private["published_loss"] == plain["published_loss"]
    assert private["params"] == plain["params"]
    # the same Adam fit in one process, on the whole city's loss: equal to 1e-6 after 10 steps
    with precision("float64"):
        fit = _centralized_fit(path, steps=10)
    assert private["published_loss"] == pytest.approx(fit.loss_history_, rel=1e-6)
    for name, value in fit.params_.items():
        assert np.allclose(private["params"][name], value, rtol=1e-6, atol=0), name
    assert fit.loss_history_[-1] < 0.8 * fit.loss_history_[0]  # and it is a fit: the loss went down
    held = [private["holders"][r]["cases"] for r in ("0", "1")]
    assert held[0] == [BOROUGHS[b] for b in (0, 2, 4)] and sorted(held[0] + held[1]) == sorted(BOROUGHS)
    # the transcript: public keys, then per step the masked vectors, which decode to noise, and their sum
    records = [json.loads(line) for line in (tmp_path / "secure" / "transcript.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "public_keys" and len(records) == 1 + 10
    codec, decoded = FixedPoint(44, parties=2), []
    for step, record in enumerate(records[1:]):
        received = [np.array(m, dtype=np.uint64) for m in record["from_ranks"]]
        decoded += [codec.decode(m) for m in received]
        assert codec.decode(received[0] + received[1])[0] == pytest.approx(private["published_loss"][step])
    # a holder's loss and gradient are < 1e3 in magnitude; its masked message decodes to noise uniform over
    # +-2^19, beyond 1e3 with probability 0.998 (a message in the clear: never)
    assert np.mean(np.abs(np.concatenate(decoded)) > 1e3) > 0.95
    manifest = json.loads((tmp_path / "secure" / "manifest.json").read_text())
    assert manifest["privacy"]["mode"] == "secure" and manifest["privacy"]["rounds"] == 10


@pytest.mark.slow
def test_secure_dp_reports_the_accountants_epsilon(tmp_path):
    private = _calibrate(_config(tmp_path, "secure+dp", steps=1), tmp_path / "dp")
    assert private["privacy"]["epsilon"] == pytest.approx(epsilon(2.0, 1, 1e-5))
    assert private["privacy"]["delta"] == 1e-5 and private["privacy"]["clip"] == 10.0


@pytest.mark.slow
def test_holders_that_keep_their_microdata_fit_what_one_process_fits(tmp_path):
    """privacy.microdata: 5 holders, one per borough, each keep their residents (area shards); the only quantity
    of the simulation that crosses them is the city-wide community pressure per age band, through the
    secure sum (and its gradient in the backward pass). 3 Adam steps agree with the centralized fit."""
    path = _config(tmp_path, "secure", steps=3, dtype="float64", frac_bits=44)
    config = yaml.safe_load(path.read_text())
    config["privacy"]["microdata"] = True
    config["distributed"]["shard"] = "area"
    config["population"]["scale"] = 0.001
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "micro"
    private = _calibrate(path, out, nproc=5)
    with precision("float64"):
        fit = _centralized_fit(path, steps=3)
    # in float64 the fixed-point city pressure and the holders' partial sums are the only differences
    assert private["published_loss"] == pytest.approx(fit.loss_history_, rel=1e-6)
    for name, value in fit.params_.items():
        assert np.allclose(private["params"][name], value, rtol=1e-6, atol=0), name
    held = [r["cases"] for r in private["holders"].values()]
    assert sorted(b for h in held for b in h) == sorted(BOROUGHS) and all(len(h) == 1 for h in held)
    # what the coordinator received: per day the holders' masked pressure by age band (10 values, noise
    # alone), and per step the masked loss and gradient; never a holder's series or per-area values
    records = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    kinds = {(r["kind"], r.get("what", "")) for r in records}
    assert kinds == {("public_keys", ""), ("masked", "community pressure by age band"),
                     ("masked", "community pressure by age band (gradient)"), ("masked", "loss+gradient")}
    codec, decoded = FixedPoint(44, parties=5), []
    pressure = [r for r in records if r.get("what") == "community pressure by age band"]
    assert len(pressure) >= 3 * 7 * WEEKS
    for record in pressure[:50]:
        received = [np.array(m, dtype=np.uint64) for m in record["from_ranks"]]
        assert all(m.size == 10 for m in received)
        decoded += [codec.decode(m) for m in received]
        total = codec.decode(sum(received[1:], received[0]))
        assert np.allclose(total, record["sum"]) and (np.abs(total) < 1e3).all()
    # each masked message decodes to noise uniform over +-2^19: beyond 1e3 with probability 0.998
    assert np.mean(np.abs(np.concatenate(decoded)) > 1e3) > 0.95
