"""Archetypes: a partition of the agents into K groups, each with one profile for the LLM.

An :class:`ArchetypeSpec` (YAML in ``archetypes/``) says how to form them:

- ``method: group``: one archetype per non-empty combination of the listed attributes, ordered by
  the attributes' codes (first attribute slowest);
- ``method: kmeans`` / ``minibatch_kmeans``: scikit-learn k-means on the one-hot encoded
  attributes, fitted on a random sample of agents; the profile of a cluster is the modal label of
  each attribute among its members (``profile: modal``, the default), which may describe few real
  members or none, or its most common full combination of labels (``profile: most_common``), which
  describes real members. ``Archetypes.profile_share`` says which share of each archetype's members
  its profile describes exactly.

Every attribute is categorical, so agents with the same attribute combination ("cell") have the
same one-hot vector. Both methods therefore work on the (few hundred) distinct cells, weighted by
how many agents (or sampled agents) fall in each: the fit is the same as on the agents themselves,
and assigning all N agents is one table lookup ``index = cell_archetype[cell]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lpm_llm.population.table import AGE_BANDS, BOROUGHS, RACES, SEXES, Population
from lpm_llm.resources import resolve_path

__all__ = ["ATTRIBUTES", "ArchetypeSpec", "Archetypes", "describe"]

log = logging.getLogger(__name__)

EMPLOYED_LABELS: tuple[str, ...] = ("not employed", "employed")
#: attributes an archetype may use -> labels (``employed`` is a bool column)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "age_band": AGE_BANDS,
    "sex": SEXES,
    "borough": BOROUGHS,
    "race": RACES,
    "employed": EMPLOYED_LABELS,
}


class ArchetypeSpec(BaseModel):
    """How agents are grouped into archetypes.

    Args:
        name: identifies the archetype set (in results and prompts' cache keys).
        method: ``group``, ``kmeans`` or ``minibatch_kmeans``.
        attributes: population columns used, from ``ATTRIBUTES``.
        k: number of clusters (clustering methods only).
        sample_size: agents drawn (without replacement) to fit the clustering; all if larger than N.
        seed: seeds the sample and scikit-learn.
        profile: a cluster's profile: the modal label of each attribute (``modal``) or the most
            common combination of labels among its members (``most_common``).
        description: free text for people reading the file.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    method: Literal["group", "kmeans", "minibatch_kmeans"]
    attributes: list[str] = Field(min_length=1)
    k: int | None = Field(None, ge=1)
    sample_size: int = Field(100_000, ge=1)
    seed: int = 0
    profile: Literal["modal", "most_common"] = "modal"
    description: str = ""
    _source: Path | None = None  # the YAML file it came from, for error messages

    @model_validator(mode="after")
    def _check(self) -> ArchetypeSpec:
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown archetype attribute {unknown[0]!r}; known: {', '.join(ATTRIBUTES)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes repeat a name: {self.attributes}")
        if self.method == "group" and self.k is not None:
            raise ValueError("k is only for method kmeans/minibatch_kmeans; method group makes one archetype "
                             "per attribute combination")
        if self.method != "group" and self.k is None:
            raise ValueError(f"method {self.method} needs k, the number of archetypes")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ArchetypeSpec:
        """Load a spec; `path` is a user file or the name of one in the bundled ``archetypes/``."""
        resolved = resolve_path(path, "archetypes")
        try:
            data = yaml.safe_load(resolved.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"archetype file {resolved} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"archetype file {resolved} must hold a mapping (name, method, attributes, ...),"
                             f" got {type(data).__name__}")
        for a in data.get("attributes") or []:
            if a not in ATTRIBUTES:
                known = ", ".join(ATTRIBUTES)
                raise ValueError(f"unknown archetype attribute {a!r} in {resolved}; known: {known}")
        try:
            spec = cls(**data)
        except ValidationError as e:
            raise ValueError(f"archetype file {resolved}: {_explain(e)}") from None
        spec._source = resolved
        return spec

    def _where(self) -> str:
        return f"archetype spec {self.name!r}" + (f" ({self._source})" if self._source else "")

    def assign(self, population: Population) -> Archetypes:
        """Put every agent of `population` in exactly one archetype."""
        cell, shape = _cell_codes(population, self.attributes, self._where())
        n_cells = int(np.prod(shape))
        cell_counts = torch.bincount(cell, minlength=n_cells).cpu().numpy()
        present = np.flatnonzero(cell_counts)
        if self.method == "group":
            cell_archetype = np.full(n_cells, -1, dtype=np.int64)
            cell_archetype[present] = np.arange(present.size)
            profile_cells = [present[[i]] for i in range(present.size)]
        else:
            if self.k > present.size:
                raise ValueError(
                    f"{self._where()}: k={self.k} is larger than the number of distinct agents "
                    f"({present.size} distinct combinations of {', '.join(self.attributes)}); lower k"
                )
            cell_archetype = self._cluster(cell, cell_counts, shape)
            k = int(cell_archetype.max()) + 1
            profile_cells = [np.flatnonzero(cell_archetype == j) for j in range(k)]
        lut = torch.as_tensor(cell_archetype, dtype=torch.int32, device=cell.device)
        index = lut[cell]
        counts = torch.bincount(index.long(), minlength=len(profile_cells)).cpu()
        profiles, share = [], []
        for cells in profile_cells:
            codes = np.unravel_index(cells, shape)
            w = cell_counts[cells]
            if self.profile == "most_common":  # the combination with most members (ties: the lowest cell)
                best = int(np.argmax(w))
                picked = [int(c[best]) for c in codes]
            else:  # modal label of each attribute, weighting cells by their agents
                picked = [int(np.argmax(np.bincount(c, weights=w, minlength=len(ATTRIBUTES[a]))))
                          for a, c in zip(self.attributes, codes, strict=True)]
            profiles.append({a: ATTRIBUTES[a][c] for a, c in zip(self.attributes, picked, strict=True)})
            exact = int(np.ravel_multi_index(tuple(picked), shape))
            share.append(float(cell_counts[exact] / max(w.sum(), 1)) if exact in set(cells.tolist()) else 0.0)
        return Archetypes(
            name=self.name,
            attributes=tuple(self.attributes),
            index=index,
            counts=counts.to(torch.int64),
            profiles=profiles,
            descriptions=[describe(p) for p in profiles],
            profile_share=torch.tensor(share, dtype=torch.float64),
        )

    def _cluster(self, cell: torch.Tensor, cell_counts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """(cells,) archetype of each cell (-1 for cells with no agent), clusters ordered by size."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        n = cell.shape[0]
        rng = np.random.default_rng(self.seed)
        if self.sample_size >= n:
            fit_counts = cell_counts
        else:
            pick = torch.as_tensor(rng.choice(n, size=self.sample_size, replace=False), device=cell.device)
            fit_counts = torch.bincount(cell[pick], minlength=cell_counts.size).cpu().numpy()
        fit_cells = np.flatnonzero(fit_counts)
        if fit_cells.size < self.k:
            raise ValueError(
                f"{self._where()}: the sample of {self.sample_size} agents holds only {fit_cells.size} "
                f"distinct combinations, fewer than k={self.k}; raise sample_size"
            )
        present = np.flatnonzero(cell_counts)
        if self.method == "kmeans":
            model = KMeans(n_clusters=self.k, n_init=4, random_state=self.seed)
        else:
            model = MiniBatchKMeans(n_clusters=self.k, n_init=4, random_state=self.seed, batch_size=1024)
        model.fit(_one_hot(fit_cells, shape), sample_weight=fit_counts[fit_cells].astype(np.float64))
        labels = model.predict(_one_hot(present, shape))
        # Clusters that received no cell are dropped; the rest are numbered by size (largest
        # first), ties by their smallest cell, so the numbering does not depend on sklearn's.
        used = np.unique(labels)
        if used.size < self.k:
            log.warning("%s: %d of k=%d clusters are empty and dropped", self._where(), self.k - used.size,
                        self.k)
        size = np.array([cell_counts[present[labels == u]].sum() for u in used])
        first = np.array([present[labels == u].min() for u in used])
        rank = np.empty(used.size, dtype=np.int64)
        rank[np.lexsort((first, -size))] = np.arange(used.size)
        remap = np.full(self.k, -1, dtype=np.int64)
        remap[used] = rank
        out = np.full(cell_counts.size, -1, dtype=np.int64)
        out[present] = remap[labels]
        return out


@dataclass
class Archetypes:
    """K archetypes of a population.

    Attributes:
        name: the spec's name.
        attributes: attributes the archetypes are built on.
        index: (N,) int32, archetype 0..K-1 of each agent, on the population's device.
        counts: (K,) int64 agents per archetype (CPU).
        profiles: K dicts attribute -> label (modal label among members for clusters).
        descriptions: K human-readable profiles, e.g. "a 35-44 year old woman in Queens".
        profile_share: (K,) float64 share of each archetype's members whose attributes are exactly
            its profile (1 for groups; None when not known).
    """

    name: str
    attributes: tuple[str, ...]
    index: torch.Tensor
    counts: torch.Tensor
    profiles: list[dict[str, str]]
    descriptions: list[str]
    profile_share: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = len(self.profiles)
        if self.counts.shape != (k,) or len(self.descriptions) != k:
            raise ValueError(f"archetypes {self.name!r}: {k} profiles but counts {tuple(self.counts.shape)} "
                             f"and {len(self.descriptions)} descriptions")

    @property
    def k(self) -> int:
        """Number of archetypes K."""
        return len(self.profiles)

    def members_of(self, k: int) -> torch.Tensor:
        """(M,) int64 indices of the agents in archetype `k`."""
        if not 0 <= k < self.k:
            raise IndexError(f"archetype {k} out of range 0..{self.k - 1}")
        return torch.nonzero(self.index == k).squeeze(1)

    def profile_table(self) -> pd.DataFrame:
        """One row per archetype: ``archetype``, each attribute, ``count``, ``description``."""
        df = pd.DataFrame(self.profiles, columns=list(self.attributes))
        df.insert(0, "archetype", np.arange(self.k))
        df["count"] = self.counts.numpy()
        df["description"] = self.descriptions
        return df


# -- helpers ----------------------------------------------------------------------------------------


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"field {field}: {msg}" if err["loc"] else msg)
    return "; ".join(parts)


def _cell_codes(
    population: Population, attributes: list[str], where: str
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(N,) int64 combined code of the attributes (first attribute slowest) and the cell-grid shape."""
    shape = tuple(len(ATTRIBUTES[a]) for a in attributes)
    cell = torch.zeros(population.n, dtype=torch.int64, device=population.device)
    for a, size in zip(attributes, shape, strict=True):
        if a not in population:
            cols = ", ".join(population.columns)
            raise ValueError(f"{where}: the population has no column {a!r}; columns: {cols}")
        col = population[a]
        if a != "employed" and population.codebooks.get(a) != ATTRIBUTES[a]:
            raise ValueError(f"{where}: column {a!r} has codebook {population.codebooks.get(a)}, "
                             f"expected {list(ATTRIBUTES[a])}")
        cell = cell * size + col.to(torch.int64)
    return cell, shape


def _one_hot(cells: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(len(cells), sum(shape)) float64 one-hot encoding of flat cell codes."""
    codes = np.unravel_index(cells, shape)
    out = np.zeros((cells.size, sum(shape)))
    start = 0
    for c, size in zip(codes, shape, strict=True):
        out[np.arange(cells.size), start + c] = 1.0
        start += size
    return out


_RACE_WORDS = {
    "Asian/Pacific-Islander": "Asian or Pacific Islander",
    "Black/African-American": "Black or African American",
    "Hispanic/Latino": "Hispanic or Latino",
    "White": "White",
}
_BOROUGH_PHRASE = {"Bronx": "in the Bronx", "Staten Island": "on Staten Island"}


def _article(word: str) -> str:
    first = word.split("-")[0].split(" ")[0].lower()
    vowel = first[:1] in "aeiou" or first.startswith(("8", "11", "18"))
    return "an" if vowel else "a"


def describe(profile: dict[str, str]) -> str:
    """Human-readable profile for prompts: ``describe({"age_band": "35-44", "sex": "Female",
    "borough": "Queens"})`` is "a 35-44 year old woman in Queens". Missing attributes are left out."""
    age = profile.get("age_band")
    child = age in AGE_BANDS[: AGE_BANDS.index("18-24")] if age else False
    noun = {"Female": "girl" if child else "woman", "Male": "boy" if child else "man"}.get(
        profile.get("sex", ""), "child" if child else "person")
    words = []
    if age:
        words.append("75 years or older" if age == "75+" else f"{age} year old")
    race = profile.get("race")
    if race in _RACE_WORDS:
        words.append(_RACE_WORDS[race])
    if age == "75+":
        phrase = f"{noun} {words[0]}" if len(words) == 1 else f"{words[1]} {noun} {words[0]}"
    else:
        phrase = " ".join([*words, noun])
    tail = []
    if race == "other":
        tail.append("of another race or ethnicity")
    borough = profile.get("borough")
    if borough:
        tail.append(_BOROUGH_PHRASE.get(borough, f"in {borough}"))
    if "employed" in profile:
        tail.append("who is employed" if profile["employed"] == "employed" else "who is not employed")
    return " ".join([_article(phrase), phrase, *tail])

