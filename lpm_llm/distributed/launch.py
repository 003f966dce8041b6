"""``lpm-llm run ... --nproc N``: the same command, started on N ranks by torch's own launcher.

The command replaces itself with ``python -m torch.distributed.run --standalone --nproc-per-node N
-m lpm_llm ...`` (the arguments without ``--nproc``), so that the process the user started is the
launcher: stopping it stops every rank (the launcher forwards SIGINT/SIGTERM to its ranks, and each
rank asks the kernel to kill it if the launcher dies), and a rank that fails stops the others.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["launch_command", "launch"]


def launch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The ``torchrun`` command line that runs ``lpm-llm ARGV`` on ``nproc`` local ranks."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "lpm_llm", *argv]


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(argv: Sequence[str], nproc: int) -> None:  # pragma: no cover - replaces the process
    """Replace this process with ``torchrun`` running ``lpm-llm ARGV`` on ``nproc`` ranks."""
    command = launch_command(strip_nproc(argv), nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
