"""``engram bench shard``: what splitting Engram tables across ranks costs, on real text.

1. Traffic (no processes; the figure that carries over to real clusters): each of W ranks hashes its own
   part of consecutive text; the bytes one rank sends and receives per token for its lookups are the ids
   it asks of other ranks (8 bytes each), the rows they return and the gradients it sends back (row
   width x 4 bytes each, fp32), summed over Engram layers; with deduplication a step's repeated ids
   travel once. Also the balance of the two ownerships (contiguous ranges, modulo): the most distinct
   rows any rank serves over the mean.
2. Time (real processes, gloo, one thread per rank): the table lookup (forward + backward) and a whole
   training step at each world size, each rank a fixed batch (so tokens/s should grow with the world
   size), and the share of the step spent in the all-to-alls. On a 2-core machine world 2 is the largest
   that measures scaling; beyond that the ranks only contend for cores.

Shape legend: B batch per rank, T sequence length, L Engram layers, H heads per layer, W ranks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

QUICK = dict(preset="debug", batch=2, seq=64, steps=3, worlds=(1, 2), traffic_worlds=(2, 8),
             tokenizer_bytes=2_000_000)
ID_BYTES, WIRE_BYTES = 8, 4  # int64 ids, fp32 rows and gradients


def run(preset: str = "tiny", corpus: str = "mini", batch: int = 4, seq: int = 256, steps: int = 8,
        worlds: Sequence[int] = (1, 2), traffic_worlds: Sequence[int] = (2, 8, 64), cache_dir: str | None = None,
        tokenizer_bytes: int = 20_000_000) -> dict[str, Any]:
    from engram.data.corpora import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cfg, tok, hasher = _layout(preset, corpus, cache, tokenizer_bytes)
    ids, seg = _stream(corpus, tok, cache)
    traffic = [_traffic(hasher, cfg.engram.d_mem // hasher.heads_per_layer, ids, seg, batch, seq, w, own)
               for w in traffic_worlds for own in ("contiguous", "modulo")]
    args = dict(preset=preset, corpus=corpus, batch=batch, seq=seq, steps=steps, cache=str(cache),
                tokenizer_bytes=tokenizer_bytes)
    timing = [_timed_job(w, args) for w in worlds]
    base = timing[0]
    for t in timing:
        t["speedup"] = t["tokens_per_s"] / base["tokens_per_s"]
    return {"preset": preset, "corpus": corpus, "batch_per_rank": batch, "seq": seq, "traffic": traffic,
            "timing": timing, "table": _table(preset, corpus, batch, seq, traffic, timing)}


# ------------------------------------------------------------------------------------------- traffic


def _layout(preset_name: str, corpus: str, cache: Path, tokenizer_bytes: int):
    from engram.config import preset
    from engram.hashing import NgramHasher
    from engram.tokenizer import CompressionMap
    from engram.train.trainer import corpus_tokenizer, fit_model_config

    cfg = preset(preset_name)
    if cfg.engram is None:
        raise ValueError(f"preset {preset_name!r} has no Engram layers: there are no tables to shard")
    tok = corpus_tokenizer(corpus, cfg.vocab_size, cache, tokenizer_bytes)
    cfg = fit_model_config(cfg, tok)
    return cfg, tok, NgramHasher.from_config(cfg.engram, CompressionMap.build(tok).lookup)


def _stream(corpus: str, tok: Any, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The training split's documents in order, as one token stream and its document index per token."""
    from engram.memory.hotness import corpus_documents

    docs = [d for d in corpus_documents(corpus, tok, "train", cache) if len(d)]
    ids = np.concatenate(docs).astype(np.int64)
    seg = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    return ids, seg


def _rank_batches(ids: np.ndarray, seg: np.ndarray, batch: int, seq: int, world: int, step: int = 0):
    """[(ids [B, T], segment ids [B, T])] of each rank at ``step``: consecutive text, rank after rank."""
    n = batch * seq
    if (step + 1) * world * n > len(ids):
        raise ValueError(f"the text has {len(ids):,} tokens, fewer than {world} ranks x {n} tokens x {step + 1} steps")
    out = []
    for r in range(world):
        at = (step * world + r) * n
        out.append((torch.from_numpy(ids[at : at + n]).view(batch, seq), torch.from_numpy(seg[at : at + n]).view(batch, seq)))
    return out


def _traffic(hasher, d_head: int, ids, seg, batch: int, seq: int, world: int, ownership: str) -> dict[str, Any]:
    """Per-rank bytes per token with and without deduplication, and the rows each owner serves."""
    from engram.memory.table import EngramTable

    tables = [EngramTable(hasher.head_sizes(layer), 1, device="meta") for layer in hasher.layers]
    remote_all = remote_distinct = distinct = 0
    served_W = torch.zeros(world, dtype=torch.int64)
    for r, (ids_BT, seg_BT) in enumerate(_rank_batches(ids, seg, batch, seq, world)):
        hashed_BTLH = hasher(ids_BT, seg_BT)
        for j, table in enumerate(tables):
            flat = table.flat_ids(hashed_BTLH[:, :, j]).reshape(-1)
            rows = table.num_rows
            owner = _owner(flat, rows, world, ownership)
            uniq = torch.unique(flat)
            owner_u = _owner(uniq, rows, world, ownership)
            remote_all += int((owner != r).sum())
            remote_distinct += int((owner_u != r).sum())
            distinct += uniq.numel()
            served_W += torch.bincount(owner_u, minlength=world)
    tokens = world * batch * seq
    per_row = ID_BYTES + 2 * d_head * WIRE_BYTES
    served = served_W.float()
    return {"world": world, "ownership": ownership, "distinct_rows_per_token": distinct / tokens,
            "bytes_per_token_dedup": remote_distinct * per_row / tokens,
            "bytes_per_token_no_dedup": remote_all * per_row / tokens,
            "served_max_over_mean": float(served.max() / served.mean())}


