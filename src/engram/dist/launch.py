"""``engram train --nproc N``: start N workers on this machine through torchrun and wait for them.

The launcher is PyTorch's own (``python -m torch.distributed.run --standalone``: a free port on this host,
one rendezvous, the workers' environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``); each worker runs ``engram.cli`` with the same arguments minus ``--nproc`` and joins the
group in ``Runtime.from_env``. If a worker fails, torchrun stops the others and exits non-zero; its exit
status is ours. ``OMP_NUM_THREADS`` defaults to 1 per worker (N workers on N cores; set it to share more).
Several machines: run torchrun yourself on each (docs/scaleout.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from engram.argtypes import drop_option


def worker_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the workers are the job, not launchers)."""
    return drop_option(argv, "--nproc")


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "engram.cli", *worker_argv(argv)]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run the workers to completion; returns torchrun's exit status (0 when every worker succeeded)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(launch_command(nproc, argv), env=env).returncode


__all__ = ["launch", "launch_command", "worker_argv"]
