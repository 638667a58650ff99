"""Run a multi-process scenario of tests/dist_worker.py: one real process per rank, meeting through a
FileStore, one thread each; a hung job is killed and reported, never waited on forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")


@dataclass
class Job:
    returncodes: list[int]
    stderr: list[str]
    seconds: float
    results: list[dict | None]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ENGRAM_FAULTS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_job(scenario: str, world: int, tmp: Path, args: dict | None = None, limit_s: float = 240,
            env_of_rank: dict[int, dict[str, str]] | None = None) -> Job:
    """Start ``world`` ranks of ``scenario``; wait (at most ``limit_s``, then kill all and fail)."""
    tmp.mkdir(parents=True, exist_ok=True)
    init = tmp / "store"
    init.unlink(missing_ok=True)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    procs, t0 = [], time.monotonic()
    for r in range(world):
        cmd = [sys.executable, str(WORKER), scenario, str(r), str(world), str(init), str(out), json.dumps(args or {})]
        env = worker_env(**(env_of_rank or {}).get(r, {}))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    errs = []
    try:
        for p in procs:
            left = max(1.0, limit_s - (time.monotonic() - t0))
            errs.append(p.communicate(timeout=left)[1])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"{scenario} at world {world} hung for {limit_s} s")
    results = [torch.load(out / f"rank{r}.pt") if (out / f"rank{r}.pt").exists() else None for r in range(world)]
    return Job([p.returncode for p in procs], errs, time.monotonic() - t0, results)


def assert_ok(job: Job) -> None:
    bad = [(r, c, e[-2000:]) for r, (c, e) in enumerate(zip(job.returncodes, job.stderr)) if c != 0]
    assert not bad, "\n".join(f"rank {r} exited {c}:\n{e}" for r, c, e in bad)
