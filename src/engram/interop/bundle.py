"""The Engram bundle: a set of Engram layers on disk, outside any training run. One format for everything
made elsewhere or kept apart from a backbone: ``engram import`` writes it (DeepSeek's demo, DeepSeek-V4.1),
``engram export`` reads it, and the Hugging Face adapter saves and loads it (engram.hf.saving).

Layout of a bundle directory::

    engram_bundle.json   format "engram-bundle" version 1: the EngramConfig, the backbone width and the
                         number of residual branches, the layers held, the hash layout and its fingerprint,
                         ``base`` (what the rows were made for: the tokenizer, and for an adapter the base
                         model, engram.hf.identity), ``source`` (where the weights came from), the tables,
                         and every other file's size and sha256
    fusion.safetensors   "<layer>.<EngramFusion key>" for every layer, in the dtype they were given
    engram.<layer>.rows  each layer's table as a row file (engram.memory.rowfile: checked records, the table
                         layout and hash layout in its header); fp32, bf16, or 8-bit rows kept as given
                         (V4.1's fp8 rows with their own power-of-two scales)

Guarantees: writing goes into a temporary directory beside the target, fsynced and renamed into place, so
a reader sees the old bundle or the new one. Tables are written and read in chunks of rows, never whole.
Reading checks the format, every file's size, and (``verify="full"``) every file's sha256 (a row file's
over its data pages, its header having its own checksum); ``"quick"`` checks sizes and headers only and
leaves the rows to their per-record checksums, checked on every read (``"auto"``: full up to 1 GiB).
Loading refuses, naming each differing field: another tokenizer (vocabulary, compression map), another
hash layout (vocabulary, multipliers, primes, pad id), fusion tensors of other names or shapes.

A loaded bundle is an ``EngramLayerSet`` of ordinary ``EngramLayer`` modules (engram.model's builder), its
tables on the device, in host memory, or read from the bundle's own row files (``tier="disk"``).

Shape legend: B batch, T time, L hash layers, H heads per layer, M branches, D model width.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import safetensors
import safetensors.torch
import torch
from torch import nn

from engram import io as eio
from engram.config import EngramConfig, diff_configs, from_dict, to_dict
from engram.hashing import NgramHasher
from engram.layers.engram import EngramLayer
from engram.memory.layout import TableLayout
from engram.memory.quant import QuantizedRows
from engram.memory.rowfile import RowFileError, RowFileReader, read_header, write_rowfile
from engram.memory.store import TIERS, rowfile_name
from engram.memory.table import check_layout
from engram.model import build_engram_layer
from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, load_tokenizer, tokenizer_identity

BUNDLE_FILE = "engram_bundle.json"
FUSION_FILE = "fusion.safetensors"
FORMAT = "engram-bundle"
FORMAT_VERSION = 1
# written by earlier versions of the HF adapter (same layout under another name): still read
LEGACY_ADAPTER = ("engram_adapter.json", "engram-hf-adapter", 1)
FULL_VERIFY_BYTES = 1 << 30  # verify="auto": sha256 of every file when they add up to at most this
DEFAULT_CHUNK_ROWS = 1 << 16
Verify = Literal["full", "quick", "auto"]


class BundleFileError(ValueError):
    """A bundle directory that is incomplete, corrupt or of an unknown format; the message names the file."""


class BundleMismatchError(ValueError):
    """A bundle made for another tokenizer, base model or shape than the one it is loaded for."""


# ------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class BundleLayer:
    """One layer to write: its fusion state dict (our key names), ``rows(start, stop)`` producing table rows
    [stop - start, Dh] (fp32 / bf16, or ``QuantizedRows`` already in ``row_format``), and the row file
    format (engram.memory.rowfile: "fp32", "bf16", "fp8", "int8")."""

    fusion: dict[str, torch.Tensor]
    rows: Callable[[int, int], torch.Tensor | QuantizedRows]
    row_format: str


def table_layout(config: EngramConfig, hasher: NgramHasher, layer: int) -> TableLayout:
    """What layer ``layer``'s table is under this config and hasher (compared with a row file's header)."""
    return TableLayout(f"engram.{layer}", tuple(hasher.head_sizes(layer)), config.d_head, config.table_dtype,
                       hasher.layout())


def write_bundle(
    path: str | os.PathLike,
    config: EngramConfig,
    hasher: NgramHasher,
    d_model: int,
    n_branches: int,
    layers: dict[int, BundleLayer],
    base: dict[str, Any],
    source: dict[str, Any],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a bundle of ``layers`` (a subset of ``config.layers``) to directory ``path``, atomically; tables
    are streamed ``chunk_rows`` rows at a time. ``base``: what the rows were made for (at least
    ``{"tokenizer": tokenizer_identity(...)}``); ``source``: where they came from (free-form, recorded)."""
    missing = sorted(set(layers) - set(hasher.layers))
    if missing:
        raise ValueError(f"layers {missing} are not in the hash layout's layers {list(hasher.layers)}")
    if "tokenizer" not in base:
        raise ValueError("a bundle records the tokenizer its hashes use: base['tokenizer'] is missing")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        # clones: views of one tensor (V4.1's keys and value are slices of wkv) cannot be saved as such
        fusion = {f"{i}.{k}": v.detach().cpu().clone(memory_format=torch.contiguous_format)
                  for i, layer in sorted(layers.items()) for k, v in layer.fusion.items()}
        eio.atomic_write(tmp / FUSION_FILE, safetensors.torch.save(fusion, metadata={"format": "pt"}))
        files = {FUSION_FILE: {"bytes": (tmp / FUSION_FILE).stat().st_size, "sha256": eio.sha256_file(tmp / FUSION_FILE)}}
        tables = {}
        for i, layer in sorted(layers.items()):
            name, digest = rowfile_name(f"engram.{i}"), hashlib.sha256()
            header = write_rowfile(tmp / name, table_layout(config, hasher, i), layer.rows, layer.row_format,
                                   chunk_rows=chunk_rows, progress=progress, data_digest=digest)
            tables[str(i)] = {"file": name, "rows": header.num_rows, "d_head": config.d_head, "dtype": config.table_dtype,
                              "row_format": layer.row_format}
            files[name] = {"bytes": header.file_size, "data_offset": header.data_offset, "data_sha256": digest.hexdigest()}
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "engram": to_dict(config), "d_model": int(d_model),
            "n_branches": int(n_branches), "layers": sorted(int(i) for i in layers), "hash_layout": hasher.layout(),
            "hash_fingerprint": hasher.fingerprint(), "base": base, "source": source,
            "tables": {"format": "engram-rows", "layers": tables}, "files": files,
        }
        eio.write_synced(tmp / BUNDLE_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        eio.fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():  # replacing a bundle: swap, then delete the old copy
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    eio.fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- read


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's JSON, checked (``read_bundle``)."""

    path: Path
    config: EngramConfig
    d_model: int
    n_branches: int
    layers: tuple[int, ...]
    hash_layout: dict[str, Any]
    base: dict[str, Any]
    source: dict[str, Any]
    tables: dict[str, Any] = field(repr=False)
    files: dict[str, Any] = field(repr=False)

    def table_file(self, layer: int) -> Path:
        return self.path / self.tables["layers"][str(layer)]["file"]

    def row_format(self, layer: int) -> str:
        return self.tables["layers"][str(layer)].get("row_format") or _row_kind(self.config.table_dtype)


def _row_kind(dtype: str) -> str:
    return "bf16" if dtype == "bfloat16" else "fp32"


def _load_json(directory: Path) -> tuple[dict[str, Any], Path]:
    for name, fmt, version in ((BUNDLE_FILE, FORMAT, FORMAT_VERSION), LEGACY_ADAPTER):
        f = directory / name
        if not f.is_file():
            continue
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise BundleFileError(f"{f} is unreadable or corrupt: {e}") from None
        if meta.get("format") != fmt or meta.get("format_version") != version:
            raise BundleFileError(f"{f}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                                  f"expected {fmt!r} version {version}")
        return meta, f
    raise BundleFileError(f"{directory} is not an Engram bundle: no {BUNDLE_FILE}")


def _from_legacy_adapter(meta: dict[str, Any]) -> dict[str, Any]:
    """An adapter directory of the earlier format: one branch, every config layer, the base model as base."""
    cfg = meta["engram"]
    d_model = meta["base_model"]["config"].get("hidden_size") or meta["base_model"]["config"].get("n_embd")
    return {**meta, "base": meta["base_model"], "d_model": d_model, "n_branches": 1, "layers": list(cfg["layers"]),
            "source": {"kind": "hf-adapter"}}


def read_bundle(path: str | os.PathLike, verify: Verify = "auto") -> BundleInfo:
    """The bundle at ``path``, after checking its format and files (module docstring: ``verify``)."""
    directory = Path(path)
    meta, json_file = _load_json(directory)
    if json_file.name == LEGACY_ADAPTER[0]:
        meta = _from_legacy_adapter(meta)
    files = meta["files"]
    if verify == "auto":
        verify = "full" if sum(int(m["bytes"]) for m in files.values()) <= FULL_VERIFY_BYTES else "quick"
    for name, m in files.items():
        _check_file(directory / name, m, verify, json_file.name)
    try:
        config = from_dict(EngramConfig, meta["engram"])
    except (TypeError, ValueError) as e:
        raise BundleFileError(f"{json_file}: its EngramConfig is invalid: {e}") from None
    layers = tuple(int(i) for i in meta["layers"])
    if set(meta["tables"]["layers"]) != {str(i) for i in layers}:
        raise BundleFileError(f"{json_file}: tables for layers {sorted(meta['tables']['layers'])}, the bundle holds "
                              f"layers {list(layers)}")
    return BundleInfo(directory, config, int(meta["d_model"]), int(meta["n_branches"]), layers, meta["hash_layout"],
                      meta["base"], meta.get("source", {}), meta["tables"], files)


def _check_file(f: Path, m: dict[str, Any], verify: str, listed_in: str) -> None:
    if not f.is_file():
        raise BundleFileError(f"bundle file missing: {f}")
    bad = f.stat().st_size != m["bytes"]
    if not bad and "data_sha256" in m:  # a row file: its header has its own checksum
        try:
            read_header(f)
        except RowFileError as e:
            raise BundleFileError(f"bundle file {f} is truncated or corrupt: {e}") from None
        bad = verify == "full" and _sha256_from(f, int(m["data_offset"])) != m["data_sha256"]
    elif not bad and verify == "full":
        bad = eio.sha256_file(f) != m["sha256"]
    if bad:
        raise BundleFileError(f"bundle file {f} is truncated or corrupt (size or sha256 differs from {listed_in})")


def _sha256_from(path: Path, offset: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_fusion(info: BundleInfo) -> dict[int, dict[str, torch.Tensor]]:
    """Every layer's fusion state dict, checked against the names and shapes the config builds."""
    try:
        flat = safetensors.torch.load_file(str(info.path / FUSION_FILE))
    except (OSError, safetensors.SafetensorError) as e:
        raise BundleFileError(f"cannot read {info.path / FUSION_FILE}: {e}") from None
    check_fusion(flat, info.config, info.d_model, info.n_branches, info.layers, info.path / FUSION_FILE)
    out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in info.layers}
    for k, v in flat.items():
        i, key = k.split(".", 1)
        out[int(i)][key] = v
    return out


def check_fusion(tensors: dict[str, torch.Tensor], config: EngramConfig, d_model: int, n_branches: int,
                 layers: tuple[int, ...], source: Path) -> None:
    """The fusion tensors have exactly the names and shapes this config builds for these layers."""
    with torch.device("meta"):  # shapes only
        fusion = build_engram_layer(config, d_model, n_branches, [1] * config.total_heads).fusion
    want = {f"{i}.{k}": tuple(v.shape) for i in layers for k, v in fusion.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise BundleFileError(f"{source}: fusion tensors do not fit this config and model (name, shape): {diff[:8]}")


def fill_table(weight: torch.Tensor, path: Path, expected: TableLayout, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """Copy a row file's rows into ``weight`` [R, Dh] chunk by chunk (each record checked), refusing a file of
    another table layout; memory beyond ``weight`` stays at one chunk."""
    try:
        with RowFileReader(path, expected=expected, io="pread") as reader, torch.no_grad():
            for start, rows in reader.iter_rows(chunk_rows, dtype=weight.dtype):
                weight[start : start + len(rows)].copy_(rows)
    except RowFileError as e:
        raise BundleFileError(f"cannot read {path}: {e}") from None


# ------------------------------------------------------------------------------------------- load


class EngramLayerSet(nn.Module):
    """Engram layers loaded from a bundle, usable without a backbone: hash token ids once for every layer
    of the hash layout, then run any layer held on hidden states of its backbone.

    ``hash(ids, token_mask=None)`` -> hash ids [B, T, L, H]; ``forward(layer, h [B, T, M, D], hash_ids,
    token_mask=None, conv_state=None)`` -> (Y [B, T, M, D], gate [B, T, M]); the caller adds Y to h.
    ``hasher.step`` and ``ShortConv.init_state`` carry decoding state, as in ``engram.model``.
    """

    def __init__(self, info: BundleInfo, hasher: NgramHasher, layers: dict[int, EngramLayer]) -> None:
        super().__init__()
        self.info, self.config, self.hasher = info, info.config, hasher
        self.d_model, self.n_branches = info.d_model, info.n_branches
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.slot = {layer: j for j, layer in enumerate(hasher.layers)}

    def __getitem__(self, layer: int) -> EngramLayer:
        if str(layer) not in self.layers:
            raise KeyError(f"layer {layer} is not in this bundle (it holds {list(self.info.layers)})")
        return self.layers[str(layer)]

    def hash(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hasher(ids, token_mask=token_mask)

    def forward(self, layer: int, h_BTMD: torch.Tensor, hash_ids_BTLH: torch.Tensor,
                token_mask: torch.Tensor | None = None, conv_state: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self[layer](h_BTMD, hash_ids_BTLH[:, :, self.slot[layer]], conv_state=conv_state, token_mask=token_mask)


def check_base(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse unless every field ``saved`` records equals ``current``'s, naming each difference."""
    diffs = diff_configs({k: v for k, v in saved.items() if k != "config_sha256"},
                         {k: current.get(k) for k in saved if k != "config_sha256"})
    if diffs:
        shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
        raise BundleMismatchError(f"{what} was made for another tokenizer or base model: " + "; ".join(shown))


def bundle_hasher(info: BundleInfo, tokenizer: Any = None, compression: CompressionMap | None = None) -> NgramHasher:
    """The hasher of ``info``'s hash layout for ``tokenizer`` (a tokenizer.json path or ``Tokenizer``;
    default DeepSeek's), refusing another tokenizer or hash layout by name."""
    tok = load_tokenizer(tokenizer if tokenizer is not None else deepseek_tokenizer_path())
    cmap = compression if compression is not None else CompressionMap.build(tok)
    check_base({"tokenizer": info.base["tokenizer"]}, {"tokenizer": tokenizer_identity(tok, cmap)}, f"bundle {info.path}")
    lookup = cmap.lookup if info.config.compress else CompressionMap.identity(cmap.vocab_size).lookup
    hasher = NgramHasher.from_config(info.config, lookup)
    check_layout(info.hash_layout, hasher.layout())
    return hasher


def load_bundle(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    compression: CompressionMap | None = None,
    tier: str = "device",
    device: torch.device | str = "cpu",
    verify: Verify = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> EngramLayerSet:
    """Load the bundle at ``path`` as an ``EngramLayerSet`` for ``tokenizer`` (default: DeepSeek's).

    ``tier``: "device" (tables in memory on ``device``), "host" (in CPU RAM) or "disk" (read on demand from
    the bundle's row files: nothing of the table is loaded). Refuses another tokenizer or hash layout
    (naming the fields), and files that are missing, corrupt or do not fit the config.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown table tier {tier!r}; valid tiers: {', '.join(TIERS)}")
    info = read_bundle(path, verify)
    hasher = bundle_hasher(info, tokenizer, compression)
    fusion = read_fusion(info)
    layers = {}
    for i in info.layers:
        with torch.device("meta"):  # nothing allocated until the tier is known
            layer = build_engram_layer(info.config, info.d_model, info.n_branches, hasher.head_sizes(i),
                                       f"engram.{i}", hasher.layout())
        expected = table_layout(info.config, hasher, i)
        if tier == "disk":
            layer.table.place("disk", info.table_file(i))
        else:  # host rows are allocated in CPU RAM directly, never on the device first
            layer.table.to_empty(device="cpu" if tier == "host" else device)
            fill_table(layer.table.weight, info.table_file(i), expected, chunk_rows)
            layer.table.place(tier)
        layer.fusion.to_empty(device=device)
        layer.fusion.load_state_dict(fusion[i])
        layers[i] = layer.eval()
    return EngramLayerSet(info, hasher, layers)


__all__ = [
    "BUNDLE_FILE",
    "FUSION_FILE",
    "BundleFileError",
    "BundleInfo",
    "BundleLayer",
    "BundleMismatchError",
    "EngramLayerSet",
    "bundle_hasher",
    "check_base",
    "check_fusion",
    "fill_table",
    "load_bundle",
    "read_bundle",
    "read_fusion",
    "table_layout",
    "write_bundle",
]
