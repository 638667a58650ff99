"""CLI subcommand ``train`` over engram.train.trainer (argument parsing only)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TextIO

from engram.argtypes import NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT
from engram.config import PRESET_NAMES, TrainConfig, preset


def _resume_mode(s: str):
    if s == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {s!r}")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(**given)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--corpus", help=f"corpus name (default {d.corpus}); see `engram data prepare`")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: a BPE trained on the corpus, cached)")
    p.add_argument("--steps", type=POS_INT, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", dest="batch_size", type=POS_INT, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--seq-len", dest="seq_len", type=POS_INT, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=POS_FLOAT, help=f"backbone learning rate (default {d.lr}); tables get x{d.table_lr_mult}")
    p.add_argument("--table-lr-mult", dest="table_lr_mult", type=POS_FLOAT)
    p.add_argument("--weight-decay", dest="weight_decay", type=NONNEG_FLOAT)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup-steps", dest="warmup_steps", type=NONNEG_INT)
    p.add_argument("--optimizer", dest="backbone_optimizer", choices=["adamw", "muon"])
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"],
                   help="compute dtype (default auto: bf16 where the CPU/GPU runs it fast, else fp32)")
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile each decoder block (faster steps after a one-off compile)")
    p.add_argument("--eval-every", dest="eval_every", type=POS_INT)
    p.add_argument("--eval-batches", dest="eval_batches", type=POS_INT)
    p.add_argument("--ckpt-every", dest="ckpt_every", type=POS_INT)
    p.add_argument("--seed", type=NONNEG_INT)
    p.add_argument("--loader-timeout", dest="loader_timeout", type=POS_FLOAT,
                   help=f"seconds to wait for one batch from the loader thread (default {d.loader_timeout:g})")
    p.add_argument("--cache-dir", help="data cache (default $ENGRAM_CACHE_DIR or ~/.cache/engram)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.train.trainer import train

    res = train(preset(args.preset), _train_config(args), args.out, resume=args.resume, cache_dir=args.cache_dir,
                progress=not args.no_progress, label=args.preset)
    c = res.model.param_counts()
    val = f"{res.final_val['loss']:.4f} (ppl {res.final_val['ppl']:.1f})" if res.final_val else "-"
    print(f"trained {args.preset} to step {res.step}: val loss {val}, {res.tokens_per_s:,.0f} tokens/s, "
          f"P_tot {c['P_tot']:,}, P_act {c['P_act']:,}; run in {res.run_dir}", file=out)
    if res.empty_batches:
        print(f"note: {res.empty_batches} batch(es) had every target masked and contributed nothing", file=out)
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model on a corpus")
    t.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESET_NAMES)}")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    t.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode,
                   help="continue from the newest checkpoint in --out (an error if there is none); "
                        "`--resume auto` starts fresh when there is none")
    _add_train_options(t)
    t.set_defaults(func=cmd_train)
