"""Import DeepSeek's Engram weights into a bundle, and export a bundle in DeepSeek-V4.1's layout.

    import_demo(state_file, out, ...)    the public demo's ``Engram`` state dict (one layer) -> a bundle
    import_v41(src_dir, out, layers)     Engram layers of a V4.1 safetensors checkpoint -> a bundle
    export_v41(bundle, out)              a bundle -> V4.1 safetensors (+ index and config), the reverse

Key names and layouts are mapped by engram.interop.deepseek (which also refuses every misfit, naming the
key); the hash layout comes from the arguments (and, for V4.1, the checkpoint's config.json) and is
checked against the weights: the demo's offsets give its head sizes, a V4.1 table's row count must be the
sum of the layout's primes.

Streaming: a V4.1 table is ~101 GB per layer, so its ``embed.weight`` / ``embed.scale`` are never read
whole. The checkpoint's safetensors headers are parsed (engram.interop.stfile), the table enters the
checks as a meta tensor (shape and dtype only), and rows are copied ``chunk_rows`` at a time, by byte
offset, straight into the bundle's row file, as stored (fp8 payload + e8m0 scales: export writes the same
bytes back). Export streams the other way. Memory stays at a chunk plus the projections.

V4.1 checkpoint layout assumed: tensors under ``<prefix>layers.<L>.engram.`` (any prefix, e.g. ``model.``)
in ``*.safetensors`` files (a ``model.safetensors.index.json`` is followed when present), and an optional
``config.json`` with the inference code's argument names (``engram_layer_ids``, ``engram_max_ngram_size``,
``engram_n_heads``, ``engram_vocab_size``, ``engram_pad_id``, ``engram_compressed_vocab_size``,
``engram_num_embeddings``, ``norm_eps`` or ``rms_norm_eps``); arguments given here take precedence.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.interop.bundle import DEFAULT_CHUNK_ROWS, BundleLayer, read_bundle, read_fusion, write_bundle
from engram.interop.deepseek import (
    V41_HASH_LAYOUT,
    V41_NORM_EPS,
    ReferenceFormatError,
    demo_to_engram,
    engram_to_v41,
    v41_to_engram,
)
from engram.interop.stfile import SafetensorsFile, TensorSource, write_safetensors
from engram.io import atomic_write_json
from engram.memory.quant import FP8_BLOCK, QuantizedRows, quantize_rows
from engram.memory.rowfile import RowFileReader
from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, load_tokenizer, tokenizer_identity

DEMO_START_SIZE = 129_280 * 5  # the demo's engram_vocab_size default, per order
V41_KEY_PREFIX = "layers.{layer}.engram."  # what export writes
V41_INDEX = "model.safetensors.index.json"
_V41_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.engram\.)(?P<key>.+)$")
_TABLE_KEYS = ("embed.weight", "embed.scale")


def _tokenizer(tokenizer: Any, compression: CompressionMap | None) -> tuple[Any, CompressionMap]:
    """The tokenizer (default DeepSeek's) and its compression map (``compression``: built already)."""
    tok = load_tokenizer(tokenizer if tokenizer is not None else deepseek_tokenizer_path())
    return tok, compression if compression is not None else CompressionMap.build(tok)


def _check_chunk(chunk_rows: int) -> None:
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


# ------------------------------------------------------------------------------------------- the demo


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (loaded with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceFormatError(f"{path} does not hold a state dict (name -> tensor)")
    return state


def import_demo(
    state_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: int = 1,
    layers: Sequence[int] = (1, 15),
    max_ngram: int = 3,
    heads: int | None = None,
    start_size: Sequence[int] = (DEMO_START_SIZE,),
    seed: int = 0,
    pad_id: int = 2,
    tokenizer: Any = None,
    compression: CompressionMap | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """The demo's ``Engram(layer_id=layer)`` state dict -> a bundle holding that layer.

    The demo's settings (``engram_cfg``) are not in its state dict: ``layers`` (its ``layer_ids``),
    ``max_ngram``, ``heads`` (default: from the offsets), ``start_size`` (its ``engram_vocab_size``, one per
    order or one for all), ``seed``, ``pad_id`` and the tokenizer (default DeepSeek's) give the hash layout;
    the head sizes its offsets record must be that layout's primes for ``layer``."""
    _check_chunk(chunk_rows)
    state = read_state_file(state_file)
    ref = demo_to_engram(state)
    n_orders = max_ngram - 1
    sizes = tuple(start_size) * n_orders if len(start_size) == 1 else tuple(start_size)
    if heads is None:
        heads = len(ref.head_sizes) // max(n_orders, 1)
    cfg = ref.engram_config(layers=tuple(layers), max_ngram=max_ngram, heads=heads, table_sizes=sizes, seed=seed,
                            pad_id=pad_id)
    if layer not in cfg.layers:
        raise ValueError(f"layer {layer} is not one of the hash layout's layers {list(cfg.layers)}")
    tok, cmap = _tokenizer(tokenizer, compression)
    hasher = NgramHasher.from_config(cfg, cmap.lookup)
    ref = demo_to_engram(state, head_sizes=hasher.head_sizes(layer))  # the offsets against our primes
    table = ref.table
    rows = BundleLayer(ref.fusion, lambda a, b: table[a:b].to(torch.float32), "fp32")
    source = {"kind": "deepseek-demo", "reference": "engram_demo_v1.py Engram state dict", "layer": layer}
    return write_bundle(out, cfg, hasher, ref.d_model, ref.hc_mult, {layer: rows},
                        {"tokenizer": tokenizer_identity(tok, cmap)}, source, chunk_rows)


# ------------------------------------------------------------------------------------------- V4.1


@dataclass(frozen=True)
class V41Tensor:
    file: SafetensorsFile
    name: str  # full key in the checkpoint


class V41Checkpoint:
    """The Engram tensors of a V4.1 safetensors checkpoint directory, by layer, and its config.json."""

    def __init__(self, directory: str | os.PathLike, key_prefix: str | None = None) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"V4.1 checkpoint directory {self.directory} does not exist")
        self.files: list[SafetensorsFile] = []
        self.layers: dict[int, dict[str, V41Tensor]] = {}
        self.prefixes: dict[int, str] = {}
        try:
            for p in self._file_paths():
                self.files.append(SafetensorsFile(p))
            self.config = self._config()
            for f in self.files:
                for name in f.entries:
                    self._add(f, name, key_prefix)
        except BaseException:
            self.close()
            raise

    def _file_paths(self) -> list[Path]:
        index = self.directory / V41_INDEX
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (self.directory / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names files that are not there: {missing[:4]}")
            return [self.directory / n for n in names]
        paths = sorted(self.directory.glob("*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"{self.directory} holds no .safetensors files")
        return paths

    def _config(self) -> dict[str, Any]:
        f = self.directory / "config.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def _add(self, f: SafetensorsFile, name: str, key_prefix: str | None) -> None:
        m = _V41_KEY.match(name)
        if m is None:
            return
        layer, prefix = int(m["layer"]), m["prefix"]
        if key_prefix is not None and prefix != key_prefix.format(layer=layer):
            return
        if self.prefixes.setdefault(layer, prefix) != prefix:
            raise ReferenceFormatError(f"layer {layer}'s Engram tensors appear under two prefixes: "
                                       f"{self.prefixes[layer]!r} and {prefix!r} (choose one with key_prefix)")
        self.layers.setdefault(layer, {})[m["key"]] = V41Tensor(f, name)

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s Engram state dict (keys relative to the module): the table as meta tensors
        (shape and dtype, for the checks; its rows are streamed by ``rows``), the rest read."""
        if layer not in self.layers:
            raise ReferenceFormatError(f"layer {layer} has no Engram tensors in {self.directory}; Engram layers "
                                       f"present: {sorted(self.layers)}")
        return {k: t.file.entry(t.name).meta() if k in _TABLE_KEYS else t.file.read(t.name)
                for k, t in self.layers[layer].items()}

    def rows(self, layer: int) -> Callable[[int, int], QuantizedRows]:
        """rows(start, stop) -> the table's fp8 rows and their scales, one positioned read of each."""
        w, s = (self.layers[layer][k] for k in _TABLE_KEYS)
        return lambda a, b: QuantizedRows(w.file.read_rows(w.name, a, b), s.file.read_rows(s.name, a, b))

    def close(self) -> None:
        for f in self.files:
            f.close()


def _v41_settings(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The hash layout and norm epsilon: arguments, else config.json, else V4.1's released values."""
    start = config.get("engram_vocab_size", V41_HASH_LAYOUT["table_sizes"][0])
    max_ngram = config.get("engram_max_ngram_size", V41_HASH_LAYOUT["max_ngram"])
    found = {
        "layers": tuple(config.get("engram_layer_ids", V41_HASH_LAYOUT["layers"])),
        "max_ngram": max_ngram,
        "heads": config.get("engram_n_heads", V41_HASH_LAYOUT["heads"]),
        "table_sizes": tuple(start) if isinstance(start, list) else (start,) * (max_ngram - 1),
        "seed": 0,  # V4.1's multipliers: default_rng(10007 L)
        "pad_id": config.get("engram_pad_id", V41_HASH_LAYOUT["pad_id"]),
        "norm_eps": config.get("norm_eps", config.get("rms_norm_eps", V41_NORM_EPS)),
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if "table_sizes" in given and len(given["table_sizes"]) == 1:
        given["table_sizes"] = tuple(given["table_sizes"]) * (given.get("max_ngram", max_ngram) - 1)
    return {**found, **given}


def _check_v41_config(config: dict[str, Any], hasher: NgramHasher, cmap: CompressionMap) -> None:
    """What config.json records about the hash layout must be what we compute (vocabulary, rows)."""
    want = config.get("engram_compressed_vocab_size")
    if want is not None and int(want) != cmap.compressed_vocab_size:
        raise ReferenceFormatError(
            f"config.json: engram_compressed_vocab_size {want}, but this tokenizer's compression gives "
            f"{cmap.compressed_vocab_size} (another tokenizer?)"
        )
    rows = config.get("engram_num_embeddings")
    if rows is not None:
        got = [hasher.total_rows(x) for x in hasher.layers]
        if [int(r) for r in rows] != got:
            raise ReferenceFormatError(f"config.json: engram_num_embeddings {rows}, but the hash layout gives {got} "
                                       "rows per layer (another start size, head count or layer list?)")


def import_v41(
    src_dir: str | os.PathLike,
    out: str | os.PathLike,
    layers: Sequence[int] | None = None,
    *,
    tokenizer: Any = None,
    compression: CompressionMap | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    key_prefix: str | None = None,
    progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> Path:
    """Engram layers ``layers`` (default: all found) of the V4.1 checkpoint in ``src_dir`` -> a bundle.

    ``overrides``: ``layers_all`` (the hash layout's layer ids), ``max_ngram``, ``heads``, ``table_sizes``,
    ``pad_id``, ``norm_eps``; unset ones come from config.json or V4.1's release (module docstring). Tables
    are copied ``chunk_rows`` rows at a time; nothing larger is ever read."""
    _check_chunk(chunk_rows)
    ckpt = V41Checkpoint(src_dir, key_prefix)
    try:
        layout_layers = overrides.pop("layers_all", None)
        s = _v41_settings(ckpt.config, {**overrides, "layers": layout_layers})
        chosen = sorted(ckpt.layers) if layers is None else list(layers)
        if not chosen:
            raise ReferenceFormatError(f"{src_dir} holds no Engram tensors (no keys '...layers.<L>.engram.*')")
        missing = [x for x in chosen if x not in ckpt.layers]
        if missing:
            raise ReferenceFormatError(f"layers {missing} have no Engram tensors in {src_dir}; Engram layers "
                                       f"present: {sorted(ckpt.layers)}")
        tok, cmap = _tokenizer(tokenizer, compression)
        refs, cfg, hasher = {}, None, None
        for x in chosen:
            state = ckpt.state(x)
            try:
                ref = v41_to_engram(state, s["norm_eps"])  # shapes and dtypes first
                layout = {k: s[k] for k in ("layers", "max_ngram", "heads", "table_sizes", "seed", "pad_id")}
                cfg = ref.engram_config(**layout)
                if x not in cfg.layers:
                    raise ReferenceFormatError(f"it is not one of the hash layout's layers {list(cfg.layers)}")
                if hasher is None:
                    hasher = NgramHasher.from_config(cfg, cmap.lookup)
                refs[x] = v41_to_engram(state, s["norm_eps"], head_sizes=hasher.head_sizes(x))
            except ReferenceFormatError as e:
                raise ReferenceFormatError(f"layer {x} ({ckpt.prefixes[x]}*): {e}") from None
        _check_v41_config(ckpt.config, hasher, cmap)
        shapes = {(r.d_model, r.hc_mult) for r in refs.values()}
        if len(shapes) > 1:
            raise ReferenceFormatError(f"the layers disagree on (model width, branches): {sorted(shapes)}")
        bundle_layers = {x: BundleLayer(r.fusion, ckpt.rows(x), "fp8") for x, r in refs.items()}
        source = {"kind": "deepseek-v41", "reference": "DeepSeek-V4.1 inference Engram", "norm_eps": s["norm_eps"],
                  "key_prefix": {str(x): ckpt.prefixes[x] for x in chosen}}
        ref0 = next(iter(refs.values()))
        return write_bundle(out, cfg, hasher, ref0.d_model, ref0.hc_mult, bundle_layers,
                            {"tokenizer": tokenizer_identity(tok, cmap)}, source, chunk_rows, progress)
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------------- export


def _table_chunks(path: Path, chunk_rows: int, part: str) -> Callable[[], Iterator[torch.Tensor]]:
    """Chunks of a row file's table in V4.1's layout (``part``: "payload" or "scales"): fp8 rows with blocks
    of 32 are copied as stored, float rows quantized chunk by chunk (the rule is per block, so chunking
    changes nothing)."""

    def chunks() -> Iterator[torch.Tensor]:
        with RowFileReader(path, io="pread") as reader:
            n, kind = reader.header.num_rows, reader.fmt.kind
            for a in range(0, n, chunk_rows):
                ids = torch.arange(a, min(a + chunk_rows, n))
                q = reader.gather_quantized(ids) if kind == "fp8" else quantize_rows(reader.gather(ids), "fp8_e4m3")
                yield q.payload if part == "payload" else q.scales

    return chunks


def _v41_config(info: Any) -> dict[str, Any]:
    cfg, layout = info.config, info.hash_layout
    sizes = set(cfg.table_sizes)
    return {
        "engram_layer_ids": list(cfg.layers), "engram_max_ngram_size": cfg.max_ngram, "engram_n_heads": cfg.heads,
        "engram_vocab_size": cfg.table_sizes[0] if len(sizes) == 1 else list(cfg.table_sizes),
        "engram_head_dim": cfg.d_head, "engram_pad_id": cfg.pad_id,
        "engram_compressed_vocab_size": layout["compressed_vocab_size"],
        "engram_num_embeddings": [sum(p for order in layout["primes"][str(x)] for p in order) for x in cfg.layers],
        "dim": info.d_model, "hc_mult": info.n_branches, "norm_eps": cfg.gate_norm_eps,
    }


def export_v41(bundle: str | os.PathLike, out: str | os.PathLike, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               key_prefix: str = V41_KEY_PREFIX) -> Path:
    """A bundle -> a V4.1 checkpoint directory: one ``engram-layer-<L>.safetensors`` per layer (keys
    ``key_prefix`` + V4.1's names), ``model.safetensors.index.json`` and ``config.json``. Refuses what V4.1
    cannot hold (biases, a short conv, a multiplier seed other than 0, rows not a multiple of 32 wide)."""
    _check_chunk(chunk_rows)
    info = read_bundle(bundle, verify="quick")  # rows are checked record by record as they are copied
    cfg = info.config
    if cfg.seed != 0:
        raise ReferenceFormatError(f"V4.1's multipliers use seed 0; this bundle's hash layout has seed {cfg.seed}")
    if cfg.d_head % FP8_BLOCK:
        raise ReferenceFormatError(f"V4.1 rows are a multiple of {FP8_BLOCK} wide; this bundle's are {cfg.d_head}")
    fusion = read_fusion(info)
    out = Path(out)
    weight_map, total = {}, 0
    for x in info.layers:
        R, W = int(info.tables["layers"][str(x)]["rows"]), cfg.d_head
        meta = QuantizedRows(torch.empty(R, W, dtype=torch.float8_e4m3fn, device="meta"),
                             torch.empty(R, W // FP8_BLOCK, dtype=torch.float8_e8m0fnu, device="meta"))
        state = engram_to_v41(fusion[x], meta)  # refuses biases and conv, checks shapes
        prefix = key_prefix.format(layer=x)
        sources = [TensorSource.of(prefix + k, v) for k, v in state.items() if k not in _TABLE_KEYS]
        for k, part in zip(_TABLE_KEYS, ("payload", "scales")):
            t = state[k]
            sources.append(TensorSource(prefix + k, t.dtype, tuple(t.shape),
                                        _table_chunks(info.table_file(x), chunk_rows, part)))
        name = f"engram-layer-{x}.safetensors"
        write_safetensors(out / name, sources)
        weight_map.update({s.name: name for s in sources})
        total += (out / name).stat().st_size
    atomic_write_json(out / V41_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", _v41_config(info))
    return out


__all__ = ["DEMO_START_SIZE", "V41Checkpoint", "V41_KEY_PREFIX", "export_v41", "import_demo", "import_v41",
           "read_state_file"]
