"""Where a training process runs: its device, its rank among how many, and the process groups it talks on.

``Runtime.single(device)`` is one process (world size 1): every collective below is then a no-op that
returns its input, so the trainer has one code path. ``Runtime.from_env()`` joins the job ``torchrun``
started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on NCCL when the
process has a GPU (``cuda:LOCAL_RANK``) and gloo on CPU.

Two groups over the same ranks: ``group`` carries the backbone's DDP all-reduces and the trainer's small
collectives; ``table_group`` carries the sharded tables' all-to-alls. DDP launches its bucket all-reduces
asynchronously while backward runs, and the lookup's backward all-to-all runs inside that same backward:
on one group their order could differ between ranks (a bucket ready a moment earlier on one rank), which
mismatches collectives. Two groups keep each stream ordered.

Timeouts: every collective fails after ``timeout_s`` (gloo's default of 30 minutes would hang a job on a
dead rank for half an hour; ours is 10 minutes, tests use seconds). A failure surfaces as
``CollectiveError`` naming this rank, what it was doing and the timeout; a peer that died usually closes
its sockets, which fails the collective at once rather than at the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, stalled or raised (see its own log)."""


@dataclass
class Runtime:
    """Device, rank, world size and process groups of this process (see the module docstring)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # torch ProcessGroup for DDP and small collectives; None in a single process
    table_group: Any = None  # torch ProcessGroup for the table all-to-alls
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = ""

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.world_size > 1 and (self.group is None or self.table_group is None):
            raise ValueError("a runtime of several processes needs its process groups")
        if not self.timeout_s > 0:
            raise ValueError(f"collective timeout must be positive, got {self.timeout_s}")

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Runtime":
        return cls(torch.device(device))

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None,
                 init_method: str = "env://", device: torch.device | str | None = None) -> "Runtime":
        """Join the process group described by the environment (``torchrun`` sets it); a world of one
        process (or no ``WORLD_SIZE``) is ``Runtime.single`` on the default device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        if world == 1:
            return cls.single(device)
        return cls.init(rank, world, device, timeout_s=timeout_s, backend=backend, init_method=init_method,
                        local_rank=local)

    @classmethod
    def init(cls, rank: int, world_size: int, device: torch.device | str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S,
             backend: str | None = None, init_method: str = "env://", local_rank: int = 0) -> "Runtime":
        """Initialise torch.distributed (``init_method`` "env://", "file:///path" or "tcp://host:port")
        and make the two groups."""
        device = torch.device(device)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        table_group = dist.new_group(backend=backend, timeout=timeout)
        return cls(device, rank, world_size, local_rank, dist.group.WORLD, table_group, timeout_s, backend)

    # ----------------------------------------------------------------------------------------- queries

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} on {self.device}"

    # ------------------------------------------------------------------------------------- collectives

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Re-raise a failed collective inside the block as ``CollectiveError`` saying what was going on."""
        try:
            yield
        except CollectiveError:
            raise
        except (dist.DistError, RuntimeError) as e:
            if not self.distributed or not _is_collective_failure(e):
                raise
            raise CollectiveError(
                f"{self.describe()}: a collective failed while {what} (timeout {self.timeout_s:g} s): another rank "
                f"died, stalled or raised; see the other ranks' output. Cause: {str(e).splitlines()[0][:300]}"
            ) from e

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks in place (returns it); a no-op in a single process. A host tensor
        travels through this rank's device where the backend needs it (NCCL)."""
        if self.distributed:
            x = t.to(self.device) if self.backend == "nccl" and t.device != self.device else t
            with self.guard("summing a tensor over ranks"):
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
            if x is not t:
                t.copy_(x)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.guard("exchanging small objects"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        with self.guard("broadcasting a small object"):
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            with self.guard("waiting at a barrier"):
                dist.barrier(group=self.group)

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if it raised on any, raise on all (the rank's own error where it
        failed, elsewhere a ``CollectiveError`` naming the failed ranks), so no rank walks on alone into a
        collective the failed one will never join."""
        err: BaseException | None = None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
            err, out = e, None
        if not self.distributed:
            if err is not None:
                raise err
            return out
        status = self.all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        failed = [(r, s) for r, s in enumerate(status) if s is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {s}" for r, s in failed)
            raise CollectiveError(f"{self.describe()}: {what} failed on another rank: {detail}")
        return out

    def close(self, barrier: bool = True) -> None:
        """Leave the process group, after a barrier (so no rank tears down while another still talks)
        unless ``barrier`` is False (after a failure, when another rank may be gone)."""
        if self.distributed and dist.is_initialized():
            try:
                if barrier:
                    self.barrier()
            finally:
                dist.destroy_process_group()


_FAILURE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "closed", "broken pipe",
                  "watchdog", "abort")


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    msg = str(e).lower()
    return any(w in msg for w in _FAILURE_WORDS)


__all__ = ["CollectiveError", "DEFAULT_TIMEOUT_S", "Runtime"]
