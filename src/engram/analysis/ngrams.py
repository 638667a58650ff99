"""Counting n-grams of a tokenised corpus: distinct n-grams (how many slots memory could use) and
(context, next token) statistics (the factual probes of ``engram.analysis.probes``).

An n-gram is n consecutive tokens of one document; none spans two documents. It is packed into one
int64 key, t_1 V^(n-1) + ... + t_n, with V the vocabulary size (the compressed one when a compression
lookup is applied), so counting is one ``numpy.unique`` over an int64 array.
"""

from __future__ import annotations

import numpy as np


def _check_fits(base: int, n: int) -> None:
    if base ** n >= 2**63:
        raise ValueError(f"{n}-grams over a vocabulary of {base:,} do not fit an int64 key (vocab^n >= 2^63)")


def ngram_keys(tokens: np.ndarray, n: int, base: int) -> np.ndarray:
    """Keys of every n-gram of one token sequence: int64 [len - n + 1] (empty when shorter than n)."""
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) < n:
        return np.empty(0, dtype=np.int64)
    key = np.zeros(len(t) - n + 1, dtype=np.int64)
    for j in range(n):
        key = key * base + t[j : len(t) - n + 1 + j]
    return key


def corpus_ngram_keys(dataset, n: int, lookup: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Keys of every n-gram of every document of a ``TokenDataset`` (ids mapped through ``lookup`` when
    given), and the base they are packed in."""
    lk = None if lookup is None else np.asarray(lookup, dtype=np.int64)
    base = int(lk.max()) + 1 if lk is not None else int(dataset.vocab_size)
    _check_fits(base, n)
    parts = []
    for i in range(dataset.n_docs):
        doc = np.asarray(dataset.doc(i), dtype=np.int64)
        parts.append(ngram_keys(lk[doc] if lk is not None else doc, n, base))
    keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return keys, base


def distinct_ngrams(dataset, orders, lookup: np.ndarray | None = None) -> dict[int, dict[str, int]]:
    """For each order n: {"distinct": number of different n-grams, "total": n-gram occurrences}."""
    out = {}
    for n in orders:
        keys, _ = corpus_ngram_keys(dataset, int(n), lookup)
        out[int(n)] = {"distinct": int(len(np.unique(keys))), "total": int(len(keys))}
    return out


__all__ = ["corpus_ngram_keys", "distinct_ngrams", "ngram_keys"]
