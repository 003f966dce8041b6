"""Locate the files that ship with the package: prompts, archetypes, experiments and NYC data.

A wheel carries `prompts/`, `archetypes/` and `experiments/` under `lpm_llm/_bundled/`; a source
checkout (or an editable install) has them at the repository root. Callers never care which.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_BUNDLED = ("prompts", "archetypes", "experiments")


def resource_dir(kind: str) -> Path:
    """Folder of a bundled resource kind: 'prompts', 'archetypes', 'experiments' or 'data'."""
    if kind == "data":
        return _PACKAGE / "data"
    if kind not in _BUNDLED:
        raise ValueError(f"unknown resource kind {kind!r}; known: data, {', '.join(_BUNDLED)}")
    installed = _PACKAGE / "_bundled" / kind
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent / kind
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"bundled folder {kind!r} not found in {installed} nor {checkout}; reinstall lpm-llm")


def resolve_path(path: str | Path, kind: str) -> Path:
    """Resolve a user path: as given if it exists, else by name inside the bundled `kind` folder.

    `resolve_path("nyc_demographic.yaml", "archetypes")` finds the shipped file from any working
    directory, while `resolve_path("./my/archetypes.yaml", ...)` keeps the user's own file.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    candidates = [resource_dir(kind) / p, resource_dir(kind) / p.name]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"{kind[:-1] if kind.endswith('s') else kind} file {str(path)!r} not found "
        f"(looked at {p.resolve()} and in {resource_dir(kind)})"
    )


def nyc_data_path(name: str) -> Path:
    """Path of a bundled NYC data file, e.g. 'covid_daily.csv'."""
    p = resource_dir("data") / "nyc" / name
    if not p.exists():
        raise FileNotFoundError(f"bundled NYC data file {name!r} not found at {p}")
    return p
