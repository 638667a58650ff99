"""CLI subcommand ``bench NAME``: every benchmark compares against a baseline in the same run and prints a
table; ``--quick`` uses small sizes (seconds) for smoke tests."""

from __future__ import annotations

import argparse
from typing import Callable


def _benches() -> dict[str, tuple[Callable[..., dict], dict]]:
    """name -> (run function, its --quick keyword arguments). Imported when a benchmark runs, not at start-up."""
    from engram.bench import cache, generate, hashing, lookup, offload, shard, step, storage, train

    mods = {"hashing": hashing, "lookup": lookup, "step": step, "train": train, "storage": storage, "cache": cache,
            "generate": generate, "offload": offload, "shard": shard}
    return {name: (m.run, getattr(m, "QUICK", {})) for name, m in mods.items()}


BENCHES = ("hashing", "lookup", "step", "train", "storage", "cache", "generate", "offload", "shard")


def cmd_bench(args: argparse.Namespace) -> int:
    run, quick = _benches()[args.which]
    kw = dict(quick) if args.quick else {}
    if args.vs_hf:
        if args.which != "train":
            raise ValueError("--vs-hf belongs to `engram bench train`")
        kw["vs_hf"] = True
    res = run(**kw)
    print(res["table"])
    if args.json_out:
        from engram.io import atomic_write_json

        atomic_write_json(args.json_out, {k: v for k, v in res.items() if k != "table"})
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks against a baseline in the same run")
    b.add_argument("which", choices=BENCHES)
    b.add_argument("--quick", action="store_true", help="small sizes (seconds), for smoke tests")
    b.add_argument("--vs-hf", action="store_true",
                   help="train: time our dense backbone against transformers' Llama of the same shape, eager and compiled")
    b.add_argument("--json-out", help="also write the figures as JSON")
    b.set_defaults(func=cmd_bench)
