"""CLI subcommands over the training library: ``train``, ``eval``, ``generate``, ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from engram.config import PRESET_NAMES, TrainConfig, preset


# argparse types: a bad value is reported as "argument --NAME: ...", naming the option the user typed


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {v:g}")
        return v

    return parse


_POS_INT, _NONNEG_INT = _int_at_least(1), _int_at_least(0)
_POS_FLOAT, _NONNEG_FLOAT = _finite_float(0.0, lo_open=True), _finite_float(0.0)


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
    p.add_argument("--steps", type=_POS_INT, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", dest="batch_size", type=_POS_INT, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--seq-len", dest="seq_len", type=_POS_INT, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=_POS_FLOAT, help=f"backbone learning rate (default {d.lr}); tables get x{d.table_lr_mult}")
    p.add_argument("--table-lr-mult", dest="table_lr_mult", type=_POS_FLOAT)
    p.add_argument("--weight-decay", dest="weight_decay", type=_NONNEG_FLOAT)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup-steps", dest="warmup_steps", type=_NONNEG_INT)
    p.add_argument("--optimizer", dest="backbone_optimizer", choices=["adamw", "muon"])
    p.add_argument("--dtype", choices=["bf16", "fp32"])
    p.add_argument("--eval-every", dest="eval_every", type=_POS_INT)
    p.add_argument("--eval-batches", dest="eval_batches", type=_POS_INT)
    p.add_argument("--ckpt-every", dest="ckpt_every", type=_POS_INT)
    p.add_argument("--seed", type=_NONNEG_INT)
    p.add_argument("--loader-timeout", dest="loader_timeout", type=_POS_FLOAT,
                   help=f"seconds to wait for one batch from the loader thread (default {d.loader_timeout:g})")
    p.add_argument("--cache-dir", help="data cache (default $ENGRAM_CACHE_DIR or ~/.cache/engram)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------ train


def cmd_train(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.train.trainer import train

    model_cfg = preset(args.preset)
    res = train(model_cfg, _train_config(args), args.out, resume=args.resume, cache_dir=args.cache_dir,
                progress=not args.no_progress, label=args.preset)
    c = res.model.param_counts()
    val = f"{res.final_val['loss']:.4f} (ppl {res.final_val['ppl']:.1f})" if res.final_val else "-"
    print(f"trained {args.preset} to step {res.step}: val loss {val}, {res.tokens_per_s:,.0f} tokens/s, "
          f"P_tot {c['P_tot']:,}, P_act {c['P_act']:,}; run in {res.run_dir}", file=out)
    if res.empty_batches:
        print(f"note: {res.empty_batches} batch(es) had every target masked and contributed nothing", file=out)
    return 0


# ------------------------------------------------------------------------------------------------- eval


def evaluate_run(run: str, corpus: str | None = None, file: str | None = None, batches: int | None = 32,
                 batch_size: int = 8, seq_len: int | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Loss and perplexity of a trained run on a corpus's held-out split or on a text file."""
    from engram.data.corpora import default_cache_dir, prepare
    from engram.data.loader import EvalLoader
    from engram.data.shards import TokenDataset, prepare_tokens, tokenize_documents, write_token_dataset
    from engram.data.bpe import eot_id
    from engram.data.corpora import Document
    from engram.train.trainer import evaluate, load_run

    if (corpus is None) == (file is None):
        raise ValueError("give exactly one of --corpus NAME or --file PATH")
    for name, v in (("batches", batches), ("batch size", batch_size), ("sequence length", seq_len)):
        if v is not None and v < 1:
            raise ValueError(f"the number of {name} must be >= 1, got {v}" if name == "batches" else f"{name} must be >= 1, got {v}")
    text = read_text_file(file) if file is not None else None
    lr = load_run(run)
    T = seq_len or lr.config["train"]["seq_len"]
    if T > lr.model.cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds the model's context of {lr.model.cfg.max_seq_len} tokens")
    hash_fn = lr.model.hash if lr.model.hasher is not None else None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if text is not None:
            docs = [Document(text=text, source="file", path=str(file))]
            write_token_dataset(tokenize_documents(docs, lr.tokenizer), tmp, vocab_size=lr.tokenizer.get_vocab_size(),
                                eot_id=eot_id(lr.tokenizer))
            data, source = TokenDataset(tmp), str(file)
        else:
            c = prepare(corpus, cache)
            split = "val" if c.documents_of("val") else "train"
            data, source = prepare_tokens(c, lr.tokenizer, cache, (split,))[split], f"{corpus} ({split})"
        loader = EvalLoader(data, batch_size, T, batches, hash_fn=hash_fn, source=source)
        res = evaluate(lr.model, loader, lr.config["train"]["dtype"])
    return {"run": str(run), "step": lr.step, "source": source, **res}


