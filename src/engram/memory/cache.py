"""A hot-row cache in a faster tier in front of a slower store (RAM in front of the disk tier).

``CachedStore(backing, capacity_bytes, policy)`` is itself a ``RowStore``: each ``gather`` is one step of
its replacement policy (engram.memory.cache_policy). The step's unique rows are looked up; hits are
copied out of the cache's slot tensor, misses are read from the backing store in one batched read; then
the policy's evictions free slots and its admissions fill them from the rows just read. Read-only: a cache
never trains (``trainable = False``), so a model with a cached table refuses to build an optimizer.

Rows in flight are never lost to eviction, by construction: every ``gather`` returns the batch *its own
copy* of its rows (the gather assembles them into a fresh tensor anyway, so the copy costs nothing
extra), and the cache's slots are only written inside ``gather`` under a lock. A prefetch for step i+1
that evicts rows of step i therefore cannot change what step i already holds (FBGEMM's hazard needed
pins because its kernels read the cache slots in place). The previous step's rows are still passed to
the policy as protected, so they are not evicted right after use (that would only cost hit rate).
When a step has more unique rows than the cache can take, the overflow is read from the backing store
for that step only (``policy.stats.overflow``): never an error, never a wait.

Shape legend: N ids asked, U unique ids, C capacity in rows, Dh row width.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from engram.io import fault_point
from engram.memory.cache_policy import CachePolicy, make_policy
from engram.memory.store import RowStore

_ITEMSIZE = {"float32": 4, "bfloat16": 2}


class CachedStore(RowStore):
    """``backing`` with a cache of ``capacity_bytes`` of rows (see the module docstring)."""

    trainable = False

    def __init__(self, backing: RowStore, capacity_bytes: int, policy: str | CachePolicy = "lfu-aging",
                 **policy_kw: Any) -> None:
        super().__init__(backing.layout)
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.backing = backing
        self.tier = f"{backing.tier}+cache"
        lay = backing.layout
        self.capacity = min(capacity_bytes // (lay.d_head * _ITEMSIZE[lay.dtype]), lay.num_rows)
        self.policy = policy if isinstance(policy, CachePolicy) else make_policy(policy, lay.num_rows, self.capacity,
                                                                                  **policy_kw)
        if self.policy.capacity != self.capacity:
            raise ValueError(f"policy capacity {self.policy.capacity} != cache capacity {self.capacity} rows")
        dtype = torch.bfloat16 if lay.dtype == "bfloat16" else torch.float32
        self.slots = torch.empty(self.capacity, lay.d_head, dtype=dtype)  # C x Dh rows, RAM
        self.slot_of = np.full(lay.num_rows, -1, dtype=np.int64)  # row -> slot, -1 = not cached
        self._free = list(range(self.capacity - 1, -1, -1))
        self._previous = np.zeros(0, np.int64)  # last step's rows: protected from eviction
        self._lock = threading.Lock()
        self.stats.extra.update(hits=0, misses=0, backing_bytes=0)

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        fault_point(f"store.gather:{self.layout.name}")
        ids = flat_ids.reshape(-1).cpu().numpy().astype(np.int64, copy=False)
        uniq, inv = np.unique(ids, return_inverse=True)
        with self._lock:
            rows = self._step(uniq)
        self._count(len(ids), rows.numel() * rows.element_size())
        return rows if np.array_equal(uniq, ids) else rows[torch.from_numpy(inv)]

    def _step(self, uniq: np.ndarray) -> torch.Tensor:
        res = self.policy.access(uniq, self._previous)
        hit = res.hit_U
        out = torch.empty(len(uniq), self.layout.d_head, dtype=self.slots.dtype)
        if hit.any():
            out[torch.from_numpy(np.nonzero(hit)[0])] = self.slots[torch.from_numpy(self.slot_of[uniq[hit]])]
        miss_pos = np.nonzero(~hit)[0]
        if len(miss_pos):
            before = self.backing.stats.bytes_read
            out[torch.from_numpy(miss_pos)] = self.backing.gather(torch.from_numpy(uniq[miss_pos])).to(out.dtype)
            self.stats.extra["backing_bytes"] += self.backing.stats.bytes_read - before
        self._apply(res.evict, res.admit, uniq, out)
        self._previous = uniq
        self.stats.extra["hits"] += int(hit.sum())
        self.stats.extra["misses"] += len(miss_pos)
        return out

    def _apply(self, evict: np.ndarray, admit: np.ndarray, uniq: np.ndarray, rows: torch.Tensor) -> None:
        """Free the evicted rows' slots, then copy the admitted rows (read this step) into free slots."""
        for r in evict.tolist():
            self._free.append(int(self.slot_of[r]))
            self.slot_of[r] = -1
        if len(admit):
            slots = np.array([self._free.pop() for _ in range(len(admit))], dtype=np.int64)
            self.slot_of[admit] = slots
            pos = np.searchsorted(uniq, admit)  # admitted rows are among this step's (sorted) ids
            self.slots[torch.from_numpy(slots)] = rows[torch.from_numpy(pos)]

    def hit_rate(self) -> float:
        h, m = self.stats.extra["hits"], self.stats.extra["misses"]
        return h / max(h + m, 1)

    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    def close(self) -> None:
        self.backing.close()


__all__ = ["CachedStore"]
