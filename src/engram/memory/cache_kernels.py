"""Compiled step kernels of the row-cache policies (``engram.memory.cache_policy``).

Why compiled (numba): LRU lists, frequency heaps, W-TinyLFU's admission duels and Belady's furthest-next-use
eviction are sequential per row; NumPy cannot vectorise them, and plain Python runs about 1 M row accesses/s,
too slow for the tens of millions a hit-rate simulation replays. Each policy is one ``*_step`` function
(one step of the interface: classify hits, update recency/frequency, admit or bypass misses) and one
``*_stream`` function that loops the same step function over a whole recorded stream, so the simulator and
the live cache run identical code. ``engram.memory.cache_reference`` holds the same algorithms in plain
Python; tests check that both make the same decisions.

State lives in arrays owned by the Python policy object:

    rows_RF  int32 [R, F]   per table row: SLOT (slot index or NIL), STAMP (last step that accessed it),
                            PIN (last step it was protected), then policy fields (CNT, EPOCH)
    slots_CF int64 [C, F]   per cache slot: ROW, PREV, NEXT (list links), SEG (which list), HPOS (heap
                            position) or ADMIT (step admitted), KEY (Belady's next use)
    lists_K3 int64 [K, 3]   per list: head (least recent), tail (most recent), size
    free_C   int64 [C]      stack of free slots; meta[FREE_TOP] is its height
    heap_C3  int64 [C, 3]   binary min-heap of (key, tie, slot): LFU (count * 2^32 + stamp, row),
                            Belady (-next use, -row)
    meta     int64 [8]      step counter, free-stack height, heap size, policy counters

Legend: R table rows, C capacity (slots), U ids in a step, P protected ids, K lists, S steps, A accesses.
A row is *pinned* during a step when the step accessed it (STAMP == step) or protects it (PIN == step);
pinned rows are never evicted. Steps are numbered from 1; 0 means never.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NIL = -1
# rows_RF columns
SLOT, STAMP, PIN, CNT, EPOCH = 0, 1, 2, 3, 4
# slots_CF columns
ROW, PREV, NEXT, SEG, HPOS, ADMIT, KEY = 0, 1, 2, 3, 4, 5, 6
SLOT_FIELDS = 7
# lists_K3 columns
HEAD, TAIL, SIZE = 0, 1, 2
# meta fields
STEP, FREE_TOP, HEAP_SIZE, EPOCH_NOW, SINCE_AGING, SKETCH_ADDS = 0, 1, 2, 3, 4, 5
META_FIELDS = 8
# W-TinyLFU lists
WINDOW, PROBATION, PROTECTED = 0, 1, 2
# return codes, in out_counts[4]
OK, DUPLICATE = 0, 1
NEVER = np.iinfo(np.int64).max  # Belady: no next use

SKETCH_DEPTH = 4
SKETCH_MAX = 15  # 4-bit counters, as in TinyLFU
# Odd multipliers of the sketch's multiply-shift hashes (fixed: the sketch is deterministic).
SKETCH_SEEDS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
                        dtype=np.uint64)


# --------------------------------------------------------------------------------------- small helpers


@njit(cache=True)
def _pinned(r, rows_RF, step):
    return rows_RF[r, STAMP] == step or rows_RF[r, PIN] == step


@njit(cache=True)
def _unlink(s, slots_CF, lists_K3):
    k = slots_CF[s, SEG]
    p, n = slots_CF[s, PREV], slots_CF[s, NEXT]
    if p == NIL:
        lists_K3[k, HEAD] = n
    else:
        slots_CF[p, NEXT] = n
    if n == NIL:
        lists_K3[k, TAIL] = p
    else:
        slots_CF[n, PREV] = p
    slots_CF[s, PREV] = NIL
    slots_CF[s, NEXT] = NIL
    lists_K3[k, SIZE] -= 1


@njit(cache=True)
def _append(s, k, slots_CF, lists_K3):
    """Put slot s at the most-recent end (tail) of list k."""
    t = lists_K3[k, TAIL]
    slots_CF[s, SEG] = k
    slots_CF[s, PREV] = t
    slots_CF[s, NEXT] = NIL
    if t == NIL:
        lists_K3[k, HEAD] = s
    else:
        slots_CF[t, NEXT] = s
    lists_K3[k, TAIL] = s
    lists_K3[k, SIZE] += 1


@njit(cache=True)
def _first_unpinned(k, after, slots_CF, lists_K3, rows_RF, step):
    """(slot, last skipped) of the least recent unpinned slot of list k, starting after slot ``after``
    (NIL: from the head). Skipped slots stay pinned for the rest of the step, so callers resume there."""
    s = lists_K3[k, HEAD] if after == NIL else slots_CF[after, NEXT]
    while s != NIL and _pinned(slots_CF[s, ROW], rows_RF, step):
        after = s
        s = slots_CF[s, NEXT]
    return s, after


@njit(cache=True)
def _take_free(free_C, meta):
    meta[FREE_TOP] -= 1
    return free_C[meta[FREE_TOP]]


@njit(cache=True)
def _give_free(s, free_C, meta):
    free_C[meta[FREE_TOP]] = s
    meta[FREE_TOP] += 1


@njit(cache=True)
def find_duplicate(ids_U, rows_RF):
    """Index of the first id of ``ids_U`` that repeats an earlier one, or -1. Marks rows by negating their
    stamp and undoes every mark before returning, so the state is left exactly as it was."""
    dup, n = -1, ids_U.shape[0]
    for i in range(ids_U.shape[0]):
        r = ids_U[i]
        if rows_RF[r, STAMP] < 0:
            dup, n = i, i
            break
        rows_RF[r, STAMP] = -rows_RF[r, STAMP] - 1
    for i in range(n):
        r = ids_U[i]
        rows_RF[r, STAMP] = -rows_RF[r, STAMP] - 1
    return dup


@njit(cache=True)
def _start(ids_U, rows_RF, hit_U, out_counts):
    """Reset the step's outputs and flag hits; False (state untouched) when an id repeats."""
    out_counts[:] = 0
    dup = find_duplicate(ids_U, rows_RF)
    if dup >= 0:
        out_counts[4] = DUPLICATE
        out_counts[5] = dup
        return False
    for i in range(ids_U.shape[0]):
        hit_U[i] = rows_RF[ids_U[i], SLOT] != NIL
    return True


