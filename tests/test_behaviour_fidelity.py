"""Archetype fidelity on a mocked LLM whose per-agent answers are known: the metrics come out exactly."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest
import torch

from lpm_llm.behaviour.fidelity import fidelity, fidelity_metrics, stratified_sample
from lpm_llm.core.interventions import nyc_2020
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.population.archetypes import ArchetypeSpec
from tests.behaviour_helpers import function_client

FEMALE = re.compile(r"\b(woman|girl)\b")


def _p(text: str) -> float:
    """P(yes) 0.8 for a woman or girl, 0.2 for anyone else (whatever the date, cases or policies)."""
    return 0.8 if FEMALE.search(text.split("You are ")[1]) else 0.2


def test_stratified_sample_allocates_proportionally_and_weights_to_the_population():
    strata = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx, w = stratified_sample(strata, 50, seed=1)
    s = strata.numpy()[idx]
    assert len(set(idx.tolist())) == 50 and np.bincount(s).tolist() == [30, 15, 5]
    assert w.sum() == pytest.approx(1.0)
    assert [w[s == k].sum() for k in range(3)] == pytest.approx([0.6, 0.3, 0.1])
    idx, w = stratified_sample(strata, 3)  # every stratum kept while the sample allows
    assert sorted(strata.numpy()[idx].tolist()) == [0, 1, 2] and w.tolist() == pytest.approx([0.6, 0.3, 0.1])


def test_fidelity_metrics_of_known_answers(small_nyc, tmp_path):
    pop = small_nyc
    by_sex = ArchetypeSpec(name="sex", method="group", attributes=["sex"]).assign(pop)
    by_borough = ArchetypeSpec(name="borough", method="group", attributes=["borough"]).assign(pop)
    strata = ArchetypeSpec(name="sb", method="group", attributes=["sex", "borough"]).assign(pop).index
    client, backend = function_client(_p, cache_dir=tmp_path / "cache")
    dates = [dt.date(2020, 3, 15), dt.date(2020, 4, 19)]
    report = fidelity(PromptSpec.from_yaml("isolation.yaml"), client, pop, {"sex": by_sex, "borough": by_borough},
                      strata=strata, dates=dates, schedule=nyc_2020(), steps=13, sample=400)
    client.close()
    sets = report["sets"].set_index("set")

    # archetypes that are the answer's only cause stand in exactly
    exact = sets.loc["sex"]
    assert exact["mad"] == pytest.approx(0.0, abs=1e-6) and exact["r2"] == pytest.approx(1.0, abs=1e-6)
    assert exact["r2_partition"] == pytest.approx(1.0, abs=1e-6)
    assert (exact["slope"], exact["intercept"]) == pytest.approx((1.0, 0.0), abs=1e-5)
    assert exact["profile_share"] == 1.0 and exact["requests_per_run"] == 2 * 13

    # borough archetypes ("a person in Queens") answer 0.2; a share f of the agents answers 0.8
    female = pop["sex"].to(torch.int64) == pop.codebooks["sex"].index("Female")
    f = female.double().mean().item()
    b = pop["borough"].to(torch.int64)
    f_b = torch.stack([female[b == k].double().mean() for k in range(5)]).numpy()
    w_b = torch.bincount(b, minlength=5).double().numpy() / pop.n
    coarse = sets.loc["borough"]
    assert coarse["mad"] == pytest.approx(0.6 * f, abs=1e-5)
    assert coarse["bias"] == pytest.approx(-0.6 * f, abs=1e-5)
    assert coarse["r2"] == pytest.approx(-f / (1 - f), abs=1e-4)
    assert coarse["r2_partition"] == pytest.approx(1 - (w_b * f_b * (1 - f_b)).sum() / (f * (1 - f)), abs=1e-4)
    per = report["archetypes"].query("set == 'borough'").sort_values("archetype")
    assert per["mad"].to_numpy() == pytest.approx(0.6 * f_b, abs=1e-5)
    assert per["p_archetype"].to_numpy() == pytest.approx(0.2)

    # every distinct question once per date: 2 sexes, 5 boroughs, and the sampled agents' own profiles
    answers = report["answers"]
    assert len(answers) == 400 * len(dates)
    assert answers["p_individual"].to_numpy() == pytest.approx(np.where(answers["sex"] == "Female", 0.8, 0.2))
    people = answers[["age_band", "sex", "borough", "race", "employed"]].drop_duplicates()
    assert len(backend.requests) == (len(people) + 2 + 5) * len(dates)


def test_metrics_by_hand():
    p_ind = np.array([[0.1, 0.3], [0.5, 0.7], [0.9, 0.9]])
    p_arch = np.array([[0.2, 0.4], [0.2, 0.4], [0.9, 0.9]])
    m = fidelity_metrics(p_ind, p_arch, np.array([0.25, 0.25, 0.5]), np.array([0, 0, 1]))
    assert m["mad"] == pytest.approx((0.25 * (0.1 + 0.1 + 0.3 + 0.3)) / 2)
    assert m["bias"] == pytest.approx((0.25 * (0.1 + 0.1 - 0.3 - 0.3)) / 2)
    # date means 0.6 and 0.7; total sum of squares 0.25*(0.25+0.01+0.16+0) + 0.5*(0.09+0.04)
    ss = 0.25 * (0.25 + 0.01 + 0.16 + 0.0) + 0.5 * (0.09 + 0.04)
    assert m["r2"] == pytest.approx(1 - 0.25 * (0.01 + 0.01 + 0.09 + 0.09) / ss)
    # member means of archetype 0: 0.3 and 0.5
    assert m["r2_partition"] == pytest.approx(1 - 0.25 * (0.04 + 0.04 + 0.04 + 0.04) / ss)


def test_profile_share_counts_the_members_a_profile_describes(small_nyc):
    pop = small_nyc
    attrs = ["age_band", "sex", "borough", "race"]
    group = ArchetypeSpec(name="g", method="group", attributes=["sex", "borough"]).assign(pop)
    assert group.profile_share.tolist() == [1.0] * group.k
    spec = dict(name="k", method="kmeans", attributes=attrs, k=12, sample_size=20_000)
    modal = ArchetypeSpec(**spec).assign(pop)
    common = ArchetypeSpec(**spec, profile="most_common").assign(pop)
    assert torch.equal(modal.index, common.index)  # the same clusters, other profiles
    codes = {a: pop[a].to(torch.int64) for a in attrs}
    for arch in (modal, common):
        for k in range(arch.k):
            members = arch.index == k
            match = members.clone()
            for a in attrs:
                match &= codes[a] == pop.codebooks[a].index(arch.profiles[k][a])
            assert arch.profile_share[k].item() == pytest.approx(match.sum().item() / members.sum().item())
    # the most common combination describes at least as many members as the modal labels do
    assert (common.profile_share >= modal.profile_share).all() and (common.profile_share > 0).all()
