"""``engram bench train``: training throughput and the cost of the memory's moving parts.

1. tokens/s of the tiny dense, MoE and Engram-MoE presets in fp32, and with bf16 autocast where the hardware
   runs bf16 fast (engram.runtime.resolve_dtype; on AVX2-only CPUs bf16 matmuls are ~80x slower), same batches;
2. optimizer-step time of the Engram tables' ``SparseRowAdam`` on a 1e5-row vs a 1e7-row table with the
   same touched rows (sparse updates: the cost should follow rows touched, not table size);
3. hashing time as a share of a tiny Engram-MoE training step (hashing runs in the loader's thread, but
   it must stay small even when it does not overlap).

``--vs-hf`` instead times a train step (forward, backward, AdamW) of our ``tiny-dense`` backbone against
``transformers``' ``LlamaForCausalLM`` of the same shape, same batches, eager and ``torch.compile``d on
both sides (ours: each block compiled, ``engram.runtime.compile_blocks``; HF: the whole model).
"""

from __future__ import annotations

import os

import torch

from engram.bench.common import time_pair
from engram.report import format_table
from engram.runtime import compile_blocks, resolve_dtype
from engram.bench.step import _stepper
from engram.config import preset
from engram.model import build_model
from engram.train.optim import SparseRowAdam

QUICK = dict(batch=2, seq=64, big_rows=200_000, small_rows=20_000, lookups=4096, repeats=2, compiled=False)


def _table_step(rows: int, d: int, lookups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(rows, d, generator=g))
    opt = SparseRowAdam([w], lr=1e-3)
    ids = torch.randint(0, min(rows, 100_000), (lookups,), generator=g)  # same touched rows in both tables
    vals = torch.randn(lookups, d, generator=g)

    def step() -> None:
        w.grad = torch.sparse_coo_tensor(ids[None], vals, (rows, d), check_invariants=False)
        opt.step()

    return step


def run(batch: int = 16, seq: int = 256, big_rows: int = 10_000_000, small_rows: int = 100_000, d: int = 32,
        lookups: int = 32_768, repeats: int = 3, vs_hf: bool = False, compiled: bool = True) -> dict:
    """``compiled``: with ``vs_hf``, also time both models under torch.compile (--quick skips it)."""
    if vs_hf:
        return run_vs_hf(batch, seq, repeats=max(repeats, 5), compiled=compiled)
    out: dict = {"config": dict(batch=batch, seq=seq, big_rows=big_rows, small_rows=small_rows, d=d,
                                lookups=lookups, threads=torch.get_num_threads())}
    # 1. throughput
    fns, names = {}, []
    dtypes = ("fp32", "bf16") if resolve_dtype("auto") == "bf16" else ("fp32",)
    for dtype in dtypes:
        for name in ("tiny-dense", "tiny-moe", "tiny"):
            key = f"{name} {dtype}"
            fns[key] = _stepper(name, batch, seq, torch.bfloat16 if dtype == "bf16" else torch.float32)[0]
            names.append(key)
    times = time_pair(fns, repeats=repeats, warmup=1)
    toks = batch * seq
    rows = [[k, times[k] * 1e3, toks / times[k], times["tiny-moe " + k.split()[1]] / times[k]] for k in names]
    t1 = format_table(["preset / dtype", "ms / step", "tokens/s", "speed vs tiny-moe"], rows)
    out["tokens_per_s"] = {k: toks / times[k] for k in names}

    # 2. sparse optimizer step: big vs small table, same touched rows. Huge pages (a torch allocator option
    # read at allocation time) cut the TLB misses of random rows in multi-GB tables.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    tsteps = {f"{small_rows:.0e} rows": _table_step(small_rows, d, lookups),
              f"{big_rows:.0e} rows": _table_step(big_rows, d, lookups)}
    ot = time_pair(tsteps, repeats=max(repeats * 3, 5), warmup=2)
    small_k, big_k = list(tsteps)
    t2 = format_table(["table", "ms / optimizer step", "ratio"],
                      [[k, ot[k] * 1e3, ot[k] / ot[small_k]] for k in tsteps])
    out["table_step_ratio"] = ot[big_k] / ot[small_k]
    del tsteps

    # 3. hashing share of a step
    model = build_model(preset("tiny"))
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    seg = torch.zeros_like(ids)
    ht = time_pair({"hash": lambda: model.hash(ids, seg)}, repeats=max(repeats * 3, 5))["hash"]
    fast = resolve_dtype("auto")
    share = ht / times[f"tiny {fast}"]
    out["hash_share"] = share
    t3 = format_table(["hashing (tiny, all Engram layers)", "ms / batch", f"share of a {fast} train step"],
                      [["model.hash(ids, segment_ids)", ht * 1e3, f"{share:.2%}"]])
    out["table"] = "\n\n".join([t1, t2, t3])
    return out


def _hf_stepper(cfg, ids: torch.Tensor, dtype: torch.dtype, compiled: bool):
    from engram.bench.generate import hf_llama_like

    torch.manual_seed(0)
    model = hf_llama_like(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    fwd = torch.compile(model, dynamic=False) if compiled else model

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_vs_hf(batch: int = 16, seq: int = 256, repeats: int = 5, dtype: str = "auto", compiled: bool = True) -> dict:
    """Train-step time of our dense backbone vs a same-shape transformers Llama (eager, and compiled)."""
    dtype = resolve_dtype(dtype)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = preset("tiny-dense")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    fns = {"transformers Llama, eager": _hf_stepper(cfg, ids, dt, False),
           "engram tiny-dense, eager": _stepper("tiny-dense", batch, seq, dt)[0]}
    if compiled:
        fns["transformers Llama, compiled"] = _hf_stepper(cfg, ids, dt, True)
        fns["engram tiny-dense, compiled"] = _stepper("tiny-dense", batch, seq, dt, compiled=True)[0]
    times = time_pair(fns, repeats=repeats, warmup=2)  # the first warm-up call compiles
    base = times["transformers Llama, eager"]
    rows = [[k, times[k] * 1e3, batch * seq / times[k], base / times[k]] for k in fns]
    table = format_table(["train step (tiny-dense shape, " + dtype + ")", "ms / step", "tokens/s", "speed vs HF eager"],
                         rows)
    table += f"\nB={batch}, T={seq}, threads {torch.get_num_threads()}" + ("" if compiled else "; compiled rows skipped (--quick)")
    return {"table": table, "ms_per_step": {k: v * 1e3 for k, v in times.items()},
            "speed_vs_hf_eager": {k: base / v for k, v in times.items()},
            "config": dict(batch=batch, seq=seq, dtype=dtype, threads=torch.get_num_threads())}
