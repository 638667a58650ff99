"""Rows that arrive in time: gather each Engram layer's rows on background workers while earlier blocks
compute, and hand them to the block.

Row ids depend only on token ids, so they are known as soon as the tokens are: ``submit(hash_ids)``
starts one gather per Engram table (on a worker thread; the disk tier fans its reads out further) and
returns ``PrefetchedRows``, which the model takes as ``memory_rows``. When block i needs its rows,
``PrefetchedRows.get(i)`` waits for that gather only: the time it waits is the stall (counted in
``stats``); a worker's error is re-raised there, in the caller, and the block never computes on missing
rows. Prefill overlaps a chunk's gathers with the embedding and the blocks before the first Engram
layer; a decode step the same, one token per row (the next token exists only after sampling, so there is
no earlier point to start). How much compute that hides behind, per preset: docs/offload.md.

With CUDA, rows gathered on the host go through pinned staging buffers (two per table, used in turn) and
are copied on a side stream; the block's stream waits on the copy's event, not the host.

Shape legend: B batch, T time, L Engram layers, H heads, Dh row width.
"""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engram.model import EngramLM


@dataclass
class PrefetchStats:
    submitted: int = 0  # gathers started (one per table per step)
    waited: int = 0  # gathers a block had to wait for
    stall_s: float = 0.0  # seconds blocks spent waiting for rows
    gather_s: float = 0.0  # seconds the workers spent gathering

    def as_dict(self) -> dict[str, float]:
        return {"submitted": self.submitted, "waited": self.waited, "stall_s": self.stall_s, "gather_s": self.gather_s}


class PrefetchedRows:
    """One step's rows per Engram block, as they arrive (the model's ``memory_rows``)."""

    def __init__(self, futures: dict[int, Future], stats: PrefetchStats, lock: threading.Lock) -> None:
        self._futures, self._stats, self._lock = futures, stats, lock

    def get(self, block: int, default=None) -> torch.Tensor | None:
        fut = self._futures.get(block)
        if fut is None:
            return default
        t0 = time.perf_counter()
        waited = not fut.done()
        rows, event = fut.result()  # a worker's error is raised here, in the caller
        with self._lock:
            self._stats.stall_s += time.perf_counter() - t0
            self._stats.waited += int(waited)
        if event is not None:
            stream = torch.cuda.current_stream(rows.device)
            stream.wait_event(event)  # the block's stream waits, not the host
            rows.record_stream(stream)  # allocated on the side stream, read on this one
        return rows

    def wait_all(self) -> None:
        for fut in self._futures.values():
            fut.result()


def _one_intra_op_thread() -> None:
    """A worker's torch ops run on its own thread only. Otherwise each worker that reaches an OpenMP
    region brings its own team of threads, which spin against the model's team on the same cores:
    measured on 2 cores, decoding with the prefetcher ran 40% slower than without it while never waiting
    for a row; with this, as fast. (``torch.set_num_threads`` sets the calling thread's OpenMP and MKL
    thread counts; the caller's own count is untouched.)"""
    torch.set_num_threads(1)


class RowPrefetcher:
    """Background gathers of a model's Engram rows (see the module docstring)."""

    def __init__(self, model: EngramLM) -> None:
        self.device = model.tok_emb.weight.device
        self.tables = {i: layer.table for i, layer in model.engram_layers().items()}
        self.slot = {layer: j for j, layer in enumerate(model.hasher.layers)} if model.hasher is not None else {}
        self.stats = PrefetchStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, len(self.tables)), thread_name_prefix="engram-prefetch",
                                        initializer=_one_intra_op_thread)
        self._staging: dict[int, list[torch.Tensor | None]] = {i: [None, None] for i in self.tables}
        self._events: dict[int, list] = {i: [None, None] for i in self.tables}
        self._turn = 0
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def submit(self, hash_ids_BTLH: torch.Tensor) -> PrefetchedRows:
        """Start gathering every Engram layer's rows for these hash ids; returns at once."""
        self._turn ^= 1
        futures = {}
        for block, table in self.tables.items():
            ids_BTH = hash_ids_BTLH[:, :, self.slot[block]]
            ctx = contextvars.copy_context()  # workers run in the caller's context (e.g. an armed fault plan)
            futures[block] = self._pool.submit(ctx.run, self._gather, block, table, ids_BTH, self._turn)
        self.stats.submitted += len(futures)
        return PrefetchedRows(futures, self.stats, self._lock)

    def _gather(self, block: int, table, ids_BTH: torch.Tensor, turn: int):
        t0 = time.perf_counter()
        rows = table.gather_rows(ids_BTH)  # [B, T, H, Dh] on the store's side (host for host/disk tiers)
        out, event = self._to_device(block, rows, turn)
        with self._lock:
            self.stats.gather_s += time.perf_counter() - t0
        return out, event

    def _to_device(self, block: int, rows: torch.Tensor, turn: int):
        if rows.device == self.device or self._side is None:
            return rows.to(self.device), None
        prev = self._events[block][turn]
        if prev is not None:
            prev.synchronize()  # the copy that last used this staging buffer has finished
        buf = self._staging[block][turn]
        if buf is None or buf.numel() < rows.numel() or buf.dtype != rows.dtype:
            buf = torch.empty(rows.numel(), dtype=rows.dtype, pin_memory=True)
            self._staging[block][turn] = buf
        staged = buf[: rows.numel()].view(rows.shape)
        staged.copy_(rows)
        with torch.cuda.stream(self._side):
            out = staged.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._side)
        self._events[block][turn] = event
        return out, event

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RowPrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PrefetchStats", "PrefetchedRows", "RowPrefetcher"]
