"""Row-cache policies: one contract suite run against every policy (compiled and reference), the compiled
ones decision-for-decision equal to the plain-Python references, LRU/LFU against textbook models, Belady
as an upper bound, and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.memory.cache_policy import Belady, CachePolicy, LFUAging, RowStream, Static, TinyLFU, make_policy
from engram.memory.cache_reference import REFERENCE_POLICIES, BeladyRef

ONLINE = ("lru", "lfu", "lfu-aging", "tinylfu", "static")
KINDS = [(name, impl) for name in ONLINE + ("belady",) for impl in ("fast", "ref")]


def build(name: str, impl: str, num_rows: int, capacity: int, stream: RowStream, hot: list[int]) -> CachePolicy:
    kwargs = {}
    if name == "static":
        kwargs["hot_ids"] = hot
    if name == "lfu-aging":
        kwargs["period"] = max(capacity, 3)  # short, so that aging happens inside small tests
    if name == "tinylfu":
        kwargs["sample"] = max(4 * capacity, 8)
    if name == "belady":
        return (Belady if impl == "fast" else BeladyRef)(num_rows, capacity, stream)
    if impl == "ref":
        return REFERENCE_POLICIES[name](num_rows, capacity, **kwargs)
    return make_policy(name, num_rows, capacity, **kwargs)


@st.composite
def scenarios(draw):
    """A table size, a capacity, steps of unique ids (in a drawn order) and a protected set per step."""
    R = draw(st.integers(1, 24))
    C = draw(st.integers(0, R))
    ids = st.lists(st.integers(0, R - 1), unique=True, max_size=R)
    steps = draw(st.lists(ids, min_size=1, max_size=25))
    prot = draw(st.lists(st.lists(st.integers(0, R - 1), max_size=4), min_size=len(steps), max_size=len(steps)))
    hot = draw(st.lists(st.integers(0, R - 1), max_size=R))
    return R, C, [np.array(s, np.int64) for s in steps], [np.array(p, np.int64) for p in prot], hot


def _stream(R, steps):
    offsets = np.cumsum([0] + [len(s) for s in steps])
    return RowStream(np.concatenate(steps) if steps else np.zeros(0, np.int64), offsets, R)


def check_contract(policy: CachePolicy, steps, prot) -> list[tuple]:
    """Replay the steps, checking every guarantee of the interface; returns the decisions made. Belady, an
    offline bound that ignores pins, is held to all but the pin rules."""
    pins = policy.name != "belady"
    resident: set[int] = set()
    decisions = []
    for ids, p in zip(steps, prot):
        res = policy.access(ids, p)
        hit = res.hit_U
        assert hit.dtype == bool and hit.shape == ids.shape
        assert hit.tolist() == [int(r) in resident for r in ids], "a hit is a row resident when the step began"
        misses = {int(r) for r, h in zip(ids, hit) if not h}
        admit, evict = set(res.admit.tolist()), set(res.evict.tolist())
        assert len(admit) == res.admit.size and len(evict) == res.evict.size
        assert admit <= misses, "only misses are admitted"
        assert evict <= resident, "only resident rows are evicted"
        pinned = {int(r) for r in ids} | {int(r) for r in p}
        assert not (pins and evict & pinned), "a row of this step or a protected row was evicted"
        assert res.rejected >= 0 and res.overflow >= 0
        assert len(misses) == len(admit) + res.rejected + res.overflow, "every miss is admitted or bypassed"
        resident = (resident - evict) | admit
        assert len(resident) <= policy.capacity, "capacity exceeded"
        assert policy.resident_ids().tolist() == sorted(resident)
        assert len(policy) == len(resident)
        if res.overflow and pins:
            assert resident <= pinned, "overflow only when every resident row is pinned"
        decisions.append((hit.tolist(), res.admit.tolist(), res.evict.tolist(), res.rejected, res.overflow))
    s = policy.stats
    assert s.steps == len(steps) and s.accesses == sum(len(x) for x in steps)
    assert s.hits + s.admitted + s.rejected + s.overflow == s.accesses
    return decisions


@pytest.mark.parametrize("name,impl", KINDS)
@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_contract(name, impl, scenario):
    R, C, steps, prot, hot = scenario
    stream = _stream(R, steps)
    first = check_contract(build(name, impl, R, C, stream, hot), steps, prot)
    assert check_contract(build(name, impl, R, C, stream, hot), steps, prot) == first, "not deterministic"


@pytest.mark.parametrize("name", ONLINE + ("belady",))
@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_compiled_equals_reference(name, scenario):
    R, C, steps, prot, hot = scenario
    stream = _stream(R, steps)
    fast, ref = build(name, "fast", R, C, stream, hot), build(name, "ref", R, C, stream, hot)
    for ids, p in zip(steps, prot):
        a, b = fast.access(ids, p), ref.access(ids, p)
        assert a.hit_U.tolist() == b.hit_U.tolist()
        assert a.admit.tolist() == b.admit.tolist() and a.evict.tolist() == b.evict.tolist()
        assert (a.rejected, a.overflow) == (b.rejected, b.overflow)
    assert fast.resident_ids().tolist() == ref.resident_ids().tolist()


@pytest.mark.parametrize("name", ONLINE + ("belady",))
@pytest.mark.parametrize("protect_previous", [True, False])
def test_run_replays_the_same_steps(name, protect_previous):
    rng = np.random.default_rng(1)
    R, C = 500, 40
    stream = RowStream.from_steps([rng.zipf(1.3, 20) % R for _ in range(300)], R)
    hot = list(np.argsort(-np.bincount(stream.ids_A, minlength=R), kind="stable"))
    a, b = build(name, "fast", R, C, stream, hot), build(name, "fast", R, C, stream, hot)
    hits = a.run(stream, protect_previous)
    prev, manual = None, []
    for ids in stream.steps():
        manual.append(b.access(ids, prev if protect_previous else None).hits)
        prev = ids
    assert hits.tolist() == manual
    assert a.resident_ids().tolist() == b.resident_ids().tolist()
    sa, sb = a.stats, b.stats
    assert (sa.steps, sa.accesses, sa.hits, sa.admitted, sa.evicted, sa.rejected, sa.overflow) == \
           (sb.steps, sb.accesses, sb.hits, sb.admitted, sb.evicted, sb.rejected, sb.overflow)


def textbook_lru_hits(seq, capacity):
    """One access per step, no pins: a hit iff the row is among the ``capacity`` most recently used."""
    stack, hits = [], 0
    for r in seq:
        if r in stack[-capacity:] if capacity else False:
            hits += 1
        if r in stack:
            stack.remove(r)
        stack.append(r)
    return hits


def textbook_lfu_hits(seq, capacity):
    """One access per step: evict the resident with the fewest accesses so far, then the least recent."""
    count, last, cache, hits = {}, {}, [], 0
    for t, r in enumerate(seq):
        count[r] = count.get(r, 0) + 1
        last[r] = t
        if r in cache:
            hits += 1
        elif capacity:
            if len(cache) == capacity:
                cache.remove(min(cache, key=lambda v: (count[v], last[v], v)))
            cache.append(r)
    return hits


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=80), st.integers(0, 16))
def test_lru_and_lfu_match_textbook_models(seq, capacity):
    R = 16
    capacity = min(capacity, R)
    stream = RowStream.from_steps([[r] for r in seq], R)
    assert make_policy("lru", R, capacity).run(stream, False).sum() == textbook_lru_hits(seq, capacity)
    assert make_policy("lfu", R, capacity).run(stream, False).sum() == textbook_lfu_hits(seq, capacity)


@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_belady_bounds_every_online_policy(scenario):
    R, C, steps, _, _ = scenario
    stream = _stream(R, steps)
    best = Belady(R, C, stream).run(stream).sum()
    oracle = list(np.argsort(-np.bincount(stream.ids_A, minlength=R), kind="stable"))  # static, knowing the stream
    for name in ONLINE:
        p = build(name, "fast", R, C, stream, oracle)
        assert p.run(stream).sum() <= best, name
    assert best <= stream.num_accesses - stream.first_touches(), "no policy beats the compulsory misses"


def test_overflow_bypasses_instead_of_failing():
    steps = [np.arange(10), np.arange(5, 25), np.arange(30, 60)]
    stream = RowStream.from_steps(steps, 64)
    for name in ("lru", "lfu", "lfu-aging", "tinylfu"):
        p = build(name, "fast", 64, 8, stream, [])
        res = [p.access(s, prev) for s, prev in zip(steps, [None] + steps[:-1])]
        assert res[0].admit.size == 8 and res[0].overflow == 2, name
        assert res[1].admit.size == 0 and res[1].overflow == 17, "every resident is hit or protected: no room"
        if name == "tinylfu":  # room again, but a row seen once does not beat residents seen as often
            assert res[2].overflow == 0 and res[2].rejected == 30
        else:
            assert res[2].admit.size == 5 and res[2].overflow == 25, "step 0's rows are no longer protected"
        assert len(p) == 8


def test_capacity_zero_and_full_table():
    stream = RowStream.from_steps([np.arange(5), np.arange(3, 8)], 8)
    for name in ONLINE + ("belady",):
        none = build(name, "fast", 8, 0, stream, list(range(8)))
        assert none.run(stream).sum() == 0 and len(none) == 0
        full = build(name, "fast", 8, 8, stream, list(range(8)))
        if name != "belady":  # Belady keeps only rows used again
            assert full.run(stream).sum() == 2 and len(full) == 8


def test_policy_parameters():
    assert LFUAging(100, 10).aging_period == 40
    t = TinyLFU(10_000, 1000)
    assert (t.window_max, t.protected_max, t.sample_size) == (10, 792, 10_000)
    assert t.sketch_DW.shape == (4, 4096)
    s = Static(10, 3, np.array([7, 7, 2, 9, 1]))
    assert s.preload_ids().tolist() == [7, 2, 9]


def test_bad_input_is_refused_clearly():
    p = make_policy("lru", 10, 4)
    with pytest.raises(ValueError, match="row 3 repeats at position 2"):
        p.access(np.array([3, 1, 3]))
    assert p.stats.steps == 0 and len(p) == 0, "a refused step changes nothing"
    with pytest.raises(ValueError, match=r"row id 10 outside the table \[0, 10\)"):
        p.access(np.array([1, 10]))
    with pytest.raises(ValueError, match="protected ids: row id -1"):
        p.access(np.array([1]), np.array([-1]))
    with pytest.raises(TypeError, match="integer row ids"):
        p.access(np.array([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        p.access(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="capacity must lie in"):
        make_policy("lfu", 10, 11)
    with pytest.raises(ValueError, match="unknown cache policy 'mru'; valid: lru, lfu"):
        make_policy("mru", 10, 4)
    with pytest.raises(ValueError, match="static policy needs hot_ids"):
        make_policy("static", 10, 4)
    with pytest.raises(ValueError, match="row 2 repeats"):
        Static(10, 4, [1, 2]).access(np.array([2, 2]))
    for name in ("lfu", "tinylfu"):
        with pytest.raises(ValueError, match="row 5 repeats at position 1"):
            make_policy(name, 10, 4).access(np.array([5, 5]))
    stream = RowStream.from_steps([[1, 2], [3]], 10)
    b = Belady(10, 2, stream)
    with pytest.raises(ValueError, match="does not match step 0"):
        b.access(np.array([3]))
    with pytest.raises(ValueError, match="stream is over 10 rows"):
        make_policy("lru", 11, 2).run(stream)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        RowStream(np.array([1, 2]), np.array([0, 3]), 10)


def test_stream_construction_and_next_use():
    s = RowStream.from_matrix(np.array([[3, 1, 3], [1, 1, 1], [2, 3, 0]]), 4)
    assert [x.tolist() for x in s.steps()] == [[1, 3], [1], [0, 2, 3]]
    assert s.first_touches() == 4 and s.num_accesses == 6
    never = np.iinfo(np.int64).max
    assert s.next_use().tolist() == [1, 2, never, never, never, never]


def test_lru_keeps_recency_order_across_pins():
    p = make_policy("lru", 10, 3)
    p.access(np.array([0, 1, 2]))
    p.access(np.array([0]))  # order now 1, 2, 0 (least recent first)
    res = p.access(np.array([5]), protected_U=np.array([1]))
    assert res.evict.tolist() == [2], "the protected least-recent row is skipped, keeping its place"
    assert p.access(np.array([6])).evict.tolist() == [1]


def test_textbook_models_on_a_known_sequence():
    assert textbook_lru_hits([1, 2, 1, 3, 2, 1], 2) == 1
    assert textbook_lfu_hits([1, 2, 1, 3, 2, 1], 2) == 2  # 1 stays (count 2); 3 replaces 2, then 2 replaces 3
