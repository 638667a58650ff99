"""CLI subcommands over engram.analysis (argument parsing only): ``engram gates`` and
``engram analyze gates|logit-lens|cka|ablate`` (over ``engram.analysis.runs``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO


def _text_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="the held-out split of this corpus (e.g. en, mini, brown, sympy)")
    src.add_argument("--file", help="a UTF-8 text file")


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    p.add_argument("--cache-dir", help="data cache (default $ENGRAM_CACHE_DIR or ~/.cache/engram)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")


def cmd_gates(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.analysis.runs import analyze_gates

    res = analyze_gates(args.run, args.out, text=args.text, file=args.file)
    values = res["values"]
    for blk, per_branch in values["gates"].items():
        for m, row in enumerate(per_branch):
            top = sorted(zip(row, values["tokens"]), reverse=True)[:5]
            print(f"block {blk} branch {m}: mean gate {sum(row) / len(row):.3f}; highest "
                  + ", ".join(f"{t!r} {g:.2f}" for g, t in top), file=out)
    print("wrote " + ", ".join(res["files"].values()), file=out)
    return 0


def cmd_logit_lens(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.analysis.runs import analyze_logit_lens

    res = analyze_logit_lens([args.run] + ([args.run2] if args.run2 else []), args.out, args.corpus, args.file,
                             args.batches, args.batch_size, args.seq_len, args.dtype, args.cache_dir)
    for label, c in res["curves"].items():
        print(f"{label} ({c['tokens']:,} tokens of {c['source']}): KL per block "
              + " ".join(f"{k:.4f}" for k in c["kl"]), file=out)
    print("wrote " + ", ".join(res["files"].values()), file=out)
    return 0


def cmd_cka(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.analysis.runs import analyze_cka

    res = analyze_cka(args.run, args.run2, args.out, args.corpus, args.file, args.batches, args.batch_size,
                      args.seq_len, args.max_tokens, args.dtype, args.cache_dir, args.top_k)
    print(f"linear CKA (unbiased HSIC) over {res['tokens']:,} tokens of {res['source']}; rows: blocks of {args.run}", file=out)
    for i, row in enumerate(res["cka"]):
        print(f"  block {i}: " + " ".join(f"{v:.3f}" for v in row)
              + f"   soft alignment {res['alignment_a_in_b'][i]:.2f}", file=out)
    print("wrote " + ", ".join(res["files"].values()), file=out)
    return 0


def cmd_ablate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.analysis.runs import analyze_ablation

    res = analyze_ablation(args.run, args.out, args.probes, args.in_context, args.seed, args.heldout_batches,
                           args.dtype, args.cache_dir, args.min_count)
    print(res["markdown"], file=out)
    print("wrote " + ", ".join(res["files"].values()), file=out)
    return 0


def cmd_engram_gates(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
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
    """``engram gates``: the gates of a text, printed (or JSON) and as a heatmap."""
    q = sub.add_parser("gates", help="Engram gate per token of a text (numbers and a heatmap PNG)")
    q.add_argument("run", help="run directory (or a checkpoint directory)")
    q.add_argument("--text", required=True)
    q.add_argument("--png", help="write the heatmap here")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_engram_gates)


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="look inside trained runs: gates, LogitLens, CKA, Engram-off ablation")
    asub = a.add_subparsers(dest="analysis", required=True)

    g = asub.add_parser("gates", help="per-token Engram gates: heatmap PNG, shaded-text HTML, JSON")
    g.add_argument("run", help="run directory (or a checkpoint directory)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--file", help="a UTF-8 text file")
    g.add_argument("--out", default="runs/analysis", help="output directory (default runs/analysis)")
    g.set_defaults(func=cmd_gates)

    lens = asub.add_parser("logit-lens", help="KL(final || block read through the head) per block, one or two runs")
    lens.add_argument("run")
    lens.add_argument("run2", nargs="?", help="a second run to draw on the same plot")
    _text_source(lens)
    lens.add_argument("--batches", type=int, default=8, help="evaluation batches (default 8)")
    lens.add_argument("--batch-size", type=int, default=8)
    lens.add_argument("--seq-len", type=int, help="default: the run's training sequence length")
    _common(lens, "runs/analysis")
    lens.set_defaults(func=cmd_logit_lens)

    c = asub.add_parser("cka", help="linear CKA between every block pair of two runs, soft alignment")
    c.add_argument("run")
    c.add_argument("run2")
    _text_source(c)
    c.add_argument("--batches", type=int, default=4, help="evaluation batches (default 4)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seq-len", type=int, help="default: the first run's training sequence length")
    c.add_argument("--max-tokens", type=int, default=8192, help="positions compared (default 8192)")
    c.add_argument("--top-k", type=int, default=5,
                   help="blocks averaged in the soft alignment (default 5, the paper's; use fewer for shallow models)")
    _common(c, "runs/analysis")
    c.set_defaults(func=cmd_cka)

    ab = asub.add_parser("ablate", help="retention with Engram switched off, on factual and in-context probes")
    ab.add_argument("run")
    ab.add_argument("--probes", type=int, default=200, help="factual probes at most (default 200)")
    ab.add_argument("--in-context", type=int, default=100, help="probes per in-context task (default 100)")
    ab.add_argument("--min-count", type=int, default=20, help="factual: occurrences a context needs (default 20)")
    ab.add_argument("--seed", type=int, default=0, help="seed of the synthetic in-context probes")
    ab.add_argument("--heldout-batches", type=int, default=4, help="held-out batches for loss on/off (0: skip)")
    _common(ab, "runs/analysis")
    ab.set_defaults(func=cmd_ablate)


__all__ = ["add_analyze_parser", "add_gates_parser"]
