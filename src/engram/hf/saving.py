"""Save and load an Engram adapter alone, without the base model's weights.

Layout of an adapter directory::

    engram_adapter.json   format and version, the EngramConfig, the hash layout and its fingerprint,
                          the base model's identity (engram.hf.identity), the table layout, and the size
                          and sha256 of every other file
    fusion.safetensors    gate, value and key projections, norms, conv: "<decoder index>.<fusion key>"
    tables.safetensors    one table per Engram layer: "<decoder index>" -> [rows, d_head]

Tables are written and read by ``write_tables`` / ``read_tables`` only, so their file format can change
(to the storage tier's) in one place. Saving writes into a temporary directory beside the target,
fsyncs it and renames it into place: a reader sees the old adapter or the new one, never a mix.
Loading checks, before it touches the model: format, file sizes and checksums, the base model and
tokenizer identity and the hash layout (each refusal names what differs), and tensor names and shapes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from engram import io as eio
from engram.config import EngramConfig, from_dict, to_dict
from engram.hf.adapter import EngramAdapter, attach, engram_adapter, plan_adapter
from engram.hf.identity import check_identity
from engram.memory.table import check_layout
from engram.model import build_engram_layer
from engram.tokenizer import CompressionMap

ADAPTER_FILE = "engram_adapter.json"
FUSION_FILE = "fusion.safetensors"
TABLES_FILE = "tables.safetensors"
FORMAT = "engram-hf-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory that is incomplete, corrupt or of an unknown format."""


# ------------------------------------------------------------------------------------------- tables


def write_tables(directory: Path, tables: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Write every Engram layer's table into ``directory``; return the layout JSON's ``tables`` entry."""
    tensors = {str(i): w.detach().to("cpu").contiguous() for i, w in tables.items()}
    safetensors.torch.save_file(tensors, str(directory / TABLES_FILE), metadata={"format": "pt"})
    with open(directory / TABLES_FILE, "rb") as f:
        os.fsync(f.fileno())
    return {
        "format": "safetensors",
        "file": TABLES_FILE,
        "layers": {k: {"rows": int(t.shape[0]), "d_head": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch.")}
                   for k, t in tensors.items()},
    }


def read_tables(directory: Path, entry: dict[str, Any]) -> dict[int, torch.Tensor]:
    """The tables ``write_tables`` wrote, checked against the layout JSON's ``tables`` entry."""
    if entry.get("format") != "safetensors":
        raise AdapterFileError(f"{directory}: table format {entry.get('format')!r} is not supported here")
    tensors = _read_safetensors(directory / entry["file"])
    if set(tensors) != set(entry["layers"]):
        raise AdapterFileError(f"{directory / entry['file']}: tables {sorted(tensors)} != listed {sorted(entry['layers'])}")
    for k, t in tensors.items():
        want = entry["layers"][k]
        got = {"rows": int(t.shape[0]), "d_head": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch.")}
        if got != want:
            raise AdapterFileError(f"{directory / entry['file']}: table {k} is {got}, the layout says {want}")
    return {int(k): t for k, t in tensors.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as e:
        raise AdapterFileError(f"cannot read {path}: {e}") from None


# ------------------------------------------------------------------------------------------- save


def _fusion_tensors(adapter: EngramAdapter) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v.detach().to("cpu").contiguous()
        for i, layer in adapter.layers.items()
        for k, v in layer.fusion.state_dict().items()
    }


def _layout(adapter: EngramAdapter) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engram": to_dict(adapter.config),
        "hash_layout": adapter.hasher.layout(),
        "hash_fingerprint": adapter.hasher.fingerprint(),
        "base_model": adapter.identity,
    }


def _write_files(tmp: Path, adapter: EngramAdapter) -> None:
    safetensors.torch.save_file(_fusion_tensors(adapter), str(tmp / FUSION_FILE), metadata={"format": "pt"})
    with open(tmp / FUSION_FILE, "rb") as f:
        os.fsync(f.fileno())
    layout = _layout(adapter)
    layout["tables"] = write_tables(tmp, {i: layer.table.weight for i, layer in adapter.layers.items()})
    layout["files"] = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": eio.sha256_file(tmp / name)}
        for name in (FUSION_FILE, layout["tables"]["file"])
    }
    eio.write_synced(tmp / ADAPTER_FILE, json.dumps(layout, indent=2, sort_keys=True) + "\n")
    eio.fsync_dir(tmp)


