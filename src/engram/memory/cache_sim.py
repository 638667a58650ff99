"""Replaying real row streams through the cache policies: hit rate against cache size.

``lane_stream`` turns token documents into the row stream a serving cache sees: ``lanes`` sequences
decode side by side (documents dealt to lanes in a seeded random order, each document starting afresh), each advancing ``tokens_per_step`` tokens a step; a step's rows are the union over its positions
and heads, each row counted once. ``simulate`` replays one stream through policies and capacities,
beside Belady's offline optimum and the compulsory ceiling (every first touch is a miss for any cache that
starts empty).

Legend: B lanes, T tokens per lane, K tokens per step per lane, H heads, S steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from engram.hashing import NgramHasher
from engram.memory.cache_policy import Belady, CachePolicy, RowStream, make_policy
from engram.memory.hotness import flat_row_ids


def deal_documents(lengths: Sequence[int], lanes: int, seed: int = 0) -> list[list[int]]:
    """Documents (by index) per lane: a seeded random order, each next document to the shortest lane."""
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    out: list[list[int]] = [[] for _ in range(lanes)]
    total = np.zeros(lanes, np.int64)
    for i in order:
        k = int(np.argmin(total))
        out[k].append(int(i))
        total[k] += lengths[i]
    return out


def lane_stream(hasher: NgramHasher, docs: Sequence[np.ndarray], layer: int, lanes: int, tokens_per_step: int = 1,
                seed: int = 0) -> RowStream:
    """The row stream of one Engram layer for ``lanes`` sequences advancing ``tokens_per_step`` each step.

    A document longer than 1/(8 lanes) of the text is split into pieces of that length (each piece a request
    that starts afresh). Lanes are cut to the shortest one (at most one piece is dropped per lane).
    """
    if layer not in hasher.layers:
        raise ValueError(f"layer {layer} is not an Engram layer of this layout {hasher.layers}")
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    # a document longer than an eighth of a lane is served as several requests, so lanes balance to within
    # an eighth of their length when cut to the shortest
    longest = max(1, sum(len(d) for d in docs) // (8 * lanes))
    docs = [d[i:i + longest] for d in docs for i in range(0, len(d), longest)]
    dealt = deal_documents([len(d) for d in docs], lanes, seed)
    per_lane = []
    for idx in dealt:
        rows = [flat[layer] for _, flat in flat_row_ids(hasher, (docs[i] for i in idx))]
        per_lane.append(np.concatenate(rows) if rows else np.zeros((0, hasher.heads_per_layer), np.int64))
    T = min(len(r) for r in per_lane) // tokens_per_step * tokens_per_step
    if T == 0:
        raise ValueError(f"too little text for {lanes} lanes of {tokens_per_step} tokens a step")
    rows_BTH = np.stack([r[:T] for r in per_lane])
    S = T // tokens_per_step
    rows_SN = rows_BTH.reshape(lanes, S, tokens_per_step, -1).transpose(1, 0, 2, 3).reshape(S, -1)
    return RowStream.from_matrix(rows_SN, hasher.total_rows(layer))


@dataclass
class SimResult:
    policy: str
    capacity: int
    hits: int
    accesses: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


def compulsory_ceiling(stream: RowStream) -> float:
    """The best hit rate any cache that starts empty can reach on ``stream``: 1 - first touches / accesses."""
    return 1.0 - stream.first_touches() / stream.num_accesses if stream.num_accesses else 0.0


def oracle_ranking(stream: RowStream) -> np.ndarray:
    """Rows ranked by their access count in ``stream`` itself (ties: lower row id): what a static cache
    would hold if it knew the future's frequencies."""
    rows, counts = np.unique(stream.ids_A, return_counts=True)
    return rows[np.lexsort((rows, -counts))]


def simulate(stream: RowStream, capacities: Sequence[int], policies: Sequence[str], hot_ids: np.ndarray | None = None,
             protect_previous: bool = True, belady: bool = True, oracle: bool = True,
             progress: Callable[[SimResult], None] | None = None) -> list[SimResult]:
    """Hit counts of each policy (and the references) at each capacity on one stream; each run starts empty.

    ``hot_ids`` (hottest first) is needed for the ``static`` policy. The previous step's rows are
    protected, as a prefetching store protects the batch in flight. References: ``belady`` (offline
    optimum) and ``static-oracle`` (the static policy ranked by the stream's own counts).
    """
    out = []
    ranked = oracle_ranking(stream) if oracle else None
    for cap in capacities:
        runs: list[tuple[str, Callable[[], CachePolicy]]] = []
        for name in policies:
            kw = {"hot_ids": hot_ids} if name == "static" else {}
            runs.append((name, lambda name=name, kw=kw: make_policy(name, stream.num_rows, cap, **kw)))
        if belady:
            runs.append(("belady", lambda: Belady(stream.num_rows, cap, stream)))
        if oracle:
            runs.append(("static-oracle", lambda: make_policy("static", stream.num_rows, cap, hot_ids=ranked)))
        for name, factory in runs:
            t0 = time.perf_counter()
            policy = factory()
            hits = int(policy.run(stream, protect_previous).sum())
            res = SimResult(name, cap, hits, stream.num_accesses, time.perf_counter() - t0)
            del policy
            out.append(res)
            if progress is not None:
                progress(res)
    return out


__all__ = ["SimResult", "compulsory_ceiling", "deal_documents", "lane_stream", "oracle_ranking", "simulate"]