def cmd_eval(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    res = evaluate_run(args.run, args.corpus, args.file, args.batches, args.batch_size, args.seq_len, args.cache_dir)
    if args.json:
        print(json.dumps(res), file=out)
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} nats/token, perplexity {res['ppl']:.2f} "
              f"over {res['tokens']:,} tokens (step {res['step']})", file=out)
    return 0


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a binary file (NUL bytes or invalid UTF-8) is refused, not scored."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a directory, expected a text file")
    data = p.read_bytes()
    if b"\0" in data[: 1 << 20]:
        raise ValueError(f"{p} looks binary (it contains NUL bytes); evaluation needs a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (invalid byte at offset {e.start}); evaluation needs a UTF-8 text file") from None


# --------------------------------------------------------------------------------------------- generate


def generate_text(run: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int | None = 0) -> str:
    from engram.data.bpe import eot_id
    from engram.train.trainer import load_run

    from engram.model import check_sampling

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    lr = load_run(run)
    eot = eot_id(lr.tokenizer)
    ids = [eot] + lr.tokenizer.encode(prompt).ids  # the separator opens every training document
    out = lr.model.generate([ids], max_new_tokens, temperature, top_k, top_p, eos_id=eot, seed=seed)[0]
    return prompt + lr.tokenizer.decode([t for t in out if t != eot])


def cmd_generate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    text = generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    print(text, file=out)
    return 0


# ------------------------------------------------------------------------------------------------ gates


def gates_of_run(run: str, text: str, out_png: str | None = None) -> dict[str, Any]:
    """Gate values of a trained run's Engram layers on ``text`` (and a heatmap PNG if asked)."""
    from engram.analysis.gates import gate_values, plot_gates
    from engram.data.bpe import eot_id
    from engram.train.trainer import load_run

    lr = load_run(run)
    values = gate_values(lr.model, lr.tokenizer, text, bos_id=eot_id(lr.tokenizer))
    if out_png:
        plot_gates(values, out_png, title=f"Engram gates: {Path(run).name}")
    return values


def cmd_gates(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
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


# ------------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from engram.train.demo import run_demo

    run_demo(args.out, steps=args.steps, cache_dir=args.cache_dir, progress=not args.no_progress, out=out)
    return 0


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model on a corpus")
    t.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESET_NAMES)}")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    t.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode,
                   help="continue from the newest checkpoint in --out (an error if there is none); "
                        "`--resume auto` starts fresh when there is none")
    _add_train_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss and perplexity of a trained run")
    e.add_argument("run", help="run directory (or a checkpoint directory)")
    e.add_argument("--corpus", help="evaluate on this corpus's held-out split (e.g. mini, brown, sympy)")
    e.add_argument("--file", help="evaluate on a text file")
    e.add_argument("--batches", type=_POS_INT, default=32)
    e.add_argument("--batch-size", type=_POS_INT, default=8)
    e.add_argument("--seq-len", type=_POS_INT, help="default: the run's training sequence length")
    e.add_argument("--cache-dir")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained run (incremental decoding)")
    g.add_argument("run", help="run directory (or a checkpoint directory)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_NONNEG_INT, default=64)
    g.add_argument("--temperature", type=_NONNEG_FLOAT, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_POS_INT, default=50)
    g.add_argument("--top-p", type=_finite_float(0.0, 1.0, lo_open=True), help="nucleus mass in (0, 1]")
    g.add_argument("--seed", type=_NONNEG_INT, default=0)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("gates", help="Engram gate per token of a text (numbers and a heatmap PNG)")
    q.add_argument("run", help="run directory (or a checkpoint directory)")
    q.add_argument("--text", required=True)
    q.add_argument("--png", help="write the heatmap here")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_gates)

    d = sub.add_parser("demo", help="train tiny MoE and tiny Engram-MoE side by side on `mini` and compare")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, help="steps per model (default: the demo's budget)")
    d.add_argument("--cache-dir")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
