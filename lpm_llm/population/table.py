"""Population: N agents as named 1-D tensor columns with a codebook per categorical column.

Columns (all shape (N,)), as built by :func:`lpm_llm.population.synthesis.synthesize_nyc`:

=============  =======  ==================================================================
name           dtype    meaning
=============  =======  ==================================================================
borough        int8     code into ``BOROUGHS``
age_band       int8     code into ``AGE_BANDS``
sex            int8     code into ``SEXES``
race           int8     code into ``RACES`` (``other`` = in no published group)
household      int32    household group id, every agent has one (0..H-1)
school         int32    classroom group id for ages 5-17, -1 for none
workplace      int32    workplace group id for employed adults 18-64, -1 for none
employed       bool     in work at the start of the simulation
=============  =======  ==================================================================

A categorical column is stored as the smallest integer dtype that fits its codes and has an entry in
``codebooks`` (code -> label). Group-id columns are int32 with -1 for "no group". Never address a
column by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

BOROUGHS: tuple[str, ...] = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
AGE_BANDS: tuple[str, ...] = (
    "0-4", "5-12", "13-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65-74", "75+",
)
SEXES: tuple[str, ...] = ("Female", "Male")
RACES: tuple[str, ...] = (
    "Asian/Pacific-Islander", "Black/African-American", "Hispanic/Latino", "White", "other",
)
GROUP_COLUMNS: tuple[str, ...] = ("household", "school", "workplace")

_META_KEY = b"lpm_llm.codebooks"
_SCALE_KEY = b"lpm_llm.scale"


def smallest_int_dtype(max_value: int, min_value: int = 0) -> torch.dtype:
    """Smallest signed torch integer dtype holding every value in [min_value, max_value]."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        if info.min <= min_value and max_value <= info.max:
            return dtype
    raise ValueError(f"values in [{min_value}, {max_value}] do not fit in int64")


