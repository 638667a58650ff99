"""Engram tables split by rows across ranks: a lookup is an exchange of ids and of rows by all-to-all.

Ownership: contiguous ranges. With R rows and W ranks, C = ceil(R / W) and rank r owns rows
[r C, min((r + 1) C, R)). Measured against modulo ownership (row i on rank i mod W) on real text with
``engram bench shard`` (docs/scaleout.md): hashed ids spread uniformly over every head, so both balance
the rows each rank serves to within a few percent; contiguous ranges keep three things simple that
modulo would complicate: a shard is one slice of the flat table (checkpoints store it as one row-range
file and any world size reads back any range), the owner of an id is one division, and sorted distinct
ids are already grouped by owner (no extra sort before the exchange).

Lookup of the flat row ids of one step (any shape [...], N ids in all), in numbered steps:

    1. ids_U, inv_N = unique(ids_N)                 deduplicate (sorted); inv maps each id to its row
    2. send_W = bincount(ids_U // C)                how many distinct ids each owner gets from us
    3. recv_W = all_to_all(send_W)                  how many ids each rank asks of us
    4. asked_M = all_to_all(ids_U; send_W -> recv_W)   the ids others (and we) ask of our shard
    5. served_MD = shard[asked_M - start]           gathered on the owner (sparse gradient on the shard)
    6. rows_UD = all_to_all(served_MD; recv_W -> send_W)   rows back to the askers (autograd-aware)
    7. rows_ND = rows_UD[inv_N]                     every position's row again

Backward runs step 6 in reverse: each asker's row gradients (summed over its duplicate ids by the
indexing in step 7) go back to the owner, where step 5's embedding makes them one row-sparse gradient of
the shard, so ``SparseRowAdam`` updates only touched rows and keeps moments only for owned rows. The
returned gradients are multiplied by ``grad_scale`` (1 / W in training: the tables are averaged over
ranks like DDP averages the backbone).

Shape legend: N ids asked by this rank (positions x heads), U distinct ids, W ranks, M ids asked of this
rank, D row width (Dh), R rows of the whole table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engram.memory import memory_tables
from engram.memory.layout import TableLayout
from engram.memory.store import ReadOnlyTableError, RowStore

OWNERSHIP = ("contiguous", "modulo")  # modulo is measured by the benchmark only (see the module docstring)


@dataclass(frozen=True)
class RowSharding:
    """Which rows of an R-row table rank ``rank`` of ``world`` owns (contiguous ranges)."""

    num_rows: int
    world: int
    rank: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        if self.num_rows < self.world:
            raise ValueError(f"a table of {self.num_rows} rows cannot be split over {self.world} ranks")

    @property
    def chunk(self) -> int:
        return math.ceil(self.num_rows / self.world)

    def range_of(self, rank: int) -> tuple[int, int]:
        return min(rank * self.chunk, self.num_rows), min((rank + 1) * self.chunk, self.num_rows)

    @property
    def start(self) -> int:
        return self.range_of(self.rank)[0]

    @property
    def stop(self) -> int:
        return self.range_of(self.rank)[1]

    def owner(self, flat_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(flat_ids, self.chunk, rounding_mode="floor")


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """``all_to_all_single`` with uneven splits along dim 0; returns a new tensor."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Rows to their askers; backward returns the gradients (times ``grad_scale``) to the owners and adds
    its wall time to ``stats["exchange_s"]``."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any,
                grad_scale: float, stats: dict) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.grad_scale = out_splits, in_splits, group, grad_scale
        ctx.stats = stats
        return all_to_all(x_MD, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g_UD: torch.Tensor):
        t0 = time.perf_counter()
        g = g_UD * ctx.grad_scale if ctx.grad_scale != 1.0 else g_UD
        out = all_to_all(g, ctx.in_splits, ctx.out_splits, ctx.group)
        ctx.stats["exchange_s"] += time.perf_counter() - t0
        return out, None, None, None, None, None