@njit(cache=True)
def _begin_step(ids_U, prot_P, rows_RF, meta):
    """Advance the step counter, mark protected rows and stamp this step's rows (which pins them)."""
    step = meta[STEP] + 1
    meta[STEP] = step
    for j in range(prot_P.shape[0]):
        rows_RF[prot_P[j], PIN] = step
    for i in range(ids_U.shape[0]):
        rows_RF[ids_U[i], STAMP] = step
    return step


# ------------------------------------------------------------------------------------------------ LRU


@njit(cache=True)
def lru_step(ids_U, prot_P, rows_RF, slots_CF, lists_K3, free_C, meta, hit_U, admit_U, evict_U, out_counts):
    """One step of LRU. out_counts = [admitted, evicted, rejected, overflow, code, dup index]."""
    if not _start(ids_U, rows_RF, hit_U, out_counts):
        return
    step = _begin_step(ids_U, prot_P, rows_RF, meta)
    for i in range(ids_U.shape[0]):
        if hit_U[i]:
            s = rows_RF[ids_U[i], SLOT]
            _unlink(s, slots_CF, lists_K3)
            _append(s, 0, slots_CF, lists_K3)
    skipped, exhausted = NIL, False
    for i in range(ids_U.shape[0]):
        if hit_U[i]:
            continue
        r = ids_U[i]
        if meta[FREE_TOP] > 0:
            s = _take_free(free_C, meta)
        else:
            if not exhausted:
                s, skipped = _first_unpinned(0, skipped, slots_CF, lists_K3, rows_RF, step)
                exhausted = s == NIL
            if exhausted:
                out_counts[3] += 1
                continue
            v = slots_CF[s, ROW]
            rows_RF[v, SLOT] = NIL
            _unlink(s, slots_CF, lists_K3)
            evict_U[out_counts[1]] = v
            out_counts[1] += 1
        slots_CF[s, ROW] = r
        rows_RF[r, SLOT] = s
        _append(s, 0, slots_CF, lists_K3)
        admit_U[out_counts[0]] = r
        out_counts[0] += 1


