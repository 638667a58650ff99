"""What a memory table is, independent of where its rows live (TorchRec's table config vs its placement).

A ``TableLayout`` names the table, gives its heads' sizes (distinct primes, order-major as the hasher
emits them), its row width and the dtype rows are trained in, and the hash layout the rows belong to: a
row means something only under the multipliers and primes that addressed it. Stores (engram.memory.store)
hold the rows; files (engram.memory.rowfile) record the layout in their header and are refused under
another one, naming the differing fields.

Head h owns flat rows [offset_h, offset_h + size_h); offsets are the cumulative sum of earlier heads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from engram.config import diff_configs

ROW_DTYPES = ("float32", "bfloat16")
_ITEMSIZE = {"float32": 4, "bfloat16": 2}


class TableLayoutError(ValueError):
    """Rows saved under one layout offered to a table of another; the message names the differing fields."""


@dataclass(frozen=True)
class TableLayout:
    name: str  # which table of the model: "engram.1" (block 1's Engram layer), "overencoding"
    head_sizes: tuple[int, ...]
    d_head: int
    dtype: str = "float32"  # the dtype rows are trained and held in memory in
    hash_layout: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # NgramHasher.layout()
    hash_fingerprint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_sizes", tuple(int(s) for s in self.head_sizes))
        if not self.head_sizes or any(s <= 0 for s in self.head_sizes):
            raise ValueError(f"table {self.name!r}: head sizes must be positive, got {list(self.head_sizes)}")
        if self.d_head < 1:
            raise ValueError(f"table {self.name!r}: row width must be >= 1, got {self.d_head}")
        if self.dtype not in ROW_DTYPES:
            raise ValueError(f"table {self.name!r}: row dtype must be one of {ROW_DTYPES}, got {self.dtype!r}")
        if self.hash_layout is not None and self.hash_fingerprint is None:
            fp = hashlib.sha256(json.dumps(self.hash_layout, sort_keys=True).encode()).hexdigest()
            object.__setattr__(self, "hash_fingerprint", fp)

    @property
    def num_heads(self) -> int:
        return len(self.head_sizes)

    @property
    def num_rows(self) -> int:
        return sum(self.head_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.head_sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def num_params(self) -> int:
        return self.num_rows * self.d_head

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in their training dtype."""
        return self.num_params * _ITEMSIZE[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "head_sizes": list(self.head_sizes), "d_head": self.d_head, "dtype": self.dtype,
                "hash_fingerprint": self.hash_fingerprint, "hash_layout": self.hash_layout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TableLayout":
        return cls(d["name"], tuple(d["head_sizes"]), int(d["d_head"]), d.get("dtype", "float32"),
                   d.get("hash_layout"), d.get("hash_fingerprint"))

    def check_same_rows(self, other: "TableLayout", what: str, *, dtype: bool = False) -> None:
        """Refuse ``other`` (the layout of rows found in ``what``) unless its rows address the same things:
        same head sizes, row width and hash layout (and dtype, if asked); the error names every difference."""
        mine = {k: v for k, v in self.to_dict().items() if k != "name" and (dtype or k != "dtype")}
        theirs = {k: v for k, v in other.to_dict().items() if k != "name" and (dtype or k != "dtype")}
        if mine.get("hash_layout") is None or theirs.get("hash_layout") is None:  # compare by fingerprint only
            mine.pop("hash_layout"), theirs.pop("hash_layout")
        else:
            mine.pop("hash_fingerprint"), theirs.pop("hash_fingerprint")
        diffs = diff_configs(_jsonable(theirs), _jsonable(mine))
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
            raise TableLayoutError(f"{what} holds rows of another table layout (found != expected): {shown}")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


__all__ = ["ROW_DTYPES", "TableLayout", "TableLayoutError"]
