"""Row stores: one contract suite over every tier (device, host, disk in each row dtype and read mode),
the tiers' equivalence inside a model, and the row file's faults (corrupt row, truncation, wrong magic,
version, layout or width, ids outside the table, a disk table asked to train, interrupted exports).

Reference: the device store, whose rows are the table's tensor itself. Exact for fp32 / bf16 files; for
8-bit files, exactly dequantize(quantize(W)) (engram.memory.quant)."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import io as eio
from engram.memory.layout import TableLayout, TableLayoutError
from engram.memory.quant import dequantize_rows, quantize_rows
from engram.memory.rowfile import PAGE, RowFileError, RowFileReader, RowFormat, read_header, write_rowfile
from engram.memory.placement import Placement
from engram.memory.store import DiskStore, ReadOnlyTableError, TensorStore
from engram.memory.table import EngramTable

ROOT = Path(__file__).resolve().parents[1]
HASH = {"format": "engram-hash-v1", "seed": 0, "primes": {"1": [[53, 59], [61, 67]]}}


def make_table(width: int = 32, dtype: str = "float32", sizes=(53, 59, 61, 67)) -> EngramTable:
    torch.manual_seed(0)
    return EngramTable(list(sizes), width, dtype, name="engram.1", hash_layout=HASH)


def write(table: EngramTable, path: Path, kind: str) -> Path:
    w = table.weight.detach()
    write_rowfile(path, table.layout, lambda a, b: w[a:b], kind, {"run": "test", "step": 0}, chunk_rows=64)
    return path


def expected_rows(table: EngramTable, kind: str) -> torch.Tensor:
    """What a store of ``kind`` must return for every row: the rows themselves, or their 8-bit round trip."""
    w = table.weight.detach()
    if kind in ("fp32", "bf16"):
        return w.to(torch.bfloat16).to(w.dtype) if kind == "bf16" else w
    q = quantize_rows(w, {"fp8": "fp8_e4m3", "int8": "int8"}[kind])
    return dequantize_rows(q, w.dtype)


STORES = [("device", None, None), ("host", None, None)] + [
    ("disk", kind, io) for kind in ("fp32", "bf16", "fp8", "int8") for io in ("pread", "mmap")
]


@pytest.fixture(params=STORES, ids=[f"{t}-{k}-{io}" if k else t for t, k, io in STORES])
def store_case(request, tmp_path):
    """(table, its store, the row dtype the store returns) for two widths: 32 (fp8 scales per 32 values,
    DeepSeek's layout) and 24 (one scale per row)."""
    tier, kind, io = request.param
    cases = []
    for width in (32, 24):
        table = make_table(width)
        if tier == "disk":
            cases.append((table, DiskStore(table.layout, write(table, tmp_path / f"t{width}.rows", kind), io=io,
                                           threads=3), kind))
        else:
            cases.append((table, TensorStore(table.layout, table.weight, tier), "fp32"))
    return cases


def test_contract_gathers_equal_the_reference(store_case):
    g = torch.Generator().manual_seed(1)
    for table, store, kind in store_case:
        want = expected_rows(table, kind)
        ids = torch.randint(0, table.num_rows, (500,), generator=g)
        ids[:5] = torch.tensor([0, table.num_rows - 1, 7, 7, 7])  # ends of the table and repeats
        distinct = torch.randperm(table.num_rows, generator=g)[:50]  # no repeats, any order
        assert torch.equal(store.gather(distinct), want[distinct])
        got = store.gather(ids)
        assert got.dtype == table.weight.dtype and got.shape == (500, table.d_head)
        assert torch.equal(got, want[ids])
        assert torch.equal(store.gather(torch.arange(table.num_rows)), want)
        assert store.gather(torch.zeros(0, dtype=torch.long)).shape == (0, table.d_head)
        assert store.stats.rows == 550 + table.num_rows and store.nbytes() > 0
        store.close()


def test_bf16_tables_round_trip_exactly_in_bf16_files(tmp_path):
    table = make_table(32, "bfloat16")
    store = DiskStore(table.layout, write(table, tmp_path / "b.rows", "bf16"))
    assert torch.equal(store.gather(torch.arange(table.num_rows)), table.weight.detach())


# ----------------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("kind", ["fp32", "fp8"])
def test_a_model_on_the_disk_tier_equals_it_in_memory(tmp_path, kind):
    """Same logits as the in-memory model whose tables are the file's rows (exact: no dequantisation
    error for fp32, and for fp8 the in-memory reference holds dequantize(quantize(W)))."""
    from engram.config import preset
    from engram.model import build_model

    cfg = preset("debug")
    ref = build_model(cfg).eval()
    for name, t in ref.memory_tables().items():
        write(t, tmp_path / f"{name}.rows", kind)
        with torch.no_grad():
            t.weight.copy_(expected_rows(t, kind))
    disk = build_model(cfg, placement=Placement("disk", tmp_path)).eval()
    disk.load_state_dict({k: v for k, v in ref.state_dict().items() if "table" not in k}, strict=True)
    assert not list(disk.memory_tables()["engram.1"].parameters())  # nothing in memory
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    assert torch.equal(disk(ids).logits, ref(ids).logits)
    assert disk.param_counts() == ref.param_counts()  # accounting does not depend on placement
    with pytest.raises(ReadOnlyTableError, match="engram.1.*read-only disk tier"):
        from engram.train.optim import build_optimizers

        build_optimizers(disk, lr=1e-3)
    with pytest.raises(ReadOnlyTableError, match="checkpoint needs every table's rows in memory"):
        from engram.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "ck", 1, disk, None, {})


