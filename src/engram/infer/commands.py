"""CLI subcommands over engram.infer: ``eval`` and ``generate`` (argument parsing only)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from engram.argtypes import NONNEG_FLOAT, NONNEG_INT, POS_INT, UNIT_INTERVAL


def _placement(args: argparse.Namespace):
    from engram.memory.placement import Placement

    if args.table_dir and args.table_tier != "disk":
        raise ValueError("--table-dir is for --table-tier disk")
    cache = int(args.cache_mb * 2**20)
    kw = {}
    if args.cache_policy == "static":
        if not args.hotness:
            raise ValueError("--cache-policy static needs --hotness FILE (`engram tables hotness RUN --corpus NAME`)")
        from engram.memory.hotness import RowHotness

        hot = RowHotness.load(args.hotness)
        kw = {f"engram.{layer}": {"hot_ids": hot.ranked(layer)} for layer in hot.layers}
    return Placement(args.table_tier, args.table_dir, io=args.table_io, cache_bytes=cache,
                     cache_policy=args.cache_policy, cache_kw=kw)


def _add_tier_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table-tier", choices=["device", "host", "disk"], default="device",
                   help="where the Engram tables live (default: in memory on the device)")
    p.add_argument("--table-dir", help="with --table-tier disk: the row files (`engram tables export RUN DIR`)")
    p.add_argument("--table-io", choices=["pread", "mmap"], default="mmap", help="disk reads (default mmap)")
    p.add_argument("--cache-mb", type=NONNEG_FLOAT, default=0.0,
                   help="with --table-tier disk: a hot-row cache of this many MiB per table in RAM")
    p.add_argument("--cache-policy", choices=["lru", "lfu", "lfu-aging", "tinylfu", "static"], default="lfu-aging")
    p.add_argument("--hotness", help="for --cache-policy static: a hotness file (`engram tables hotness`)")


def cmd_eval(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.infer import evaluate_run

    res = evaluate_run(args.run, args.corpus, args.file, args.batches, args.batch_size, args.seq_len, args.cache_dir,
                       _placement(args), args.compile)
    if args.json:
        print(json.dumps(res), file=out)
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} nats/token, perplexity {res['ppl']:.2f} "
              f"over {res['tokens']:,} tokens (step {res['step']})", file=out)
    return 0


def cmd_generate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.infer import generate_text, generate_texts, read_prompts_file

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompt is not None:
        print(generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed, _placement(args)), file=out)
        return 0
    texts, res = generate_texts(args.run, read_prompts_file(args.prompts_file), args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, args.batch_size, _placement(args), args.prefetch)
    for t in texts:
        print(json.dumps(t), file=out)
    print(f"{len(texts)} prompts: prefill {res.prefill_tok_s:,.0f} tokens/s, decode {res.decode_tok_s:,.0f} tokens/s "
          f"({res.steps} decode steps, batch {args.batch_size})", file=out)
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
    e.add_argument("--compile", action="store_true", help="torch.compile each decoder block first")
    _add_tier_options(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained run (incremental decoding)")
    g.add_argument("run", help="run directory (or a checkpoint directory)")
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts-file", help="many prompts, one per line, decoded together (printed as JSON strings)")
    g.add_argument("--batch-size", type=POS_INT, default=8, help="with --prompts-file: decoding slots")
    g.add_argument("--prefetch", action="store_true", help="gather Engram rows in the background while blocks compute")
    g.add_argument("--max-new-tokens", type=NONNEG_INT, default=64)
    g.add_argument("--temperature", type=NONNEG_FLOAT, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=POS_INT, default=50)
    g.add_argument("--top-p", type=UNIT_INTERVAL, help="nucleus mass in (0, 1]")
    g.add_argument("--seed", type=NONNEG_INT, default=0)
    _add_tier_options(g)
    g.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------------------------------------- tables


def cmd_tables(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.infer import tables

    if args.action == "export":
        files = tables.export_tables(args.run, args.out, args.dtype, progress=not args.no_progress)
        for f in files:
            info = tables.table_info(f)
            print(f"{f}: {info['rows']:,} rows of {info['row_width']} ({args.dtype}), {info['bytes']:,} bytes", file=out)
    elif args.action == "info":
        info = tables.table_info(args.file)
        print(json.dumps(info, indent=2) if args.json else _info_text(info), file=out)
    elif args.action == "hotness":
        res = tables.hotness(args.run, args.corpus, args.out, args.max_tokens, args.cache_dir)
        print(f"{args.out}: {res['tokens']:,} tokens counted; rows touched: {res['touched']}", file=out)
    elif args.action == "verify":
        res = tables.verify_table(args.file, progress=not args.no_progress)
        print(f"{res['file']}: all {res['rows']:,} rows check out", file=out)
    else:
        res = tables.check_quantized(args.run, args.dtype, args.corpus, args.batches, args.batch_size, args.cache_dir)
        print(json.dumps(res) if args.json else _check_text(res), file=out)
    return 0


def _info_text(info: dict) -> str:
    f = info["format"]
    return "\n".join([
        f"{info['file']}: table {info['table']}, {info['rows']:,} rows x {info['row_width']} ({info['heads']} heads)",
        f"  rows stored as {f['kind']}, scales: {f['scales']}; record {f['record_size']} bytes, "
        f"{f['records_per_page']} per 4 KiB page ({info['page_use']:.1%} of each page used)",
        f"  {info['bytes']:,} bytes; trained in {info['train_dtype']}; hash layout {info['hash_fingerprint'][:16]}...",
        f"  exported from {info['source'].get('run')} at step {info['source'].get('step')}, "
        f"weights sha256 {info['source'].get('weights_sha256', '')[:16]}...",
    ])


def _check_text(r: dict) -> str:
    return (f"{r['dtype']} tables on {r['corpus']} ({r['tokens']:,} held-out tokens): loss {r['loss']:.4f} vs "
            f"{r['loss_fp32']:.4f} with fp32 rows ({r['loss_delta']:+.4f}), mean KL {r['mean_kl']:.2e} nats/token; "
            f"{r['table_bytes']:,} bytes vs {r['table_bytes_fp32']:,} ({r['bytes_saved']:.1%} saved)")


def add_tables_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tables", help="a run's Engram tables as row files: export, info, verify, check, hotness")
    acts = t.add_subparsers(dest="action", required=True)
    e = acts.add_parser("export", help="write each table as OUT/<table>.rows (atomic)")
    e.add_argument("run")
    e.add_argument("out", help="directory for the row files")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp8", "int8"], default="fp32")
    e.add_argument("--no-progress", action="store_true")
    i = acts.add_parser("info", help="print a row file's header")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    v = acts.add_parser("verify", help="check every row of a row file (names the first bad one)")
    v.add_argument("file")
    v.add_argument("--no-progress", action="store_true")
    c = acts.add_parser("check", help="held-out loss and KL of quantized tables against fp32, and bytes saved")
    c.add_argument("run")
    c.add_argument("--dtype", choices=["bf16", "fp8", "int8"], default="fp8")
    c.add_argument("--corpus", help="default: the run's training corpus (its validation split)")
    c.add_argument("--batches", type=POS_INT, default=16)
    c.add_argument("--batch-size", type=POS_INT, default=8)
    c.add_argument("--cache-dir")
    c.add_argument("--json", action="store_true")
    h = acts.add_parser("hotness", help="count how often each table row is used on a corpus's training split")
    h.add_argument("run")
    h.add_argument("--corpus", required=True)
    h.add_argument("--out", required=True, help="the hotness file to write (safetensors)")
    h.add_argument("--max-tokens", type=POS_INT)
    h.add_argument("--cache-dir")
    t.set_defaults(func=cmd_tables)
