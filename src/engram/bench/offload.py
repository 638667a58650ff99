"""``engram bench offload``: what serving the Engram table from disk costs a decoding model.

One process, the same prompts (held-out text of ``mini``), greedy, on the ``small`` backbone (the largest
preset that decodes at a usable speed on this CPU) with one Engram layer at block 1 whose table is
>= 4 GiB (8 heads x ~2.1 M rows x 64 fp32). Four configurations:

1. no Engram (the same backbone, its MoE as the allocation left it);
2. Engram, table in memory (the device tier);
3. table on the disk tier, with the background prefetcher and a hot-row cache (<= 10% of the table);
4. disk tier, no prefetch, no cache (every step's rows read in the block);
3a, 3b: configuration 3 with only the cache or only the prefetcher, to show what each part costs or saves.

Each disk configuration runs guest-cold (the table file dropped from this VM's page cache first, checked
with mincore) and then warm. Reported: prefill and decode tokens/s, the penalty of 3 against 2 and 1,
hit rate, stall time (the blocks' wait for rows), and the stall predicted by the rows missed and the
cold read rate measured on the same file. The VM's host may still cache the virtual disk: "cold" means
cold in this guest.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from engram.bench.storage import _resident_fraction
from engram.config import EngramConfig, preset
from engram.data.corpora import default_cache_dir
from engram.infer.generate import generate_batch
from engram.infer.prefetch import RowPrefetcher
from engram.memory.rowfile import RowFileReader, read_header, write_rowfile
from engram.memory.placement import Placement
from engram.memory.store import rowfile_name
from engram.model import build_model
from engram.report import format_table

QUICK = dict(rows_per_head=20_000, prompts=2, prompt_len=16, new_tokens=4, cache_fraction=0.1, backbone="debug")


def _config(backbone: str, rows_per_head: int):
    base = preset(backbone)
    e = base.engram or EngramConfig()
    engram = dataclasses.replace(e, layers=(1,), max_ngram=3, heads=4, table_sizes=(rows_per_head, rows_per_head),
                                 d_mem=512 if backbone != "debug" else 64)
    return dataclasses.replace(base, engram=engram), dataclasses.replace(base, engram=None)


def _table_file(model, directory: Path) -> Path:
    """The model's table as a row file (cached across runs: the bench's weights are seeded)."""
    (name, table), = model.memory_tables().items()
    path = directory / rowfile_name(name)
    try:
        if read_header(path).layout.hash_fingerprint == table.layout.hash_fingerprint:
            return path
    except (OSError, ValueError):
        pass
    w = table.weight.detach()
    write_rowfile(path, table.layout, lambda a, b: w[a:b], "fp32", {"run": "engram bench offload", "step": 0})
    return path


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    from engram.bench.generate import _prompts as text_prompts

    try:
        return text_prompts(n, length, vocab, real_text=True)
    except Exception:  # no corpus here (offline): random ids keep the benchmark runnable
        return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(0)).tolist()


def _decode(model, prompts, new_tokens, prefetch: bool) -> dict:
    pf = RowPrefetcher(model) if prefetch else None
    try:
        res = generate_batch(model, prompts, new_tokens, temperature=0, prefetcher=pf)
    finally:
        if pf is not None:
            pf.close()
    return {"prefill": res.prefill_tok_s, "decode": res.decode_tok_s, "stall_s": res.prefetch.get("stall_s", 0.0),
            "tokens": res.tokens, "steps": res.steps}


def run(rows_per_head: int = 2_100_000, prompts: int = 8, prompt_len: int = 64, new_tokens: int = 32,
        cache_fraction: float = 0.1, backbone: str = "small", repeats: int = 2) -> dict:
    torch.manual_seed(0)
    cfg, plain_cfg = _config(backbone, rows_per_head)
    bench_dir = default_cache_dir() / "bench" / f"offload-{backbone}-{rows_per_head}"
    bench_dir.mkdir(parents=True, exist_ok=True)
    mem = build_model(cfg).eval()
    path = _table_file(mem, bench_dir)
    batch = _prompts(prompts, prompt_len, cfg.vocab_size)
    table_bytes = mem.table_bytes()
    results, notes = {}, []
    plain = build_model(plain_cfg).eval()
    results["1. no Engram"] = _best(lambda: _decode(plain, batch, new_tokens, False), repeats)
    del plain
    results["2. Engram, table in memory"] = ref = _best(lambda: _decode(mem, batch, new_tokens, False), repeats)
    dense = {k: v for k, v in mem.state_dict().items() if ".table." not in k}
    del mem
    cache_bytes = int(cache_fraction * table_bytes)
    for label, placement, prefetch in (
        ("3. disk + prefetch + cache", Placement("disk", bench_dir, cache_bytes=cache_bytes), True),
        ("4. disk, no prefetch, no cache", Placement("disk", bench_dir), False),
        ("3a. disk + cache, no prefetch", Placement("disk", bench_dir, cache_bytes=cache_bytes), False),
        ("3b. disk + prefetch, no cache", Placement("disk", bench_dir), True),
    ):
        model = build_model(cfg, placement=placement).eval()
        model.load_state_dict(dense, strict=False)
        store = model.memory_tables()["engram.1"].store
        reader = getattr(store, "backing", store).reader
        reader.drop_cache()
        resident = _resident_fraction(path)
        cold = _decode(model, batch, new_tokens, prefetch)
        if cold["tokens"] != ref["tokens"]:
            raise AssertionError(f"{label}: tokens differ from the in-memory model")
        warm = _best(lambda: _decode(model, batch, new_tokens, prefetch), repeats)
        hit = store.hit_rate() if hasattr(store, "hit_rate") else 0.0
        misses = store.stats.extra.get("misses", store.stats.rows)
        results[f"{label}, guest-cold"] = {**cold, "hit": hit, "resident": resident}
        results[f"{label}, warm"] = {**warm, "hit": hit, "misses": misses}
        store.close()
        del model
    cold_rate = _cold_read_rate(path)
    return _report(results, ref, table_bytes, cache_bytes, cold_rate, new_tokens, prompts, notes)


def _best(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(max(repeats, 1))]
    return max(runs, key=lambda r: r["decode"])


def _cold_read_rate(path: Path, n: int = 20_000) -> float:
    with RowFileReader(path, io="mmap", threads=4) as reader:
        ids = np.random.default_rng(0).integers(0, reader.header.num_rows, n)
        reader.drop_cache()
        t0 = time.perf_counter()
        reader.gather(ids)
        return n / (time.perf_counter() - t0)


def _report(results: dict, ref: dict, table_bytes: int, cache_bytes: int, cold_rate: float, new_tokens: int,
            prompts: int, notes: list[str]) -> dict:
    base = results["1. no Engram"]["decode"]
    rows = []
    for label, r in results.items():
        rows.append([label, r["prefill"], r["decode"], f"{1 - r['decode'] / ref['decode']:+.1%}",
                     f"{1 - r['decode'] / base:+.1%}", f"{r.get('hit', float('nan')):.3f}" if "hit" in r else "-",
                     r["stall_s"]])
    table = format_table(["configuration", "prefill tok/s", "decode tok/s", "penalty vs 2", "penalty vs 1",
                          "hit rate", "stall s"], rows)
    table += (f"\ntable {table_bytes / 2**30:.2f} GiB, cache {cache_bytes / 2**20:.0f} MiB "
              f"({cache_bytes / table_bytes:.0%}); {prompts} prompts, {new_tokens} new tokens each; cold rows/s of "
              f"this file (4 threads): {cold_rate:,.0f}")
    return {"table": table, "results": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()},
            "cold_rows_per_s": cold_rate}
