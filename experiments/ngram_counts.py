"""How many different n-grams the memory experiment's models could store: beyond that, slots only plateau.

Counted on compressed token ids (what Engram and OverEncoding hash), n-grams inside one document, for
each order the models use, over (a) the whole training split and (b) the tokens one run actually
trains on (seed 0's batches; other seeds see a different sample of the same size). The counts are kept
in RESULTS/SIZE/memory/ngram_counts.json (``ngram_counts-400k.json`` for a ``--tokens`` budget, as the
reports), so the report is rebuilt from committed files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engram.io import atomic_write_json

from experiments.report import budget_tag
from experiments.runner import plan_experiment
from experiments.specs import SIZES


def memory_ngram_counts(size: str, seeds, tokens, dtype, results: Path, runs: Path, cache_dir) -> dict | None:
    """The counts (from the committed file, else computed from a finished run's tokenizer; None if
    no run has started yet)."""
    path = Path(results) / size / "memory" / f"ngram_counts{budget_tag('memory', size, tokens)}.json"
    plans, _ = plan_experiment("memory", size, seeds, tokens, dtype)
    steps = plans[0].train.steps
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("steps") == steps:
            return saved
    run_dir = next((Path(runs) / p.size / p.experiment / p.name for p in plans
                    if (Path(runs) / p.size / p.experiment / p.name / "tokenizer.json").is_file()), None)
    if run_dir is None:
        return None
    counts = count_for_run(run_dir, size, steps, cache_dir)
    atomic_write_json(path, counts)
    return counts


def count_for_run(run_dir: Path, size: str, steps: int, cache_dir) -> dict:
    from engram.analysis.ngrams import distinct_ngrams
    from engram.data import TrainLoader, load_tokenizer, prepare, prepare_tokens
    from engram.data.bpe import tokenizer_fingerprint
    from engram.tokenizer import CompressionMap

    sz = SIZES[size]
    tok = load_tokenizer(run_dir / "tokenizer.json")
    lookup = np.asarray(CompressionMap.load(run_dir / "compression.safetensors").lookup, dtype=np.int64)
    corpus = prepare(sz.corpus, Path(cache_dir) if cache_dir else None)
    train = prepare_tokens(corpus, tok, Path(cache_dir) if cache_dir else None, ("train",))["train"]
    orders = range(2, sz.engram.max_ngram + 1)
    whole = distinct_ngrams(train, orders, lookup)
    loader = TrainLoader(train, sz.batch_size, sz.seq_len, seed=0)
    try:
        batches = [loader.make_batch(k) for k in range(steps)]
    finally:
        loader.close()
    seen = _seen_ngrams(batches, orders, lookup)
    return {"tokenizer": tokenizer_fingerprint(tok), "corpus": sz.corpus, "steps": steps,
            "orders": {str(n): {**whole[n], "seen_by_a_run": seen[n]} for n in orders},
            "training_tokens": train.n_tokens}


def _seen_ngrams(batches, orders, lookup: np.ndarray) -> dict[int, int]:
    """Distinct n-grams inside documents of the batches' inputs (compressed ids)."""
    base = int(lookup.max()) + 1
    keys: dict[int, list[np.ndarray]] = {n: [] for n in orders}
    for b in batches:
        ids, seg = lookup[b.ids.numpy()], b.segment_ids.numpy()
        T = ids.shape[1]
        for n in orders:
            key = np.zeros((ids.shape[0], T - n + 1), dtype=np.int64)
            for j in range(n):
                key = key * base + ids[:, j : T - n + 1 + j]
            same_doc = seg[:, : T - n + 1] == seg[:, n - 1 :]
            keys[n].append(key[same_doc])
    return {n: int(len(np.unique(np.concatenate(k)))) for n, k in keys.items()}


__all__ = ["count_for_run", "memory_ngram_counts"]
