"""safetensors files read and written in bounded pieces: a V4.1 table layer is ~101 GB, far above RAM.

A safetensors file is ``u64 header length | header JSON | data``; the header maps each tensor name to its
dtype, shape and ``data_offsets`` [begin, end) within the data, which the tensors cover contiguously.
``SafetensorsFile`` parses that header itself and reads any row range of a tensor with one positioned
read (``os.pread``), so a caller streams a table in chunks of its choosing; it counts every read (rows,
bytes, the largest read) so tests can show memory stays bounded without timing anything.
``write_safetensors`` writes a file from tensors given as row-chunk producers, in one pass, atomically.
The library's ``safe_open`` could slice too; owning the ~60 lines keeps read sizes explicit and countable.

Shape legend: R rows of a tensor, N rows in one read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from engram.io import FileHandle, atomic_open

# safetensors dtype names <-> torch dtypes (the ones Engram weights use, plus the common rest)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit on the header size


class SafetensorsFormatError(ValueError):
    """A safetensors file whose header is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index of the first dimension)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A tensor of this shape and dtype on the meta device (for checks; holds no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass
class ReadCounter:
    reads: int = 0
    bytes: int = 0
    max_rows: int = 0  # the largest row count read in one call
    max_bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # rows read per tensor

    def add(self, name: str, rows: int, nbytes: int) -> None:
        self.reads += 1
        self.bytes += nbytes
        self.max_rows, self.max_bytes = max(self.max_rows, rows), max(self.max_bytes, nbytes)
        self.rows[name] = self.rows.get(name, 0) + rows


class SafetensorsFile(FileHandle):
    """Header of one safetensors file and positioned reads of its tensors (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.counter = ReadCounter()
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries, self.metadata = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _parse_header(self) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{self.path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{self.path}: not a safetensors file (header length {n} in {size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except ValueError as e:
            raise SafetensorsFormatError(f"{self.path}: corrupt safetensors header: {e}") from None
        meta = header.pop("__metadata__", None) or {}
        base, entries = 8 + n, {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            dtype, shape = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
            if end - b != math.prod(shape) * dtype.itemsize or base + end > size:
                raise SafetensorsFormatError(
                    f"{self.path}: tensor {name!r} ({e['dtype']} {list(shape)}) has data offsets [{b}, {end}) that "
                    f"do not fit its size or the file ({size} bytes): truncated?"
                )
            entries[name] = TensorEntry(name, dtype, shape, base + b, base + end)
        return entries, meta

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.entries[name]

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (for the small ones: projections, norms)."""
        e = self.entry(name)
        if not e.shape:
            return self._read(e, e.begin, e.end - e.begin, 1).reshape(())
        return self.read_rows(name, 0, e.shape[0])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` ([N, ...]) in one positioned read of just those bytes."""
        e = self.entry(name)
        if not e.shape or not 0 <= start <= stop <= e.shape[0]:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside tensor {name!r} of shape {list(e.shape)}")
        return self._read(e, e.begin + start * e.row_bytes, (stop - start) * e.row_bytes, stop - start).reshape(
            stop - start, *e.shape[1:])

    def _read(self, e: TensorEntry, offset: int, nbytes: int, rows: int) -> torch.Tensor:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:  # pread may return less than asked (large reads, signals)
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise SafetensorsFormatError(f"{self.path}: short read of {e.name!r} at byte {offset + got}")
            got += n
        self.counter.add(e.name, rows, nbytes)
        return torch.frombuffer(buf, dtype=torch.uint8).view(e.dtype) if nbytes else torch.empty(0, dtype=e.dtype)


# ---------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its name, dtype, shape, and ``chunks()`` yielding its rows in order."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSource":
        t = t.detach().cpu().contiguous()
        return cls(name, t.dtype, tuple(t.shape), lambda: iter([t]))


def write_safetensors(path: str | os.PathLike, tensors: Sequence[TensorSource],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in this order) as one safetensors file, atomically, chunk by chunk: only one chunk
    of one tensor is in memory at a time. Each source must yield exactly its shape's bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors name")
        n = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            want, wrote = math.prod(t.shape) * t.dtype.itemsize, 0
            for chunk in t.chunks():
                if chunk.dtype != t.dtype:
                    raise ValueError(f"tensor {t.name!r}: a chunk is {chunk.dtype}, expected {t.dtype}")
                data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                wrote += data.size
            if wrote != want:
                raise ValueError(f"tensor {t.name!r}: its chunks held {wrote} bytes, its shape needs {want}")


__all__ = ["DTYPES", "ReadCounter", "SafetensorsFile", "SafetensorsFormatError", "TensorEntry", "TensorSource",
           "write_safetensors"]