# ------------------------------------------------------------------------------------ LFU (+ aging)
#
# A binary min-heap of slots, each entry (k1, k2, slot) in heap_C3 with the key stored in the heap itself so
# that sifting reads only the heap: LFU keys are (count * 2^32 + last step, row), Belady's (-next use, -row).


@njit(cache=True)
def _heap_less(i, j, heap_C3):
    if heap_C3[i, 0] != heap_C3[j, 0]:
        return heap_C3[i, 0] < heap_C3[j, 0]
    return heap_C3[i, 1] < heap_C3[j, 1]


@njit(cache=True)
def _heap_swap(i, j, heap_C3, slots_CF):
    for c in range(3):
        heap_C3[i, c], heap_C3[j, c] = heap_C3[j, c], heap_C3[i, c]
    slots_CF[heap_C3[i, 2], HPOS] = i
    slots_CF[heap_C3[j, 2], HPOS] = j


@njit(cache=True)
def _sift_up(i, heap_C3, slots_CF):
    while i > 0:
        p = (i - 1) // 2
        if not _heap_less(i, p, heap_C3):
            return
        _heap_swap(i, p, heap_C3, slots_CF)
        i = p


@njit(cache=True)
def _sift_down(i, n, heap_C3, slots_CF):
    while True:
        best, c = i, 2 * i + 1
        if c < n and _heap_less(c, best, heap_C3):
            best = c
        if c + 1 < n and _heap_less(c + 1, best, heap_C3):
            best = c + 1
        if best == i:
            return
        _heap_swap(i, best, heap_C3, slots_CF)
        i = best


@njit(cache=True)
def _heap_push(s, k1, k2, heap_C3, slots_CF, meta):
    n = meta[HEAP_SIZE]
    heap_C3[n, 0], heap_C3[n, 1], heap_C3[n, 2] = k1, k2, s
    slots_CF[s, HPOS] = n
    meta[HEAP_SIZE] = n + 1
    _sift_up(n, heap_C3, slots_CF)


