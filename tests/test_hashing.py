"""Hashing: exact against tests/reference.py, plus causality, document isolation and incremental == full."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.hashing import (
    NgramHasher,
    is_prime,
    layer_multipliers,
    next_prime,
    segment_ids_from_starts,
    table_primes,
)
from reference import ref_hash, ref_is_prime, ref_multipliers, ref_table_primes

V = 300
LOOKUP = np.array([(i * 7) % 211 for i in range(V)], dtype=np.int64)  # a surjection onto 0..210
# re-number in first-seen order, as a compression map is
_, first = np.unique(LOOKUP, return_index=True)
_order = {v: i for i, v in enumerate(LOOKUP[np.sort(first)])}
LOOKUP = np.array([_order[v] for v in LOOKUP], dtype=np.int64)


def make(max_ngram=3, heads=4, layers=(1, 5), sizes=None, seed=0, pad_id=2):
    sizes = sizes or tuple(97 + 40 * i for i in range(max_ngram - 1))
    return NgramHasher(LOOKUP, layers, max_ngram, heads, sizes, seed, pad_id)


def to_ref(h: NgramHasher, out: torch.Tensor) -> dict:
    return {layer: out[:, :, i].tolist() for i, layer in enumerate(h.layers)}


def test_is_prime_matches_trial_division():
    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if ref_is_prime(n)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
    assert is_prime(1_000_000_007) and not is_prime(1_000_000_007 * 3)
    # strong pseudoprimes to several small bases must still be rejected
    assert not is_prime(3215031751) and not is_prime(3825123056546413051)


def test_primes_match_reference_and_are_distinct():
    got = table_primes([1, 5, 9], [50, 50, 120], 5)
    want = ref_table_primes([1, 5, 9], [50, 50, 120], 5)
    assert {k: [list(o) for o in v] for k, v in got.items()} == want
    flat = [p for v in got.values() for o in v for p in o]
    assert len(set(flat)) == len(flat)


def test_prime_search_scales_to_1e9_rows():
    p = table_primes([1, 15], [10**9, 10**9 + 5], 8)
    flat = [x for v in p.values() for o in v for x in o]
    assert len(set(flat)) == 32 and all(x > 10**9 - 1 for x in flat) and all(is_prime(x) for x in flat)
    assert next_prime(10**9) == 1_000_000_007


def test_multipliers_match_reference_and_are_odd_int64():
    for layer in (0, 1, 15):
        m = layer_multipliers(layer, 0, 129280, 4)
        assert list(m) == ref_multipliers(layer, 0, 129280, 4)
        assert all(x % 2 == 1 and 0 < x < 2**63 for x in m)
        # the bound: any canonical id times any multiplier fits int64
        assert max(m) * (129280 - 1) < 2**63


@pytest.mark.parametrize("max_ngram,heads", [(2, 1), (3, 4), (4, 2)])
def test_hash_matches_reference_exactly(max_ngram, heads):
    h = make(max_ngram, heads)
    g = torch.Generator().manual_seed(max_ngram)
    ids = torch.randint(0, V, (3, 17), generator=g)
    got = h(ids)
    assert got.dtype == torch.int64 and got.shape == (3, 17, 2, (max_ngram - 1) * heads)
    want = ref_hash(ids.tolist(), LOOKUP, h.layers, max_ngram, heads, h.table_sizes_requested, 0, 2)
    assert to_ref(h, got) == want


def test_hash_with_segments_matches_reference():
    h = make(4, 2)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    seg = segment_ids_from_starts([[0, 3, 4, 11], [7]], 20)
    want = ref_hash(ids.tolist(), LOOKUP, h.layers, 4, 2, h.table_sizes_requested, 0, 2, seg.tolist())
    assert to_ref(h, h(ids, seg)) == want


def test_negative_mix_never_happens_and_indices_in_range():
    h = make(3, 4)
    ids = torch.randint(0, V, (4, 64))
    out = h(ids)
    for li, layer in enumerate(h.layers):
        sizes = torch.tensor(h.head_sizes(layer))
        assert bool((out[:, :, li] >= 0).all()) and bool((out[:, :, li] < sizes).all())


def test_int32_and_int64_inputs_agree():
    h = make()
    ids = torch.randint(0, V, (2, 33))
    assert torch.equal(h(ids), h(ids.to(torch.int32)))
    assert torch.equal(h(ids), h(ids.to(torch.int16)))


def test_bad_input():
    h = make()
    with pytest.raises(ValueError, match=r"id 300 at position \(0, 2\)"):
        h(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"id -1 at position \(1, 0\)"):
        h(torch.tensor([[1, 2, 3], [-1, 0, 0]]))
    with pytest.raises(TypeError, match="integer"):
        h(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        h(torch.tensor([1, 2, 3]))
    assert h(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 2, 8)
    assert h(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0, 2, 8)
    with pytest.raises(ValueError, match="max_ngram"):
        NgramHasher(LOOKUP, (1,), 1, 4, (), 0, 2)
    with pytest.raises(ValueError, match="heads"):
        NgramHasher(LOOKUP, (1,), 3, 0, (10, 10), 0, 2)
    with pytest.raises(ValueError, match="positive"):
        NgramHasher(LOOKUP, (1,), 3, 2, (10, 0), 0, 2)
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher(LOOKUP, (1,), 3, 2, (10, 10), 0, V)


def test_fingerprint_changes_with_every_layout_field():
    base = make()
    fps = {base.fingerprint()}
    for h in (make(seed=1), make(heads=3), make(layers=(1, 6)), make(sizes=(98, 137)), make(pad_id=3), make(max_ngram=4)):
        fps.add(h.fingerprint())
    other_lookup = LOOKUP.copy()
    other_lookup[[0, 1]] = other_lookup[[1, 0]]
    fps.add(NgramHasher(other_lookup, (1, 5), 3, 4, (97, 137), 0, 2).fingerprint())
    assert len(fps) == 8
    assert make().fingerprint() == base.fingerprint()  # deterministic


def test_pad_id_is_mapped_through_compression():
    h = make(pad_id=5)
    assert h.pad_id == int(LOOKUP[5])
    # the first position of order 2 reads the canonical pad as its predecessor
    ids = torch.tensor([[7]])
    want = ref_hash([[7]], LOOKUP, h.layers, 3, 4, h.table_sizes_requested, 0, 5)
    assert to_ref(h, h(ids)) == want


# ------------------------------------------------------------------------------------------ properties

ids_strategy = st.lists(st.lists(st.integers(0, V - 1), min_size=12, max_size=12), min_size=1, max_size=3)


@settings(max_examples=30, deadline=None)
@given(ids=ids_strategy, t=st.integers(0, 11), new=st.integers(0, V - 1))
def test_causality(ids, t, new):
    h = make(4, 2)
    a = torch.tensor(ids)
    b = a.clone()
    b[:, t:] = new  # change everything from t on
    ha, hb = h(a), h(b)
    assert torch.equal(ha[:, :t], hb[:, :t])


@settings(max_examples=30, deadline=None)
@given(ids=ids_strategy, cut=st.integers(1, 11))
def test_document_isolation(ids, cut):
    """A packed document hashes exactly as it does alone."""
    h = make(4, 2)
    x = torch.tensor(ids)
    seg = torch.zeros_like(x)
    seg[:, cut:] = 1
    packed = h(x, seg)
    assert torch.equal(packed[:, :cut], h(x[:, :cut]))
    assert torch.equal(packed[:, cut:], h(x[:, cut:]))


@settings(max_examples=30, deadline=None)
@given(ids=ids_strategy, chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_incremental_equals_full(ids, chunks):
    h = make(4, 3)
    x = torch.tensor(ids)
    full = h(x)
    state = h.init_state(x.shape[0])
    outs, t = [], 0
    for c in chunks + [x.shape[1]]:
        if t >= x.shape[1]:
            break
        outs.append(h.step(x[:, t : t + c], state))
        t += c
    assert torch.equal(torch.cat(outs, 1), full)


def test_incremental_rows_of_different_lengths():
    h = make(3, 2)
    x = torch.randint(0, V, (3, 9))
    lengths = [9, 4, 6]
    state = h.init_state(3)
    got = [[] for _ in range(3)]
    for t in range(9):
        active = torch.tensor([int(t < n) for n in lengths])
        out = h.step(x[:, t : t + 1], state, lengths=active)
        for b in range(3):
            if t < lengths[b]:
                got[b].append(out[b, 0])
    for b in range(3):
        assert torch.equal(torch.stack(got[b]), h(x[b : b + 1, : lengths[b]])[0])


def test_prefill_with_lengths_then_decode():
    h = make(4, 2)
    x = torch.randint(0, V, (2, 10))
    state = h.init_state(2)
    h.step(x[:, :5], state, lengths=torch.tensor([5, 3]))  # row 1's prompt is 3 tokens (right padded)
    nxt = torch.stack([x[0, 5], x[1, 3]])[:, None]
    out = h.step(nxt, state)
    assert torch.equal(out[0, 0], h(x[:1, :6])[0, 5])
    assert torch.equal(out[1, 0], h(x[1:, :4])[0, 3])


# ------------------------------------------------------------------------------------------ token mask


def random_mask(shape, seed, p_masked=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) >= p_masked  # True = real token


@pytest.mark.parametrize("max_ngram", [2, 3, 4])
def test_token_mask_matches_reference(max_ngram):
    h = make(max_ngram, 2)
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(max_ngram))
    mask = random_mask(ids.shape, max_ngram)
    seg = torch.tensor([[0] * 7 + [1] * 13, [0] * 20, [0] * 3 + [1] * 3 + [2] * 14])
    for s in (None, seg):
        want = ref_hash(ids.tolist(), LOOKUP, h.layers, max_ngram, 2, h.table_sizes_requested, 0, 2,
                        None if s is None else s.tolist(), mask.tolist())
        assert to_ref(h, h(ids, s, token_mask=mask)) == want


def test_masked_token_is_all_pad_and_blocks_look_back():
    h = make(4, 2)
    x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 4] = False  # one masked token: shorter than the look-back (3), so crossing would be visible
    got = h(x, token_mask=mask)
    all_pad = h(torch.tensor([[2]]))[0, 0]  # position 0 of a row holding the pad id: every read is pad
    assert torch.equal(got[0, 4], all_pad)
    assert torch.equal(got[0, :4], h(x[:, :4])[0])  # causal: earlier positions unchanged
    assert torch.equal(got[0, 5:], h(x[:, 5:])[0])  # after the mask: as if the sequence started there
    assert torch.equal(h(x, token_mask=torch.ones_like(mask)), h(x))  # all-real mask = no mask


def test_left_padding_masked_hashes_like_the_unpadded_row():
    h = make(3, 4)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :5] = False  # row 0: 5 left-pad positions (their ids are arbitrary)
    got = h(x, token_mask=mask)
    assert torch.equal(got[0, 5:], h(x[:1, 5:])[0])
    assert torch.equal(got[1], h(x[1:])[0])


@settings(max_examples=30, deadline=None)
@given(ids=ids_strategy, chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_incremental_with_token_mask_equals_full(ids, chunks, seed):
    h = make(4, 3)
    x = torch.tensor(ids)
    mask = random_mask(x.shape, seed, p_masked=0.25)
    full = h(x, token_mask=mask)
    state = h.init_state(x.shape[0])
    outs, t = [], 0
    for c in chunks + [x.shape[1]]:
        if t >= x.shape[1]:
            break
        outs.append(h.step(x[:, t : t + c], state, token_mask=mask[:, t : t + c]))
        t += c
    assert torch.equal(torch.cat(outs, 1), full)


def test_incremental_token_mask_with_lengths():
    """Right-padded prefill with a mask: positions beyond a row's length neither advance nor clear it."""
    h = make(4, 2)
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 2] = False
    mask[1, 4] = False  # beyond row 1's prompt of 3 tokens: must not touch its history
    state = h.init_state(2)
    h.step(x[:, :5], state, lengths=torch.tensor([5, 3]), token_mask=mask[:, :5])
    out = h.step(torch.stack([x[0, 5], x[1, 3]])[:, None], state)
    assert torch.equal(out[0, 0], h(x[:1, :6], token_mask=mask[:1, :6])[0, 5])
    assert torch.equal(out[1, 0], h(x[1:, :4])[0, 3])


def test_token_mask_bad_input():
    h = make()
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="token_mask must be a bool tensor"):
        h(x, token_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_mask shape \(2, 4\) != ids shape \(2, 5\)"):
        h(x, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask shape"):
        h.step(x, h.init_state(2), token_mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.gpu
def test_cpu_and_cuda_agree():
    h = make(4, 4)
    x = torch.randint(0, V, (4, 100))
    assert torch.equal(h(x), h(x.cuda()).cpu())


@pytest.mark.gpu
def test_token_mask_cpu_and_cuda_agree():
    h = make(4, 4)
    x = torch.randint(0, V, (4, 100))
    mask = random_mask(x.shape, 5)
    assert torch.equal(h(x, token_mask=mask), h(x.cuda(), token_mask=mask.cuda()).cpu())
    state = h.init_state(4, "cuda")
    steps = [h.step(x[:, t : t + 10].cuda(), state, token_mask=mask[:, t : t + 10].cuda()) for t in range(0, 100, 10)]
    assert torch.equal(torch.cat(steps, 1).cpu(), h(x, token_mask=mask))


def test_segment_ids_from_starts_errors():
    with pytest.raises(ValueError, match="out of range"):
        segment_ids_from_starts([[0, 12]], 10)
