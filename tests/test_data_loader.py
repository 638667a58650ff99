"""Tests for engram.data.loader: packing with segment ids, determinism, exact resume, the background thread.

Uses small synthetic token datasets (random documents written as real shards), so it needs no corpus.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engram.data.loader import IGNORE_INDEX, EvalLoader, Packing, TrainLoader
from engram.data.shards import TokenDataset, write_token_dataset

EOT = 0


def make_dataset(path, lengths, vocab=1000, seed=0) -> TokenDataset:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, size=n) for n in lengths]  # ids >= 1: EOT = 0 only where the packer puts it
    write_token_dataset(((f"d{i}", d) for i, d in enumerate(docs)), path, vocab_size=vocab, eot_id=EOT, shard_tokens=300)
    return TokenDataset(path)


def reference_windows(ds: TokenDataset, order, T):
    """Obvious packing: build the whole stream, then slice it."""
    stream, doc_of = [], []
    for n, k in enumerate(order):
        toks = [EOT, *ds.doc(int(k)).tolist()]
        stream += toks
        doc_of += [n] * len(toks)
    out = []
    for j in range((len(stream) - 1) // T):
        w, d = stream[j * T : j * T + T + 1], doc_of[j * T : j * T + T + 1]
        ids, tgt = w[:-1], [w[t + 1] if d[t + 1] == d[t] else IGNORE_INDEX for t in range(T)]
        seg = [x - d[0] for x in d[:-1]]
        out.append((ids, tgt, seg))
    return out


@pytest.fixture
def ds(tmp_path):
    lengths = np.random.default_rng(1).integers(0, 90, size=80).tolist() + [300, 0, 1]  # long, empty, single
    return make_dataset(tmp_path, lengths)


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("T", [1, 7, 64, 257])
def test_packing_matches_reference(ds, T):
    order = np.random.default_rng(T).permutation(ds.n_docs)
    packing = Packing(ds, order, T)
    ref = reference_windows(ds, order, T)
    assert packing.n_windows == len(ref) > 0
    for j, (ids, tgt, seg) in enumerate(ref):
        got = packing.window(j)
        assert [x.tolist() for x in got] == [ids, tgt, seg], j
        assert all(x.dtype == np.int64 for x in got)


def test_segment_ids_and_targets_at_boundaries(tmp_path):
    write_token_dataset(
        [("a", np.array([5, 6, 7])), ("b", np.array([8, 9])), ("c", np.array([10, 11, 12, 13]))],
        tmp_path,
        vocab_size=20,
        eot_id=EOT,
    )
    packing = Packing(TokenDataset(tmp_path), np.arange(3), seq_len=5)
    # stream: 0 5 6 7 | 0 8 9 | 0 10 11 12 13   (| = document boundary, 0 = separator opening a document)
    # windows of T+1 = 6 with stride 5: stream[0:6], stream[5:11]; the rest (12 13) is dropped.
    assert packing.n_windows == 2
    ids, targets, seg = packing.window(0)
    assert ids.tolist() == [0, 5, 6, 7, 0]
    assert targets.tolist() == [5, 6, 7, IGNORE_INDEX, 8]  # 7 -> the next document's separator: masked
    assert seg.tolist() == [0, 0, 0, 0, 1]
    ids, targets, seg = packing.window(1)
    assert ids.tolist() == [8, 9, 0, 10, 11]  # starts mid-document: segment 0 is the rest of "b"
    assert targets.tolist() == [9, IGNORE_INDEX, 10, 11, 12]
    assert seg.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(IndexError):
        packing.window(2)


def test_batch_shapes_and_hash_fn(ds):
    calls = []

    def hash_fn(ids, seg):
        calls.append(threading.current_thread().name)
        return ids * 7 + seg

    with TrainLoader(ds, batch_size=3, seq_len=16, seed=0, hash_fn=hash_fn) as loader:
        b = next(loader)
    for x in (b.ids, b.targets, b.segment_ids, b.hash_ids):
        assert x.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(b.hash_ids, b.ids * 7 + b.segment_ids)
    assert calls and all(name == "engram-data-loader" for name in calls)  # hashing ran in the background
    valid = b.targets != IGNORE_INDEX
    assert torch.equal(b.targets[:, :-1][valid[:, :-1]], b.ids[:, 1:][valid[:, :-1]])  # targets are next tokens
    assert torch.all(b.segment_ids[:, 1:] - b.segment_ids[:, :-1] >= 0) and torch.all(b.segment_ids[:, 0] == 0)
    assert b.to("cpu").ids is not None


# ------------------------------------------------------------------------------------------ train loader


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(
        torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) and torch.equal(x.segment_ids, y.segment_ids)
        for x, y in zip(a, b, strict=True)
    )


def test_loader_is_deterministic_from_seed(ds):
    with TrainLoader(ds, 4, 16, seed=3) as a, TrainLoader(ds, 4, 16, seed=3) as b, TrainLoader(ds, 4, 16, seed=4) as c:
        xa, xb, xc = take(a, 10), take(b, 10), take(c, 10)
    assert same(xa, xb) and not same(xa, xc)


def test_epoch_covers_every_window_once(ds):
    with TrainLoader(ds, 4, 16, seed=0) as loader:
        n = loader.batches_per_epoch
        epoch0 = take(loader, n)
        assert loader.epoch == 1
        epoch1 = take(loader, n)
    packing, window_order = loader._order.epoch(0)
    used = sorted(map(int, window_order[: n * 4]))
    expected = {tuple(packing.window(j)[0].tolist()) for j in used}
    got = {tuple(row.tolist()) for b in epoch0 for row in b.ids}
    assert got == expected and len(got) == n * 4
    assert not same(epoch0, epoch1)  # a new shuffle each epoch


@pytest.mark.parametrize("stop", [1, 5, 13])  # 13 is in the second epoch (7 batches per epoch)
def test_resume_is_exact(ds, stop):
    B, T = 16, 32
    with TrainLoader(ds, B, T, seed=1, prefetch=4) as full:
        assert full.batches_per_epoch == 7
        uninterrupted = take(full, 25)
    with TrainLoader(ds, B, T, seed=1, prefetch=4) as first:
        take(first, stop)
        state = first.state_dict()  # the producer thread is already batches ahead: they must not count
        take(first, 2)
    with TrainLoader(ds, B, T, seed=1) as resumed:
        resumed.load_state_dict(state)
        assert resumed.step == stop
        assert same(take(resumed, 25 - stop), uninterrupted[stop:])
    with TrainLoader(ds, B, T, seed=1) as rewound:  # load_state_dict on a running loader rewinds it too
        take(rewound, 20)
        rewound.load_state_dict(state)
        assert same(take(rewound, 3), uninterrupted[stop : stop + 3])


def test_state_from_other_geometry_is_refused(ds):
    with (
        TrainLoader(ds, 4, 16, seed=1) as a,
        TrainLoader(ds, 4, 32, seed=1) as b,
        pytest.raises(ValueError, match="seq_len=16 vs 32"),
    ):
        b.load_state_dict(a.state_dict())


def test_background_exception_reaches_the_caller(ds):
    calls = 0

    def flaky_hash(ids, seg):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("bad hash table")
        return ids

    loader = TrainLoader(ds, 2, 16, seed=0, hash_fn=flaky_hash, prefetch=1)
    good = take(loader, 2)
    assert all(torch.equal(b.hash_ids, b.ids) for b in good)
    with pytest.raises(KeyError, match="bad hash table") as e:
        next(loader)
    assert any("loader thread while building batch 2" in n for n in e.value.__notes__)
    assert loader.step == 2  # the failed batch was not counted
    b = next(loader)  # the next call retries the same step (the hash function works again)
    assert loader.step == 3 and torch.equal(b.ids, loader.make_batch(2).ids)
    loader.close()


def test_loader_thread_stops_on_close(ds):
    before = {t.ident for t in threading.enumerate()}
    loader = TrainLoader(ds, 2, 16, prefetch=2)
    next(loader)
    loader.close()
    assert not [t for t in threading.enumerate() if t.name == "engram-data-loader" and t.ident not in before and t.is_alive()]


def test_too_small_dataset_is_refused(tmp_path):
    tiny = make_dataset(tmp_path, [3, 4])
    with pytest.raises(ValueError, match="do not fill one batch"):
        TrainLoader(tiny, 2, 16)
    with pytest.raises(ValueError, match="too few tokens"):
        EvalLoader(tiny, 2, 16)


# ------------------------------------------------------------------------------------------- eval loader


def test_eval_loader_is_fixed(ds):
    ev = EvalLoader(ds, 2, 16, n_batches=5, hash_fn=lambda ids, seg: ids + 1)
    first, second = list(ev), list(ev)
    assert len(ev) == len(first) == 5 and same(first, second)
    assert same(list(EvalLoader(ds, 2, 16, n_batches=5)), first)  # independent of any training seed
    assert all(torch.equal(b.hash_ids, b.ids + 1) for b in first)
    everything = EvalLoader(ds, 2, 16, n_batches=10**6)
    assert len(everything) == everything.packing.n_windows // 2  # capped at what the split holds


def test_dropping_a_loader_stops_its_thread(ds):
    import gc

    loader = TrainLoader(ds, 2, 16, prefetch=2)
    next(loader)
    (thread,) = [t for t in threading.enumerate() if t.name == "engram-data-loader" and t is loader._prefetcher._thread]
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_stuck_loader_thread_times_out_clearly(ds):
    import time

    def slow_hash(ids, seg):
        time.sleep(1.5)
        return ids

    loader = TrainLoader(ds, 2, 8, hash_fn=slow_hash, timeout=0.3)
    with pytest.raises(TimeoutError, match="produced no batch in 0.3 s"):
        next(loader)
    loader.close()
    with pytest.raises(ValueError, match="timeout must be positive"):
        TrainLoader(ds, 2, 8, timeout=0)
    with pytest.raises(ValueError, match="batches must be >= 1"):
        EvalLoader(ds, 2, 8, 0)
