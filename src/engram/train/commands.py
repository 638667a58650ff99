"""CLI subcommand ``train`` over engram.train.trainer (argument parsing only)."""

from __future__ import annotations

import argparse
import dataclasses
import os
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
    p.add_argument("--grad-clip", dest="grad_clip", type=NONNEG_FLOAT,
                   help=f"max gradient norm of each clipped group (default {d.grad_clip:g}; 0: no clipping)")
    p.add_argument("--grad-clip-groups", dest="grad_clip_groups", choices=["per_group", "global", "backbone"],
                   help="per_group (default): backbone and tables each by its own norm; global: one norm over "
                        "both; backbone: tables unclipped")
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


def _add_dist_options(p: argparse.ArgumentParser) -> None:
    from engram.dist.runtime import DEFAULT_TIMEOUT_S

    p.add_argument("--nproc", type=POS_INT, default=1,
                   help="processes on this machine (launched through torchrun; tables sharded across them, the "
                        "backbone data-parallel; --batch-size is the global batch). Several nodes: run "
                        "`torchrun ... -m engram.cli train ...` yourself (docs/scaleout.md)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=POS_FLOAT, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds before a collective gives up on a dead or stalled rank (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if there is one, else the CPU)")


def cmd_train(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # the launcher: start the workers, wait for them
        from engram.dist.launch import launch

        tcfg, _ = _train_config(args), preset(args.preset)  # a bad setting is reported once, here
        if tcfg.batch_size % args.nproc:
            raise ValueError(f"--batch-size {tcfg.batch_size} (the global batch) is not divisible by --nproc {args.nproc}")
        return launch(args.nproc, getattr(args, "argv", None) or sys.argv[1:])
    from engram.dist import Runtime
    from engram.train.trainer import train

    rt = Runtime.from_env(timeout_s=args.dist_timeout, device=args.device)
    ok = False
    try:
        res = train(preset(args.preset), _train_config(args), args.out, resume=args.resume, cache_dir=args.cache_dir,
                    progress=not args.no_progress, label=args.preset, runtime=rt)
        ok = True
    finally:
        rt.close(barrier=ok)  # after a failure another rank may be gone: leave without waiting for it
    if not rt.is_main:
        return 0
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
    _add_dist_options(t)
    t.set_defaults(func=cmd_train)