class Population:
    """N agents stored column-wise.

    Args:
        columns: name -> 1-D tensor, all of the same length N.
        codebooks: categorical column name -> labels, so that ``labels[code]`` names a code.
        scale: agents per real person (0.01 for a 1:100 city), or None if the agents stand for
            themselves; set once where the population is made (``synthesize_nyc``) and kept by
            every copy and by parquet files.
        residents: real residents per area (one per label of the ``borough`` codebook), or None;
            with them :meth:`persons_per_agent` is exact per area.
    """

    def __init__(
        self,
        columns: Mapping[str, torch.Tensor],
        codebooks: Mapping[str, Iterable[str]] | None = None,
        *,
        scale: float | None = None,
        residents: Iterable[float] | None = None,
    ):
        if not columns:
            raise ValueError("a Population needs at least one column")
        lengths = {name: int(t.shape[0]) for name, t in columns.items()}
        for name, t in columns.items():
            if t.dim() != 1:
                raise ValueError(f"column {name!r} must be 1-D, got shape {tuple(t.shape)}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns: dict[str, torch.Tensor] = dict(columns)
        self.codebooks: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in (codebooks or {}).items()}
        for name in self.codebooks:
            if name not in self.columns:
                raise ValueError(f"codebook for {name!r} but no such column; columns: {sorted(self.columns)}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale (agents per real person) must be > 0, got {scale}")
        self.scale: float | None = None if scale is None else float(scale)
        self.residents: tuple[float, ...] | None = None if residents is None else tuple(map(float, residents))
        if self.residents is not None and len(self.residents) != len(self.codebooks.get("borough", ())):
            raise ValueError(f"residents has {len(self.residents)} values; the borough codebook "
                             f"{self.codebooks.get('borough', ())} needs one per area")

    def persons_per_agent(self, agents: torch.Tensor | None = None) -> torch.Tensor:
        """(areas,) float64 real residents represented by one agent, per area of the ``borough``
        codebook: residents / agents when ``residents`` is known, else ``1 / scale``, else 1.
        `agents` (areas,): the agents per area to use instead of this table's (the whole population's
        when this table is one rank's shard of it)."""
        areas = len(self.codebooks.get("borough", ())) or 1
        if self.residents is not None:
            if agents is None:
                agents = torch.bincount(self["borough"].long().cpu(), minlength=areas)
            agents = agents.double().cpu()
            return torch.tensor(self.residents, dtype=torch.float64) / agents.clamp(min=1.0)
        return torch.full((areas,), 1.0 if self.scale is None else 1.0 / self.scale, dtype=torch.float64)

    def _meta(self) -> dict:
        return {"scale": self.scale, "residents": self.residents}

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    @property
    def n(self) -> int:
        """Number of agents N."""
        return len(self)

    @property
    def device(self) -> torch.device:
        return next(iter(self.columns.values())).device

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"unknown column {name!r}; columns: {', '.join(sorted(self.columns))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def labels(self, name: str) -> tuple[str, ...]:
        """Codebook of a categorical column."""
        if name not in self.codebooks:
            raise KeyError(f"column {name!r} is not categorical; categorical: {', '.join(sorted(self.codebooks))}")
        return self.codebooks[name]

    def nbytes(self) -> int:
        """Bytes held by all columns."""
        return sum(t.element_size() * t.numel() for t in self.columns.values())

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}:{str(v.dtype).removeprefix('torch.')}" for k, v in self.columns.items())
        return f"Population(n={self.n}, device={self.device}, columns=[{cols}])"

    # -- transforms -----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Population:
        """A copy with every column on `device` (the same object's columns are not moved)."""
        return Population({k: v.to(device) for k, v in self.columns.items()}, self.codebooks, **self._meta())

    def with_columns(self, **columns: torch.Tensor) -> Population:
        """A new Population sharing existing columns plus (or replacing) the given ones."""
        return Population({**self.columns, **columns}, self.codebooks, **self._meta())

    # -- dataframes and parquet -----------------------------------------------------------------
    def to_dataframe(self, decode: bool = False) -> pd.DataFrame:
        """Columns as a DataFrame; with `decode`, categorical columns become pandas Categoricals."""
        data = {}
        for name, t in self.columns.items():
            arr = t.detach().cpu().numpy()
            if decode and name in self.codebooks:
                arr = pd.Categorical.from_codes(arr.astype(np.int64), categories=list(self.codebooks[name]))
            data[name] = arr
        return pd.DataFrame(data)

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        codebooks: Mapping[str, Iterable[str]] | None = None,
        device: torch.device | str = "cpu",
    ) -> Population:
        """Build from a DataFrame.

        String or pandas-Categorical columns become coded categorical columns (codebook = the
        given one, else the categories in sorted order); integer columns keep the smallest fitting
        dtype (group columns stay int32); float columns become float32; bool stays bool.
        """
        codebooks = {k: tuple(v) for k, v in (codebooks or {}).items()}
        columns: dict[str, torch.Tensor] = {}
        out_books: dict[str, tuple[str, ...]] = {}
        for name in df.columns:
            s = df[name]
            if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or pd.api.types.is_string_dtype(s):
                book = codebooks.get(name) or tuple(sorted(map(str, pd.unique(s.astype(str)))))
                codes = pd.Categorical(s.astype(str), categories=list(book)).codes
                if (codes < 0).any():
                    bad = sorted(set(s.astype(str)[codes < 0]))[:5]
                    raise ValueError(f"column {name!r} has values outside its codebook {list(book)}: {bad}")
                columns[name] = torch.from_numpy(codes.astype(np.int64)).to(smallest_int_dtype(len(book) - 1))
                out_books[name] = book
            elif pd.api.types.is_bool_dtype(s):
                columns[name] = torch.from_numpy(s.to_numpy(dtype=bool))
            elif pd.api.types.is_integer_dtype(s):
                arr = s.to_numpy()
                if name in GROUP_COLUMNS:
                    dtype = torch.int32
                elif name in codebooks:
                    dtype = smallest_int_dtype(len(codebooks[name]) - 1)
                    out_books[name] = codebooks[name]
                else:
                    dtype = smallest_int_dtype(int(arr.max(initial=0)), int(arr.min(initial=0)))
                columns[name] = torch.from_numpy(arr.astype(np.int64)).to(dtype)
            elif pd.api.types.is_float_dtype(s):
                columns[name] = torch.from_numpy(s.to_numpy(dtype=np.float32))
            else:
                raise TypeError(f"column {name!r} has unsupported dtype {s.dtype}")
        return cls({k: v.to(device) for k, v in columns.items()}, out_books)

    def to_parquet(self, path: str | Path) -> None:
        """Write the raw columns (codes, not labels) and the codebooks (in the file's metadata)."""
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.to_dataframe(decode=False), preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_META_KEY] = json.dumps({k: list(v) for k, v in self.codebooks.items()}).encode()
        meta[_SCALE_KEY] = json.dumps(self._meta()).encode()
        pq.write_table(table.replace_schema_metadata(meta), str(path))

    @classmethod
    def from_parquet(cls, path: str | Path, device: torch.device | str = "cpu") -> Population:
        """Read a file written by :meth:`to_parquet`; dtypes and codebooks come back unchanged."""
        import json

        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"population file {path} does not exist")
        table = pq.read_table(str(path))
        meta = table.schema.metadata or {}
        books = json.loads(meta[_META_KEY]) if _META_KEY in meta else {}
        columns = {}
        for name in table.column_names:
            arr = table.column(name).to_numpy()
            # a copy: arrow's buffers are read-only and torch needs writable memory
            columns[name] = torch.from_numpy(np.array(arr, copy=True)).to(device)
        scale = json.loads(meta[_SCALE_KEY]) if _SCALE_KEY in meta else {}
        return cls(columns, books, **scale)
