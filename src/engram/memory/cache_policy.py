"""Replacement policies for a hot-row cache of Engram table rows, behind one small per-step interface.

A cache store (RAM in front of the disk tier, device memory in front of the host tier) calls, once per step
and per Engram layer::

    result = policy.access(ids_U, protected_U)       # ids_U: the step's unique row ids, int64 [U]

and gets ``result.hit_U`` (bool [U]: resident when the step began), ``result.admit`` (misses to insert) and
``result.evict`` (resident rows to drop first). Guarantees, for every policy (one test suite checks them all):

* at most ``capacity`` rows are resident after any step (resident = admitted and not yet evicted);
* ``evict`` never holds a row of this step nor a ``protected`` row (rows a batch in flight still reads:
  the prefetch for step i+1 passes step i's rows), so a slot is never overwritten under a reader;
* ``admit`` is a subset of this step's misses; a miss that is not admitted is *bypassed*: the store reads it
  from the slower tier for this step only. ``result.rejected`` counts misses the policy chose not to keep,
  ``result.overflow`` those with no evictable slot (a step's rows exceeding what is free or unpinned):
  overflow is never an error and never waits;
* a row counts once per step however many positions use it (ids must be unique: a repeat raises);
* decisions are deterministic (no randomness; ties broken by row id or position).

Policies (``make_policy(name, num_rows, capacity)``): ``lru``; ``lfu`` (frequency over the full history,
ties to the least recent); ``lfu-aging`` (LFU whose counts halve every ``period`` accesses); ``tinylfu``
(W-TinyLFU: a 1% LRU window admitting everything, then a count-min-sketch admission duel into a segmented
LRU main); ``static`` (the rows ranked hottest by a hotness file, admitted on first touch, never evicted).
``Belady`` is the offline optimum (MIN with bypass) for a recorded ``RowStream``, as a reference.

The fast policies run compiled step kernels (``engram.memory.cache_kernels``); ``engram.memory.cache_reference``
has the same algorithms in plain Python, checked decision for decision against these.

Memory: per table row a few int32 (slot, last step, pin step; LFU adds count and aging epoch), per slot a
few int64: about 12-20 bytes per table row plus 56 per cached row.

Legend: R table rows, C capacity in rows, U ids in a step, P protected ids, A accesses, S steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from engram.memory import cache_kernels as K

# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class AccessResult:
    """What one step decided. ``admit`` and ``evict`` are int64 row ids; evictions happen before admissions."""

    hit_U: np.ndarray  # bool [U]
    admit: np.ndarray  # int64 [A], subset of ids_U[~hit_U]
    evict: np.ndarray  # int64 [E], resident rows, none of this step's or protected
    rejected: int  # misses the policy chose not to keep
    overflow: int  # misses bypassed for lack of an evictable slot

    @property
    def hits(self) -> int:
        return int(self.hit_U.sum())


@dataclass(slots=True)
class CacheStats:
    """Counts since construction. ``accesses`` = row accesses, once per row per step."""

    steps: int = 0
    accesses: int = 0
    hits: int = 0
    admitted: int = 0
    evicted: int = 0
    rejected: int = 0
    overflow: int = 0

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def add(self, accesses: int, hits: int, admitted: int, evicted: int, rejected: int, overflow: int, steps: int = 1):
        self.steps += steps
        self.accesses += accesses
        self.hits += hits
        self.admitted += admitted
        self.evicted += evicted
        self.rejected += rejected
        self.overflow += overflow


# ----------------------------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class RowStream:
    """A recorded sequence of steps: step t's unique row ids are ``ids_A[offsets_S1[t]:offsets_S1[t + 1]]``."""

    ids_A: np.ndarray  # int64 [A]
    offsets_S1: np.ndarray  # int64 [S + 1]
    num_rows: int

    def __post_init__(self) -> None:
        ids, off = np.ascontiguousarray(self.ids_A, np.int64), np.ascontiguousarray(self.offsets_S1, np.int64)
        object.__setattr__(self, "ids_A", ids)
        object.__setattr__(self, "offsets_S1", off)
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != ids.size or np.any(np.diff(off) < 0):
            raise ValueError("RowStream offsets must start at 0, never decrease and end at the number of ids")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise ValueError(f"RowStream ids must lie in [0, {self.num_rows})")

    @classmethod
    def from_matrix(cls, rows_SN: np.ndarray, num_rows: int) -> RowStream:
        """One step per row of ``rows_SN`` (N ids each, repeats allowed): each step's ids sorted, deduplicated."""
        rows = np.sort(np.asarray(rows_SN, dtype=np.int64).reshape(len(rows_SN), -1), axis=1)
        keep = np.ones(rows.shape, dtype=bool)
        keep[:, 1:] = rows[:, 1:] != rows[:, :-1]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(keep.sum(1), out=offsets[1:])
        return cls(rows[keep], offsets, num_rows)

    @classmethod
    def from_steps(cls, steps: Sequence[np.ndarray], num_rows: int) -> RowStream:
        """One step per array (repeats allowed): each step's ids sorted, deduplicated."""
        uniq = [np.unique(np.asarray(s, dtype=np.int64)) for s in steps]
        offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
        np.cumsum([u.size for u in uniq], out=offsets[1:])
        ids = np.concatenate(uniq) if uniq else np.zeros(0, np.int64)
        return cls(ids, offsets, num_rows)

    @property
    def num_steps(self) -> int:
        return self.offsets_S1.size - 1

    @property
    def num_accesses(self) -> int:
        return int(self.ids_A.size)

    def step(self, t: int) -> np.ndarray:
        return self.ids_A[self.offsets_S1[t]:self.offsets_S1[t + 1]]

    def steps(self):
        for t in range(self.num_steps):
            yield self.step(t)

    def first_touches(self) -> int:
        """Distinct rows: every one is a compulsory miss for a cache that starts empty."""
        return int(np.unique(self.ids_A).size)

    def next_use(self) -> np.ndarray:
        """int64 [A]: the step at which each access's row is next accessed (``NEVER`` if it is not)."""
        return _next_use(self.ids_A, self.offsets_S1, self.num_rows)