def test_host_tier_trains_like_the_device_tier():
    """On this CPU machine host and device share memory; the tier still goes through its own store."""
    from engram.config import preset
    from engram.model import build_model
    from engram.train.optim import build_optimizers

    cfg = preset("debug")
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(cfg, placement=Placement("host"))
    assert b.memory_tables()["engram.1"].tier == "host"
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    for m in (a, b):
        opt = build_optimizers(m, lr=1e-2)
        for _ in range(3):
            m(ids, targets=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_prefetched_rows_equal_gathering_in_the_block():
    from engram.config import preset
    from engram.model import build_model

    m = build_model(preset("debug")).eval()
    ids = torch.randint(0, 512, (2, 12))
    hash_ids = m.hash(ids)
    rows = {1: m.memory_tables()["engram.1"].gather_rows(hash_ids[:, :, 0])}
    assert torch.equal(m(ids, memory_rows=rows).logits, m(ids).logits)


# ------------------------------------------------------------------------------------------ faults


def test_a_corrupt_row_is_named_and_never_returned(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    h = read_header(path)
    rec = RowFormat("fp32", 32).record_size
    victim = 100
    off = h.data_offset + (victim // (PAGE // rec)) * PAGE + (victim % (PAGE // rec)) * rec + 5
    data = bytearray(path.read_bytes())
    data[off] ^= 0x40
    path.write_bytes(bytes(data))
    for io in ("pread", "mmap"):
        store = DiskStore(table.layout, path, io=io)
        assert torch.equal(store.gather(torch.tensor([99, 101])), table.weight.detach()[[99, 101]])  # others fine
        with pytest.raises(RowFileError, match=f"t.rows: row {victim} is corrupt"):
            store.gather(torch.tensor([3, victim, 200]))
    from engram.infer.tables import verify_table

    with pytest.raises(RowFileError, match=f"row {victim} is corrupt"):
        verify_table(path, progress=False)


def test_a_row_moved_to_another_record_is_caught(tmp_path):
    """The checksum mixes in the row id: a record copied over another one fails."""
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    h, rec = read_header(path), RowFormat("fp32", 32).record_size
    data = bytearray(path.read_bytes())
    a, b = h.data_offset, h.data_offset + rec  # rows 0 and 1 share the first page
    data[b : b + rec] = data[a : a + rec]
    path.write_bytes(bytes(data))
    with pytest.raises(RowFileError, match="row 1 is corrupt"):
        DiskStore(table.layout, path).gather(torch.tensor([1]))


def test_bad_files_are_refused_at_open(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    good = path.read_bytes()
    cases = {
        "truncated": good[:-PAGE],
        "magic": b"NOTROWS!" + good[8:],
        "version": good[:8] + struct.pack("<I", 99) + good[12:],
        "header": good[:60] + bytes([good[60] ^ 1]) + good[61:],
    }
    messages = {"truncated": "truncated: .* the header implies", "magic": "not an engram row file",
                "version": "format version 99", "header": "header is truncated or corrupt"}
    for what, blob in cases.items():
        bad = tmp_path / f"{what}.rows"
        bad.write_bytes(blob)
        with pytest.raises(RowFileError, match=messages[what]):
            DiskStore(table.layout, bad)
    with pytest.raises(FileNotFoundError, match="missing.rows does not exist"):
        DiskStore(table.layout, tmp_path / "missing.rows")


def test_another_layout_is_refused_naming_the_fields(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    other_hash = {**HASH, "seed": 7}
    for layout, field in ((TableLayout("engram.1", (53, 59, 61, 67), 32, hash_layout=other_hash), "hash_layout.seed"),
                          (TableLayout("engram.1", (53, 59, 61, 71), 32, hash_layout=HASH), "head_sizes"),
                          (TableLayout("engram.1", (53, 59, 61, 67), 16, hash_layout=HASH), "d_head: 32 != 16")):
        with pytest.raises(TableLayoutError, match=field):
            RowFileReader(path, expected=layout)


def test_ids_outside_the_table_and_bad_reader_options(tmp_path):
    table = make_table()
    store = DiskStore(table.layout, write(table, tmp_path / "t.rows", "fp32"))
    with pytest.raises(IndexError, match=f"row {table.num_rows} outside row file"):
        store.gather(torch.tensor([0, table.num_rows]))
    with pytest.raises(IndexError, match="row -1"):
        store.gather(torch.tensor([-1]))
    with pytest.raises(ValueError, match="io must be"):
        RowFileReader(tmp_path / "t.rows", io="aio")
    with pytest.raises(ValueError, match="unknown table tier 'ssd'"):
        Placement("ssd")
    with pytest.raises(ValueError, match="the disk tier needs a table directory"):
        Placement("disk")


def test_direct_io_reads_the_same_rows(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    try:
        reader = RowFileReader(path, direct=True)
        rows = reader.gather(torch.tensor([5, 77, 200]))
    except OSError as e:  # a filesystem without O_DIRECT (tmpfs) refuses the open or the read
        assert e.errno in (errno.EINVAL, errno.EOPNOTSUPP)
        return
    assert torch.equal(rows, table.weight.detach()[[5, 77, 200]])


def test_disk_full_during_export_leaves_nothing_under_the_name(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    before = path.read_bytes()
    with torch.no_grad():
        table.weight.add_(1.0)
    with eio.inject_faults(eio.Fault("write:t.rows", after_bytes=3 * PAGE)):
        with pytest.raises(OSError) as info:
            write(table, path, "fp32")
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.rows"]
    with eio.inject_faults(eio.Fault("write:new.rows", after_bytes=PAGE)):
        with pytest.raises(OSError):
            write(table, tmp_path / "new.rows", "fp8")
    assert not (tmp_path / "new.rows").exists()


KILL_EXPORT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_memory_store import make_table, write
t = make_table()
with torch.no_grad():
    t.weight.add_(1.0)
write(t, __import__("pathlib").Path(sys.argv[1]), "fp32")
print("DONE", flush=True)
"""


def test_an_export_killed_midway_keeps_the_old_file(tmp_path):
    table = make_table()
    path = write(table, tmp_path / "t.rows", "fp32")
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), eio.FAULTS_ENV: "rowfile.chunk:t.rows=kill@2"}
    proc = subprocess.run([sys.executable, "-c", KILL_EXPORT.format(tests=str(Path(__file__).parent)), str(path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "DONE" not in proc.stdout
    assert path.read_bytes() == before
    assert DiskStore(table.layout, path).gather(torch.tensor([3])).equal(table.weight.detach()[[3]])


def test_record_packing_never_straddles_a_page():
    for kind, width in (("fp32", 32), ("bf16", 256), ("fp8", 256), ("int8", 100), ("fp32", 1024), ("fp32", 2000)):
        fmt = RowFormat(kind, width)
        from engram.memory.rowfile import record_offsets

        offs = record_offsets(fmt, 8192, np.arange(5000))
        starts, ends = offs // PAGE, (offs + fmt.record_size - 1) // PAGE
        assert (starts == ends).all() if fmt.record_size <= PAGE else (offs % PAGE == 0).all(), (kind, width)
    assert RowFormat("fp8", 256).record_size == 256 + 8 + 4  # DeepSeek's fp8 row, its 8 scales, a checksum