def _owner(flat: torch.Tensor, rows: int, world: int, ownership: str) -> torch.Tensor:
    if ownership == "modulo":
        return flat % world
    return torch.div(flat, -(-rows // world), rounding_mode="floor")


# --------------------------------------------------------------------------------------------- timing


def _timed_job(world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``world`` worker processes of this module; rank 0's medians."""
    import engram

    src = str(Path(engram.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory(prefix="engram-bench-shard-") as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "engram.bench.shard", "worker", str(world), str(Path(tmp) / "store"), str(out),
               json.dumps(args)]
        procs = [subprocess.Popen([*cmd[:5], str(r), *cmd[5:]], env=env, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        errs = [p.communicate(timeout=1800)[1] for p in procs]
        failed = [(r, p.returncode, e) for r, (p, e) in enumerate(zip(procs, errs)) if p.returncode != 0]
        if failed:
            r, code, err = failed[0]
            raise RuntimeError(f"bench shard: rank {r} of {world} exited {code}:\n{err[-3000:]}")
        return json.loads(out.read_text())


def _worker(rank: int, world: int, store: str, out: Path, args: dict[str, Any]) -> None:
    from engram.dist import Runtime
    from engram.dist.parallel import data_parallel
    from engram.dist.sharded import shard_tables
    from engram.model import build_model
    from engram.tokenizer import CompressionMap
    from engram.train.optim import TABLE_GROUP, build_optimizers, clip_grad_groups_

    torch.set_num_threads(1)
    rt = Runtime.init(rank, world, "cpu", timeout_s=300, init_method=f"file://{store}") if world > 1 else Runtime.single()
    cache = Path(args["cache"])
    cfg, tok, _ = _layout(args["preset"], args["corpus"], cache, args["tokenizer_bytes"])
    ids, seg = _stream(args["corpus"], tok, cache)
    torch.manual_seed(0)
    model = build_model(cfg, CompressionMap.build(tok).lookup).train()
    if rt.distributed:
        shard_tables(model, rt.rank, rt.world_size, rt.table_group)
    net = data_parallel(model, rt)
    opt = build_optimizers(model, 1e-3)
    table = next(iter(model.memory_tables().values()))
    tables = {id(p) for g in opt.param_groups if g["name"] == TABLE_GROUP for p in g["params"]}
    lookup_s, step_s, share = [], [], []
    warmup = 1
    for s in range(warmup + args["steps"]):
        ids_BT, seg_BT = _rank_batches(ids, seg, args["batch"], args["seq"], world, s)[rank]
        targets = torch.roll(ids_BT, -1, 1)
        hash_BTLH = model.hash(ids_BT, seg_BT)
        rt.barrier()
        t0 = time.perf_counter()
        table(hash_BTLH[:, :, 0]).float().square().sum().backward()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ex0 = table.store.stats.extra.get("exchange_s", 0.0)
        rt.barrier()
        t2 = time.perf_counter()
        net(ids_BT, seg_BT, hash_BTLH, targets, return_logits=False).loss.backward()
        params = list(model.parameters())
        clip_grad_groups_([p for p in params if id(p) not in tables], [p for p in params if id(p) in tables], 1.0,
                          "per_group", rt.all_reduce_sum if rt.distributed else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if s >= warmup:
            lookup_s.append(t1 - t0)
            step_s.append(t3 - t2)
            share.append((table.store.stats.extra.get("exchange_s", 0.0) - ex0) / (t3 - t2))
    if rt.is_main:
        step = statistics.median(step_s)
        out.write_text(json.dumps({
            "world": world, "lookup_ms": 1e3 * statistics.median(lookup_s), "step_ms": 1e3 * step,
            "tokens_per_s": world * args["batch"] * args["seq"] / step, "all_to_all_share": statistics.median(share),
        }))
    rt.close()


# ---------------------------------------------------------------------------------------------- table


def _table(preset: str, corpus: str, batch: int, seq: int, traffic: list[dict], timing: list[dict]) -> str:
    lines = [f"Sharded Engram tables: preset {preset}, {corpus} text, {batch} x {seq} tokens per rank per step",
             "",
             "traffic per rank (ids 8 B, rows and gradients fp32), and the rows each owner serves:",
             "| ranks | ownership | distinct rows/token | bytes/token dedup | bytes/token no dedup | dedup saves | "
             "max/mean rows served |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for t in traffic:
        saves = t["bytes_per_token_no_dedup"] / max(t["bytes_per_token_dedup"], 1e-9)
        lines.append(f"| {t['world']} | {t['ownership']} | {t['distinct_rows_per_token']:.2f} | "
                     f"{t['bytes_per_token_dedup']:,.0f} | {t['bytes_per_token_no_dedup']:,.0f} | {saves:.2f}x | "
                     f"{t['served_max_over_mean']:.3f} |")
    lines += ["", "time (gloo, one thread per rank; each rank its own batch), rank 0's medians:",
              "| ranks | lookup fwd+bwd ms | train step ms | tokens/s (all ranks) | vs 1 rank | all-to-all share of step |",
              "|---:|---:|---:|---:|---:|---:|"]
    for t in timing:
        lines.append(f"| {t['world']} | {t['lookup_ms']:.2f} | {t['step_ms']:.1f} | {t['tokens_per_s']:,.0f} | "
                     f"{t['speedup']:.2f}x | {100 * t['all_to_all_share']:.1f}% |")
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> int:
    world, rank, store, out, args = int(argv[0]), int(argv[1]), argv[2], Path(argv[3]), json.loads(argv[4])
    _worker(rank, world, store, out, args)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(_worker_main(sys.argv[2:]))
