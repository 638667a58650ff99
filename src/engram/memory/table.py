"""Engram memory tables: one flat table per Engram layer, all heads in it, its rows in a store.

What the table is (``layout``: head sizes, row width, dtype, hash layout) is fixed at construction; where
its rows live (``store``, engram.memory.store) is a placement chosen with ``place``: ``device`` (the
default: the rows are the ``weight`` parameter, moving with the model), ``host`` (the parameter stays in
CPU RAM when the model moves to a GPU) or ``disk`` (a row file; the parameter is dropped, read-only).
The model never knows which.

Head h of a layer owns rows [offset_h, offset_h + size_h) of the flat table, offsets being the cumulative
sum of the earlier heads' (prime) sizes, order-major as the hasher emits them. A lookup adds the offsets
to per-head hash ids and gathers rows.

Shape legend: B batch, T time, H heads of the layer, Dh row width (d_mem / H), R total rows.

Init (documented once): rows ~ N(0, init_std^2), init_std = 1 by default like ``nn.Embedding`` and the
reference; the gate's RMSNorm on keys makes the fused output insensitive to this scale.

Gradients: with ``sparse=True`` the table's gradient is a sparse COO tensor holding only the rows a step
touched, so the optimizer (``engram.train.optim.SparseRowAdam``) reads and writes only those rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engram.memory.layout import ROW_DTYPES, TableLayout, TableLayoutError
from engram.memory.store import TIERS, DiskStore, RowStore, TensorStore

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EngramTable(nn.Module):
    """Flat multi-head embedding table. ``forward(hash_ids [..., H]) -> rows [..., H, Dh]``."""

    def __init__(
        self,
        head_sizes: Sequence[int],
        d_head: int,
        dtype: str | torch.dtype = "float32",
        init_std: float = 1.0,
        sparse: bool = True,
        device: torch.device | str | None = None,
        name: str = "table",
        hash_layout: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dtype, torch.dtype):
            names = {v: k for k, v in _DTYPES.items()}
            if dtype not in names:
                raise ValueError(f"table dtype must be one of {ROW_DTYPES}, got {dtype}")
            dtype = names[dtype]
        self.layout = TableLayout(name, tuple(head_sizes), d_head, dtype, hash_layout)
        self.head_sizes, self.d_head = self.layout.head_sizes, d_head
        self.init_std, self.sparse = init_std, sparse
        # head offsets are structure derived from the layout, not state: kept per device (see _offsets), so
        # no path (meta -> to_empty -> load_state_dict, .to(device)) can leave them stale
        self._layout_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.weight = nn.Parameter(torch.empty(self.layout.num_rows, d_head, dtype=_DTYPES[dtype], device=device))
        self.store: RowStore = TensorStore(self.layout, self.weight, "device")
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ structure

    @property
    def num_heads(self) -> int:
        return self.layout.num_heads

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def tier(self) -> str:
        return self.store.tier

    @property
    def trainable(self) -> bool:
        return self.store.trainable

    @property
    def row_range(self) -> tuple[int, int]:
        """Rows [start, stop) of the whole table that ``weight`` holds (a shard's range when sharded)."""
        return self.store.row_range

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rows ~ N(0, init_std^2)."""
        w = self._parameters.get("weight")
        if w is not None and w.device.type != "meta":
            w.normal_(0.0, self.init_std)

    def _layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets [H], sizes [H]) int64 on ``device``; head h starts after heads < h."""
        if device not in self._layout_cache:
            sizes = torch.tensor(self.head_sizes, dtype=torch.int64, device="cpu")
            self._layout_cache[device] = ((sizes.cumsum(0) - sizes).to(device), sizes.to(device))
        return self._layout_cache[device]

    @property
    def offsets(self) -> torch.Tensor:
        w = self._parameters.get("weight")
        return self._layout(w.device if w is not None else torch.device("cpu"))[0]

    def flat_ids(self, hash_ids: torch.Tensor, check: bool = False) -> torch.Tensor:
        """Per-head hash ids [..., H] -> flat row ids [..., H]."""
        if hash_ids.shape[-1] != self.num_heads:
            raise ValueError(f"hash ids have {hash_ids.shape[-1]} heads, table has {self.num_heads}")
        offsets, sizes = self._layout(hash_ids.device)
        if check and hash_ids.numel():
            bad = (hash_ids < 0) | (hash_ids >= sizes)
            if bool(bad.any()):
                pos = tuple(bad.nonzero()[0].tolist())
                raise ValueError(f"hash id {int(hash_ids[pos])} at {pos} outside its head's table")
        return hash_ids + offsets

    # --------------------------------------------------------------------------------------- lookup

    @torch.compiler.disable  # sparse row gradients and host/disk stores stay eager under torch.compile
    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return self.store.lookup(self.flat_ids(hash_ids), hash_ids.device, self.sparse)  # [..., H, Dh]

    def gather_rows(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Rows [..., H, Dh] without autograd, on the store's side (for a prefetcher)."""
        flat = self.flat_ids(hash_ids)
        return self.store.gather(flat.reshape(-1)).reshape(*flat.shape, self.d_head)

    # ------------------------------------------------------------------------------------ placement

    def place(self, tier: str, path: str | Path | None = None, **reader_kw: Any) -> "EngramTable":
        """Move the rows to ``tier``: "device", "host" (CPU RAM, pinned when CUDA exists) or "disk" (the
        row file ``path``, refused if its layout differs; the in-memory rows are dropped)."""
        if tier not in TIERS:
            raise ValueError(f"unknown table tier {tier!r}; valid tiers: {', '.join(TIERS)}")
        if self.store.row_range != (0, self.num_rows):
            raise ValueError(f"table {self.layout.name!r} holds only rows {self.store.row_range} of a sharded table; "
                             "load a checkpoint into an unsharded model to place its rows")
        self.store.close()
        if tier == "disk":
            if path is None:
                raise ValueError(f"table {self.layout.name!r}: the disk tier needs the row file's path")
            self.store = DiskStore(self.layout, path, **reader_kw)
            self._parameters.pop("weight", None)  # nothing in memory, nothing to save or train
            return self
        w = self._parameters.get("weight")
        if w is None:
            raise ValueError(f"table {self.layout.name!r} has no rows in memory (it was placed on disk)")
        if tier == "host" and w.device.type != "cpu":
            with torch.no_grad():
                cpu = w.detach().to("cpu")
                if torch.cuda.is_available():
                    cpu = cpu.pin_memory()
            self.weight = nn.Parameter(cpu, requires_grad=w.requires_grad)
        self.store = TensorStore(self.layout, self._parameters["weight"], tier)
        return self

    def _apply(self, fn: Callable, recurse: bool = True):
        """``model.to(device)`` moves a device-tier (or sharded) table; host rows stay in CPU RAM, disk rows on disk."""
        if self.store.moves_with_module:  # device rows, or a shard of a distributed table
            out = super()._apply(fn, recurse)
            self.store.rebind(self._parameters["weight"])
            return out
        held = self._parameters.pop("weight", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if held is not None:
                self._parameters["weight"] = held

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, rows={self.num_rows}, d_head={self.d_head}, dtype={self.layout.dtype}, "
                f"tier={self.tier}")


def check_layout(saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a table saved under another hash layout, naming every differing field."""
    from engram.config import diff_configs

    diffs = diff_configs(saved, expected)
    if diffs:
        raise TableLayoutError("Engram table was trained under another hash layout: " + "; ".join(diffs))


__all__ = ["EngramTable", "TableLayoutError", "check_layout"]
