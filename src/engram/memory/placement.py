"""Where a model's tables live: a tier for every table, and for the disk tier the row files and the
hot-row cache in front of them. Above the stores and the cache, which it puts together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.memory.cache import CachedStore
from engram.memory.store import TIERS, rowfile_name


@dataclass(frozen=True)
class Placement:
    """Where a model's tables live: ``tier`` for every table; for "disk", ``directory`` holds one row file
    per table (``rowfile_name``); ``io``/``threads``/``direct`` tune the disk reader. ``cache_bytes`` > 0
    puts a hot-row cache of that many bytes per table in RAM in front of the disk tier (engram.memory.cache)
    with replacement policy ``cache_policy`` (``cache_kw``: per table name, the policy's options, e.g.
    ``{"engram.1": {"hot_ids": ...}}`` for "static")."""

    tier: str = "device"
    directory: Path | None = None
    io: str = "mmap"
    threads: int = 4
    direct: bool = False
    cache_bytes: int = 0
    cache_policy: str = "lfu-aging"
    cache_kw: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"unknown table tier {self.tier!r}; valid tiers: {', '.join(TIERS)}")
        if self.tier == "disk" and self.directory is None:
            raise ValueError("the disk tier needs a table directory (export one with `engram tables export`)")
        if self.cache_bytes and self.tier != "disk":
            raise ValueError(f"a hot-row cache sits in front of the disk tier, not the {self.tier} tier")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")

    def apply(self, tables: dict[str, Any]) -> None:
        """Place every table (an ``EngramTable`` by name); disk files are opened and checked here."""
        for name, table in tables.items():
            if self.tier == "disk":
                table.place("disk", Path(self.directory) / rowfile_name(name), io=self.io, threads=self.threads,
                            direct=self.direct)
                if self.cache_bytes:
                    table.store = CachedStore(table.store, self.cache_bytes, self.cache_policy,
                                              **self.cache_kw.get(name, {}))
            else:
                table.place(self.tier)


__all__ = ["Placement"]
