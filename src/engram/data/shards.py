"""Token shards: tokenised documents in memory-mapped binary files, one directory per corpus split.

A split directory holds ``index.json`` (written last: the directory is complete once it exists; it
carries a sha256 of its own content, so a changed byte is caught) and ``shard_NNNNN.bin`` files (each with
a crc32 of its payload). A document never spans shards. Each shard is self-describing:

    offset 0   header, 64 bytes, little-endian:
               magic b"ENGRAMTK" | version u32 | itemsize u32 (2 = uint16, 4 = uint32)
               | n_tokens u64 | n_docs u64 | crc32 u64 (of everything after the header) | 24 zero bytes
    offset 64  tokens: n_tokens x itemsize bytes, zero-padded to a multiple of 8
    then       document offsets: (n_docs + 1) x uint64, offsets[0] = 0, offsets[-1] = n_tokens;
               document j is tokens[offsets[j]:offsets[j+1]]

Tokens are stored as uint16 when the vocabulary fits (<= 65536), else uint32. Documents are stored
without separators; the packer adds ``<|endoftext|>`` (see :mod:`engram.data.loader`).

Opening checks the index checksum, the magic, the version, that the file size matches the header (so
a truncated file is caught) and, with ``verify=True`` (the default), the crc32; any failure raises
:class:`ShardError` naming the file and what to delete. ``prepare_tokens`` rebuilds a damaged cache
itself: the token cache is derived data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engram.io import atomic_open, atomic_write_json
from engram.data.bpe import eot_id, tokenizer_fingerprint
from engram.data.corpora import Corpus, Document, Split, default_cache_dir

__all__ = [
    "ShardError",
    "TokenDataset",
    "prepare_tokens",
    "read_shard",
    "tokenize_documents",
    "write_shard",
    "write_token_dataset",
]

MAGIC = b"ENGRAMTK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ24x")  # 64 bytes
INDEX_FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens (128 MiB as uint16) per shard


class ShardError(ValueError):
    """A shard or index is corrupt, truncated or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def write_shard(path: str | os.PathLike[str], docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write documents (1-D integer arrays) as one shard, atomically; returns its index entry."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard dtype must be uint16 or uint32, got {dtype}")
    lengths = np.array([len(d) for d in docs], dtype=np.uint64)
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    n_tokens = int(offsets[-1])
    tokens = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
    for d in docs:
        if len(d) and (int(d.min()) < 0 or int(d.max()) > np.iinfo(dtype).max):
            raise ValueError(f"token ids out of range for {dtype} in shard {path}")
    tok_bytes = tokens.astype("<" + dtype.str[1:], copy=False).tobytes()
    payload = [tok_bytes, b"\0" * (_pad8(len(tok_bytes)) - len(tok_bytes)), offsets.astype("<u8").tobytes()]
    crc = 0
    for part in payload:
        crc = zlib.crc32(part, crc)
    with atomic_open(path) as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, n_tokens, len(docs), crc))
        for part in payload:
            f.write(part)
    return {"file": Path(path).name, "n_tokens": n_tokens, "n_docs": len(docs), "crc32": crc}


@dataclass(frozen=True, slots=True)
class Shard:
    path: Path
    tokens: np.ndarray  # (n_tokens,) uint16/uint32, memory-mapped
    offsets: np.ndarray  # (n_docs + 1,) int64, in memory
    crc32: int


