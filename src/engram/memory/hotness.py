"""Row hotness: how often each Engram table row is looked up over a token stream, per Engram layer.

Hashing is a pure function of token ids, so counting needs no model weights, only the hash layout: each
document is hashed on its own (n-grams never cross documents, as in training with segment ids), per-head
hash ids become flat row ids (head offset added, ``EngramTable.flat_ids``), and every position counts once.
The static cache policy ranks rows by these counts (``RowHotness.ranked``); count them on the *training*
split only, so that a cache evaluated on held-out text has not seen it.

File format (``RowHotness.save``; safetensors, written atomically):

    tensors   ``layer{L}.rows``    int64 [N_L]  row ids with a nonzero count, ascending
              ``layer{L}.counts``  int64 [N_L]  their counts (positions that looked the row up)
    metadata  ``format``           "engram-hotness-v1"
              ``layout``           JSON of ``NgramHasher.layout()`` (checked on load against the model's)
              ``num_rows``         JSON {layer: rows in that layer's table}
              ``source``           JSON {corpus, split, documents, tokens, ...} of what was counted

Entry points: ``row_hotness(run_or_model, corpus, split="train")`` for a trained run (an
``engram.infer.LoadedRun``) or a model with its tokenizer; ``count_row_hotness(hasher, docs)`` for any
hash layout and token documents (no model at all, e.g. a paper-sized layout).

Legend: T tokens of a document, H heads per layer, L Engram layers, N rows with a nonzero count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from numba import njit

from engram.hashing import NgramHasher
from engram.io import atomic_write
from engram.memory.table import EngramTable, check_layout

FORMAT = "engram-hotness-v1"
CHUNK_TOKENS = 1 << 18  # documents are hashed in groups of about this many tokens (bounded memory)


# ------------------------------------------------------------------------------------------- hashing


def _flat_tables(hasher: NgramHasher) -> dict[int, EngramTable]:
    """Shape-only tables (meta device): they own the head-offset rule for flat row ids."""
    return {layer: EngramTable(hasher.head_sizes(layer), 1, device="meta") for layer in hasher.layers}


def hashed_chunks(hasher: NgramHasher, docs: Iterable[np.ndarray]
                  ) -> Iterator[tuple[list[int], list[int], dict[int, np.ndarray]]]:
    """Documents hashed in groups of ~``CHUNK_TOKENS`` tokens (one hasher call each, documents separated by
    segment ids): (document indices, their lengths, {layer: flat row ids int64 [sum of lengths, H]})."""
    tables = _flat_tables(hasher)
    group: list[tuple[int, np.ndarray]] = []
    size = 0

    def flush() -> tuple[list[int], list[int], dict[int, np.ndarray]]:
        ids = torch.from_numpy(np.concatenate([d for _, d in group]).astype(np.int64))[None]
        seg = torch.from_numpy(np.repeat(np.arange(len(group)), [len(d) for _, d in group]))[None]
        hashed_TLH = hasher(ids, seg)[0]
        flat = {layer: tables[layer].flat_ids(hashed_TLH[:, j]).numpy() for j, layer in enumerate(hasher.layers)}
        return [i for i, _ in group], [len(d) for _, d in group], flat

    for i, doc in enumerate(docs):
        if len(doc) == 0:
            continue
        group.append((i, np.asarray(doc)))
        size += len(doc)
        if size >= CHUNK_TOKENS:
            yield flush()
            group, size = [], 0
    if group:
        yield flush()


def flat_row_ids(hasher: NgramHasher, docs: Iterable[np.ndarray]) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
    """For each non-empty document (raw token ids), its flat row ids per layer: (index, {layer: int64 [T, H]})."""
    for indices, lengths, flat in hashed_chunks(hasher, docs):
        start = 0
        for i, n in zip(indices, lengths):
            yield i, {layer: f[start:start + n] for layer, f in flat.items()}
            start += n


@njit(cache=True)
def _count_into(counts_R, ids):
    for i in range(ids.shape[0]):
        counts_R[ids[i]] += 1


# ------------------------------------------------------------------------------------------- counting


@dataclass
class RowHotness:
    """Lookup counts per Engram layer (sparse: rows never looked up are absent)."""

    layout: dict[str, Any]  # NgramHasher.layout() of the counted layout
    num_rows: dict[int, int]
    rows: dict[int, np.ndarray]  # layer -> int64 [N] ascending row ids
    counts: dict[int, np.ndarray]  # layer -> int64 [N] counts
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.rows)

    def _layer(self, layer: int) -> int:
        if layer not in self.rows:
            raise ValueError(f"no hotness for Engram layer {layer}; counted layers: {list(self.rows)}")
        return layer

    def ranked(self, layer: int) -> np.ndarray:
        """Row ids of ``layer``, hottest first (ties: lower row id first); never-seen rows are absent."""
        layer = self._layer(layer)
        order = np.lexsort((self.rows[layer], -self.counts[layer]))
        return self.rows[layer][order]

    def dense(self, layer: int) -> np.ndarray:
        """int64 [rows of the layer]: every row's count."""
        layer = self._layer(layer)
        out = np.zeros(self.num_rows[layer], np.int64)
        out[self.rows[layer]] = self.counts[layer]
        return out

    def total(self, layer: int) -> int:
        return int(self.counts[self._layer(layer)].sum())

    def check(self, hasher: NgramHasher) -> None:
        """Refuse a hotness file counted under another hash layout (its row ids would mean other n-grams)."""
        check_layout(self.layout, hasher.layout())

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save

        tensors = {}
        for layer in self.rows:
            tensors[f"layer{layer}.rows"] = np.ascontiguousarray(self.rows[layer], np.int64)
            tensors[f"layer{layer}.counts"] = np.ascontiguousarray(self.counts[layer], np.int64)
        meta = {"format": FORMAT, "layout": json.dumps(self.layout, sort_keys=True),
                "num_rows": json.dumps({str(k): v for k, v in self.num_rows.items()}),
                "source": json.dumps(self.source, sort_keys=True)}
        atomic_write(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, hasher: NgramHasher | None = None) -> RowHotness:
        """Read a hotness file; with ``hasher``, also check it belongs to that hash layout."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no hotness file at {path}")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not an engram hotness file (format {meta.get('format')!r}, expected {FORMAT!r})")
            num_rows = {int(k): int(v) for k, v in json.loads(meta["num_rows"]).items()}
            rows = {layer: f.get_tensor(f"layer{layer}.rows") for layer in num_rows}
            counts = {layer: f.get_tensor(f"layer{layer}.counts") for layer in num_rows}
        out = cls(json.loads(meta["layout"]), num_rows, rows, counts, json.loads(meta["source"]))
        if hasher is not None:
            out.check(hasher)
        return out


def count_row_hotness(hasher: NgramHasher, docs: Iterable[np.ndarray], max_tokens: int | None = None,
                      source: dict[str, Any] | None = None) -> RowHotness:
    """Count every position's row per layer over ``docs`` (raw token ids, one array per document).

    ``max_tokens`` stops after the document that reaches it (documents are taken whole).
    """
    num_rows = {layer: hasher.total_rows(layer) for layer in hasher.layers}
    dense = {layer: np.zeros(n, np.int64) for layer, n in num_rows.items()}
    n_docs = n_tokens = 0

    def limited() -> Iterator[np.ndarray]:
        nonlocal n_docs, n_tokens
        for d in docs:
            if max_tokens is not None and n_tokens >= max_tokens:
                return
            n_docs += 1
            n_tokens += len(d)
            yield d

    for _, _, flat in hashed_chunks(hasher, limited()):
        for layer, rows_TH in flat.items():
            _count_into(dense[layer], rows_TH.ravel())
    rows = {layer: np.flatnonzero(c).astype(np.int64) for layer, c in dense.items()}
    counts = {layer: dense[layer][rows[layer]] for layer in dense}
    info = {**(source or {}), "documents": n_docs, "tokens": n_tokens}
    return RowHotness(hasher.layout(), num_rows, rows, counts, info)


def corpus_documents(corpus: str, tokenizer: Any, split: str, cache_dir: str | os.PathLike | None = None
                     ) -> list[np.ndarray]:
    """The raw token ids of each document of a corpus split (tokenised once, then read from the cache)."""
    from engram.data import prepare, prepare_tokens

    c = prepare(corpus, cache_dir)
    if not c.documents_of(split):  # type: ignore[arg-type]
        raise ValueError(f"corpus {corpus!r} has no documents in its {split!r} split"
                         + (" (it is evaluation-only: every document is validation)" if c.val_fraction >= 1 else ""))
    ds = prepare_tokens(c, tokenizer, cache_dir, splits=(split,))[split]  # type: ignore[arg-type]
    return [ds.doc(i) for i in range(ds.n_docs)]


def row_hotness(run_or_model: Any, corpus: str, split: str = "train", *, tokenizer: Any = None,
                cache_dir: str | os.PathLike | None = None, max_tokens: int | None = None) -> RowHotness:
    """Hotness of a trained model's Engram rows over a corpus split (default: training split only).

    ``run_or_model``: an ``engram.infer.LoadedRun`` (uses its model's hash layout and its tokenizer), or an
    ``EngramLM`` together with ``tokenizer=`` (a ``tokenizers.Tokenizer``).
    """
    model = getattr(run_or_model, "model", run_or_model)
    tok = tokenizer if tokenizer is not None else getattr(run_or_model, "tokenizer", None)
    hasher = getattr(model, "hasher", None)
    if hasher is None or getattr(getattr(model, "cfg", None), "engram", None) is None:
        raise ValueError("row_hotness needs a model with Engram layers (or a LoadedRun of one)")
    if tok is None:
        raise ValueError("row_hotness needs the model's tokenizer: pass a LoadedRun, or tokenizer=")
    docs = corpus_documents(corpus, tok, split, cache_dir)
    return count_row_hotness(hasher, docs, max_tokens, source={"corpus": corpus, "split": split})


__all__ = ["FORMAT", "RowHotness", "corpus_documents", "count_row_hotness", "flat_row_ids", "hashed_chunks",
           "row_hotness"]
