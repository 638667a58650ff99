"""Durable file writes: a file is either wholly there with its new content, or not changed at all.

``atomic_write`` writes into a temporary file in the target's own directory (same filesystem, so the
rename is atomic), flushes and fsyncs it, ``os.replace``s it over the target, then fsyncs the directory
so the rename itself survives a power cut. A failure at any point (disk full, a kill) leaves the old
file untouched and at worst a stray ``.tmp-*`` file, which the next write of the same target ignores.

``write_synced`` is the non-atomic sibling for files written inside a directory that is itself renamed
into place atomically (a checkpoint): it only guarantees the bytes are on disk when it returns.

Data may be ``bytes``/``str`` or a callable ``writer(f)`` that streams into a binary file object (for
``torch.save``), so large payloads need not be held twice in memory. Writers see a ``RecordingFile``:
an ``OSError`` from the disk (ENOSPC, EIO) is re-raised as itself even when the writer turned it into
something else (``torch.save`` reports a failed write as ``RuntimeError: unexpected pos ...``).

Also here, because every durable write goes through this module:

* ``RunLock``: an exclusive OS lock on a run directory, held for the life of the process.
* Fault injection for tests (``fault_point`` / ``inject_faults`` / ``$ENGRAM_FAULTS``): named points in
  writers where a test makes the write fail, the process die, or time pass. It is the one mechanism
  every writer (checkpoints, table export, caches) uses; production runs never arm it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno as errno_mod
import fnmatch
import hashlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Literal, Self, Union

Payload = Union[bytes, bytearray, memoryview, str, Callable[[BinaryIO], Any]]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that entries created or renamed in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- fault injection

FAULTS_ENV = "ENGRAM_FAULTS"


@dataclass(frozen=True)
class Fault:
    """What happens when execution reaches a named point (``point`` is an fnmatch pattern).

    ``action``: "raise" an ``OSError(errno)`` (disk full by default), "kill" the process with SIGKILL,
    or "sleep" ``seconds``; on the ``hit``-th arrival (1-based) only, or every arrival from then on when
    ``repeat``. The point "write:<file name>" is reached by every write through this module, with the
    running byte count of the file: ``after_bytes`` makes it fire once the file would grow past that size.
    """

    point: str
    action: Literal["raise", "kill", "sleep"] = "raise"
    errno: int = errno_mod.ENOSPC
    seconds: float = 0.0
    hit: int = 1
    repeat: bool = False
    after_bytes: int | None = None


@dataclass
class FaultPlan:
    faults: tuple[Fault, ...]
    hits: dict[int, int] = field(default_factory=dict)  # fault index -> arrivals so far

    @classmethod
    def parse(cls, spec: str) -> "FaultPlan":
        """``"point=action[:arg][@hit][+]"`` items separated by ";": ``checkpoint.file=kill@2``,
        ``write=raise:28``, ``checkpoint.*=sleep:0.5+`` (``+`` repeats; ``write=raise>BYTES`` fires past a size)."""
        faults = []
        for item in filter(None, (x.strip() for x in spec.split(";"))):
            point, _, act = item.partition("=")
            repeat = act.endswith("+")
            act = act.rstrip("+")
            act, _, hit = act.partition("@")
            act, _, size = act.partition(">")
            action, _, arg = act.partition(":")
            if action not in ("raise", "kill", "sleep") or not point:
                raise ValueError(f"${FAULTS_ENV}: cannot parse {item!r}")
            kw: dict[str, Any] = {"hit": int(hit or 1), "repeat": repeat}
            if action == "raise" and arg:
                kw["errno"] = int(arg)
            if action == "sleep":
                kw["seconds"] = float(arg or 0)
            if size:
                kw["after_bytes"] = int(size)
            faults.append(Fault(point, action, **kw))
        return cls(tuple(faults))


_ACTIVE_FAULTS: contextvars.ContextVar[FaultPlan | None] = contextvars.ContextVar("engram_faults", default=None)


def _active_plan() -> FaultPlan | None:
    plan = _ACTIVE_FAULTS.get()
    if plan is None and os.environ.get(FAULTS_ENV):
        plan = FaultPlan.parse(os.environ[FAULTS_ENV])
        _ACTIVE_FAULTS.set(plan)  # parsed once per context, so hit counts accumulate
    return plan


def fault_point(name: str, nbytes: int | None = None) -> None:
    """A named point where a test may inject a fault (no-op unless one is armed)."""
    plan = _active_plan()
    if plan is None:
        return
    for i, f in enumerate(plan.faults):
        if not fnmatch.fnmatchcase(name, f.point):
            continue
        if f.after_bytes is not None and (nbytes is None or nbytes <= f.after_bytes):
            continue
        n = plan.hits[i] = plan.hits.get(i, 0) + 1
        if n == f.hit or (f.repeat and n > f.hit):
            if f.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.action == "sleep":
                time.sleep(f.seconds)
            else:
                raise OSError(f.errno, f"{os.strerror(f.errno)} (injected at {name})")


@contextlib.contextmanager
def inject_faults(*faults: Fault) -> Iterator[FaultPlan]:
    """Arm ``faults`` in this thread for the block (tests only)."""
    plan = FaultPlan(tuple(faults))
    token = _ACTIVE_FAULTS.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE_FAULTS.reset(token)


# ---------------------------------------------------------------------------------------------- writes


class RecordingFile:
    """A binary file wrapper that remembers the first ``OSError`` a write raised (see module docstring)
    and passes every write through the fault point "write:<file name>"."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f, self.name, self.error, self.written = f, name, None, 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        try:
            fault_point(f"write:{self.name}", self.written + n)
            out = self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.written += n
        return out

    def __getattr__(self, name: str) -> Any:  # seek, tell, flush, fileno, ... of the real file
        return getattr(self._f, name)


