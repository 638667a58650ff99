"""The row file: one Engram table on disk, in a checked format of our own.

Layout of a file (little-endian)::

    offset 0      magic b"ENGRAMRW" | version u32 | header length u32 | data offset u64 | rows u64
                  | record size u32 | records per page u32 | header crc32 u32      (40 bytes)
    offset 40     header JSON: the table layout (with the full hash layout, so a refusal names the
                  differing fields), the row format, where the rows came from (run, step, sha256 of the
                  weights exported), the checksum algorithm; zero-padded to the data offset (4 KiB pages)
    data offset   records, page by page; the file ends on a page boundary

A record is [payload | scales | checksum u32]: row i's values (fp32, bf16, fp8 e4m3 or int8), its
quantization scales (engram.memory.quant), and a 32-bit checksum of both that also mixes in i, so a
record copied to the wrong place is caught too. A record never straddles a 4 KiB page: small records
are packed ``PAGE // record`` to a page (the tail of each page is padding), larger ones start on a page
boundary. A missed row therefore costs one page read, and checking it needs no other bytes.

Checksum ("mulsum32-v1"): the record's payload and scale bytes as u32 words w_j (zero-padded), s = sum
w_j K_j mod 2^64 with odd per-position constants K_j, then mixed with the row id and folded to 32 bits.
Any change of a single word changes s (K_j is odd), and it is a few vectorised multiply-adds per row,
where crc32 would be a Python call per row.

Reads (``RowFileReader.gather``) deduplicate the ids, sort them by offset and fetch the pages either
through positioned reads (``pread``/``preadv`` on a thread pool, runs of adjacent pages coalesced; the
file is opened with random-access advice so the kernel does not read ahead; optionally ``O_DIRECT``)
or through an ``mmap`` with ``MADV_RANDOM``. Every record read is checked; a bad one raises
``RowFileError`` naming the file and the row. A row is never returned as zeros.

Shape legend: N rows asked, U unique rows, W row width, P pages read, C record size in bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from engram.io import FileHandle, atomic_open, fault_point
from engram.memory.layout import TableLayout
from engram.memory.quant import QuantizedRows, RowQuant, dequantize_rows, quantize_rows

MAGIC = b"ENGRAMRW"
VERSION = 1
PAGE = 4096
_FIXED = struct.Struct("<8sIIQQIII")  # 40 bytes
CHECKSUM = "mulsum32-v1"
ROW_FORMATS = ("fp32", "bf16", "fp8", "int8")
_PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16}
_QUANT = {"fp8": "fp8_e4m3", "int8": "int8"}


class RowFileError(ValueError):
    """A row file that is truncated, corrupt, of another format or layout; the message names the file."""


# --------------------------------------------------------------------------------------------- format


@dataclass(frozen=True)
class RowFormat:
    """How one row is encoded: ``kind`` in ROW_FORMATS, ``width`` values."""

    kind: str
    width: int

    def __post_init__(self) -> None:
        if self.kind not in ROW_FORMATS:
            raise ValueError(f"row format must be one of {', '.join(ROW_FORMATS)}, got {self.kind!r}")

    @property
    def quant(self) -> RowQuant | None:
        return RowQuant(_QUANT[self.kind], self.width) if self.kind in _QUANT else None

    @property
    def payload_bytes(self) -> int:
        if self.kind in _PLAIN:
            return self.width * _PLAIN[self.kind].itemsize
        return self.width  # one byte per value

    @property
    def scale_bytes(self) -> int:
        q = self.quant
        return 0 if q is None else q.bytes_per_row - q.width

    @property
    def record_size(self) -> int:
        return self.payload_bytes + self.scale_bytes + 4

    @property
    def records_per_page(self) -> int:
        """Records packed into one page, or 0 when a record needs a page (or more) of its own."""
        return PAGE // self.record_size if self.record_size <= PAGE else 0

    @property
    def pages_per_record(self) -> int:
        return -(-self.record_size // PAGE)

    def describe(self) -> dict[str, Any]:
        q = self.quant
        scales = "none" if q is None else f"{q.scales_per_row} x {q.scale_dtype} per row (one per {q.group} values)"
        return {"kind": self.kind, "width": self.width, "payload_bytes": self.payload_bytes,
                "scale_bytes": self.scale_bytes, "scales": scales, "record_size": self.record_size,
                "records_per_page": self.records_per_page}


def _data_pages(fmt: RowFormat, n_rows: int) -> int:
    rpp = fmt.records_per_page
    return -(-n_rows // rpp) if rpp else n_rows * fmt.pages_per_record


def record_offsets(fmt: RowFormat, data_offset: int, rows: np.ndarray) -> np.ndarray:
    """Byte offset of each row's record (int64)."""
    rows = rows.astype(np.int64, copy=False)
    rpp = fmt.records_per_page
    if rpp:
        return data_offset + (rows // rpp) * PAGE + (rows % rpp) * fmt.record_size
    return data_offset + rows * fmt.pages_per_record * PAGE


# ------------------------------------------------------------------------------------------- checksum


def _constants(n_words: int) -> np.ndarray:
    """Odd 64-bit constants per word position (splitmix64 of the position, fixed forever)."""
    z = (np.arange(1, n_words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def record_checksums(body_NB: np.ndarray, rows_N: np.ndarray) -> np.ndarray:
    """mulsum32 of each record body (payload + scales, uint8 [N, B]) at its row id -> uint32 [N]."""
    N, B = body_NB.shape
    pad = (-B) % 4
    if pad:
        body_NB = np.concatenate([body_NB, np.zeros((N, pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(body_NB).view("<u4").astype(np.uint64)
    with np.errstate(over="ignore"):
        s = (words * _constants(words.shape[1])).sum(axis=1, dtype=np.uint64)
        s ^= rows_N.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
        s ^= s >> np.uint64(32)
    return (s & np.uint64(0xFFFFFFFF)).astype(np.uint32)


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class RowFileHeader:
    layout: TableLayout
    fmt: RowFormat
    data_offset: int
    source: dict[str, Any]  # {"run", "step", "weights_sha256"}

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def file_size(self) -> int:
        return self.data_offset + _data_pages(self.fmt, self.num_rows) * PAGE

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "format": self.fmt.describe(), "source": self.source,
                "checksum": CHECKSUM}


def _encode_header(h: RowFileHeader) -> bytes:
    body = json.dumps(h.to_json(), sort_keys=True).encode()
    fixed = _FIXED.pack(MAGIC, VERSION, len(body), h.data_offset, h.num_rows, h.fmt.record_size,
                        h.fmt.records_per_page, zlib.crc32(body))
    blob = fixed + body
    return blob + b"\0" * (h.data_offset - len(blob))


def read_header(path: str | os.PathLike) -> RowFileHeader:
    """Open checks: magic, version, header checksum, and the file size the header implies (truncation)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            fixed = f.read(_FIXED.size)
            if len(fixed) < _FIXED.size:
                raise RowFileError(f"{path}: truncated: {size} bytes, shorter than the {_FIXED.size}-byte header")
            magic, version, hlen, data_offset, n_rows, rec, rpp, crc = _FIXED.unpack(fixed)
            if magic != MAGIC:
                raise RowFileError(f"{path}: not an engram row file (magic {magic!r}, expected {MAGIC!r})")
            if version != VERSION:
                raise RowFileError(f"{path}: row file format version {version}; this engram reads version {VERSION}")
            body = f.read(hlen)
    except FileNotFoundError:
        raise FileNotFoundError(f"row file {path} does not exist") from None
    if len(body) != hlen or zlib.crc32(body) != crc:
        raise RowFileError(f"{path}: header is truncated or corrupt (checksum mismatch)")
    meta = json.loads(body)
    fmt = RowFormat(meta["format"]["kind"], int(meta["format"]["width"]))
    h = RowFileHeader(TableLayout.from_dict(meta["layout"]), fmt, int(data_offset), meta.get("source", {}))
    if (rec, rpp, n_rows) != (fmt.record_size, fmt.records_per_page, h.num_rows) or meta.get("checksum") != CHECKSUM:
        raise RowFileError(f"{path}: header fields disagree (record size, rows or checksum algorithm)")
    if fmt.width != h.layout.d_head:
        raise RowFileError(f"{path}: row width {fmt.width} != layout row width {h.layout.d_head}")
    if size != h.file_size:
        what = "truncated" if size < h.file_size else "has trailing bytes"
        raise RowFileError(f"{path}: {what}: {size} bytes, the header implies {h.file_size}")
    return h


# -------------------------------------------------------------------------------------------- encoding


def encode_rows(fmt: RowFormat, rows_NW: torch.Tensor | QuantizedRows, ids_N: np.ndarray) -> np.ndarray:
    """fp32/bf16 rows -> records uint8 [N, C] (payload, scales, checksum). Rows already quantized in this
    format (``QuantizedRows``, e.g. DeepSeek-V4.1's fp8 rows with their own scales) are stored as they are."""
    if isinstance(rows_NW, QuantizedRows):
        if fmt.kind in _PLAIN or rows_NW.fmt != fmt.quant:
            raise ValueError(f"quantized rows in format {rows_NW.fmt} cannot be stored as {fmt.kind} rows of width "
                             f"{fmt.width}")
    if fmt.kind in _PLAIN:
        payload = rows_NW.to(_PLAIN[fmt.kind]).contiguous().view(torch.uint8).numpy()
        body = payload
    else:
        q = rows_NW if isinstance(rows_NW, QuantizedRows) else quantize_rows(rows_NW, _QUANT[fmt.kind])
        body = np.concatenate([q.payload.view(torch.uint8).numpy(),
                               q.scales.contiguous().view(torch.uint8).numpy().reshape(len(ids_N), -1)], axis=1)
    return np.concatenate([body, record_checksums(body, ids_N).view(np.uint8).reshape(-1, 4)], axis=1)


def decode_records(fmt: RowFormat, rec_NC: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Records -> rows [N, W] in ``dtype`` (dequantized for 8-bit formats)."""
    body = torch.from_numpy(np.ascontiguousarray(rec_NC[:, : fmt.payload_bytes + fmt.scale_bytes]))
    if fmt.kind in _PLAIN:
        return body.view(_PLAIN[fmt.kind]).reshape(len(rec_NC), fmt.width).to(dtype)
    q = fmt.quant
    payload = body[:, : fmt.width].contiguous().view(q.payload_dtype)
    scales = body[:, fmt.width :].contiguous().view(q.scale_dtype).reshape(len(rec_NC), q.scales_per_row)
    return dequantize_rows(QuantizedRows(payload, scales), dtype)


# ---------------------------------------------------------------------------------------------- writer


def write_rowfile(
    path: str | os.PathLike,
    layout: TableLayout,
    read_rows: Callable[[int, int], torch.Tensor | QuantizedRows],
    kind: str,
    source: dict[str, Any] | None = None,
    chunk_rows: int = 1 << 16,
    progress: Callable[[int], None] | None = None,
    data_digest: Any = None,
) -> RowFileHeader:
    """Write a table's rows as a row file, atomically (temp file, fsync, rename): on any failure the old
    file under ``path`` is untouched and nothing half-written carries its name.

    ``read_rows(start, stop)`` returns rows [stop - start, W] (fp32 or bf16, or ``QuantizedRows`` already
    in an 8-bit ``kind``'s format, stored unchanged), so the table is streamed in chunks and never held
    twice. ``source["weights_sha256"]`` is filled with the digest of those rows (of each quantized row, its
    payload then its scales). ``data_digest`` (a hashlib object), when given, is fed every byte written
    after the header, so a caller can record a checksum of the data without reading the file back.
    """
    fmt = RowFormat(kind, layout.d_head)
    hlen = len(json.dumps({"layout": layout.to_dict(), "format": fmt.describe(), "source": source or {},
                           "checksum": CHECKSUM}, sort_keys=True).encode()) + 256  # room for the digest
    data_offset = -(-(_FIXED.size + hlen) // PAGE) * PAGE
    digest = hashlib.sha256()
    path = Path(path)
    with atomic_open(path) as f:
        f.write(b"\0" * data_offset)  # the header goes in last, once the digest is known
        rpp = fmt.records_per_page
        step = max(rpp, 1) * max(1, chunk_rows // max(rpp, 1))  # whole pages per chunk
        for start in range(0, layout.num_rows, step):
            stop = min(start + step, layout.num_rows)
            rows = read_rows(start, stop)
            shape = tuple((rows.payload if isinstance(rows, QuantizedRows) else rows).shape)
            if shape != (stop - start, layout.d_head):
                raise ValueError(f"read_rows({start}, {stop}) returned shape {shape}")
            digest.update(_row_bytes(rows).numpy().tobytes())
            pages = _pages(fmt, encode_rows(fmt, rows, np.arange(start, stop)))
            if data_digest is not None:
                data_digest.update(pages)
            f.write(pages)
            fault_point(f"rowfile.chunk:{path.name}")
            if progress is not None:
                progress(stop - start)
        header = RowFileHeader(layout, fmt, data_offset, {**(source or {}), "weights_sha256": digest.hexdigest()})
        f.seek(0)
        f.write(_encode_header(header))
    return header


def _row_bytes(rows: torch.Tensor | QuantizedRows) -> torch.Tensor:
    """The bytes the weights digest covers, row after row (so it does not depend on the chunking): the
    values, or a quantized row's payload followed by its scales."""
    if not isinstance(rows, QuantizedRows):
        return rows.contiguous().view(torch.uint8)
    n = rows.payload.shape[0]
    return torch.cat([rows.payload.contiguous().view(torch.uint8).reshape(n, -1),
                      rows.scales.contiguous().view(torch.uint8).reshape(n, -1)], dim=1)


def _records_view(buf: np.ndarray, fmt: RowFormat, n_pages: int) -> np.ndarray:
    """The records in ``n_pages`` pages of ``buf`` as a strided view: [pages, per page, C] when records
    are packed into pages, else [records, C]. Indexing it gathers records without building byte indices."""
    C = fmt.record_size
    if fmt.records_per_page:
        return np.lib.stride_tricks.as_strided(buf, (n_pages, fmt.records_per_page, C), (PAGE, C, 1), writeable=False)
    span = fmt.pages_per_record
    return np.lib.stride_tricks.as_strided(buf, (n_pages // span, C), (span * PAGE, 1), writeable=False)


def _pages(fmt: RowFormat, rec_NC: np.ndarray) -> bytes:
    """Records laid out in pages (each page's tail, or each record's last page, zero-padded)."""
    N, C = rec_NC.shape
    rpp = fmt.records_per_page
    if rpp:
        n_pages = -(-N // rpp)
        out = np.zeros((n_pages, PAGE), np.uint8)
        full = np.zeros((n_pages * rpp, C), np.uint8)
        full[:N] = rec_NC
        out[:, : rpp * C] = full.reshape(n_pages, rpp * C)
        return out.tobytes()
    out = np.zeros((N, fmt.pages_per_record * PAGE), np.uint8)
    out[:, :C] = rec_NC
    return out.tobytes()


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class ReadStats:
    rows: int = 0  # unique rows read
    pages: int = 0  # pages fetched
    bytes: int = 0
    seconds: float = 0.0


class RowFileReader(FileHandle):
    """Checked, batched row reads from one row file (see the module docstring).

    ``io``: "pread" (positioned reads on ``threads`` threads; ``direct=True`` bypasses the page cache
    with O_DIRECT) or "mmap". ``expected``: the layout the caller's model needs; a file of another
    layout (head sizes, row width, hash layout) is refused at open, naming the differing fields.
    """

    _pool: ThreadPoolExecutor | None = None
    _mm: mmap.mmap | None = None

    def __init__(self, path: str | os.PathLike, expected: TableLayout | None = None, io: str = "pread",
                 threads: int = 4, direct: bool = False) -> None:
        if io not in ("pread", "mmap"):
            raise ValueError(f"io must be 'pread' or 'mmap', got {io!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        self.header = read_header(self.path)
        if expected is not None:
            expected.check_same_rows(self.header.layout, f"row file {self.path}")
        self.fmt, self.io, self.threads, self.direct = self.header.fmt, io, threads, direct
        self.stats = ReadStats()
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct and io == "pread" else 0)
        self._fd = os.open(self.path, flags)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)  # no 8 MiB read-ahead per miss
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="engram-rowfile")
        self._mm = None
        if io == "mmap":
            self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
            if hasattr(self._mm, "madvise"):
                self._mm.madvise(mmap.MADV_RANDOM)

    @property
    def layout(self) -> TableLayout:
        return self.header.layout

    def gather(self, ids_N: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [N, W] in ``dtype`` for flat row ids [N] (any order, repeats allowed), every one checked."""
        import time

        t0 = time.perf_counter()
        ids = np.asarray(ids_N.cpu() if isinstance(ids_N, torch.Tensor) else ids_N, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.header.num_rows):
            bad = int(ids[(ids < 0) | (ids >= self.header.num_rows)][0])
            raise IndexError(f"row {bad} outside row file {self.path} ({self.header.num_rows} rows)")
        if ids.size == 0:
            return torch.empty(0, self.fmt.width, dtype=dtype)
        uniq, inv = np.unique(ids, return_inverse=True)  # sorted: reads follow the file
        rec = self._read_records(uniq)
        self._verify(rec, uniq)
        rows = decode_records(self.fmt, rec, dtype)
        self.stats.rows += len(uniq)
        self.stats.seconds += time.perf_counter() - t0
        return rows if np.array_equal(uniq, ids) else rows[torch.from_numpy(inv)]

    def gather_quantized(self, ids_N: torch.Tensor | np.ndarray) -> QuantizedRows:
        """Rows of an 8-bit file (fp8, int8) as stored: payload and scales, every record checked; for
        copying rows elsewhere without a dequantize/quantize round trip."""
        q = self.fmt.quant
        if q is None:
            raise RowFileError(f"{self.path}: rows are {self.fmt.kind}, not quantized")
        ids = np.asarray(ids_N.cpu() if isinstance(ids_N, torch.Tensor) else ids_N, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.header.num_rows):
            raise IndexError(f"rows outside row file {self.path} ({self.header.num_rows} rows)")
        uniq, inv = np.unique(ids, return_inverse=True)
        rec = self._read_records(uniq)
        self._verify(rec, uniq)
        body = torch.from_numpy(np.ascontiguousarray(rec[:, : self.fmt.payload_bytes + self.fmt.scale_bytes]))
        if not np.array_equal(uniq, ids):
            body = body[torch.from_numpy(inv)]
        payload = body[:, : q.width].contiguous().view(q.payload_dtype)
        scales = body[:, q.width :].contiguous().view(q.scale_dtype).reshape(len(body), q.scales_per_row)
        self.stats.rows += len(uniq)
        return QuantizedRows(payload, scales)

    def _verify(self, rec_UC: np.ndarray, uniq: np.ndarray) -> None:
        body = rec_UC[:, :-4]
        stored = np.ascontiguousarray(rec_UC[:, -4:]).view("<u4")[:, 0]
        bad = np.nonzero(record_checksums(body, uniq) != stored)[0]
        if bad.size:
            raise RowFileError(
                f"{self.path}: row {int(uniq[bad[0]])} is corrupt (checksum mismatch"
                + (f"; {bad.size} bad rows in this read" if bad.size > 1 else "") + ")"
            )

    def _read_records(self, uniq: np.ndarray) -> np.ndarray:
        fmt = self.fmt
        offs = record_offsets(fmt, self.header.data_offset, uniq)
        if self._mm is not None:
            return self._mmap_records(uniq)
        first = offs // PAGE
        span = fmt.pages_per_record
        need = np.unique(first if span == 1 else (first[:, None] + np.arange(span)).reshape(-1))
        pages = self._read_pages(need)
        where = np.searchsorted(need, first)  # index of each record's first page in ``pages``
        slot = (offs % PAGE) // fmt.record_size
        return _records_view(pages.reshape(-1), fmt, len(need))[(where, slot) if fmt.records_per_page else where]

    def _mmap_records(self, uniq: np.ndarray) -> np.ndarray:
        """Records of rows ``uniq`` copied out of the mapping by ``threads`` threads (numpy releases the GIL
        while copying, so the page faults of a cold file are served in parallel)."""
        fmt = self.fmt
        n_pages = (self.header.file_size - self.header.data_offset) // PAGE
        view = _records_view(np.frombuffer(self._mm, np.uint8)[self.header.data_offset :], fmt, n_pages)
        rpp = fmt.records_per_page
        out = np.empty((len(uniq), fmt.record_size), np.uint8)

        def copy(sl: slice) -> None:
            rows = uniq[sl]
            out[sl] = view[rows // rpp, rows % rpp] if rpp else view[rows]

        step = -(-len(uniq) // self.threads)
        for fut in [self._pool.submit(copy, slice(a, a + step)) for a in range(0, len(uniq), step)]:
            fut.result()
        self.stats.pages += len(np.unique(uniq // rpp)) if rpp else len(uniq) * fmt.pages_per_record
        self.stats.bytes += out.size
        return out

    def drop_cache(self) -> None:
        """Evict this file from the page cache (and this process's mapping of it): the next reads are
        cold in this machine's memory. For benchmarks."""
        if self._mm is not None and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _read_pages(self, need: np.ndarray) -> np.ndarray:
        """Pages ``need`` (sorted, unique) -> uint8 [P, PAGE], runs of adjacent pages read in one call."""
        P = len(need)
        out_mm = mmap.mmap(-1, max(P, 1) * PAGE)  # page-aligned, as O_DIRECT requires
        out = np.frombuffer(out_mm, dtype=np.uint8).reshape(max(P, 1), PAGE)[:P]
        breaks = np.nonzero(np.diff(need) != 1)[0] + 1
        runs = np.split(np.arange(P), breaks) if P else []
        view = memoryview(out_mm)
        chunks = np.array_split(np.arange(len(runs)), min(self.threads, max(len(runs), 1))) if runs else []

        def read_runs(run_ids: np.ndarray) -> None:
            for r in run_ids:
                idx = runs[r]
                a, n = int(idx[0]), len(idx)
                off = int(need[a]) * PAGE
                got = os.preadv(self._fd, [view[a * PAGE : (a + n) * PAGE]], off)
                if got != n * PAGE:
                    raise RowFileError(f"{self.path}: short read at byte {off}: {got} of {n * PAGE} bytes")

        for fut in [self._pool.submit(read_runs, c) for c in chunks]:
            fut.result()  # a reader thread's error reaches the caller
        self.stats.pages += P
        self.stats.bytes += P * PAGE
        return out

    def iter_rows(self, chunk_rows: int = 1 << 16, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, rows) over the whole file in order, every record checked (``verify``, export checks)."""
        for start in range(0, self.header.num_rows, chunk_rows):
            stop = min(start + chunk_rows, self.header.num_rows)
            yield start, self.gather(np.arange(start, stop), dtype)

    def _close_extras(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None


__all__ = ["PAGE", "ROW_FORMATS", "ReadStats", "RowFileError", "RowFileHeader", "RowFileReader", "RowFormat",
           "decode_records", "encode_rows", "read_header", "record_checksums", "record_offsets", "write_rowfile"]