def _next_use(ids_A: np.ndarray, offsets_S1: np.ndarray, num_rows: int) -> np.ndarray:
    return K.next_use(ids_A, offsets_S1, np.full(num_rows, K.NEVER, np.int64))


# ---------------------------------------------------------------------------------------------- base


def _as_ids(x: np.ndarray | Sequence[int] | None, num_rows: int, what: str) -> np.ndarray:
    if x is None:
        return np.zeros(0, np.int64)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of row ids, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must be integer row ids, got dtype {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= num_rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: row id {bad} outside the table [0, {num_rows})")
    return np.ascontiguousarray(a, dtype=np.int64)


class CachePolicy(ABC):
    """A replacement policy for ``capacity`` rows out of a table of ``num_rows``; see the module docstring."""

    name: ClassVar[str]

    def __init__(self, num_rows: int, capacity: int) -> None:
        if int(num_rows) < 1:
            raise ValueError(f"{type(self).__name__}: num_rows must be >= 1, got {num_rows}")
        if not 0 <= int(capacity) <= int(num_rows):
            raise ValueError(f"{type(self).__name__}: capacity must lie in [0, num_rows={num_rows}], got {capacity}")
        self.num_rows, self.capacity = int(num_rows), int(capacity)
        self.stats = CacheStats()

    def access(self, ids_U: np.ndarray, protected_U: np.ndarray | None = None) -> AccessResult:
        """One step: the step's unique row ids, and rows that must stay resident (a batch in flight)."""
        ids = _as_ids(ids_U, self.num_rows, "ids")
        prot = _as_ids(protected_U, self.num_rows, "protected ids")
        res = self._access(ids, prot)
        self.stats.add(ids.size, res.hits, res.admit.size, res.evict.size, res.rejected, res.overflow)
        return res

    def run(self, stream: RowStream, protect_previous: bool = True) -> np.ndarray:
        """Replay a stream (each step protecting the previous one's rows if asked); hits per step, int64 [S]."""
        self._check_stream(stream)
        hits = np.zeros(stream.num_steps, np.int64)
        prev = None
        for t, ids in enumerate(stream.steps()):
            hits[t] = self.access(ids, prev if protect_previous else None).hits
            prev = ids
        return hits

    def _check_stream(self, stream: RowStream) -> None:
        if stream.num_rows != self.num_rows:
            raise ValueError(f"stream is over {stream.num_rows} rows, the policy over {self.num_rows}")

    @abstractmethod
    def _access(self, ids_U: np.ndarray, prot_P: np.ndarray) -> AccessResult: ...

    @abstractmethod
    def resident_ids(self) -> np.ndarray:
        """Sorted int64 ids of the resident rows."""

    def __len__(self) -> int:
        return int(self.resident_ids().size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_rows={self.num_rows}, capacity={self.capacity})"


def _duplicate_error(ids: np.ndarray, i: int) -> ValueError:
    return ValueError(f"ids must be unique within a step: row {int(ids[i])} repeats at position {i}")


# ------------------------------------------------------------------------------------- compiled policies


class _KernelPolicy(CachePolicy):
    """Shared state and plumbing of the compiled policies (see ``cache_kernels`` for the array layout)."""

    row_fields: ClassVar[int] = 3

    def __init__(self, num_rows: int, capacity: int) -> None:
        super().__init__(num_rows, capacity)
        self.rows_RF = np.zeros((self.num_rows, self.row_fields), np.int32)
        self.rows_RF[:, K.SLOT] = K.NIL
        self.slots_CF = np.full((max(self.capacity, 1), K.SLOT_FIELDS), K.NIL, np.int64)
        self.free_C = np.arange(self.capacity, dtype=np.int64)[::-1].copy()  # pop order: slot 0 first
        self.meta = np.zeros(K.META_FIELDS, np.int64)
        self.meta[K.FREE_TOP] = self.capacity
        self.lists_K3 = np.full((3, 3), K.NIL, np.int64)
        self.lists_K3[:, K.SIZE] = 0
        self.heap_C3 = np.zeros((max(self.capacity, 1), 3), np.int64)

    def resident_ids(self) -> np.ndarray:
        return np.flatnonzero(self.rows_RF[:, K.SLOT] != K.NIL).astype(np.int64)

    def __len__(self) -> int:
        return self.capacity - int(self.meta[K.FREE_TOP])

    def _access(self, ids_U: np.ndarray, prot_P: np.ndarray) -> AccessResult:
        U = ids_U.size
        hit, admit, evict, counts = np.zeros(U, bool), np.zeros(U, np.int64), np.zeros(U, np.int64), np.zeros(6, np.int64)
        self._step(ids_U, prot_P, hit, admit, evict, counts)
        if counts[4] == K.DUPLICATE:
            raise _duplicate_error(ids_U, int(counts[5]))
        return AccessResult(hit, admit[: counts[0]].copy(), evict[: counts[1]].copy(), int(counts[2]), int(counts[3]))

    @abstractmethod
    def _step(self, ids_U, prot_P, hit_U, admit_U, evict_U, counts) -> None: ...

    def run(self, stream: RowStream, protect_previous: bool = True) -> np.ndarray:
        self._check_stream(stream)
        hits_S, totals = self._stream(stream, bool(protect_previous))
        self.stats.add(stream.num_accesses, int(hits_S.sum()), *(int(x) for x in totals), steps=stream.num_steps)
        return hits_S

    @abstractmethod
    def _stream(self, stream: RowStream, protect_previous: bool) -> tuple[np.ndarray, np.ndarray]: ...


class LRU(_KernelPolicy):
    """Least recently used: every miss is admitted, the least recently accessed unpinned row leaves."""

    name = "lru"

    def _step(self, ids_U, prot_P, hit_U, admit_U, evict_U, counts):
        K.lru_step(ids_U, prot_P, self.rows_RF, self.slots_CF, self.lists_K3, self.free_C, self.meta, hit_U, admit_U,
                   evict_U, counts)

    def _stream(self, stream, protect_previous):
        return K.lru_stream(stream.ids_A, stream.offsets_S1, protect_previous, self.rows_RF, self.slots_CF,
                            self.lists_K3, self.free_C, self.meta)


class LFU(_KernelPolicy):
    """Least frequently used, counting every access since the row was first seen (resident or not); ties go
    to the least recent, then the lowest row id. Every miss is admitted."""

    name = "lfu"
    row_fields = 5
    aging_period = 0

    def _step(self, ids_U, prot_P, hit_U, admit_U, evict_U, counts):
        held = np.zeros(2 * ids_U.size + prot_P.size + 1, np.int64)
        K.lfu_step(ids_U, prot_P, self.rows_RF, self.slots_CF, self.heap_C3, self.free_C, self.meta,
                   self.aging_period, held, hit_U, admit_U, evict_U, counts)

    def _stream(self, stream, protect_previous):
        return K.lfu_stream(stream.ids_A, stream.offsets_S1, protect_previous, self.rows_RF, self.slots_CF,
                            self.heap_C3, self.free_C, self.meta, self.aging_period)


class LFUAging(LFU):
    """LFU whose counts all halve each time ``period`` accesses have accumulated (default 4 x capacity), so
    rows that were hot long ago lose their claim: frequency over a sliding horizon."""

    name = "lfu-aging"

    def __init__(self, num_rows: int, capacity: int, period: int | None = None) -> None:
        super().__init__(num_rows, capacity)
        self.aging_period = int(period) if period is not None else max(4 * self.capacity, 1)
        if self.aging_period < 1:
            raise ValueError(f"LFUAging: period must be >= 1 access, got {period}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


class TinyLFU(_KernelPolicy):
    """W-TinyLFU: a small LRU window (``window`` of the capacity) takes every miss; the row it pushes out
    enters the main segmented LRU (``protected`` of the main for rows hit twice, the rest probation) only if
    a count-min sketch (4 rows of 4-bit counters, halved every ``sample`` accesses, default 10 x capacity)
    estimates it more frequent than the main's least recent probation row. Ties keep the incumbent."""

    name = "tinylfu"

    def __init__(self, num_rows: int, capacity: int, window: float = 0.01, protected: float = 0.8,
                 sample: int | None = None) -> None:
        super().__init__(num_rows, capacity)
        if not 0.0 < window <= 1.0 or not 0.0 <= protected < 1.0:
            raise ValueError(f"TinyLFU: window must lie in (0, 1] and protected in [0, 1), got {window}, {protected}")
        self.window_max = min(self.capacity, max(1, round(window * self.capacity)))
        self.protected_max = int(protected * (self.capacity - self.window_max))
        self.sample_size = int(sample) if sample is not None else max(10 * self.capacity, 16)
        width = _pow2_at_least(max(4 * self.capacity, 64))
        self.sketch_DW = np.zeros((K.SKETCH_DEPTH, width), np.uint8)
        self.sketch_shift = 64 - (width.bit_length() - 1)

    def _step(self, ids_U, prot_P, hit_U, admit_U, evict_U, counts):
        K.tinylfu_step(ids_U, prot_P, self.rows_RF, self.slots_CF, self.lists_K3, self.free_C, self.meta,
                       self.sketch_DW, self.sketch_shift, self.sample_size, self.window_max, self.protected_max,
                       hit_U, admit_U, evict_U, counts)

    def _stream(self, stream, protect_previous):
        return K.tinylfu_stream(stream.ids_A, stream.offsets_S1, protect_previous, self.rows_RF, self.slots_CF,
                                self.lists_K3, self.free_C, self.meta, self.sketch_DW, self.sketch_shift,
                                self.sample_size, self.window_max, self.protected_max)


class Belady(_KernelPolicy):
    """Belady's MIN with bypass, offline, for one recorded ``stream``: after each step is served, keep the
    ``capacity`` rows needed soonest (a miss is kept only if needed sooner than the resident needed
    furthest ahead, which leaves). It ignores the pin rules (a row may leave right after the step that used
    it; ``protected_U`` is ignored), which online policies must obey: that only raises it, so it is an upper
    bound on every policy, not a policy a store can run. ``access`` must replay the stream's steps in order.

    (With pins, keeping the rows needed soonest is no longer optimal: a pinned row holds its slot through
    the next step, so two rows needed at the same step are not interchangeable.)
    """

    name = "belady"

    def __init__(self, num_rows: int, capacity: int, stream: RowStream) -> None:
        super().__init__(num_rows, capacity)
        self._check_stream(stream)
        self.stream = stream
        self.next_A = stream.next_use()
        self.position = 0

    def _step(self, ids_U, prot_P, hit_U, admit_U, evict_U, counts):
        t = self.position
        if t >= self.stream.num_steps or not np.array_equal(ids_U, self.stream.step(t)):
            raise ValueError(f"Belady replays its recorded stream: access {t} does not match step {t} of it")
        a, b = self.stream.offsets_S1[t], self.stream.offsets_S1[t + 1]
        nxt = self.next_A[a:b]
        order = np.argsort(nxt, kind="stable")
        K.belady_step(ids_U, nxt, prot_P, self.rows_RF, self.slots_CF, self.heap_C3, self.free_C, self.meta, order,
                      hit_U, admit_U, evict_U, counts)
        self.position += 1

    def _stream(self, stream, protect_previous):
        if stream is not self.stream or self.position != 0:
            raise ValueError("Belady.run replays its own stream, from the start")
        order = _orders_within_steps(self.next_A, stream.offsets_S1)
        self.position = stream.num_steps
        return K.belady_stream(stream.ids_A, self.next_A, order, stream.offsets_S1, protect_previous, self.rows_RF,
                               self.slots_CF, self.heap_C3, self.free_C, self.meta)


def _orders_within_steps(next_A: np.ndarray, offsets_S1: np.ndarray) -> np.ndarray:
    """Per step, the positions of its accesses in ascending next use (stable): int64 [A], step-local."""
    step_A = np.repeat(np.arange(offsets_S1.size - 1), np.diff(offsets_S1))
    order = np.lexsort((next_A, step_A))  # by step, then next use; lexsort is stable
    return order - offsets_S1[step_A[order]]


# ----------------------------------------------------------------------------------------------- static


class Static(CachePolicy):
    """The ``capacity`` hottest rows of a hotness ranking (e.g. counted on a training split), admitted on
    their first touch and never evicted; every other row bypasses. ``preload_ids()`` lists them for a
    store that wants to fill the cache up front."""

    name = "static"

    def __init__(self, num_rows: int, capacity: int, hot_ids: np.ndarray) -> None:
        super().__init__(num_rows, capacity)
        hot = _as_ids(hot_ids, self.num_rows, "hot ids")
        _, first = np.unique(hot, return_index=True)
        hot = hot[np.sort(first)][: self.capacity]  # hottest first; a repeated id keeps its first rank
        self.hot_R = np.zeros(self.num_rows, bool)
        self.hot_R[hot] = True
        self._hot = hot
        self.resident_R = np.zeros(self.num_rows, bool)

    def preload_ids(self) -> np.ndarray:
        return self._hot.copy()

    def _access(self, ids_U: np.ndarray, prot_P: np.ndarray) -> AccessResult:
        if np.unique(ids_U).size != ids_U.size:
            srt = np.argsort(ids_U, kind="stable")
            dup = srt[1:][ids_U[srt[1:]] == ids_U[srt[:-1]]]
            raise _duplicate_error(ids_U, int(dup.min()))
        hit = self.resident_R[ids_U]
        admit_mask = ~hit & self.hot_R[ids_U]
        admit = ids_U[admit_mask]
        self.resident_R[admit] = True
        return AccessResult(hit, admit, np.zeros(0, np.int64), int((~hit).sum() - admit.size), 0)

    def run(self, stream: RowStream, protect_previous: bool = True) -> np.ndarray:
        self._check_stream(stream)  # nothing is ever evicted: protection changes nothing
        hits_S, totals = K.static_stream(stream.ids_A, stream.offsets_S1, self.hot_R, self.resident_R)
        self.stats.add(stream.num_accesses, int(hits_S.sum()), *(int(x) for x in totals), steps=stream.num_steps)
        return hits_S

    def resident_ids(self) -> np.ndarray:
        return np.flatnonzero(self.resident_R).astype(np.int64)


# --------------------------------------------------------------------------------------------- registry

POLICIES: dict[str, Callable[..., CachePolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "lfu-aging": LFUAging,
    "tinylfu": TinyLFU,
    "static": Static,
}


def make_policy(name: str, num_rows: int, capacity: int, **kwargs) -> CachePolicy:
    """A policy by name (``static`` needs ``hot_ids``: row ids ranked hottest first)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; valid: {', '.join(POLICIES)}")
    if name == "static" and "hot_ids" not in kwargs:
        raise ValueError("the static policy needs hot_ids (rows ranked by a hotness file: RowHotness.ranked(layer))")
    return POLICIES[name](num_rows, capacity, **kwargs)


__all__ = ["AccessResult", "Belady", "CachePolicy", "CacheStats", "LFU", "LFUAging", "LRU", "POLICIES", "RowStream",
           "Static", "TinyLFU", "make_policy"]