def _write_payload(f: BinaryIO, data: Payload, name: str) -> None:
    rec = f if isinstance(f, RecordingFile) else RecordingFile(f, name)
    try:
        if callable(data):
            data(rec)
        elif isinstance(data, str):
            rec.write(data.encode("utf-8"))
        else:
            rec.write(data)
    except Exception as e:
        if rec.error is not None and e is not rec.error:
            raise rec.error from e  # the disk's own error, not the writer's rewording of it
        raise


def write_synced(path: str | os.PathLike, data: Payload) -> None:
    """Write ``data`` to ``path`` (truncating), flush and fsync the file. Not atomic on its own."""
    with open(path, "wb") as f:
        _write_payload(f, data, Path(path).name)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing; the file appears under its name, complete and fsynced, only if
    the block succeeds (temp file in the same directory, fsync, rename, fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            rec = RecordingFile(f, path.name)
            try:
                yield rec  # type: ignore[misc]
            except Exception as e:
                if rec.error is not None and e is not rec.error:
                    raise rec.error from e
                raise
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"atomic.rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: Payload) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see ``atomic_open``)."""
    with atomic_open(path) as f:
        _write_payload(f, data, path.name if isinstance(path, Path) else Path(path).name)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as indented, key-sorted JSON with a trailing newline."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- file handle


class FileHandle:
    """Owner of one OS file descriptor (``self._fd``) for positioned reads: ``close`` is idempotent, the
    object is a context manager, and a handle dropped unclosed is closed when collected. A subclass frees
    what it holds beside the descriptor (threads, maps) in ``_close_extras``."""

    _fd: int | None = None

    def _close_extras(self) -> None:
        pass

    def close(self) -> None:
        self._close_extras()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd is not None:
            self.close()


# ------------------------------------------------------------------------------------------ run lock


class RunLockedError(RuntimeError):
    """Another live process holds the lock on a run directory."""


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock`` held for the life of the process (or until
    ``release``). The kernel drops it when the holder dies, so a killed run never leaves a stale lock;
    the file's content (the holder's pid) is only for the error message.
    """

    FILE = ".lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another engram process (pid {holder}); two writers "
                "would overwrite each other's checkpoints and metrics. Wait for it, stop it, or use "
                "another directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "FAULTS_ENV",
    "Fault",
    "FaultPlan",
    "FileHandle",
    "RecordingFile",
    "RunLock",
    "RunLockedError",
    "atomic_write",
    "atomic_write_json",
    "fault_point",
    "fsync_dir",
    "inject_faults",
    "sha256_file",
    "write_synced",
]
