"""CLI subcommands over engram.analysis (argument parsing only): ``gates``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO


def cmd_gates(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.analysis.gates import gates_of_run

    values = gates_of_run(args.run, args.text, args.png)
    if args.json:
        print(json.dumps(values), file=out)
    else:
        for blk, per_branch in values["gates"].items():
            for m, row in enumerate(per_branch):
                cells = " ".join(f"{t!r}:{g:.2f}" for t, g in zip(values["tokens"], row))
                print(f"block {blk} branch {m}: {cells}", file=out)
    if args.png:
        print(f"heatmap: {args.png}", file=out)
    return 0


def add_gates_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("gates", help="Engram gate per token of a text (numbers and a heatmap PNG)")
    q.add_argument("run", help="run directory (or a checkpoint directory)")
    q.add_argument("--text", required=True)
    q.add_argument("--png", help="write the heatmap here")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_gates)
