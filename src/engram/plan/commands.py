"""``engram plan``: argument parsing only; the planner is ``engram.plan``."""

from __future__ import annotations

import argparse
import dataclasses
import json


def _cmd_plan(args: argparse.Namespace) -> int:
    from engram.config import preset
    from engram.plan import PlanConfig, corpus_rows_per_token, format_plan, plan, smallest_world_size

    cfg = preset(args.preset)
    measured = None
    rpt = args.rows_per_token
    if rpt is None and cfg.engram is not None:
        measured = corpus_rows_per_token(cfg, args.corpus, args.batch_size, args.seq_len, args.split, args.tokenizer,
                                         args.cache_dir, args.steps)
        rpt = measured.unique
    pc = PlanConfig(world_size=args.world_size, batch_size=args.batch_size, seq_len=args.seq_len,
                    backbone=args.backbone, optimizer=args.optimizer, param_dtype=args.param_dtype,
                    optim_dtype=args.optim_dtype, table_dtype=args.table_dtype,
                    table_optim_dtype=args.table_optim_dtype, wire_dtype=args.wire_dtype, rows_per_token=rpt,
                    packed=not args.no_packing, checkpointing=args.checkpointing, memory_gib=args.memory_gib)
    p = plan(cfg, pc, args.preset)
    if args.json:
        print(json.dumps({"memory_bytes": p.memory, "total_bytes": p.total, "traffic_bytes": p.traffic,
                          "rows_per_token": rpt, "world_size": args.world_size}))
    else:
        if measured is not None:
            print(f"measured on {args.corpus} ({args.split}): {measured.unique:.2f} distinct rows per token per "
                  f"Engram layer at {args.batch_size} x {args.seq_len} tokens a step, of {measured.positions} "
                  f"looked up ({measured.dedup_factor:.2f}x deduplication, {measured.steps} steps)")
        print(format_plan(p))
    if args.memory_gib is not None and not p.fits(args.memory_gib):
        for label, alt in (("this placement", pc), ("with --backbone sharded", dataclasses.replace(pc, backbone="sharded"))):
            w = smallest_world_size(cfg, alt, args.memory_gib, params=p.params)
            if w is not None:
                print(f"{label} fits in {args.memory_gib:g} GiB from {w} ranks")
                break
        p.check_fits()  # PlacementError: the CLI prints it and exits 2
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-rank memory and all-to-all traffic of a preset on N ranks")
    p.add_argument("--preset", required=True, help="e.g. engram-27b, engram-40b")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--backbone", choices=("replicated", "sharded"), default="replicated",
                   help="replicated: DDP; sharded: ZeRO-3/FSDP-style memory")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="backbone optimizer")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="backbone master weights")
    p.add_argument("--optim-dtype", choices=("fp32", "bf16"), default="fp32", help="backbone optimizer state")
    p.add_argument("--table-dtype", choices=("fp32", "bf16"), help="table rows (default: the preset's)")
    p.add_argument("--table-optim-dtype", choices=("fp32", "bf16"), default="fp32", help="sparse Adam moments")
    p.add_argument("--wire-dtype", choices=("fp32", "bf16"), default="fp32", help="rows and row gradients exchanged")
    p.add_argument("--memory-gib", type=float, help="per-rank memory: fail with a clear message if it does not fit")
    p.add_argument("--rows-per-token", type=float,
                   help="distinct rows per token per Engram layer after per-step dedup (skips measuring)")
    p.add_argument("--corpus", default="mini", help="text the rows per token are measured on (default: mini)")
    p.add_argument("--split", default="val", help="its split (default: val; held-out corpora are all val)")
    p.add_argument("--tokenizer", help="tokenizer.json for the measurement (default: DeepSeek's)")
    p.add_argument("--steps", type=int, default=8, help="at most this many steps are measured")
    p.add_argument("--cache-dir", help="data cache (default: $ENGRAM_CACHE_DIR or ~/.cache/engram)")
    p.add_argument("--no-packing", action="store_true", help="no document mask (one document per sequence)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_plan)
