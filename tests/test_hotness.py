"""Row hotness: exact counts against a per-document reference, the file format, layout checks, real runs."""

from collections import Counter

import numpy as np
import pytest
import torch

from engram.hashing import NgramHasher
from engram.memory import hotness as H
from engram.memory.hotness import RowHotness, count_row_hotness, flat_row_ids, row_hotness
from engram.memory.table import TableLayoutError


def small_hasher(seed: int = 0) -> NgramHasher:
    return NgramHasher(np.arange(50) % 40, layers=(1, 3), max_ngram=3, heads=2, table_sizes=(31, 37), seed=seed, pad_id=0)


def docs_of(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, rng.integers(1, 40)) for _ in range(n)]


def reference_counts(hasher: NgramHasher, docs) -> dict[int, Counter]:
    """Each document hashed alone; flat id = per-head id + the sum of the earlier heads' sizes."""
    out = {layer: Counter() for layer in hasher.layers}
    for d in docs:
        hashed = hasher(torch.tensor(d, dtype=torch.int64)[None])[0]  # [T, L, H]
        for j, layer in enumerate(hasher.layers):
            offsets = np.cumsum([0] + hasher.head_sizes(layer)[:-1])
            out[layer].update((hashed[:, j].numpy() + offsets).ravel().tolist())
    return out


@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_counts_equal_per_document_reference(monkeypatch, chunk):
    monkeypatch.setattr(H, "CHUNK_TOKENS", chunk)  # small chunks: many groups, documents split across none
    h, docs = small_hasher(), docs_of(30)
    hot = count_row_hotness(h, docs)
    ref = reference_counts(h, docs)
    for layer in h.layers:
        assert dict(zip(hot.rows[layer].tolist(), hot.counts[layer].tolist())) == dict(ref[layer])
        assert hot.total(layer) == sum(len(d) for d in docs) * h.heads_per_layer
        assert hot.num_rows[layer] == h.total_rows(layer)
    assert hot.source == {"documents": 30, "tokens": sum(len(d) for d in docs)}


def test_flat_ids_per_document_and_max_tokens():
    h, docs = small_hasher(), docs_of(5)
    docs.insert(2, np.zeros(0, np.int64))  # an empty document is skipped
    seen = [(i, f[1].shape) for i, f in flat_row_ids(h, docs)]
    assert seen == [(i, (len(d), 4)) for i, d in enumerate(docs) if len(d)]
    hot = count_row_hotness(h, docs, max_tokens=len(docs[0]) + 1)
    assert hot.source["documents"] == 2, "documents are taken whole until max_tokens is reached"


def test_ranked_and_dense():
    h = small_hasher()
    hot = RowHotness(h.layout(), {1: 10}, {1: np.array([2, 5, 7, 9])}, {1: np.array([3, 8, 3, 1])})
    assert hot.ranked(1).tolist() == [5, 2, 7, 9], "hottest first, ties to the lower row id"
    assert hot.dense(1).tolist() == [0, 0, 3, 0, 0, 8, 0, 3, 0, 1]
    with pytest.raises(ValueError, match=r"no hotness for Engram layer 4; counted layers: \[1\]"):
        hot.ranked(4)


def test_file_round_trip_and_layout_check(tmp_path):
    h = small_hasher()
    hot = count_row_hotness(h, docs_of(10), source={"corpus": "x", "split": "train"})
    path = tmp_path / "hot.safetensors"
    hot.save(path)
    back = RowHotness.load(path, hasher=h)
    assert back.layout == hot.layout and back.num_rows == hot.num_rows and back.source == hot.source
    for layer in h.layers:
        assert back.rows[layer].tolist() == hot.rows[layer].tolist()
        assert back.counts[layer].tolist() == hot.counts[layer].tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["hot.safetensors"], "written atomically, no stray files"
    with pytest.raises(TableLayoutError, match="multipliers"):
        RowHotness.load(path, hasher=small_hasher(seed=1))
    with pytest.raises(FileNotFoundError, match="no hotness file"):
        RowHotness.load(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an engram hotness file"):
        RowHotness.load(tmp_path / "other.safetensors")


def test_row_hotness_of_a_model_on_a_corpus(mini_cache):
    from engram.config import preset
    from engram.data import load_tokenizer
    from engram.model import build_model
    from engram.memory.hotness import corpus_documents
    from engram.tokenizer import CompressionMap

    tok = load_tokenizer(mini_cache / "tok512.json")
    model = build_model(preset("debug"), CompressionMap.build(tok).lookup)
    hot = row_hotness(model, "mini", tokenizer=tok, cache_dir=mini_cache, max_tokens=20_000)
    assert hot.source["corpus"] == "mini" and hot.source["split"] == "train"
    docs = corpus_documents("mini", tok, "train", mini_cache)
    want = count_row_hotness(model.hasher, docs, max_tokens=20_000)
    assert all(np.array_equal(hot.counts[k], want.counts[k]) for k in want.layers)
    hot.check(model.hasher)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        row_hotness(model, "mini", cache_dir=mini_cache)
    with pytest.raises(ValueError, match="needs a model with Engram layers"):
        row_hotness(build_model(preset("tiny-dense")), "mini", tokenizer=tok)
    with pytest.raises(ValueError, match="split must be"):
        corpus_documents("mini", tok, "test", mini_cache)
