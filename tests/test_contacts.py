"""Contact layers: the segment-sum force equals a brute-force pairwise sum, and bad input fails loudly."""

from __future__ import annotations

import pytest
import torch

from lpm_llm.models.contacts import LAYERS, ContactLayers, default_community_matrix
from lpm_llm.population import AGE_BANDS, BOROUGHS, Population


def _population(n: int, seed: int = 0) -> Population:
    g = torch.Generator().manual_seed(seed)
    household = torch.randint(0, n // 3, (n,), generator=g).to(torch.int32)
    school = torch.randint(-1, 6, (n,), generator=g).to(torch.int32)
    workplace = torch.randint(-1, 9, (n,), generator=g).to(torch.int32)
    return Population(
        {
            "borough": torch.randint(0, 5, (n,), generator=g).to(torch.int8),
            "age_band": torch.randint(0, 10, (n,), generator=g).to(torch.int8),
            "household": household,
            "school": school,
            "workplace": workplace,
        },
        {"borough": BOROUGHS, "age_band": AGE_BANDS},
    )


def _brute_force(pop, w_home, w_out, rates, outside_factor, working, matrix, cross):
    """Pairwise O(N^2) reference for the formulas in the module docstring (susceptible targets)."""
    n = pop.n
    hh, sc, wk = pop["household"].long(), pop["school"].long(), pop["workplace"].long()
    bor, age = pop["borough"].long(), pop["age_band"].long()
    force = torch.zeros(n, dtype=torch.float64)
    size = {
        "hh": torch.bincount(hh),
        "sc": torch.bincount(sc[sc >= 0]),
        "wk": torch.bincount(wk[wk >= 0]),
    }
    cell_n = torch.zeros(5, 10, dtype=torch.float64)
    cell_p = torch.zeros(5, 10, dtype=torch.float64)
    for i in range(n):
        cell_n[bor[i], age[i]] += 1
        cell_p[bor[i], age[i]] += w_out[i]
    q = (1 - cross) * cell_p / cell_n.clamp(min=1) + cross * (cell_p.sum(0) / cell_n.sum(0).clamp(min=1))
    for j in range(n):
        home = out = 0.0
        for i in range(n):
            if i == j:
                continue
            if hh[i] == hh[j]:
                home += rates[0] * w_home[i] / max(int(size["hh"][hh[j]]) - 1, 1)
            if sc[j] >= 0 and sc[i] == sc[j]:
                out += rates[1] * w_out[i] / max(int(size["sc"][sc[j]]) - 1, 1)
            if wk[j] >= 0 and wk[i] == wk[j] and working[i] and working[j]:
                out += rates[2] * w_out[i] / max(int(size["wk"][wk[j]]) - 1, 1)
        out += rates[3] * float((matrix[age[j]].double() * q[bor[j]]).sum())
        force[j] = home + outside_factor[j] * out
    return force


def test_force_equals_pairwise_sum():
    pop = _population(120)
    n = pop.n
    g = torch.Generator().manual_seed(1)
    infectious = torch.nonzero(torch.rand(n, generator=g) < 0.3).squeeze(1)
    iso = (torch.rand(n, generator=g) < 0.4).float()
    outside_factor = 1 - 0.6 * iso
    working = torch.rand(n, generator=g) < 0.7
    matrix = default_community_matrix(10, 0.5)
    layers = ContactLayers.from_population(pop, community_matrix=matrix, cross_borough_share=0.2)
    w_home = torch.rand(infectious.numel(), generator=g)
    w_out = w_home * outside_factor[infectious]
    rates = torch.tensor([0.3, 0.5, 0.7, 0.2])
    with torch.no_grad():
        fast = layers.force(
            layers.pressure(infectious, w_home, w_out, rates, working),
            outside_factor=outside_factor,
            working=working,
        )
    slow = layers.force(
        layers.pressure(infectious, w_home, w_out, rates, working),
        outside_factor=outside_factor,
        working=working,
    )
    w_home_full = torch.zeros(n, dtype=torch.float64).index_put_((infectious,), w_home.double())
    w_out_full = torch.zeros(n, dtype=torch.float64).index_put_((infectious,), w_out.double())
    expected = _brute_force(
        pop, w_home_full, w_out_full, rates.tolist(), outside_factor.double(), working, matrix, 0.2
    )
    susceptible = torch.ones(n, dtype=torch.bool)
    susceptible[infectious] = False  # the formula drops the own contribution; only used on susceptibles
    torch.testing.assert_close(fast.double()[susceptible], expected[susceptible], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slow, fast)


def test_sizes_and_none_slots():
    pop = _population(300, seed=3)
    layers = ContactLayers.from_population(pop)
    assert layers.shape == (len(BOROUGHS), len(AGE_BANDS))
    assert layers.school.dtype == torch.int32 and int(layers.school.min()) >= 0
    assert float(layers.inv_school[0]) == 0.0 and float(layers.inv_workplace[0]) == 0.0
    sizes = torch.bincount(pop["household"].long())
    torch.testing.assert_close(layers.inv_household, 1.0 / (sizes.float() - 1).clamp(min=1))
    assert float(layers.cell_size.sum()) == pop.n
    assert torch.allclose(default_community_matrix(10, 0.3).sum(1), torch.ones(10))
    assert LAYERS == ("household", "school", "workplace", "community")


def test_missing_layers_mean_no_members():
    pop = _population(50)
    pop = Population(
        {k: v for k, v in pop.columns.items() if k not in ("school", "workplace")}, pop.codebooks
    )
    layers = ContactLayers.from_population(pop)
    assert int(layers.school.max()) == 0 and int(layers.workplace.max()) == 0


def test_errors_name_the_problem():
    pop = _population(50)
    no_household = Population({k: v for k, v in pop.columns.items() if k != "household"}, pop.codebooks)
    with pytest.raises(KeyError, match="household"):
        ContactLayers.from_population(no_household)
    bad = pop.with_columns(school=torch.full((50,), -2, dtype=torch.int32))
    with pytest.raises(ValueError, match="'school'.*-1 for none"):
        ContactLayers.from_population(bad)
    with pytest.raises(ValueError, match=r"shape \(10, 10\)"):
        ContactLayers.from_population(pop, community_matrix=torch.ones(3, 3))
    with pytest.raises(ValueError, match="cross_borough_share"):
        ContactLayers.from_population(pop, cross_borough_share=1.5)
    with pytest.raises(ValueError, match="assortativity"):
        default_community_matrix(10, -0.1)
