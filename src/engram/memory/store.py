"""Where a table's rows live: one small interface, several tiers.

A ``RowStore`` answers ``gather(flat_ids [N]) -> rows [N, Dh]`` (no autograd), ``lookup`` (the same,
differentiable where the tier trains), and reports ``nbytes`` and ``stats``. Tiers:

``device``  the rows are an ``nn.Parameter`` on the model's device (the reference; today's behaviour).
``host``    the rows are an ``nn.Parameter`` kept in CPU RAM whatever device the model runs on. On CUDA
            the rows a step needs are gathered on the host into a pinned staging buffer and copied to the
            device without blocking; gradients flow back through the copy to a sparse CPU gradient, so
            training updates rows in host memory, with the optimizer state beside them. (On a CPU-only
            machine host and device are the same memory.)
``disk``    the rows are a row file (engram.memory.rowfile), read on demand, every row checked. Read-only:
            building an optimizer over it, or saving a checkpoint from it, is refused.

Trainable tiers train through the table's parameter: ``F.embedding(..., sparse=True)`` gives a row-sparse
gradient and ``engram.train.optim.SparseRowAdam`` updates only the rows a step touched, keeping its
moments on the parameter's device (beside the rows). That is the "sparse row update" of the interface:
one mechanism for every trainable tier, tested against the reference.

Shape legend: N ids asked, Dh row width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engram.io import fault_point
from engram.memory.layout import TableLayout
from engram.memory.rowfile import RowFileReader

TIERS = ("device", "host", "disk")
_TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReadOnlyTableError(RuntimeError):
    """A table on a read-only tier (disk) was asked to train or to be saved as weights."""


@dataclass
class StoreStats:
    lookups: int = 0  # gather / lookup calls
    rows: int = 0  # ids asked (with repeats)
    bytes_read: int = 0  # bytes moved from the tier (device: rows x row bytes; disk: pages read)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"lookups": self.lookups, "rows": self.rows, "bytes_read": self.bytes_read, **self.extra}


class RowStore:
    """The interface (see the module docstring). ``tier`` names the implementation."""

    tier: str = ""
    trainable: bool = False
    moves_with_module: bool = False  # the rows follow ``module.to(device)`` (``rebind`` gets the moved parameter)

    def __init__(self, layout: TableLayout) -> None:
        self.layout = layout
        self.stats = StoreStats()

    @property
    def row_range(self) -> tuple[int, int]:
        """The rows [start, stop) of the whole table this store holds (all of them, except a shard's)."""
        return 0, self.layout.num_rows

    def rebind(self, weight: torch.nn.Parameter) -> None:
        """Point the store at the table's parameter after a module conversion moved it."""

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lookup(self, flat_ids: torch.Tensor, device: torch.device, sparse: bool) -> torch.Tensor:
        """Rows for ``flat_ids`` (any shape [...]) on ``device``: [..., Dh]; differentiable on trainable tiers."""
        rows = self.gather(flat_ids.reshape(-1))
        return rows.to(device, non_blocking=True).reshape(*flat_ids.shape, self.layout.d_head)

    def nbytes(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _count(self, n: int, nbytes: int) -> None:
        self.stats.lookups += 1
        self.stats.rows += n
        self.stats.bytes_read += nbytes


class TensorStore(RowStore):
    """Rows in a tensor (the table's parameter): the ``device`` tier, and the ``host`` tier."""

    trainable = True

    def __init__(self, layout: TableLayout, weight: torch.nn.Parameter, tier: str = "device") -> None:
        super().__init__(layout)
        if tier not in ("device", "host"):
            raise ValueError(f"TensorStore tier must be 'device' or 'host', got {tier!r}")
        self.tier, self.weight = tier, weight
        self._staging: torch.Tensor | None = None

    @property
    def moves_with_module(self) -> bool:  # type: ignore[override]
        return self.tier == "device"

    def rebind(self, weight: torch.nn.Parameter) -> None:
        self.weight = weight

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight.detach()
        self._count(flat_ids.numel(), flat_ids.numel() * w.shape[1] * w.element_size())
        return w.index_select(0, flat_ids.to(w.device))

    def lookup(self, flat_ids: torch.Tensor, device: torch.device, sparse: bool) -> torch.Tensor:
        w = self.weight
        self._count(flat_ids.numel(), flat_ids.numel() * w.shape[1] * w.element_size())
        ids = flat_ids.to(w.device)
        if w.device == torch.device(device):
            return F.embedding(ids, w, sparse=sparse and w.requires_grad)
        if torch.is_grad_enabled() and w.requires_grad:  # host rows, trained: autograd carries the copy back
            return F.embedding(ids, w, sparse=sparse).to(device, non_blocking=True)
        return self._staged(ids, device)

    def _staged(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host rows for inference on CUDA: gather into a pinned buffer, copy without blocking the host."""
        n, d = ids.numel(), self.weight.shape[1]
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty(max(n, 1024), d, dtype=self.weight.dtype, pin_memory=True)
        buf = self._staging[:n]
        torch.index_select(self.weight.detach(), 0, ids.reshape(-1), out=buf)
        out = buf.to(device, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the staging buffer is reused by the next call
        return out.reshape(*ids.shape, d)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class DiskStore(RowStore):
    """Rows in a row file, read on demand and checked; read-only."""

    tier = "disk"
    trainable = False

    def __init__(self, layout: TableLayout, path: str | Path, io: str = "pread", threads: int = 4,
                 direct: bool = False) -> None:
        super().__init__(layout)
        self.path = Path(path)
        self.reader = RowFileReader(self.path, expected=layout, io=io, threads=threads, direct=direct)
        self.dtype = _TORCH_DTYPE[layout.dtype]

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        fault_point(f"store.gather:{self.layout.name}")  # tests make a read fail mid-generation here
        before = self.reader.stats.bytes
        rows = self.reader.gather(flat_ids, self.dtype)
        self._count(flat_ids.numel(), self.reader.stats.bytes - before)
        return rows

    def nbytes(self) -> int:
        return self.reader.header.file_size

    def close(self) -> None:
        self.reader.close()




def rowfile_name(table: str) -> str:
    """The row file of table ``table`` inside a table directory."""
    return f"{table}.rows"


__all__ = ["DiskStore", "ReadOnlyTableError", "RowStore", "StoreStats", "TIERS", "TensorStore",
           "rowfile_name"]
