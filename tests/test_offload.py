"""Rows that arrive in time: the hot-row cache (every policy, adversarial eviction, overflow), the
prefetcher (same tokens as gathering in the block, a failing store reaches the caller) and batched
generation with slot refill (a prompt's greedy output is the same alone or in a batch; seeded sampling
does not depend on the batch)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from engram import io as eio
from engram.config import preset
from engram.infer import generate, generate_batch
from engram.infer.prefetch import RowPrefetcher
from engram.memory.cache import CachedStore
from engram.memory.cache_policy import POLICIES as POLICY_TYPES
from engram.memory.placement import Placement
from engram.memory.store import DiskStore, ReadOnlyTableError
from engram.model import build_model
from test_memory_store import make_table, write


def cached(tmp_path, capacity_rows: int, policy: str, **kw):
    table = make_table()
    disk = DiskStore(table.layout, write(table, tmp_path / "t.rows", "fp32"))
    return table, CachedStore(disk, capacity_rows * table.d_head * 4, policy, **kw)


POLICIES = sorted(POLICY_TYPES)


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_gathers_equal_the_table_under_eviction_pressure(tmp_path, policy):
    kw = {"hot_ids": np.arange(0, 240, 3)} if policy == "static" else {}
    table, store = cached(tmp_path, 20, policy, **kw)
    w = table.weight.detach()
    g = torch.Generator().manual_seed(0)
    held = []
    for step in range(30):
        ids = torch.randint(0, 60 if step % 2 else table.num_rows, (40,), generator=g)  # a hot and a cold mix
        rows = store.gather(ids)
        held.append((ids, rows))
        assert torch.equal(rows, w[ids])
    # every batch kept its own copy: later steps evicting its rows changed nothing it holds
    assert all(torch.equal(rows, w[ids]) for ids, rows in held)
    stats = store.policy.stats
    assert stats.accesses == store.stats.extra["hits"] + store.stats.extra["misses"]
    assert len(store.policy) <= store.capacity == 20


def test_overflow_bypasses_and_rows_count_once_per_step(tmp_path):
    table, store = cached(tmp_path, 8, "lru")
    ids = torch.arange(50).repeat(3)  # 50 unique rows, each used 3 times, in a cache of 8
    assert torch.equal(store.gather(ids), table.weight.detach()[ids])
    assert store.policy.stats.accesses == 50 and store.policy.stats.overflow + store.policy.stats.admitted == 50
    again = store.gather(torch.arange(8))
    assert torch.equal(again, table.weight.detach()[:8])
    assert store.stats.extra["hits"] >= 1  # some of the first 8 rows were kept


def test_a_cached_table_is_read_only(tmp_path):
    cfg = preset("debug")
    ref = build_model(cfg)
    for name, t in ref.memory_tables().items():
        write(t, tmp_path / f"{name}.rows", "fp32")
    model = build_model(cfg, placement=Placement("disk", tmp_path, cache_bytes=4096))
    assert model.memory_tables()["engram.1"].tier == "disk+cache"
    from engram.train.optim import build_optimizers

    with pytest.raises(ReadOnlyTableError, match="read-only disk\\+cache tier"):
        build_optimizers(model, lr=1e-3)
    with pytest.raises(ValueError, match="in front of the disk tier"):
        Placement("host", cache_bytes=10)


@pytest.fixture(scope="module")
def disk_model(tmp_path_factory):
    """debug preset with random (non-zero) Engram branches, its table on disk with a small cache, and the
    same model in memory."""
    tmp = tmp_path_factory.mktemp("tables")
    cfg = preset("debug")
    torch.manual_seed(0)
    ref = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if float(p.abs().sum()) == 0:
                p.normal_(0, 0.3)
    for name, t in ref.memory_tables().items():
        write(t, tmp / f"{name}.rows", "fp32")
    disk = build_model(cfg, placement=Placement("disk", tmp, cache_bytes=64 * 8 * 4)).eval()
    disk.load_state_dict(ref.state_dict() | {}, strict=False)
    return ref, disk


PROMPTS = [[0, 5, 9, 13], [0, 7], [0, 100, 200, 300, 400, 5, 6], [0, 42], [0, 1, 2, 3, 4]]


def test_greedy_output_is_the_same_alone_or_in_a_batch(disk_model):
    ref, _ = disk_model
    alone = [generate(ref, [p], 12, temperature=0)[0] for p in PROMPTS]
    for batch_size in (1, 2, 5):
        res = generate_batch(ref, PROMPTS, 12, temperature=0, batch_size=batch_size)
        assert res.tokens == alone, batch_size
        assert res.decode_tokens > 0 and res.prefill_tokens == sum(map(len, PROMPTS))
    # and each step is the argmax of the full forward
    seq = list(PROMPTS[2])
    for tok in alone[2]:
        with torch.no_grad():
            assert int(ref(torch.tensor([seq])).logits[0, -1].argmax()) == tok
        seq.append(tok)


def test_seeded_sampling_does_not_depend_on_the_batch(disk_model):
    ref, _ = disk_model
    a = generate_batch(ref, PROMPTS, 10, temperature=1.0, top_k=20, seed=3, batch_size=1).tokens
    b = generate_batch(ref, PROMPTS, 10, temperature=1.0, top_k=20, seed=3, batch_size=4).tokens
    assert a == b
    assert generate_batch(ref, PROMPTS, 10, temperature=1.0, seed=4).tokens != a


def test_finished_rows_free_their_slots(disk_model):
    ref, _ = disk_model
    first = generate(ref, [PROMPTS[0]], 3, temperature=0)[0]
    eos = first[1]  # the second token ends the first prompt early
    res = generate_batch(ref, PROMPTS, 8, temperature=0, eos_id=eos, batch_size=2)
    assert res.tokens[0] == first[:2]
    assert all(len(t) <= 8 for t in res.tokens) and all(t[-1] == eos or len(t) == 8 for t in res.tokens)


def test_prefetched_disk_rows_give_the_same_tokens(disk_model):
    ref, disk = disk_model
    want = generate_batch(ref, PROMPTS, 10, temperature=0, batch_size=3).tokens
    threads = torch.get_num_threads()
    with RowPrefetcher(disk) as pf:
        res = generate_batch(disk, PROMPTS, 10, temperature=0, batch_size=3, prefetcher=pf)
    assert res.tokens == want
    assert torch.get_num_threads() == threads  # workers run single-threaded; the caller keeps its threads
    assert res.prefetch["submitted"] > 0 and res.prefetch["stall_s"] >= 0
    assert generate_batch(disk, PROMPTS, 10, temperature=0, batch_size=3).tokens == want  # without prefetch


def test_a_store_failing_mid_generation_reaches_the_caller(disk_model):
    _, disk = disk_model
    with RowPrefetcher(disk) as pf, eio.inject_faults(eio.Fault("store.gather:engram.1", "raise", errno=errno.EIO, hit=4)):
        with pytest.raises(OSError) as info:
            generate_batch(disk, PROMPTS, 10, temperature=0, batch_size=2, prefetcher=pf)
    assert info.value.errno == errno.EIO
    with eio.inject_faults(eio.Fault("store.gather:engram.1", "raise", errno=errno.EIO, hit=2)):
        with pytest.raises(OSError):
            generate_batch(disk, PROMPTS, 10, temperature=0)


def test_bad_generation_input(disk_model):
    ref, _ = disk_model
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(ref, [[1], []], 2)
    with pytest.raises(ValueError, match="prompt 0 has 60 tokens; with 10 new tokens that exceeds the model's context of 64"):
        generate_batch(ref, [[1] * 60], 10)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(ref, [[1]], 2, batch_size=0)