class ShardedStore(RowStore):
    """This rank's rows of a table (the ``weight`` parameter holds only them); lookups are collective:
    every rank of ``group`` must call ``lookup`` the same number of times (see the module docstring)."""

    tier = "sharded"
    trainable = True
    moves_with_module = True

    def __init__(self, layout: TableLayout, weight: nn.Parameter, sharding: RowSharding, group: Any,
                 grad_scale: float = 1.0, dedup: bool = True) -> None:
        super().__init__(layout)
        if weight.shape[0] != sharding.stop - sharding.start:
            raise ValueError(f"table {layout.name!r}: shard of {weight.shape[0]} rows for the range "
                             f"[{sharding.start}, {sharding.stop})")
        self.weight, self.sharding, self.group = weight, sharding, group
        self.grad_scale, self.dedup = grad_scale, dedup
        # exchange_s: wall time in the all-to-alls, forward and backward (host time: exact on gloo, which
        # blocks; on NCCL the host only enqueues, so it is no measure there)
        self.stats.extra.update(ids_sent=0, rows_sent=0, distinct=0, exchange_s=0.0)

    @property
    def row_range(self) -> tuple[int, int]:
        return self.sharding.start, self.sharding.stop

    def rebind(self, weight: nn.Parameter) -> None:
        self.weight = weight

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.lookup(flat_ids, self.weight.device, sparse=False)

    def lookup(self, flat_ids: torch.Tensor, device: torch.device, sparse: bool) -> torch.Tensor:
        sh, W, w = self.sharding, self.sharding.world, self.weight
        ids_N = flat_ids.reshape(-1).to(w.device)
        ids_U, inv_N = self._distinct(ids_N)  # 1.
        send_W = torch.bincount(sh.owner(ids_U), minlength=W)  # 2.
        t0 = time.perf_counter()
        recv_W = all_to_all(send_W, [1] * W, [1] * W, self.group)  # 3.
        send, recv = send_W.tolist(), recv_W.tolist()
        asked_M = all_to_all(ids_U, recv, send, self.group)  # 4.
        t1 = time.perf_counter()
        served_MD = F.embedding(asked_M - sh.start, w, sparse=sparse and w.requires_grad)  # 5.
        t2 = time.perf_counter()
        if torch.is_grad_enabled() and served_MD.requires_grad:
            rows_UD = _AllToAllRows.apply(served_MD, send, recv, self.group, self.grad_scale, self.stats.extra)  # 6.
        else:
            rows_UD = all_to_all(served_MD, send, recv, self.group)
        self.stats.extra["exchange_s"] += (t1 - t0) + (time.perf_counter() - t2)
        self._count_exchange(ids_N.numel(), ids_U.numel(), send, recv, w)
        rows_ND = rows_UD[inv_N]  # 7.
        return rows_ND.to(device, non_blocking=True).reshape(*flat_ids.shape, self.layout.d_head)

    def _distinct(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids grouped by owner, each position's index into them): distinct and sorted, or with
        ``dedup=False`` every id (sorted; the benchmark's baseline)."""
        if self.dedup:
            return torch.unique(ids_N, sorted=True, return_inverse=True)
        ids_U, order = ids_N.sort(stable=True)
        inv_N = torch.empty_like(order)
        inv_N[order] = torch.arange(order.numel(), device=order.device)
        return ids_U, inv_N

    def _count_exchange(self, n: int, u: int, send: list[int], recv: list[int], w: torch.Tensor) -> None:
        r = self.sharding.rank
        self._count(n, (sum(recv) - recv[r]) * w.shape[1] * w.element_size())
        x = self.stats.extra
        x["ids_sent"] += sum(send) - send[r]  # ids this rank asked of others (8 bytes each)
        x["rows_sent"] += sum(recv) - recv[r]  # rows this rank served to others (and their gradients back)
        x["distinct"] += u


def shard_tables(model: nn.Module, rank: int, world: int, group: Any, *, dedup: bool = True) -> dict[str, RowSharding]:
    """Replace every memory table's rows by this rank's contiguous shard (a copy of those rows of the
    full table, so every rank must have built the same table) and route lookups through ``ShardedStore``.
    Gradients are averaged over ranks (``grad_scale`` 1 / world)."""
    out = {}
    for name, table in memory_tables(model).items():
        if not table.trainable:
            raise ReadOnlyTableError(f"table {name!r} lives on the read-only {table.tier} tier and cannot be sharded")
        sh = RowSharding(table.num_rows, world, rank)
        full = table.weight
        with torch.no_grad():
            shard = nn.Parameter(full.detach()[sh.start : sh.stop].clone(), requires_grad=full.requires_grad)
        table.weight = shard
        table.store = ShardedStore(table.layout, shard, sh, group, grad_scale=1.0 / world, dedup=dedup)
        out[name] = sh
    return out


__all__ = ["OWNERSHIP", "RowSharding", "ShardedStore", "all_to_all", "shard_tables"]
