"""What determines an answer besides the request: a fingerprint of the model, part of every cache key.

- Embedded model: the sha256 of the weights file, the llama-cpp-python version, the backend and
  every setting that changes the numerics. Hashing the ~100 MB file takes a fraction of a second;
  the digest is remembered per (path, size, mtime) in ``weights-sha256.json`` beside the answer
  cache's default folder, so a run hashes it once.
- Remote endpoint: the model name (in the request already) and ``llm.cache_namespace``. Two hosts
  serving the same model name share answers unless their namespaces differ.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from lpm_llm.llm.settings import default_cache_dir

log = logging.getLogger(__name__)
_lock = threading.Lock()
_memo: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | Path, store: Path | None = None) -> str:
    """sha256 hex digest of a weights file, remembered per (absolute path, size, mtime in ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
        store = store if store is not None else default_cache_dir().parent / "weights-sha256.json"
        known = _read(store)
        entry = known.get(key[0])
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            digest = str(entry["sha256"])
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            digest = h.hexdigest()
            known[key[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            _write(store, known)
        _memo[key] = digest
        return digest


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (read without importing the library)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def local_fingerprint(model_path: str | Path, *, backend: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The embedded model's fingerprint: weights hash, llama-cpp-python version, backend, settings."""
    return {
        "weights_sha256": weights_sha256(model_path),
        "llama_cpp_python": llama_cpp_version(),
        "backend": backend,
        "settings": dict(sorted(settings.items())),
    }


def _read(store: Path) -> dict[str, Any]:
    try:
        return json.loads(store.read_text())
    except (OSError, ValueError):
        return {}


def _write(store: Path, known: dict[str, Any]) -> None:
    """Best effort (the digest is only a shortcut): write atomically, log if the folder is not writable."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, store)
    except OSError as err:
        log.debug("could not remember the weights digest in %s: %s", store, err)
