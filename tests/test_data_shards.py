"""Tests for engram.data.shards: the binary shard format, corruption detection, tokenising a corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_corpora import prepare_or_skip
from tokenizers import Tokenizer

from engram.data.bpe import train_corpus_tokenizer
from engram.data.corpora import Corpus, Document
from engram.data.shards import (
    HEADER,
    ShardError,
    TokenDataset,
    _pieces,
    prepare_tokens,
    read_shard,
    tokenize_documents,
    write_shard,
    write_token_dataset,
)


def random_docs(rng: np.random.Generator, n: int, vocab: int, max_len: int = 50) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_len))) for _ in range(n)]


# ------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("vocab", [300, 65536, 100_000])
def test_dataset_round_trip_across_shards(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    docs = random_docs(rng, 60, vocab) + [np.zeros(0, np.int64)]  # an empty document too
    write_token_dataset(((f"k{i}", d) for i, d in enumerate(docs)), tmp_path, vocab_size=vocab, eot_id=0, shard_tokens=200)
    ds = TokenDataset(tmp_path)
    assert len(ds.shards) > 3 and ds.n_docs == len(docs) and ds.keys == [f"k{i}" for i in range(len(docs))]
    assert ds.shards[0].tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert isinstance(ds.shards[0].tokens, np.memmap)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds.doc(i), d)
    assert ds.n_tokens == sum(len(d) for d in docs)
    assert not list(tmp_path.glob("*.tmp"))


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    docs = random_docs(np.random.default_rng(0), 40, 500)
    write_token_dataset(((str(i), d) for i, d in enumerate(docs)), tmp_path, vocab_size=500, eot_id=0, shard_tokens=100)
    write_token_dataset(((str(i), d) for i, d in enumerate(docs)), tmp_path, vocab_size=500, eot_id=0, shard_tokens=10**9)
    assert len(list(tmp_path.glob("shard_*.bin"))) == 1 and TokenDataset(tmp_path).n_docs == 40


def test_header_layout(tmp_path):
    entry = write_shard(tmp_path / "s.bin", [np.array([1, 2, 3]), np.array([4])], np.uint16)
    raw = (tmp_path / "s.bin").read_bytes()
    magic, version, itemsize, n_tokens, n_docs, crc = HEADER.unpack(raw[: HEADER.size])
    assert (magic, version, itemsize, n_tokens, n_docs, crc) == (b"ENGRAMTK", 1, 2, 4, 2, entry["crc32"])
    assert len(raw) == 64 + 8 + 3 * 8  # header, 4 uint16 tokens padded to 8 bytes, 3 uint64 offsets
    assert np.frombuffer(raw[72:], "<u8").tolist() == [0, 3, 4]


def test_truncated_shard_error_names_the_file(tmp_path):
    path = tmp_path / "shard_00000.bin"
    write_shard(path, [np.arange(100)], np.uint16)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=rf"{path}: truncated"):
        read_shard(path)
    path.write_bytes(data[:20])
    with pytest.raises(ShardError, match=rf"{path}: truncated.*header"):
        read_shard(path)


def test_corrupted_shard_error_names_the_file(tmp_path):
    write_token_dataset([("a", np.arange(100))], tmp_path, vocab_size=1000, eot_id=0)
    path = tmp_path / "shard_00000.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{path}: checksum mismatch"):
        TokenDataset(tmp_path)
    TokenDataset(tmp_path, verify=False)  # the size still matches: only the checksum can tell
    data[:8] = b"NOTASHRD"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{path}: not an engram token shard"):
        read_shard(path, verify=False)


def test_index_and_shard_must_agree(tmp_path):
    write_token_dataset([("a", np.arange(10)), ("b", np.arange(5))], tmp_path, vocab_size=1000, eot_id=0)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["n_tokens"] = 14
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"checksum mismatch.*delete {tmp_path}"):  # any changed byte
        TokenDataset(tmp_path)
    from engram.data.shards import _index_checksum

    index["checksum"] = _index_checksum(index)  # consistent index, inconsistent with the shard
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="does not match its entry"):
        TokenDataset(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(ShardError, match="index.json: not valid JSON"):
        TokenDataset(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing index.json"):
        TokenDataset(tmp_path)


# ------------------------------------------------------------------------------------------ tokenising


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return prepare_or_skip("mini", tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def tok(mini):
    return train_corpus_tokenizer(mini, 512, max_bytes=500_000)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t.é<|>endoftx")), max_size=300), st.integers(1, 40))
def test_piecewise_encoding_is_exact(tok, text, piece_chars):
    exact = Tokenizer.from_str(tok.to_str())
    exact.encode_special_tokens = True
    assert "".join(_pieces(text, piece_chars)) == text
    ((_, ids),) = tokenize_documents([Document(text, "s", "p")], tok, piece_chars=piece_chars)
    assert ids.tolist() == exact.encode(text, add_special_tokens=False).ids


def test_literal_separator_in_text_is_ordinary_text(tok):
    ((_, ids),) = tokenize_documents([Document("a <|endoftext|> b", "s", "p")], tok)
    assert 0 not in ids.tolist() and tok.decode(ids.tolist()) == "a <|endoftext|> b"
    assert tok.encode_special_tokens is False  # the caller's tokenizer is untouched


def test_prepare_tokens_matches_plain_encoding_and_caches(mini, tok, tmp_path):
    small = Corpus("mini", mini.documents[::7], 0.3)
    splits = prepare_tokens(small, tok, tmp_path)
    for split, ds in splits.items():
        docs = small.documents_of(split)
        assert len(docs) >= 2
        assert ds.keys == [d.key for d in docs] and ds.eot_id == 0 and ds.vocab_size == 512
        for i in (0, len(docs) - 1):
            assert ds.doc(i).tolist() == tok.encode(docs[i].text).ids
    index = splits["train"].directory / "index.json"
    mtime = index.stat().st_mtime_ns
    assert prepare_tokens(small, tok, tmp_path)["train"].n_tokens == splits["train"].n_tokens
    assert index.stat().st_mtime_ns == mtime  # cached, not rewritten
    dropped = small.documents_of("train")[0]
    fewer = Corpus("mini", [d for d in small.documents if d is not dropped], 0.3)
    prepare_tokens(fewer, tok, tmp_path)  # different documents: same directory, rebuilt
    assert index.stat().st_mtime_ns != mtime


def test_a_damaged_token_cache_is_rebuilt_not_used(mini, tok, tmp_path):
    """One changed byte in the index (here the separator id) or a shard is caught and the cache rebuilt."""
    small = Corpus("mini", mini.documents[::9], 0.3)
    ds = prepare_tokens(small, tok, tmp_path)["train"]
    want = [ds.doc(i).tolist() for i in range(ds.n_docs)]
    index_path = ds.directory / "index.json"
    index_path.write_text(index_path.read_text().replace('"eot_id": 0', '"eot_id": 1'))
    with pytest.warns(UserWarning, match="rebuilding the token cache"):
        again = prepare_tokens(small, tok, tmp_path)["train"]
    assert again.eot_id == 0 and [again.doc(i).tolist() for i in range(again.n_docs)] == want
    shard = ds.directory / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER.size + 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        again = prepare_tokens(small, tok, tmp_path)["train"]
    assert [again.doc(i).tolist() for i in range(again.n_docs)] == want