def save_adapter(model_or_adapter: nn.Module | EngramAdapter, path: str | os.PathLike) -> Path:
    """Write the Engram adapter of a model (or an ``EngramAdapter``) to directory ``path``, atomically."""
    adapter = model_or_adapter if isinstance(model_or_adapter, EngramAdapter) else engram_adapter(model_or_adapter)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_files(tmp, adapter)
        old = None
        if final.exists():  # replacing an adapter: swap, then delete the old copy
            old = final.parent / f".tmp-old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        eio.fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------------------- load


def read_layout(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's layout JSON, after checking its format and every listed file's size and sha256."""
    directory = Path(path)
    try:
        layout = json.loads((directory / ADAPTER_FILE).read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{directory} is not an Engram adapter: no {ADAPTER_FILE}") from None
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{directory / ADAPTER_FILE} is unreadable or corrupt: {e}") from None
    if layout.get("format") != FORMAT or layout.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{directory / ADAPTER_FILE}: format {layout.get('format')!r} version {layout.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    for name, meta in layout["files"].items():
        f = directory / name
        if not f.is_file():
            raise AdapterFileError(f"adapter file missing: {f}")
        if f.stat().st_size != meta["bytes"] or eio.sha256_file(f) != meta["sha256"]:
            raise AdapterFileError(f"adapter file {f} is truncated or corrupt (size or sha256 differs from {ADAPTER_FILE})")
    return layout


def _check_fusion(tensors: dict[str, torch.Tensor], config: EngramConfig, d_model: int, source: Path) -> None:
    """Every layer's fusion tensors have exactly the names and shapes this config builds."""
    with torch.device("meta"):  # shapes only
        fusion = build_engram_layer(config, d_model, 1, [1] * config.total_heads).fusion
    want = {f"{i}.{k}": tuple(v.shape) for i in config.layers for k, v in fusion.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise AdapterFileError(f"{source}: fusion tensors do not fit this config and model (name, shape): {diff[:8]}")


def _load_weights(adapter: EngramAdapter, fusion: dict[str, torch.Tensor], tables: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, layer in adapter.layers.items():
            prefix = f"{i}."
            layer.fusion.load_state_dict({k[len(prefix):]: v for k, v in fusion.items() if k.startswith(prefix)})
            layer.table.weight.copy_(tables[i])


def load_adapter(
    model: nn.Module, tokenizer: Any, path: str | os.PathLike, compression: CompressionMap | None = None
) -> EngramAdapter:
    """Add the saved adapter at ``path`` to ``model`` (in place); refuse another base model or tokenizer.

    Raises ``AdapterMismatchError`` naming what differs (model class, config fields, embedding rows,
    tokenizer vocabulary or compression map), ``TableLayoutError`` for another hash layout and
    ``AdapterFileError`` for a missing, corrupt or ill-fitting file; the model is untouched on any error.
    """
    directory = Path(path)
    layout = read_layout(directory)
    config = from_dict(EngramConfig, layout["engram"])
    plan = plan_adapter(model, tokenizer, config, compression)
    check_identity(layout["base_model"], plan.identity, f"adapter {directory}")
    check_layout(layout["hash_layout"], plan.hasher.layout())
    fusion = _read_safetensors(directory / FUSION_FILE)
    _check_fusion(fusion, config, int(plan.base.config.hidden_size), directory / FUSION_FILE)
    tables = read_tables(directory, layout["tables"])
    want = {i: (plan.hasher.total_rows(i), config.d_head, config.table_dtype) for i in config.layers}
    got = {i: (int(t.shape[0]), int(t.shape[1]), str(t.dtype).removeprefix("torch.")) for i, t in tables.items()}
    if got != want:
        raise AdapterFileError(f"{directory}: tables (rows, width, dtype) {got} != this config's {want}")
    adapter = attach(plan)
    _load_weights(adapter, fusion, tables)
    return adapter


__all__ = [
    "ADAPTER_FILE",
    "AdapterFileError",
    "FUSION_FILE",
    "TABLES_FILE",
    "load_adapter",
    "read_layout",
    "read_tables",
    "save_adapter",
    "write_tables",
]
