"""engram.io: the run-directory lock (real processes, SIGKILL) and the fault-injection hook."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram import io as eio

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from engram.io import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
time.sleep(600)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "LOCKED"
    return proc


def test_run_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    proc = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(eio.RunLockedError, match=f"pid {proc.pid}"):
            eio.RunLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with eio.RunLock(tmp_path / "run") as lock:  # the kernel released it: no stale lock after SIGKILL
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(eio.RunLockedError):  # exclusive within one process too (another descriptor)
            eio.RunLock(tmp_path / "run").acquire()
    assert lock._fd is None
    eio.RunLock(tmp_path / "run").acquire().release()


def test_fault_plan_parsing():
    plan = eio.FaultPlan.parse("checkpoint.file:*=kill@2; write:x.bin=raise:5>100 ;a.b=sleep:0.25+")
    kill, write, sleep = plan.faults
    assert (kill.point, kill.action, kill.hit, kill.repeat) == ("checkpoint.file:*", "kill", 2, False)
    assert (write.action, write.errno, write.after_bytes) == ("raise", errno.EIO, 100)
    assert (sleep.action, sleep.seconds, sleep.repeat) == ("sleep", 0.25, True)
    with pytest.raises(ValueError, match="cannot parse 'oops'"):
        eio.FaultPlan.parse("oops")


def test_injected_faults_fire_on_the_named_hit_only(tmp_path):
    with eio.inject_faults(eio.Fault("p.*", "raise", errno=errno.EIO, hit=2)):
        eio.fault_point("p.one")
        with pytest.raises(OSError) as info:
            eio.fault_point("p.two")
        assert info.value.errno == errno.EIO and "injected at p.two" in str(info.value)
        eio.fault_point("p.three")  # not repeating
        eio.fault_point("q")  # another point
    eio.fault_point("p.four")  # disarmed outside the block
    with eio.inject_faults(eio.Fault("s", "sleep", seconds=0.05, repeat=True)):
        t0 = time.perf_counter()
        eio.fault_point("s"), eio.fault_point("s")
        assert time.perf_counter() - t0 >= 0.1


def test_disk_full_inside_torch_save_surfaces_as_enospc(tmp_path):
    """torch.save turns a failed write into 'RuntimeError: unexpected pos'; the io layer re-raises the
    disk's own OSError, and the target keeps its old content."""
    target = tmp_path / "state.pt"
    eio.atomic_write(target, b"old")
    with eio.inject_faults(eio.Fault("write:state.pt", after_bytes=4096)):
        with pytest.raises(OSError) as info:
            eio.atomic_write(target, lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with eio.inject_faults(eio.Fault("write:plain.bin", after_bytes=10)):
        with pytest.raises(OSError) as info:
            eio.write_synced(tmp_path / "plain.bin", lambda f: torch.save({"w": torch.ones(1000)}, f))
    assert info.value.errno == errno.ENOSPC
