"""Hashed memory: what a table is (layout), where its rows live (stores and tiers), files, quantized rows."""

from __future__ import annotations

from typing import Any


def memory_tables(model: Any) -> dict[str, Any]:
    """A model's memory tables by name (``model.memory_tables()``), or none for a model without them."""
    getter = getattr(model, "memory_tables", None)
    return dict(getter()) if getter is not None else {}


def trainable_table_parameters(model: Any) -> list:
    """The row parameters of a model's tables, refusing a table on a read-only tier by name."""
    from engram.memory.store import ReadOnlyTableError

    out = []
    for name, table in memory_tables(model).items():
        if not table.trainable:
            raise ReadOnlyTableError(f"table {name!r} lives on the read-only {table.tier} tier: training it is "
                                     "refused (place it on the device or host tier to train)")
        out.append(table.weight)
    return out
