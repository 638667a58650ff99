"""Reference cache policies: the algorithms of ``engram.memory.cache_policy`` in plain Python.

Not performance optimised (victim searches scan every resident row): they exist to be obviously right.
Each makes exactly the decisions of its compiled counterpart (same order of processing, same tie breaks),
and the test suite checks both, step by step, on random streams. Names and behaviour: see
``engram.memory.cache_policy``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from engram.memory import cache_kernels as K
from engram.memory.cache_policy import AccessResult, CachePolicy, RowStream, _duplicate_error

MASK64 = (1 << 64) - 1


def _result(hits: list[bool], admit: list[int], evict: list[int], rejected: int, overflow: int) -> AccessResult:
    return AccessResult(np.array(hits, dtype=bool), np.array(admit, dtype=np.int64), np.array(evict, dtype=np.int64),
                        rejected, overflow)


class _RefBase(CachePolicy):
    def __init__(self, num_rows: int, capacity: int) -> None:
        super().__init__(num_rows, capacity)
        self.step = 0

    def _begin(self, ids_U: np.ndarray, prot_P: np.ndarray) -> tuple[list[int], set[int]]:
        ids = [int(r) for r in ids_U]
        seen: set[int] = set()
        for i, r in enumerate(ids):
            if r in seen:
                raise _duplicate_error(ids_U, i)
            seen.add(r)
        self.step += 1
        return ids, seen | {int(r) for r in prot_P}


class LRURef(_RefBase):
    name = "lru"

    def __init__(self, num_rows: int, capacity: int) -> None:
        super().__init__(num_rows, capacity)
        self.order: OrderedDict[int, None] = OrderedDict()  # least recent first

    def _access(self, ids_U, prot_P):
        ids, pinned = self._begin(ids_U, prot_P)
        hits = [r in self.order for r in ids]
        for r, h in zip(ids, hits):
            if h:
                self.order.move_to_end(r)
        admit, evict, overflow = [], [], 0
        for r, h in zip(ids, hits):
            if h:
                continue
            if len(self.order) >= self.capacity:
                victim = next((v for v in self.order if v not in pinned), None)
                if victim is None:
                    overflow += 1
                    continue
                del self.order[victim]
                evict.append(victim)
            self.order[r] = None
            admit.append(r)
        return _result(hits, admit, evict, 0, overflow)

    def resident_ids(self):
        return np.array(sorted(self.order), dtype=np.int64)


class LFURef(_RefBase):
    name = "lfu"

    def __init__(self, num_rows: int, capacity: int, period: int = 0) -> None:
        super().__init__(num_rows, capacity)
        self.period, self.since = int(period), 0
        self.count: dict[int, int] = {}
        self.stamp: dict[int, int] = {}
        self.resident: set[int] = set()

    def _access(self, ids_U, prot_P):
        ids, pinned = self._begin(ids_U, prot_P)
        hits = [r in self.resident for r in ids]
        for r in ids:
            self.count[r] = min(self.count.get(r, 0) + 1, K.CNT_MAX)
            self.stamp[r] = self.step
        admit, evict, overflow = [], [], 0
        for r, h in zip(ids, hits):
            if h:
                continue
            if len(self.resident) >= self.capacity:
                cands = [v for v in self.resident if v not in pinned]
                if not cands:
                    overflow += 1
                    continue
                victim = min(cands, key=lambda v: (self.count[v], self.stamp[v], v))
                self.resident.remove(victim)
                evict.append(victim)
            self.resident.add(r)
            admit.append(r)
        if self.period:
            self.since += len(ids)
            if self.since >= self.period:
                self.since -= self.period
                self.count = {r: c >> 1 for r, c in self.count.items()}
        return _result(hits, admit, evict, 0, overflow)

    def resident_ids(self):
        return np.array(sorted(self.resident), dtype=np.int64)


class LFUAgingRef(LFURef):
    name = "lfu-aging"

    def __init__(self, num_rows: int, capacity: int, period: int | None = None) -> None:
        super().__init__(num_rows, capacity, period if period is not None else max(4 * capacity, 1))


class TinyLFURef(_RefBase):
    name = "tinylfu"

    def __init__(self, num_rows: int, capacity: int, window: float = 0.01, protected: float = 0.8,
                 sample: int | None = None) -> None:
        super().__init__(num_rows, capacity)  # sizes as in TinyLFU.__init__
        self.window_max = min(capacity, max(1, round(window * capacity)))
        self.protected_max = int(protected * (capacity - self.window_max))
        self.sample_size = int(sample) if sample is not None else max(10 * capacity, 16)
        width = 1 << max(max(4 * capacity, 64) - 1, 1).bit_length()
        self.shift = 64 - (width.bit_length() - 1)
        self.sketch = [[0] * width for _ in range(K.SKETCH_DEPTH)]
        self.adds = 0
        self.window: OrderedDict[int, None] = OrderedDict()
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.protected: OrderedDict[int, None] = OrderedDict()
        self.admitted_at: dict[int, int] = {}

    def _index(self, r: int, d: int) -> int:
        return ((r + 1) * int(K.SKETCH_SEEDS[d]) & MASK64) >> self.shift

    def _estimate(self, r: int) -> int:
        return min(self.sketch[d][self._index(r, d)] for d in range(K.SKETCH_DEPTH))

    def _size(self) -> int:
        return len(self.window) + len(self.probation) + len(self.protected)

    def _segment(self, r: int) -> OrderedDict | None:
        for seg in (self.window, self.probation, self.protected):
            if r in seg:
                return seg
        return None

    def _access(self, ids_U, prot_P):
        ids, _ = self._begin(ids_U, prot_P)
        step, prot = self.step, {int(r) for r in prot_P}
        this_step = set(ids)
        hits = [self._segment(r) is not None for r in ids]
        for r, h in zip(ids, hits):
            for d in range(K.SKETCH_DEPTH):
                j = self._index(r, d)
                self.sketch[d][j] = min(self.sketch[d][j] + 1, K.SKETCH_MAX)
            if h:
                self._hit(r)
        self.adds += len(ids)

        def pinned(v: int) -> bool:  # may not be evicted from the main segments
            return v in this_step or v in prot

        def eligible(v: int) -> bool:  # may leave the window
            return v not in prot and (v not in this_step or self.admitted_at[v] == step)

        evict, rejected, overflow = [], 0, 0

        def drop(v: int, seg: OrderedDict) -> None:
            del seg[v]
            if self.admitted_at.pop(v) != step:
                evict.append(v)

        for r, h in zip(ids, hits):
            if h:
                continue
            if self.capacity == 0:
                overflow += 1
                continue
            if len(self.window) < self.window_max and self._size() < self.capacity:
                self.window[r] = None
                self.admitted_at[r] = step
                continue
            cand = next((v for v in self.window if eligible(v)), None)
            cand_row = r if cand is None else cand
            if self._size() < self.capacity:
                admitted = True
            else:
                victim = next((v for v in self.probation if not pinned(v)), None)
                victim_seg = self.probation
                if victim is None:
                    victim = next((v for v in self.protected if not pinned(v)), None)
                    victim_seg = self.protected
                admitted = victim is not None and self._estimate(cand_row) > self._estimate(victim)
                if admitted:
                    drop(victim, victim_seg)
                elif cand is None:
                    if victim is not None:
                        rejected += 1
                    else:
                        overflow += 1
                    continue
                else:
                    if self.admitted_at[cand] == step:  # a miss of this step after all: bypassed
                        if victim is not None:
                            rejected += 1
                        else:
                            overflow += 1
                    drop(cand, self.window)
            if cand is None:
                self.probation[r] = None
                self.admitted_at[r] = step
                continue
            if admitted:
                del self.window[cand]
                self.probation[cand] = None
            self.window[r] = None
            self.admitted_at[r] = step
        admit = [r for r, h in zip(ids, hits) if not h and self._segment(r) is not None]
        if self.adds >= self.sample_size:
            self.sketch = [[c >> 1 for c in row] for row in self.sketch]
            self.adds //= 2
        return _result(hits, admit, evict, rejected, overflow)

    def _hit(self, r: int) -> None:
        if r in self.window:
            self.window.move_to_end(r)
        elif r in self.probation:
            del self.probation[r]
            self.protected[r] = None
            if len(self.protected) > self.protected_max:
                demoted = next(iter(self.protected))
                del self.protected[demoted]
                self.probation[demoted] = None
        else:
            self.protected.move_to_end(r)

    def resident_ids(self):
        return np.array(sorted([*self.window, *self.probation, *self.protected]), dtype=np.int64)


class BeladyRef(_RefBase):
    name = "belady"

    def __init__(self, num_rows: int, capacity: int, stream: RowStream) -> None:
        super().__init__(num_rows, capacity)
        self.stream = stream
        steps = [list(map(int, s)) for s in stream.steps()]
        self.next: list[list[int]] = [[] for _ in steps]
        later: dict[int, int] = {}
        for t in range(len(steps) - 1, -1, -1):
            self.next[t] = [later.get(r, int(K.NEVER)) for r in steps[t]]
            for r in steps[t]:
                later[r] = t
        self.resident: dict[int, int] = {}  # row -> next use

    def _access(self, ids_U, prot_P):
        t = self.step
        if t >= self.stream.num_steps or not np.array_equal(ids_U, self.stream.step(t)):
            raise ValueError(f"Belady replays its recorded stream: access {t} does not match step {t} of it")
        ids, _ = self._begin(ids_U, prot_P)
        nxt = self.next[t]
        hits = [r in self.resident for r in ids]
        for r, h, n in zip(ids, hits, nxt):
            if h:
                self.resident[r] = n
        admit, evict, rejected, overflow = [], [], 0, 0
        for i in sorted(range(len(ids)), key=lambda i: (nxt[i], i)):
            r, n = ids[i], nxt[i]
            if hits[i]:
                continue
            if self.capacity == 0:
                overflow += 1
                continue
            if n == K.NEVER:
                rejected += 1
                continue
            if len(self.resident) >= self.capacity:  # no pins: any resident may leave, this step's too
                victim = max(self.resident, key=lambda v: (self.resident[v], v))
                if self.resident[victim] <= n:
                    rejected += 1
                    continue
                del self.resident[victim]
                evict.append(victim)
            self.resident[r] = n
            admit.append(r)
        return _result(hits, admit, evict, rejected, overflow)

    def resident_ids(self):
        return np.array(sorted(self.resident), dtype=np.int64)


class StaticRef(_RefBase):
    name = "static"

    def __init__(self, num_rows: int, capacity: int, hot_ids) -> None:
        super().__init__(num_rows, capacity)
        ranked: list[int] = []
        for r in (int(x) for x in hot_ids):
            if r not in ranked:
                ranked.append(r)
        self.hot = set(ranked[:capacity])
        self.resident: set[int] = set()

    def _access(self, ids_U, prot_P):
        ids, _ = self._begin(ids_U, prot_P)
        hits = [r in self.resident for r in ids]
        admit = [r for r, h in zip(ids, hits) if not h and r in self.hot]
        self.resident.update(admit)
        return _result(hits, admit, [], hits.count(False) - len(admit), 0)

    def resident_ids(self):
        return np.array(sorted(self.resident), dtype=np.int64)


REFERENCE_POLICIES = {"lru": LRURef, "lfu": LFURef, "lfu-aging": LFUAgingRef, "tinylfu": TinyLFURef,
                      "static": StaticRef}

__all__ = ["BeladyRef", "LFUAgingRef", "LFURef", "LRURef", "REFERENCE_POLICIES", "StaticRef", "TinyLFURef"]