@njit(cache=True)
def _heap_remove(s, heap_C3, slots_CF, meta):
    i = slots_CF[s, HPOS]
    n = meta[HEAP_SIZE] - 1
    meta[HEAP_SIZE] = n
    slots_CF[s, HPOS] = NIL
    if i == n:
        return
    for c in range(3):
        heap_C3[i, c] = heap_C3[n, c]
    slots_CF[heap_C3[i, 2], HPOS] = i
    if i > 0 and _heap_less(i, (i - 1) // 2, heap_C3):
        _sift_up(i, heap_C3, slots_CF)
    else:
        _sift_down(i, n, heap_C3, slots_CF)


@njit(cache=True)
def _heap_set(s, k1, k2, heap_C3, slots_CF, meta):
    """Change slot s's key in place."""
    i = slots_CF[s, HPOS]
    heap_C3[i, 0], heap_C3[i, 1] = k1, k2
    _sift_up(i, heap_C3, slots_CF)
    _sift_down(slots_CF[s, HPOS], meta[HEAP_SIZE], heap_C3, slots_CF)


CNT_MAX = (1 << 30) - 1


@njit(cache=True)
def _count(r, rows_RF, epoch):
    """A row's frequency, halved once per aging epoch since it was last updated (lazy aging)."""
    return rows_RF[r, CNT] >> min(epoch - rows_RF[r, EPOCH], 31)


@njit(cache=True)
def _lfu_key(r, rows_RF, epoch):
    """Eviction order: lower count first, then older last access (ties: lower row id, the heap's k2)."""
    return np.int64(_count(r, rows_RF, epoch)) * (np.int64(1) << 32) + rows_RF[r, STAMP]


@njit(cache=True)
def lfu_step(ids_U, prot_P, rows_RF, slots_CF, heap_C3, free_C, meta, aging_period, held_H, hit_U, admit_U, evict_U,
             out_counts):
    """One step of LFU over the full access history, ties to the least recent, then the lowest row id.

    ``aging_period`` > 0 halves every row's count each time that many accesses have accumulated (lazily:
    a row's count is shifted by the epochs it missed); 0 is plain LFU. Pinned rows met at the top of the
    heap are held out until the step ends, as are rows admitted in it. ``held_H``: scratch >= 2U + P + 1.

    Hits do not touch the heap: between agings counts and stamps only grow, so a stored key is a lower
    bound of the true one, and a top whose stored key is exact is the true minimum. A stale top is
    re-keyed and sunk (at most once per hit), which is much cheaper than re-sifting on every hit.
    """
    if not _start(ids_U, rows_RF, hit_U, out_counts):
        return
    held_H[0] = 0
    epoch = meta[EPOCH_NOW]
    step = _begin_step(ids_U, prot_P, rows_RF, meta)
    for i in range(ids_U.shape[0]):
        r = ids_U[i]
        rows_RF[r, CNT] = min(_count(r, rows_RF, epoch) + 1, CNT_MAX)
        rows_RF[r, EPOCH] = epoch
    for i in range(ids_U.shape[0]):
        if hit_U[i]:
            continue
        r = ids_U[i]
        if meta[FREE_TOP] > 0:
            s = _take_free(free_C, meta)
        else:
            while meta[HEAP_SIZE] > 0:
                top = heap_C3[0, 2]
                v = slots_CF[top, ROW]
                if _pinned(v, rows_RF, step):
                    _heap_remove(top, heap_C3, slots_CF, meta)
                    held_H[1 + held_H[0]] = top
                    held_H[0] += 1
                    continue
                key = _lfu_key(v, rows_RF, epoch)
                if heap_C3[0, 0] == key:
                    break
                heap_C3[0, 0] = key  # a stale (lower) key: fix it and let it sink
                _sift_down(0, meta[HEAP_SIZE], heap_C3, slots_CF)
            if meta[HEAP_SIZE] == 0:
                out_counts[3] += 1
                continue
            s = heap_C3[0, 2]
            _heap_remove(s, heap_C3, slots_CF, meta)
            v = slots_CF[s, ROW]
            rows_RF[v, SLOT] = NIL
            evict_U[out_counts[1]] = v
            out_counts[1] += 1
        slots_CF[s, ROW] = r
        rows_RF[r, SLOT] = s
        held_H[1 + held_H[0]] = s
        held_H[0] += 1
        admit_U[out_counts[0]] = r
        out_counts[0] += 1
    for j in range(held_H[0]):
        s = held_H[1 + j]
        r = slots_CF[s, ROW]
        _heap_push(s, _lfu_key(r, rows_RF, epoch), r, heap_C3, slots_CF, meta)
    if aging_period > 0:
        meta[SINCE_AGING] += ids_U.shape[0]
        if meta[SINCE_AGING] >= aging_period:
            meta[SINCE_AGING] -= aging_period
            meta[EPOCH_NOW] += 1
            for i in range(meta[HEAP_SIZE]):  # every key halves its count: recompute, re-heapify
                heap_C3[i, 0] = _lfu_key(slots_CF[heap_C3[i, 2], ROW], rows_RF, meta[EPOCH_NOW])
            for i in range(meta[HEAP_SIZE] // 2 - 1, -1, -1):
                _sift_down(i, meta[HEAP_SIZE], heap_C3, slots_CF)


# -------------------------------------------------------------------------------------------- W-TinyLFU


@njit(cache=True)
def _sketch_index(r, d, shift):
    return np.int64((np.uint64(r + 1) * SKETCH_SEEDS[d]) >> np.uint64(shift))


@njit(cache=True)
def _sketch_add(r, sketch_DW, shift):
    for d in range(SKETCH_DEPTH):
        j = _sketch_index(r, d, shift)
        if sketch_DW[d, j] < SKETCH_MAX:
            sketch_DW[d, j] += 1


@njit(cache=True)
def _sketch_estimate(r, sketch_DW, shift):
    est = SKETCH_MAX
    for d in range(SKETCH_DEPTH):
        est = min(est, np.int64(sketch_DW[d, _sketch_index(r, d, shift)]))
    return est


@njit(cache=True)
def _tlfu_eligible(s, slots_CF, rows_RF, step):
    """A window slot may leave the window: not protected, and not a row that was resident and accessed
    this step (a row admitted this step may still be pushed on: for it that is a bypass)."""
    r = slots_CF[s, ROW]
    if rows_RF[r, PIN] == step:
        return False
    return rows_RF[r, STAMP] != step or slots_CF[s, ADMIT] == step


@njit(cache=True)
def _window_candidate(after, slots_CF, lists_K3, rows_RF, step):
    s = lists_K3[WINDOW, HEAD] if after == NIL else slots_CF[after, NEXT]
    while s != NIL and not _tlfu_eligible(s, slots_CF, rows_RF, step):
        after = s
        s = slots_CF[s, NEXT]
    return s, after


@njit(cache=True)
def _drop(s, slots_CF, lists_K3, rows_RF, free_C, meta, step, evict_U, out_counts):
    """Remove slot s from its list and the cache; an old row is reported as evicted."""
    r = slots_CF[s, ROW]
    _unlink(s, slots_CF, lists_K3)
    rows_RF[r, SLOT] = NIL
    if slots_CF[s, ADMIT] != step:
        evict_U[out_counts[1]] = r
        out_counts[1] += 1
    _give_free(s, free_C, meta)


@njit(cache=True)
def _tlfu_hit(s, slots_CF, lists_K3, protected_max):
    k = slots_CF[s, SEG]
    _unlink(s, slots_CF, lists_K3)
    if k == WINDOW:
        _append(s, WINDOW, slots_CF, lists_K3)
        return
    _append(s, PROTECTED, slots_CF, lists_K3)  # probation hits are promoted
    if lists_K3[PROTECTED, SIZE] > protected_max:  # demote the protected segment's least recent
        d = lists_K3[PROTECTED, HEAD]
        _unlink(d, slots_CF, lists_K3)
        _append(d, PROBATION, slots_CF, lists_K3)


@njit(cache=True)
def tinylfu_step(ids_U, prot_P, rows_RF, slots_CF, lists_K3, free_C, meta, sketch_DW, sketch_shift, sample_size,
                 window_max, protected_max, hit_U, admit_U, evict_U, out_counts):
    """One step of W-TinyLFU: a small LRU window admits every miss; a row pushed out of the window enters
    the main segmented LRU (probation, protected) only if the count-min sketch says it is more frequent
    than the main's victim. Every access of the step is counted in the sketch first."""
    if not _start(ids_U, rows_RF, hit_U, out_counts):
        return
    capacity = free_C.shape[0]
    step = _begin_step(ids_U, prot_P, rows_RF, meta)
    for i in range(ids_U.shape[0]):
        _sketch_add(ids_U[i], sketch_DW, sketch_shift)
        if hit_U[i]:
            _tlfu_hit(rows_RF[ids_U[i], SLOT], slots_CF, lists_K3, protected_max)
    meta[SKETCH_ADDS] += ids_U.shape[0]
    w_skip, p_skip, q_skip = NIL, NIL, NIL
    for i in range(ids_U.shape[0]):
        if hit_U[i]:
            continue
        r = ids_U[i]
        if capacity == 0:
            out_counts[3] += 1
            continue
        if lists_K3[WINDOW, SIZE] < window_max and meta[FREE_TOP] > 0:
            s = _take_free(free_C, meta)
            slots_CF[s, ROW], slots_CF[s, ADMIT] = r, step
            rows_RF[r, SLOT] = s
            _append(s, WINDOW, slots_CF, lists_K3)
            continue
        # the window is full: its least recent eligible row (or r itself) is the admission candidate
        cand, w_skip = _window_candidate(w_skip, slots_CF, lists_K3, rows_RF, step)
        cand_row = r if cand == NIL else slots_CF[cand, ROW]
        if meta[FREE_TOP] > 0:  # main has room
            admitted = True
        else:
            victim, p_skip = _first_unpinned(PROBATION, p_skip, slots_CF, lists_K3, rows_RF, step)
            if victim == NIL:
                victim, q_skip = _first_unpinned(PROTECTED, q_skip, slots_CF, lists_K3, rows_RF, step)
            admitted = victim != NIL and (
                _sketch_estimate(cand_row, sketch_DW, sketch_shift)
                > _sketch_estimate(slots_CF[victim, ROW], sketch_DW, sketch_shift))
            if admitted:
                _drop(victim, slots_CF, lists_K3, rows_RF, free_C, meta, step, evict_U, out_counts)
            elif cand == NIL:  # r itself lost (or found no victim): bypassed
                out_counts[2 if victim != NIL else 3] += 1
                continue
            else:  # the window's candidate lost: it leaves the cache, its slot goes to r
                if slots_CF[cand, ADMIT] == step:  # a miss of this step after all: bypassed
                    out_counts[2 if victim != NIL else 3] += 1
                _drop(cand, slots_CF, lists_K3, rows_RF, free_C, meta, step, evict_U, out_counts)
        if cand == NIL:  # r goes straight to probation
            s = _take_free(free_C, meta)
            slots_CF[s, ROW], slots_CF[s, ADMIT] = r, step
            rows_RF[r, SLOT] = s
            _append(s, PROBATION, slots_CF, lists_K3)
            continue
        if admitted:
            _unlink(cand, slots_CF, lists_K3)
            _append(cand, PROBATION, slots_CF, lists_K3)
        s = _take_free(free_C, meta)
        slots_CF[s, ROW], slots_CF[s, ADMIT] = r, step
        rows_RF[r, SLOT] = s
        _append(s, WINDOW, slots_CF, lists_K3)
    for i in range(ids_U.shape[0]):  # admitted = this step's misses still resident at its end
        if not hit_U[i] and rows_RF[ids_U[i], SLOT] != NIL:
            admit_U[out_counts[0]] = ids_U[i]
            out_counts[0] += 1
    if meta[SKETCH_ADDS] >= sample_size:  # aging: halve every counter
        for d in range(sketch_DW.shape[0]):
            for j in range(sketch_DW.shape[1]):
                sketch_DW[d, j] >>= 1
        meta[SKETCH_ADDS] //= 2


# --------------------------------------------------------------------------------------------- Belady


@njit(cache=True)
def belady_step(ids_U, next_U, prot_P, rows_RF, slots_CF, heap_C3, free_C, meta, order_U, hit_U, admit_U, evict_U,
                out_counts):
    """One step of Belady's MIN with bypass: after serving the step from the cache as it stood, keep the
    ``capacity`` rows needed soonest among the residents and this step's rows. ``next_U`` is each id's next
    step of use (NEVER if none); ``order_U`` the misses' order (ascending next use). Free of the pin rules
    (a row may leave right after its step; ``prot_P`` is ignored), so it bounds every policy that obeys them.
    Heap keys (-next use, -row): the top is the row needed furthest ahead."""
    if not _start(ids_U, rows_RF, hit_U, out_counts):
        return
    for i in range(ids_U.shape[0]):
        if hit_U[i]:  # a served row's key moves to its next use
            _heap_set(rows_RF[ids_U[i], SLOT], -next_U[i], -ids_U[i], heap_C3, slots_CF, meta)
    _begin_step(ids_U, prot_P, rows_RF, meta)
    for k in range(order_U.shape[0]):
        i = order_U[k]
        if hit_U[i]:
            continue
        r, nxt = ids_U[i], next_U[i]
        if free_C.shape[0] == 0:
            out_counts[3] += 1
            continue
        if nxt == NEVER:
            out_counts[2] += 1
            continue
        if meta[FREE_TOP] > 0:
            s = _take_free(free_C, meta)
        elif heap_C3[0, 0] < -nxt:  # the furthest resident is needed later than r
            s = heap_C3[0, 2]
            _heap_remove(s, heap_C3, slots_CF, meta)
            v = slots_CF[s, ROW]
            rows_RF[v, SLOT] = NIL
            evict_U[out_counts[1]] = v
            out_counts[1] += 1
        else:
            out_counts[2] += 1
            continue
        slots_CF[s, ROW] = r
        rows_RF[r, SLOT] = s
        _heap_push(s, -nxt, -r, heap_C3, slots_CF, meta)
        admit_U[out_counts[0]] = r
        out_counts[0] += 1


@njit(cache=True)
def static_stream(ids_A, offsets_S1, hot_R, resident_R):
    """The static policy over a whole stream: a hot row is admitted on its first touch, never evicted."""
    S = offsets_S1.shape[0] - 1
    totals, hits_S = np.zeros(4, np.int64), np.zeros(S, np.int64)
    for t in range(S):
        h = 0
        for a in range(offsets_S1[t], offsets_S1[t + 1]):
            r = ids_A[a]
            if resident_R[r]:
                h += 1
            elif hot_R[r]:
                resident_R[r] = True
                totals[0] += 1
            else:
                totals[2] += 1
        hits_S[t] = h
    return hits_S, totals


# ------------------------------------------------------------------------------------- whole streams


@njit(cache=True)
def next_use(ids_A, offsets_S1, last_R):
    """For each access, the next step that accesses its row (``last_R`` [R] must hold NEVER): one backward pass."""
    out = np.empty(ids_A.shape[0], np.int64)
    for t in range(offsets_S1.shape[0] - 2, -1, -1):
        for a in range(offsets_S1[t], offsets_S1[t + 1]):
            r = ids_A[a]
            out[a] = last_R[r]
            last_R[r] = t
    return out


#
# Each loops its step function over a recorded stream (steps ids_A[offsets_S1[t]:offsets_S1[t + 1]]),
# protecting the previous step's rows when asked (a prefetch for step t must not evict rows of step t - 1),
# and returns hits per step plus the summed out_counts.


@njit(cache=True)
def _max_step(offsets_S1):
    m = 0
    for t in range(offsets_S1.shape[0] - 1):
        m = max(m, offsets_S1[t + 1] - offsets_S1[t])
    return m


@njit(cache=True)
def _prev(ids_A, offsets_S1, t, protect_previous):
    if protect_previous and t > 0:
        return ids_A[offsets_S1[t - 1]:offsets_S1[t]]
    return ids_A[0:0]


@njit(cache=True)
def _tally(t, hit_U, n, counts, hits_S, totals):
    h = 0
    for i in range(n):
        h += hit_U[i]
    hits_S[t] = h
    for j in range(4):
        totals[j] += counts[j]


@njit(cache=True)
def lru_stream(ids_A, offsets_S1, protect_previous, rows_RF, slots_CF, lists_K3, free_C, meta):
    S, m = offsets_S1.shape[0] - 1, _max_step(offsets_S1)
    hit_U, admit_U, evict_U = np.zeros(m, np.bool_), np.zeros(m, np.int64), np.zeros(m, np.int64)
    counts, totals, hits_S = np.zeros(6, np.int64), np.zeros(4, np.int64), np.zeros(S, np.int64)
    for t in range(S):
        ids = ids_A[offsets_S1[t]:offsets_S1[t + 1]]
        lru_step(ids, _prev(ids_A, offsets_S1, t, protect_previous), rows_RF, slots_CF, lists_K3, free_C, meta,
                 hit_U, admit_U, evict_U, counts)
        _tally(t, hit_U, ids.shape[0], counts, hits_S, totals)
    return hits_S, totals


@njit(cache=True)
def lfu_stream(ids_A, offsets_S1, protect_previous, rows_RF, slots_CF, heap_C3, free_C, meta, aging_period):
    S, m = offsets_S1.shape[0] - 1, _max_step(offsets_S1)
    hit_U, admit_U, evict_U = np.zeros(m, np.bool_), np.zeros(m, np.int64), np.zeros(m, np.int64)
    held_H = np.zeros(3 * m + 1, np.int64)
    counts, totals, hits_S = np.zeros(6, np.int64), np.zeros(4, np.int64), np.zeros(S, np.int64)
    for t in range(S):
        ids = ids_A[offsets_S1[t]:offsets_S1[t + 1]]
        lfu_step(ids, _prev(ids_A, offsets_S1, t, protect_previous), rows_RF, slots_CF, heap_C3, free_C, meta,
                 aging_period, held_H, hit_U, admit_U, evict_U, counts)
        _tally(t, hit_U, ids.shape[0], counts, hits_S, totals)
    return hits_S, totals


@njit(cache=True)
def tinylfu_stream(ids_A, offsets_S1, protect_previous, rows_RF, slots_CF, lists_K3, free_C, meta, sketch_DW,
                   sketch_shift, sample_size, window_max, protected_max):
    S, m = offsets_S1.shape[0] - 1, _max_step(offsets_S1)
    hit_U, admit_U, evict_U = np.zeros(m, np.bool_), np.zeros(m, np.int64), np.zeros(m, np.int64)
    counts, totals, hits_S = np.zeros(6, np.int64), np.zeros(4, np.int64), np.zeros(S, np.int64)
    for t in range(S):
        ids = ids_A[offsets_S1[t]:offsets_S1[t + 1]]
        tinylfu_step(ids, _prev(ids_A, offsets_S1, t, protect_previous), rows_RF, slots_CF, lists_K3, free_C, meta,
                     sketch_DW, sketch_shift, sample_size, window_max, protected_max, hit_U, admit_U, evict_U, counts)
        _tally(t, hit_U, ids.shape[0], counts, hits_S, totals)
    return hits_S, totals


@njit(cache=True)
def belady_stream(ids_A, next_A, order_A, offsets_S1, protect_previous, rows_RF, slots_CF, heap_C3, free_C, meta):
    S, m = offsets_S1.shape[0] - 1, _max_step(offsets_S1)
    hit_U, admit_U, evict_U = np.zeros(m, np.bool_), np.zeros(m, np.int64), np.zeros(m, np.int64)
    counts, totals, hits_S = np.zeros(6, np.int64), np.zeros(4, np.int64), np.zeros(S, np.int64)
    for t in range(S):
        a, b = offsets_S1[t], offsets_S1[t + 1]
        belady_step(ids_A[a:b], next_A[a:b], _prev(ids_A, offsets_S1, t, protect_previous), rows_RF, slots_CF,
                    heap_C3, free_C, meta, order_A[a:b], hit_U, admit_U, evict_U, counts)
        _tally(t, hit_U, b - a, counts, hits_S, totals)
    return hits_S, totals
