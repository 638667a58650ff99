"""Save and load an Engram adapter alone, without the base model's weights: as an Engram bundle.

The adapter directory is a bundle (engram.interop.bundle, the one on-disk format for Engram layer sets):
``engram_bundle.json`` (the EngramConfig, the hash layout, ``base``: the base model's identity from
engram.hf.identity, sizes and checksums of the other files), ``fusion.safetensors`` and one row file
``engram.<decoder index>.rows`` per Engram layer. Saving is atomic (a reader sees the old adapter or the
new one). Loading checks, before it touches the model: format, file sizes and checksums, the base model
and tokenizer identity and the hash layout (each refusal names what differs), tensor names and shapes.
Adapters saved in the earlier ``engram_adapter.json`` layout still load.

A bundle written elsewhere (``engram import``) loads here too when it fits: one residual branch, the
model's width, and the tokenizer it records (a bundle that records only a tokenizer is checked on that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.hf.adapter import EngramAdapter, attach, engram_adapter, plan_adapter
from engram.hf.identity import check_identity
from engram.interop.bundle import (
    BUNDLE_FILE,
    FUSION_FILE,
    BundleFileError,
    BundleInfo,
    LEGACY_ADAPTER,
    BundleLayer,
    fill_table,
    read_bundle,
    read_fusion,
    table_layout,
    write_bundle,
)
from engram.memory.table import check_layout
from engram.tokenizer import CompressionMap

ADAPTER_FILE = BUNDLE_FILE
AdapterFileError = BundleFileError  # one error for a bad adapter or bundle directory


def _layer(adapter: EngramAdapter, i: int) -> BundleLayer:
    layer = adapter.layers[i]
    w = layer.table.weight.detach()
    kind = "bf16" if w.dtype == torch.bfloat16 else "fp32"
    fusion = {k: v.detach() for k, v in layer.fusion.state_dict().items()}
    return BundleLayer(fusion, lambda a, b: w[a:b].cpu(), kind)


def save_adapter(model_or_adapter: nn.Module | EngramAdapter, path: str | os.PathLike) -> Path:
    """Write the Engram adapter of a model (or an ``EngramAdapter``) to directory ``path``, atomically."""
    adapter = model_or_adapter if isinstance(model_or_adapter, EngramAdapter) else engram_adapter(model_or_adapter)
    d_model = next(iter(adapter.layers.values())).fusion.d_model
    return write_bundle(path, adapter.config, adapter.hasher, d_model, 1,
                        {i: _layer(adapter, i) for i in adapter.layers}, adapter.identity, {"kind": "hf-adapter"})


def read_layout(path: str | os.PathLike) -> BundleInfo:
    """The adapter's bundle description, after checking its format and every file's size and sha256."""
    if not any((Path(path) / name).is_file() for name in (BUNDLE_FILE, LEGACY_ADAPTER[0])):
        raise AdapterFileError(f"{path} is not an Engram adapter: no {BUNDLE_FILE}")
    return read_bundle(path, verify="full")


def _check_fits(info: BundleInfo, d_model: int) -> None:
    if info.n_branches != 1:
        raise BundleFileError(f"{info.path}: its Engram layers read {info.n_branches} residual branches; a "
                              "transformers model has one")
    if info.d_model != d_model:
        raise BundleFileError(f"{info.path}: its Engram layers are {info.d_model} wide, the model's hidden size "
                              f"is {d_model}")
    if set(info.layers) != set(info.config.layers):
        raise BundleFileError(f"{info.path}: holds layers {list(info.layers)} of {list(info.config.layers)}; an "
                              "adapter needs every layer of its hash layout")


def load_adapter(
    model: nn.Module, tokenizer: Any, path: str | os.PathLike, compression: CompressionMap | None = None
) -> EngramAdapter:
    """Add the saved adapter at ``path`` to ``model`` (in place); refuse another base model or tokenizer.

    Raises ``AdapterMismatchError`` naming what differs (model class, config fields, embedding rows,
    tokenizer vocabulary or compression map), ``TableLayoutError`` for another hash layout and
    ``AdapterFileError`` for a missing, corrupt or ill-fitting file; the model is untouched on any error
    but a failing disk while the verified tables are copied in.
    """
    info = read_layout(path)
    plan = plan_adapter(model, tokenizer, info.config, compression)
    saved = info.base
    check_identity(saved, {k: v for k, v in plan.identity.items() if k in saved}, f"adapter {info.path}")
    check_layout(info.hash_layout, plan.hasher.layout())
    _check_fits(info, int(plan.base.config.hidden_size))
    fusion = read_fusion(info)
    adapter = attach(plan)
    with torch.no_grad():
        for i, layer in adapter.layers.items():
            layer.fusion.load_state_dict(fusion[i])
            fill_table(layer.table.weight, info.table_file(i), table_layout(info.config, plan.hasher, i))
    return adapter


__all__ = ["ADAPTER_FILE", "AdapterFileError", "FUSION_FILE", "load_adapter", "read_layout", "save_adapter"]