def read_shard(path: str | os.PathLike[str], verify: bool = True) -> Shard:
    """Memory-map a shard, checking its header and size (and crc32 when ``verify``)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER.size:
        raise ShardError(f"{path}: truncated: {size} bytes, smaller than the {HEADER.size}-byte header")
    with open(path, "rb") as f:
        magic, version, itemsize, n_tokens, n_docs, crc = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise ShardError(f"{path}: not an engram token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this code reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: bad token itemsize {itemsize} in header")
    tok_end = HEADER.size + _pad8(n_tokens * itemsize)
    expected = tok_end + 8 * (n_docs + 1)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: {what}: {size} bytes, header (n_tokens={n_tokens}, n_docs={n_docs}) implies {expected}")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    offsets = np.fromfile(path, dtype="<u8", count=n_docs + 1, offset=tok_end).astype(np.int64)
    if verify:
        actual = 0
        with open(path, "rb") as f:
            f.seek(HEADER.size)
            for chunk in iter(lambda: f.read(1 << 24), b""):
                actual = zlib.crc32(chunk, actual)
        if actual != crc:
            raise ShardError(f"{path}: checksum mismatch (crc32 {actual:#010x}, header says {crc:#010x}): corrupted")
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise ShardError(f"{path}: document offsets are inconsistent with n_tokens={n_tokens}")
    return Shard(path, tokens, offsets, crc)


def write_token_dataset(
    docs: Iterable[tuple[str, np.ndarray]],
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int,
    eot_id: int,
    meta: dict | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> Path:
    """Write (key, token ids) documents as shards of about ``shard_tokens`` tokens plus ``index.json``.

    ``meta`` (tokenizer fingerprint, corpus, split, ...) is stored in the index. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").unlink(missing_ok=True)  # incomplete until the new index is written
    dtype = token_dtype(vocab_size)
    shards: list[dict] = []
    keys: list[str] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        shards.append(write_shard(out_dir / f"shard_{len(shards):05d}.bin", pending, dtype))
        pending, pending_tokens = [], 0

    for key, ids in docs:
        keys.append(key)
        pending.append(np.asarray(ids))
        pending_tokens += len(ids)
        if pending_tokens >= shard_tokens:
            flush()
    if pending or not shards:
        flush()
    for stale in sorted(out_dir.glob("shard_*.bin"))[len(shards) :]:  # left over from a bigger earlier run
        stale.unlink()
    index: dict = {
        "format": INDEX_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_docs": len(keys),
        "shards": shards,
        "documents": keys,
        **(meta or {}),
    }
    index["checksum"] = _index_checksum(index)
    atomic_write_json(out_dir / "index.json", index)
    return out_dir


def _index_checksum(index: dict) -> str:
    """sha256 of the index's canonical JSON without its own checksum field."""
    body = {k: v for k, v in index.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TokenDataset:
    """The documents of one tokenised split, memory-mapped. Document i is ``doc(i)`` (a read-only view)."""

    def __init__(self, directory: str | os.PathLike[str], verify: bool = True) -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no token dataset at {self.directory} (missing index.json)")
        fix = f"; delete {self.directory} and rebuild it"
        try:
            self.index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{index_path}: not valid JSON: {e}{fix}") from e
        if not isinstance(self.index, dict) or self.index.get("format") != INDEX_FORMAT:
            raise ShardError(f"{index_path}: not a token index of format {INDEX_FORMAT}{fix}")
        if "checksum" not in self.index:
            raise ShardError(f"{index_path}: has no checksum (written by an older engram){fix}")
        if self.index.get("checksum") != _index_checksum(self.index):
            raise ShardError(f"{index_path}: checksum mismatch: the index was changed or corrupted{fix}")
        self.shards: list[Shard] = []
        for entry in self.index["shards"]:
            try:
                shard = read_shard(self.directory / entry["file"], verify=verify)
            except FileNotFoundError:
                raise ShardError(f"{self.directory / entry['file']}: missing{fix}") from None
            except ShardError as e:
                raise ShardError(f"{e}{fix}") from None
            if (len(shard.tokens), len(shard.offsets) - 1, shard.crc32) != (entry["n_tokens"], entry["n_docs"], entry["crc32"]):
                raise ShardError(f"{shard.path}: does not match its entry in {index_path} (rewritten separately?){fix}")
            self.shards.append(shard)
        self.vocab_size: int = self.index["vocab_size"]
        self.eot_id: int = self.index["eot_id"]
        self.keys: list[str] = self.index["documents"]
        # Global document i lives in shard doc_shard[i] at [doc_start[i], doc_start[i] + doc_lengths[i]).
        self.doc_shard = np.concatenate([np.full(len(s.offsets) - 1, k, np.int64) for k, s in enumerate(self.shards)])
        self.doc_start = np.concatenate([s.offsets[:-1] for s in self.shards])
        self.doc_lengths = np.concatenate([np.diff(s.offsets) for s in self.shards])
        if len(self.keys) != len(self.doc_lengths):
            raise ShardError(f"{index_path}: lists {len(self.keys)} documents, the shards hold {len(self.doc_lengths)}")

    @property
    def n_docs(self) -> int:
        return len(self.doc_lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def doc(self, i: int) -> np.ndarray:
        s, a = int(self.doc_shard[i]), int(self.doc_start[i])
        return self.shards[s].tokens[a : a + int(self.doc_lengths[i])]

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.directory)!r}, docs={self.n_docs}, tokens={self.n_tokens}, shards={len(self.shards)})"


