"""``engram bench optim``: the sparse table optimizer's step cost follows the rows a step touches, not the
table size. ``SparseRowAdam`` on a small and a large table, the same number of lookups and unique rows
each step, timed interleaved; the baseline is the small table."""

from __future__ import annotations

import torch
from torch import nn

from engram.bench.common import time_pair
from engram.report import format_table
from engram.train.optim import SparseRowAdam

QUICK = dict(rows=(10_000, 200_000), lookups=4096, pool=3000, repeats=3)


def _stepper(rows: int, d: int, lookups: int, pool: int, reps: int):
    g = torch.Generator().manual_seed(0)
    table = nn.Parameter(torch.randn(rows, d, generator=g))
    opt = SparseRowAdam([table], lr=1e-3)
    ids_pool = torch.randperm(rows, generator=g)[:pool]
    grads = []
    for _ in range(reps):
        idx = ids_pool[torch.randint(0, pool, (lookups,), generator=g)]
        grads.append(torch.sparse_coo_tensor(idx[None], torch.randn(lookups, d, generator=g), (rows, d),
                                             check_invariants=False))
    table.grad = grads[0]
    opt.step()  # allocates the (dense) moment state outside the timing

    def steps() -> None:
        for gr in grads:
            table.grad = gr
            opt.step()

    return steps, int(grads[0].coalesce().indices().shape[1])


def run(rows: tuple[int, int] = (100_000, 10_000_000), d: int = 32, lookups: int = 32768, pool: int = 30000,
        reps: int = 5, repeats: int = 7) -> dict:
    small, large = rows
    fs, unique = _stepper(small, d, lookups, pool, reps)
    fl, _ = _stepper(large, d, lookups, pool, reps)
    times = time_pair({"small": fs, "large": fl}, repeats=repeats, warmup=1)
    res = [[f"{small:.0e} rows", times["small"] / reps * 1e3, 1.0],
           [f"{large:.0e} rows", times["large"] / reps * 1e3, times["large"] / times["small"]]]
    table = format_table(["table", "ms / step", "time ratio"], res)
    return {"table": table + f"\n(d={d}, {lookups} lookups, ~{unique} unique rows per step; target ratio <= 1.5)",
            "ratio": times["large"] / times["small"],
            "config": dict(rows=list(rows), d=d, lookups=lookups, unique_rows=unique, threads=torch.get_num_threads())}
