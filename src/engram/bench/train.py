"""``engram bench train``: training throughput and the cost of the memory's moving parts.

1. tokens/s of the tiny dense, MoE and Engram-MoE presets, bf16 autocast and fp32, same batches;
2. optimizer-step time of the Engram tables' ``SparseRowAdam`` on a 1e5-row vs a 1e7-row table with the
   same touched rows (sparse updates: the cost should follow rows touched, not table size);
3. hashing time as a share of a tiny Engram-MoE training step (hashing runs in the loader's thread, but
   it must stay small even when it does not overlap).
"""

from __future__ import annotations

import os

import torch

from engram.bench.common import time_pair
from engram.report import format_table
from engram.bench.step import _stepper
from engram.config import preset
from engram.model import build_model
from engram.train.optim import SparseRowAdam

QUICK = dict(batch=2, seq=64, big_rows=200_000, small_rows=20_000, lookups=4096, repeats=2)


def _table_step(rows: int, d: int, lookups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(rows, d, generator=g))
    opt = SparseRowAdam([w], lr=1e-3)
    ids = torch.randint(0, min(rows, 100_000), (lookups,), generator=g)  # same touched rows in both tables
    vals = torch.randn(lookups, d, generator=g)

    def step() -> None:
        w.grad = torch.sparse_coo_tensor(ids[None], vals, (rows, d), check_invariants=False)
        opt.step()

    return step


def run(batch: int = 16, seq: int = 256, big_rows: int = 10_000_000, small_rows: int = 100_000, d: int = 32,
        lookups: int = 32_768, repeats: int = 3) -> dict:
    out: dict = {"config": dict(batch=batch, seq=seq, big_rows=big_rows, small_rows=small_rows, d=d,
                                lookups=lookups, threads=torch.get_num_threads())}
    # 1. throughput
    fns, names = {}, []
    for dtype in ("bf16", "fp32"):
        for name in ("tiny-dense", "tiny-moe", "tiny"):
            key = f"{name} {dtype}"
            fns[key] = _stepper(name, batch, seq, torch.bfloat16 if dtype == "bf16" else torch.float32)[0]
            names.append(key)
    times = time_pair(fns, repeats=repeats, warmup=1)
    toks = batch * seq
    rows = [[k, times[k] * 1e3, toks / times[k], times["tiny-moe " + k.split()[1]] / times[k]] for k in names]
    t1 = format_table(["preset / dtype", "ms / step", "tokens/s", "speed vs tiny-moe"], rows)
    out["tokens_per_s"] = {k: toks / times[k] for k in names}

    # 2. sparse optimizer step: big vs small table, same touched rows. Huge pages (a torch allocator option
    # read at allocation time) cut the TLB misses of random rows in multi-GB tables.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    tsteps = {f"{small_rows:.0e} rows": _table_step(small_rows, d, lookups),
              f"{big_rows:.0e} rows": _table_step(big_rows, d, lookups)}
    ot = time_pair(tsteps, repeats=max(repeats * 3, 5), warmup=2)
    small_k, big_k = list(tsteps)
    t2 = format_table(["table", "ms / optimizer step", "ratio"],
                      [[k, ot[k] * 1e3, ot[k] / ot[small_k]] for k in tsteps])
    out["table_step_ratio"] = ot[big_k] / ot[small_k]
    del tsteps

    # 3. hashing share of a step
    model = build_model(preset("tiny"))
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    seg = torch.zeros_like(ids)
    ht = time_pair({"hash": lambda: model.hash(ids, seg)}, repeats=max(repeats * 3, 5))["hash"]
    share = ht / times["tiny bf16"]
    out["hash_share"] = share
    t3 = format_table(["hashing (tiny, all Engram layers)", "ms / batch", "share of a bf16 train step"],
                      [["model.hash(ids, segment_ids)", ht * 1e3, f"{share:.2%}"]])
    out["table"] = "\n\n".join([t1, t2, t3])
    return out