# ------------------------------------------------------------------------------------------ tokenising


# A newline right after a non-space character always starts a new pre-token of the byte-level
# (GPT-2) regex: no pre-token holds both whitespace and non-whitespace except a leading space, and a
# whitespace run starts at its first character. Cutting a text there and encoding the pieces
# separately therefore gives exactly the ids of the whole text, and the tokenizer's thread pool gets
# many small pieces instead of a few huge documents (several times faster on long texts).
_SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")


def _pieces(text: str, size: int) -> list[str]:
    out, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        out.append(text[start : m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def tokenize_documents(
    docs: Iterable[Document], tok: Tokenizer, *, piece_chars: int = 4096, batch_chars: int = 1 << 22
) -> Iterator[tuple[str, np.ndarray]]:
    """(key, ids) per document, in order. Special-token strings inside a text (a literal
    ``<|endoftext|>``) are encoded as ordinary text, so only the packer ever inserts separators."""
    tok = Tokenizer.from_str(tok.to_str())  # a private copy: the flag below must not leak to the caller
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.20)
    dtype = token_dtype(tok.get_vocab_size())

    def run(batch: list[Document]) -> Iterator[tuple[str, np.ndarray]]:
        pieces = [_pieces(d.text, piece_chars) for d in batch]
        encs = iter(encode([p for ps in pieces for p in ps], add_special_tokens=False))
        for d, ps in zip(batch, pieces):
            ids = [i for _ in ps for i in next(encs).ids]
            yield d.key, np.asarray(ids, dtype=dtype)

    batch: list[Document] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= batch_chars:
            yield from run(batch)
            batch, chars = [], 0
    yield from run(batch)


def _content_id(docs: list[Document]) -> str:
    h = hashlib.sha1()
    for d in docs:
        h.update(f"{d.key}\0{len(d.text)}\0".encode())
    return h.hexdigest()[:16]


def prepare_tokens(
    corpus: Corpus,
    tok: Tokenizer,
    cache_dir: str | os.PathLike[str] | None = None,
    splits: tuple[Split, ...] = ("train", "val"),
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    verify: bool = True,
) -> dict[str, TokenDataset]:
    """Tokenise ``corpus``'s splits into ``cache_dir/tokens/CORPUS-TOKENIZER/SPLIT-val0.05/`` (cached).

    The cache is reused only when its index names the same tokenizer, separator, vocabulary size and
    documents and its files check out; otherwise (stale, changed or corrupted) it is rebuilt.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = tokenizer_fingerprint(tok)
    eot = eot_id(tok)
    out: dict[str, TokenDataset] = {}
    for split in splits:
        docs = corpus.documents_of(split)
        meta = {
            "tokenizer": fp,
            "corpus": corpus.name,
            "split": split,
            "val_fraction": corpus.val_fraction,
            "content": _content_id(docs),
        }
        d = cache_dir / "tokens" / f"{corpus.name}-{fp}" / f"{split}-val{corpus.val_fraction:g}"
        cached = _reuse(d, {**meta, "eot_id": eot, "vocab_size": tok.get_vocab_size()}, verify)
        if cached is not None:
            out[split] = cached
            continue
        write_token_dataset(
            tokenize_documents(docs, tok), d, vocab_size=tok.get_vocab_size(), eot_id=eot, meta=meta, shard_tokens=shard_tokens
        )
        out[split] = TokenDataset(d, verify=verify)
    return out


def _reuse(d: Path, expect: dict, verify: bool) -> TokenDataset | None:
    """The cached dataset at ``d`` if it is complete, intact and made for ``expect``; else None."""
    if not (d / "index.json").is_file():
        return None
    try:
        ds = TokenDataset(d, verify=verify)
    except ShardError as e:
        warnings.warn(f"rebuilding the token cache {d}: {e}", stacklevel=3)
        return None
    if any(ds.index.get(k) != v for k, v in expect.items()):
        return None
    return ds
