"""CLI subcommands over engram.interop: ``engram import demo|deepseek-v41`` and ``engram export deepseek-v41``
(argument parsing only; the work is in engram.interop.convert)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from engram.argtypes import NONNEG_INT, POS_FLOAT, POS_INT


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _summary(path, out: TextIO) -> None:
    from engram.interop.bundle import read_bundle

    info = read_bundle(path, verify="quick")
    rows = {int(k): v["rows"] for k, v in info.tables["layers"].items()}
    print(f"wrote {path}: layers {list(info.layers)} (rows {rows}), {info.n_branches} branches of width "
          f"{info.d_model}, hash layout {info.hash_layout['layers']} x {info.config.total_heads} heads, "
          f"from {info.source.get('kind')}", file=out)


def cmd_import_demo(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.interop.convert import import_demo

    path = import_demo(args.state_file, args.out, layer=args.layer, layers=args.layers, max_ngram=args.max_ngram,
                       heads=args.heads, start_size=args.start_size, seed=args.seed, pad_id=args.pad_id,
                       tokenizer=args.tokenizer, chunk_rows=args.chunk_rows)
    _summary(path, out)
    return 0


def cmd_import_v41(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.interop.convert import import_v41

    path = import_v41(args.src_dir, args.out, args.layers, tokenizer=args.tokenizer, chunk_rows=args.chunk_rows,
                      key_prefix=args.key_prefix, layers_all=args.layout_layers, max_ngram=args.max_ngram,
                      heads=args.heads, table_sizes=args.start_size, pad_id=args.pad_id, norm_eps=args.norm_eps)
    _summary(path, out)
    return 0


def cmd_export_v41(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.interop.convert import export_v41

    path = export_v41(args.bundle, args.out, chunk_rows=args.chunk_rows, key_prefix=args.key_prefix)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    print(f"wrote {path}: {len(index['weight_map'])} tensors, {index['metadata']['total_size']:,} bytes", file=out)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the bundle directory to write (replaced atomically)")
    p.add_argument("--tokenizer", help="tokenizer.json whose compression the hashes use (default: DeepSeek's)")
    p.add_argument("--chunk-rows", type=POS_INT, default=65536, help="table rows copied at a time (default 65536)")
    p.add_argument("--max-ngram", type=POS_INT, help="largest n-gram order")
    p.add_argument("--heads", type=POS_INT, help="heads per order")
    p.add_argument("--start-size", type=_int_list, help="prime search start per order, or one for all")
    p.add_argument("--pad-id", type=NONNEG_INT, help="raw pad id")


def add_import_parsers(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="DeepSeek's Engram weights -> an Engram bundle (docs/interop.md)")
    isub = imp.add_subparsers(dest="format", required=True)

    d = isub.add_parser("demo", help="the public demo's Engram state dict (.safetensors or torch.save file)")
    d.add_argument("state_file")
    _common(d)
    d.add_argument("--layer", type=NONNEG_INT, default=1, help="the module's layer_id (default 1)")
    d.add_argument("--layers", type=_int_list, default=[1, 15], help="the demo's layer_ids (default 1,15)")
    d.add_argument("--seed", type=NONNEG_INT, default=0)
    # the demo's own defaults, where the V4.1 importer reads config.json instead
    d.set_defaults(func=cmd_import_demo, max_ngram=3, start_size=[129_280 * 5], pad_id=2)

    v = isub.add_parser("deepseek-v41", help="Engram layers of a DeepSeek-V4.1 safetensors checkpoint directory")
    v.add_argument("src_dir")
    _common(v)
    v.add_argument("--layers", type=_int_list, help="Engram layers to import (default: all found)")
    v.add_argument("--layout-layers", type=_int_list,
                   help="the hash layout's layer ids (default: config.json's engram_layer_ids, else 1,14)")
    v.add_argument("--norm-eps", type=POS_FLOAT, help="RMSNorm epsilon (default: config.json's, else 1e-20)")
    v.add_argument("--key-prefix", help="tensor name prefix with {layer} (default: found, '...layers.{layer}.engram.')")
    v.set_defaults(func=cmd_import_v41)


def add_export_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="an Engram bundle -> DeepSeek's layout (docs/interop.md)")
    esub = exp.add_subparsers(dest="format", required=True)
    v = esub.add_parser("deepseek-v41", help="V4.1 safetensors (+ index and config.json), fp8 tables")
    v.add_argument("bundle")
    v.add_argument("--out", required=True, help="the directory to write")
    v.add_argument("--chunk-rows", type=POS_INT, default=65536, help="table rows copied at a time (default 65536)")
    v.add_argument("--key-prefix", default="layers.{layer}.engram.", help="tensor name prefix with {layer}")
    v.set_defaults(func=cmd_export_v41)


__all__ = ["add_export_parsers", "add_import_parsers", "cmd_export_v41", "cmd_import_demo", "cmd_import_v41"]
