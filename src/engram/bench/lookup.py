"""``engram bench lookup``: EngramTable lookup rows/s vs bare ``torch.index_select`` on the same table."""

from __future__ import annotations

import torch

from engram.bench.common import time_pair
from engram.report import format_table
from engram.memory.table import EngramTable


def run(rows: int = 2_000_000, d_head: int = 32, heads: int = 16, batch: int = 8, seq: int = 2048,
        repeats: int = 9) -> dict:
    g = torch.Generator().manual_seed(0)
    per_head = rows // heads
    table = EngramTable([per_head] * heads, d_head).requires_grad_(False)
    hash_ids = torch.randint(0, per_head, (batch, seq, heads), generator=g)
    flat = (hash_ids + table.offsets).reshape(-1)  # what index_select gets: offsets already applied
    w = table.weight
    out_a = table(hash_ids)
    out_b = torch.index_select(w, 0, flat).view(batch, seq, heads, d_head)
    if not torch.equal(out_a, out_b):
        raise AssertionError("table lookup differs from index_select")
    times = time_pair({"index_select": lambda: torch.index_select(w, 0, flat),
                       "EngramTable": lambda: table(hash_ids)}, repeats)
    n = flat.numel()
    res = [
        ["torch.index_select (offsets precomputed)", times["index_select"] * 1e3, n / times["index_select"], 1.0],
        ["EngramTable (adds offsets + gather)", times["EngramTable"] * 1e3, n / times["EngramTable"],
         times["index_select"] / times["EngramTable"]],
    ]
    table_txt = format_table(["lookup", "ms / batch", "rows/s", "relative"], res)
    return {"table": table_txt, "relative": times["index_select"] / times["EngramTable"],
            "rows_per_s": n / times["EngramTable"],
            "config": dict(rows=rows, d_head=d_head, heads=heads, batch=batch, seq=seq)}
