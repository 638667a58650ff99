"""Held-out tokens for analysis: a corpus's validation split or a text file, packed like evaluation batches.

The batches carry no hash ids: each model hashes the ids itself in ``forward`` (with the segment ids, so
n-grams never cross documents), which lets two models with different hash layouts read the same batches.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from engram.data import Batch, Document, EvalLoader, eot_id, prepare, prepare_tokens, write_token_dataset
from engram.data.corpora import default_cache_dir
from engram.data.shards import TokenDataset, tokenize_documents
from engram.infer import read_text_file


def heldout_batches(
    tokenizer,
    corpus: str | None = None,
    file: str | Path | None = None,
    n_batches: int = 8,
    batch_size: int = 8,
    seq_len: int = 256,
    cache_dir: str | Path | None = None,
) -> tuple[list[Batch], str]:
    """The first ``n_batches`` evaluation batches of a corpus's held-out split or of a file, and a label.

    A corpus with a validation split uses it; an evaluation-only corpus (``brown``, ``sympy``) is
    all held out. The batches are the ones ``engram eval`` reads (same packing, same fixed order).
    """
    if (corpus is None) == (file is None):
        raise ValueError("give exactly one of a corpus name (--corpus) or a text file (--file)")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if file is not None:
        path = Path(file)
        if not path.exists():
            raise FileNotFoundError(f"no such text file: {path}")
        text = read_text_file(path)  # refuses directories and binary files, naming them
        with tempfile.TemporaryDirectory() as tmp:
            docs = [Document(text=text, source="file", path=str(path))]
            write_token_dataset(tokenize_documents(docs, tokenizer), tmp, vocab_size=tokenizer.get_vocab_size(),
                                eot_id=eot_id(tokenizer))
            return _take(TokenDataset(tmp), n_batches, batch_size, seq_len, str(path)), str(path)
    c = prepare(corpus, cache)
    split = "val" if c.documents_of("val") else "train"
    data = prepare_tokens(c, tokenizer, cache, (split,))[split]
    label = f"{corpus} ({split})"
    return _take(data, n_batches, batch_size, seq_len, label), label


def _take(data: TokenDataset, n_batches: int, batch_size: int, seq_len: int, label: str) -> list[Batch]:
    try:
        loader = EvalLoader(data, batch_size, seq_len, n_batches, prefetch=1)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return [loader.make_batch(k) for k in range(len(loader))]


__all__ = ["heldout_batches"]
