"""``engram bench hashing``: our torch hasher vs a vectorised NumPy implementation of the same formula.

The NumPy baseline is written the way the public demo hashes (per layer: pad-shift the compressed ids,
multiply, XOR, then one ``%`` per head), on the same inputs; outputs are checked equal before timing.
"""

from __future__ import annotations

import numpy as np
import torch

from engram.bench.common import time_pair
from engram.report import format_table
from engram.hashing import NgramHasher


def numpy_hash(hasher: NgramHasher, ids: np.ndarray) -> np.ndarray:
    """The same hash ids [B, T, L, H] computed with NumPy, layer by layer and head by head."""
    lookup = hasher.lookup.numpy()
    x = lookup[ids]
    B, T = x.shape
    N = hasher.max_ngram
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :T] for k in range(1, N)]
    per_layer = []
    for layer in hasher.layers:
        m = np.asarray(hasher.multipliers[layer], dtype=np.int64)
        heads = []
        mix = shifts[0] * m[0]
        for n in range(2, N + 1):
            mix = np.bitwise_xor(mix, shifts[n - 1] * m[n - 1])
            for p in hasher.primes[layer][n - 2]:
                heads.append(mix % p)
        per_layer.append(np.stack(heads, axis=-1))
    return np.stack(per_layer, axis=2)


def run(batch: int = 8, seq: int = 4096, max_ngram: int = 3, heads: int = 8, layers: tuple[int, ...] = (1, 14),
        vocab: int = 16384, repeats: int = 21) -> dict:
    g = torch.Generator().manual_seed(0)
    lookup = torch.randperm(vocab, generator=g) % (vocab * 3 // 4)  # a 25%-compressing surjection
    _, first = np.unique(lookup.numpy(), return_index=True)  # renumber in first-seen order
    order = {v: i for i, v in enumerate(lookup.numpy()[np.sort(first)])}
    lookup = torch.tensor([order[int(v)] for v in lookup], dtype=torch.int64)
    hasher = NgramHasher(lookup, layers, max_ngram, heads, [500_000] * (max_ngram - 1), seed=0, pad_id=2)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids_np = ids.numpy()
    ours, base = hasher(ids).numpy(), numpy_hash(hasher, ids_np)
    if not np.array_equal(ours, base):
        raise AssertionError("torch and NumPy hash ids differ")
    times = time_pair({"numpy": lambda: numpy_hash(hasher, ids_np), "engram": lambda: hasher(ids)}, repeats)
    toks = batch * seq
    rows = [
        ["numpy (reference-style)", times["numpy"] * 1e3, toks / times["numpy"], 1.0],
        ["engram (torch)", times["engram"] * 1e3, toks / times["engram"], times["numpy"] / times["engram"]],
    ]
    table = format_table(["implementation", "ms / batch", "tokens/s", "speed-up"], rows)
    return {"table": table, "speedup": times["numpy"] / times["engram"], "tokens_per_s": toks / times["engram"],
            "config": dict(batch=batch, seq=seq, max_ngram=max_ngram, heads=heads, layers=list(layers),
                           threads=torch.get_num_threads())}
