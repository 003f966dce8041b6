"""Archetypes: grouping and clustering specs, profiles, descriptions and every error."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from lpm_llm.population import AGE_BANDS, BOROUGHS, RACES, SEXES, Population
from lpm_llm.population.archetypes import ATTRIBUTES, Archetypes, ArchetypeSpec, describe


def _labels(pop: Population, attribute: str) -> np.ndarray:
    codes = pop[attribute].numpy().astype(np.int64)
    return np.asarray(ATTRIBUTES[attribute], dtype=object)[codes]


def _check_partition(arch: Archetypes, pop: Population) -> None:
    """Every agent in exactly one archetype; counts consistent; nothing empty."""
    assert arch.index.shape == (pop.n,) and arch.index.dtype == torch.int32
    assert arch.index.device == pop.device
    assert int(arch.index.min()) == 0 and int(arch.index.max()) == arch.k - 1
    assert arch.counts.dtype == torch.int64
    assert torch.equal(arch.counts, torch.bincount(arch.index.long(), minlength=arch.k))
    assert int(arch.counts.sum()) == pop.n and bool((arch.counts > 0).all())
    assert len(arch.profiles) == len(arch.descriptions) == arch.k


def test_group_spec_100_archetypes_matching_each_agent(small_nyc):
    spec = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml")
    assert (spec.method, spec.attributes) == ("group", ["age_band", "sex", "borough"])
    arch = spec.assign(small_nyc)
    _check_partition(arch, small_nyc)
    assert arch.k == 100 and arch.name == "nyc_age_sex_borough"
    assert arch.attributes == ("age_band", "sex", "borough")
    # every agent's own labels are its archetype's profile
    idx = arch.index.numpy()
    for a in arch.attributes:
        profile_labels = np.array([p[a] for p in arch.profiles], dtype=object)
        np.testing.assert_array_equal(profile_labels[idx], _labels(small_nyc, a))
    # ordered by codes, first attribute slowest
    assert arch.profiles[0] == {"age_band": "0-4", "sex": "Female", "borough": "Bronx"}
    assert arch.profiles[1] == {"age_band": "0-4", "sex": "Female", "borough": "Brooklyn"}
    assert arch.profiles[-1] == {"age_band": "75+", "sex": "Male", "borough": "Staten Island"}
    assert arch.descriptions[0] == "a 0-4 year old girl in the Bronx"


def test_group_spec_keeps_only_non_empty_groups():
    # 6 agents; 3 of the 2 x 5 (sex, borough) combinations occur
    pop = Population(
        {"sex": torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.int8),
         "borough": torch.tensor([3, 3, 0, 4, 4, 3], dtype=torch.int8)},
        {"sex": SEXES, "borough": BOROUGHS},
    )
    arch = ArchetypeSpec(name="t", method="group", attributes=["sex", "borough"]).assign(pop)
    _check_partition(arch, pop)
    assert arch.profiles == [{"sex": "Female", "borough": "Queens"}, {"sex": "Male", "borough": "Bronx"},
                             {"sex": "Male", "borough": "Staten Island"}]
    assert arch.index.tolist() == [0, 0, 1, 2, 2, 0]
    assert arch.counts.tolist() == [3, 1, 2]
    assert arch.members_of(2).tolist() == [3, 4]


def test_group_on_employed_bool_column(small_nyc):
    arch = ArchetypeSpec(name="e", method="group", attributes=["employed", "sex"]).assign(small_nyc)
    _check_partition(arch, small_nyc)
    assert arch.k == 4
    assert arch.descriptions[3] == "a man who is employed"
    assert int(arch.counts[2] + arch.counts[3]) == int(small_nyc["employed"].sum())


def test_kmeans_spec_64_clusters_with_modal_profiles(small_nyc):
    spec = ArchetypeSpec.from_yaml("nyc_kmeans64.yaml")
    assert (spec.method, spec.k) == ("kmeans", 64)
    arch = spec.assign(small_nyc)
    _check_partition(arch, small_nyc)
    assert arch.k == 64
    assert (arch.counts[:-1] >= arch.counts[1:]).all()  # numbered by size
    df = pd.DataFrame({a: _labels(small_nyc, a) for a in arch.attributes})
    df["archetype"] = arch.index.numpy()
    # agents with the same attributes share an archetype (k-means acts on the one-hot vector)
    assert (df.groupby(list(arch.attributes))["archetype"].nunique() == 1).all()
    # the profile is the modal label of each attribute among the members
    for a in arch.attributes:
        counts = df.groupby(["archetype", a]).size().unstack(fill_value=0)
        for k in (0, 10, 63):
            assert counts.loc[k, arch.profiles[k][a]] == counts.loc[k].max()
    table = arch.profile_table()
    assert list(table.columns) == ["archetype", *arch.attributes, "count", "description"]
    assert table["count"].sum() == small_nyc.n


def test_kmeans_is_deterministic_and_seed_matters(small_nyc):
    spec = ArchetypeSpec(name="c", method="kmeans", attributes=["age_band", "race"], k=12, sample_size=5000)
    one, two = spec.assign(small_nyc), spec.assign(small_nyc)
    assert torch.equal(one.index, two.index) and one.profiles == two.profiles
    other = spec.model_copy(update={"seed": 7}).assign(small_nyc)
    _check_partition(other, small_nyc)
    assert other.k == 12


def test_kmeans_clusters_reduce_within_cluster_spread(small_nyc):
    """Clustering beats a random split of the cells: lower within-cluster sum of squares."""
    spec = ArchetypeSpec(name="c", method="kmeans", attributes=["age_band", "sex", "borough"], k=10)
    arch = spec.assign(small_nyc)
    one_hot = [np.eye(len(ATTRIBUTES[a]))[small_nyc[a].numpy().astype(int)] for a in arch.attributes]
    x = np.concatenate(one_hot, axis=1)

    def wcss(labels):
        total = 0.0
        for k in np.unique(labels):
            m = x[labels == k]
            total += ((m - m.mean(0)) ** 2).sum()
        return total

    age, sex, borough = (small_nyc[a].numpy().astype(int) for a in ("age_band", "sex", "borough"))
    cell = age * 10 + sex * 5 + borough
    random_labels = np.random.default_rng(0).integers(0, 10, size=100)[cell]
    assert wcss(arch.index.numpy()) < 0.8 * wcss(random_labels)


def test_minibatch_kmeans(small_nyc):
    spec = ArchetypeSpec(name="m", method="minibatch_kmeans", k=20, sample_size=20_000, seed=3,
                         attributes=["age_band", "sex", "borough", "race"])
    arch = spec.assign(small_nyc)
    _check_partition(arch, small_nyc)
    assert 1 <= arch.k <= 20


def test_members_of_and_profile_table(small_nyc):
    arch = ArchetypeSpec.from_yaml("nyc_age_sex_borough.yaml").assign(small_nyc)
    members = arch.members_of(42)
    assert members.dtype == torch.int64 and members.shape == (int(arch.counts[42]),)
    assert bool((arch.index[members] == 42).all())
    with pytest.raises(IndexError, match="out of range 0..99"):
        arch.members_of(100)
    table = arch.profile_table()
    assert table.shape == (100, 6)
    assert table.loc[42, "description"] == arch.descriptions[42]


@pytest.mark.parametrize(
    ("profile", "text"),
    [
        ({"age_band": "35-44", "sex": "Female", "borough": "Queens"}, "a 35-44 year old woman in Queens"),
        ({"age_band": "18-24", "sex": "Male", "borough": "Bronx"}, "an 18-24 year old man in the Bronx"),
        ({"age_band": "5-12", "sex": "Female", "borough": "Staten Island"},
         "a 5-12 year old girl on Staten Island"),
        ({"age_band": "75+", "sex": "Male"}, "a man 75 years or older"),
        ({"age_band": "45-54", "sex": "Female", "race": "Hispanic/Latino", "borough": "Brooklyn"},
         "a 45-54 year old Hispanic or Latino woman in Brooklyn"),
        ({"race": "Asian/Pacific-Islander"}, "an Asian or Pacific Islander person"),
        ({"sex": "Male", "race": "other", "employed": "not employed"},
         "a man of another race or ethnicity who is not employed"),
        ({"age_band": "13-17"}, "a 13-17 year old child"),
    ],
)
def test_describe(profile, text):
    assert describe(profile) == text


def test_every_label_has_a_description():
    for a in AGE_BANDS:
        for s in SEXES:
            for r in RACES:
                for b in BOROUGHS:
                    d = describe({"age_band": a, "sex": s, "race": r, "borough": b})
                    assert d.startswith(("a ", "an ")) and "  " not in d


def test_bundled_spec_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ArchetypeSpec.from_yaml("nyc_kmeans64.yaml").name == "nyc_kmeans64"


# -- errors -------------------------------------------------------------------------------------------


def _write(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def test_unknown_attribute(tmp_path):
    path = _write(tmp_path, "name: x\nmethod: group\nattributes: [age_band, income]\n")
    with pytest.raises(ValueError, match=rf"unknown archetype attribute 'income' in {re.escape(str(path))}; "
                                         r"known: age_band, sex, borough, race, employed"):
        ArchetypeSpec.from_yaml(path)
    with pytest.raises(ValueError, match="unknown archetype attribute 'income'"):
        ArchetypeSpec(name="x", method="group", attributes=["income"])


def test_unknown_method(tmp_path):
    path = _write(tmp_path, "name: x\nmethod: dbscan\nattributes: [sex]\n")
    with pytest.raises(ValueError, match=r"x.yaml: field method: Input should be 'group', 'kmeans' or"):
        ArchetypeSpec.from_yaml(path)


def test_unknown_key_and_missing_field(tmp_path):
    with pytest.raises(ValueError, match="field clusters: Extra inputs are not permitted"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "name: x\nmethod: kmeans\nattributes: [sex]\nclusters: 3\n"))
    with pytest.raises(ValueError, match="field name: Field required"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "method: group\nattributes: [sex]\n"))
    with pytest.raises(ValueError, match="needs k"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "name: x\nmethod: kmeans\nattributes: [sex]\n"))
    with pytest.raises(ValueError, match="k is only for method kmeans"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "name: x\nmethod: group\nattributes: [sex]\nk: 3\n"))


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_archetypes.yaml"):
        ArchetypeSpec.from_yaml(tmp_path / "no_such_archetypes.yaml")
    with pytest.raises(ValueError, match="x.yaml is not valid YAML"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "name: x\nmethod: [group\n"))
    with pytest.raises(ValueError, match="must hold a mapping"):
        ArchetypeSpec.from_yaml(_write(tmp_path, "- just\n- a list\n"))


def test_k_larger_than_distinct_agents(small_nyc, tmp_path):
    # sex x borough has 10 distinct combinations
    path = _write(tmp_path, "name: big\nmethod: kmeans\nattributes: [sex, borough]\nk: 11\n")
    spec = ArchetypeSpec.from_yaml(path)
    pattern = (rf"'big' \({re.escape(str(path))}\): k=11 is larger than the number of distinct agents "
               r"\(10 distinct combinations of sex, borough\)")
    with pytest.raises(ValueError, match=pattern):
        spec.assign(small_nyc)
    # k equal to the number of distinct combinations is fine: one cluster per combination
    arch = spec.model_copy(update={"k": 10}).assign(small_nyc)
    _check_partition(arch, small_nyc)
    assert arch.k == 10


def test_sample_too_small_for_k(small_nyc):
    spec = ArchetypeSpec(name="s", method="kmeans", attributes=["age_band", "sex", "borough", "race"],
                         k=64, sample_size=30)
    with pytest.raises(ValueError, match="raise sample_size"):
        spec.assign(small_nyc)


def test_population_without_the_attribute():
    pop = Population({"sex": torch.tensor([0, 1], dtype=torch.int8)}, {"sex": SEXES})
    with pytest.raises(ValueError, match="population has no column 'borough'; columns: sex"):
        ArchetypeSpec(name="t", method="group", attributes=["borough"]).assign(pop)
    wrong = Population({"sex": torch.tensor([0, 1], dtype=torch.int8)}, {"sex": ("M", "F")})
    with pytest.raises(ValueError, match="column 'sex' has codebook"):
        ArchetypeSpec(name="t", method="group", attributes=["sex"]).assign(wrong)
