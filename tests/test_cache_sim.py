"""The cache simulator: lane streams built exactly as specified, references and bad input."""

import numpy as np
import pytest

from engram.hashing import NgramHasher
from engram.memory.cache_policy import RowStream
from engram.memory.cache_sim import compulsory_ceiling, deal_documents, lane_stream, oracle_ranking, simulate
from engram.memory.hotness import flat_row_ids


def hasher() -> NgramHasher:
    return NgramHasher(np.arange(30), layers=(2,), max_ngram=3, heads=2, table_sizes=(17, 19), pad_id=1)


def test_deal_documents_is_seeded_and_balanced():
    lengths = [5, 9, 1, 7, 3, 3, 8]
    a, b = deal_documents(lengths, 3, seed=4), deal_documents(lengths, 3, seed=4)
    assert a == b and sorted(i for lane in a for i in lane) == list(range(7))
    totals = [sum(lengths[i] for i in lane) for lane in a]
    assert max(totals) - min(totals) <= max(lengths)


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_lane_stream_matches_a_plain_construction(tokens_per_step):
    h = hasher()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30, n) for n in (4, 11, 6, 9, 5, 8)]
    s = lane_stream(h, docs, 2, lanes=2, tokens_per_step=tokens_per_step, seed=3)
    # plain: the same pieces and deal, each lane's rows concatenated, steps = union over lanes and heads
    longest = sum(map(len, docs)) // 16
    pieces = [d[i:i + longest] for d in docs for i in range(0, len(d), longest)]
    lanes = []
    for idx in deal_documents([len(p) for p in pieces], 2, 3):
        lanes.append(np.concatenate([dict(flat_row_ids(h, [pieces[i]]))[0][2] for i in idx]))
    T = min(map(len, lanes)) // tokens_per_step * tokens_per_step
    want = [sorted(set(np.concatenate([lane[t:t + tokens_per_step].ravel() for lane in lanes]).tolist()))
            for t in range(0, T, tokens_per_step)]
    assert [x.tolist() for x in s.steps()] == want
    assert s.num_rows == h.total_rows(2)


def test_references_and_simulate():
    s = RowStream.from_steps([[1, 2], [2, 3], [1, 3], [4]], 8)
    assert compulsory_ceiling(s) == 1 - 4 / 7
    assert oracle_ranking(s).tolist() == [1, 2, 3, 4]
    res = simulate(s, [1, 2], ["lru", "static"], hot_ids=np.array([3, 1]))
    names = [(r.policy, r.capacity) for r in res]
    assert names == [(p, c) for c in (1, 2) for p in ("lru", "static", "belady", "static-oracle")]
    best = {r.capacity: r.hits for r in res if r.policy == "belady"}
    assert all(r.hits <= best[r.capacity] for r in res)
    assert all(0 <= r.hit_rate <= compulsory_ceiling(s) for r in res)


def test_bad_input():
    h = hasher()
    with pytest.raises(ValueError, match="layer 5 is not an Engram layer"):
        lane_stream(h, [np.arange(10)], 5, 2)
    with pytest.raises(ValueError, match="tokens_per_step must be >= 1"):
        lane_stream(h, [np.arange(10)], 2, 2, tokens_per_step=0)
    with pytest.raises(ValueError, match="too little text for 4 lanes of 8 tokens"):
        lane_stream(h, [np.arange(10)], 2, 4, tokens_per_step=8)
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        deal_documents([3], 0)
