"""CLI subcommands over engram.infer: ``eval`` and ``generate`` (argument parsing only)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from engram.argtypes import NONNEG_FLOAT, NONNEG_INT, POS_INT, UNIT_INTERVAL


def cmd_eval(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.infer import evaluate_run

    res = evaluate_run(args.run, args.corpus, args.file, args.batches, args.batch_size, args.seq_len, args.cache_dir)
    if args.json:
        print(json.dumps(res), file=out)
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} nats/token, perplexity {res['ppl']:.2f} "
              f"over {res['tokens']:,} tokens (step {res['step']})", file=out)
    return 0


def cmd_generate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.infer import generate_text

    print(generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed), file=out)
    return 0


def add_infer_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="loss and perplexity of a trained run")
    e.add_argument("run", help="run directory (or a checkpoint directory)")
    e.add_argument("--corpus", help="evaluate on this corpus's held-out split (e.g. mini, brown, sympy)")
    e.add_argument("--file", help="evaluate on a UTF-8 text file")
    e.add_argument("--batches", type=POS_INT, default=32)
    e.add_argument("--batch-size", type=POS_INT, default=8)
    e.add_argument("--seq-len", type=POS_INT, help="default: the run's training sequence length")
    e.add_argument("--cache-dir")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained run (incremental decoding)")
    g.add_argument("run", help="run directory (or a checkpoint directory)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=NONNEG_INT, default=64)
    g.add_argument("--temperature", type=NONNEG_FLOAT, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=POS_INT, default=50)
    g.add_argument("--top-p", type=UNIT_INTERVAL, help="nucleus mass in (0, 1]")
    g.add_argument("--seed", type=NONNEG_INT, default=0)
    g.set_defaults(func=cmd_generate)
