"""The training loop: corpus -> tokenizer -> compression map -> token shards -> loader (hashing in its
background thread) -> EngramLM with the paper's optimizer split -> checkpoints, metrics, loss curve.

A run directory holds:
    config.json            model + train config of the run (also inside every checkpoint)
    tokenizer.json         the tokenizer the model was trained with
    compression.safetensors  the tokenizer compression map (raw id -> canonical id)
    metrics.jsonl          one record per logged step / evaluation
    loss.png               the loss curve
    checkpoints/step_*/    atomic checkpoints (see engram.train.checkpoint); ``latest`` names the newest

``train(..., resume=True)`` continues from the newest complete checkpoint bit-exactly: model, optimizer
(sparse table state included), loader position and RNG states are restored; metrics past the
checkpoint are dropped and recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engram.config import ModelConfig, TrainConfig, diff_configs, from_dict, to_dict, with_defaults
from engram.data.bpe import eot_id, load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_corpus_tokenizer
from engram.data.corpora import default_cache_dir, prepare
from engram.data.loader import EvalLoader, TrainLoader
from engram.data.shards import TokenDataset, prepare_tokens
from engram.io import atomic_write_json
from engram.model import EngramLM, build_model
from engram.tokenizer import CompressionMap
from engram.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engram.train.metrics import JsonlWriter, plot_loss_curves, read_jsonl
from engram.train.optim import build_optimizers
from engram.train.schedule import build_schedule

RUN_CONFIG = "config.json"
COMPRESSION_FILE = "compression.safetensors"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"


@dataclass
class RunData:
    """Everything a run needs besides the model: tokenizer, compression map, token datasets."""

    tokenizer: Any  # tokenizers.Tokenizer
    compression: CompressionMap
    datasets: dict[str, TokenDataset]
    model_cfg: ModelConfig  # the requested config, with vocab and pad ids taken from the tokenizer


def autocast(dtype: str):
    """bf16 autocast on CPU (about 3x faster here) or a no-op context for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def corpus_tokenizer(corpus_name: str, vocab_size: int, cache_dir: Path, max_bytes: int | None, corpus=None):
    """The cached byte-level BPE for (corpus, vocab size), trained on first use."""
    path = cache_dir / "tokenizers" / f"{corpus_name}-{vocab_size}-{max_bytes or 'all'}.json"
    if path.is_file():
        return load_tokenizer(path)
    corpus = corpus if corpus is not None else prepare(corpus_name, cache_dir)
    return train_corpus_tokenizer(corpus, vocab_size, path, max_bytes=max_bytes)


def fit_model_config(cfg: ModelConfig, tok) -> ModelConfig:
    """The model config with the tokenizer's vocabulary size and its separator as the Engram pad id."""
    pad = eot_id(tok)
    out = dataclasses.replace(cfg, vocab_size=tok.get_vocab_size())
    if out.engram is not None:
        out = dataclasses.replace(out, engram=dataclasses.replace(out.engram, pad_id=pad))
    if out.overencoding is not None:
        out = dataclasses.replace(out, overencoding=dataclasses.replace(out.overencoding, pad_id=pad))
    return out


def prepare_run_data(model_cfg: ModelConfig, tcfg: TrainConfig, cache_dir: Path) -> RunData:
    corpus = prepare(tcfg.corpus, cache_dir)
    if tcfg.tokenizer:
        tok = load_tokenizer(tcfg.tokenizer)
    else:
        tok = corpus_tokenizer(tcfg.corpus, model_cfg.vocab_size, cache_dir, tcfg.tokenizer_max_bytes, corpus)
    cmap = CompressionMap.build(tok)
    datasets = prepare_tokens(corpus, tok, cache_dir)
    return RunData(tok, cmap, datasets, fit_model_config(model_cfg, tok))


def run_config(model_cfg: ModelConfig, tcfg: TrainConfig, tok) -> dict[str, Any]:
    return {"model": to_dict(model_cfg), "train": to_dict(tcfg), "tokenizer": tokenizer_fingerprint(tok)}


def _resume_key(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must match to continue a run: the model, the tokenizer and everything that changes the
    batches or the update; ``steps`` and the logging/checkpoint cadence may change on resume. Fields
    added after a run was saved take their defaults."""
    train = with_defaults(TrainConfig, cfg["train"])
    train = {k: v for k, v in train.items() if k not in ("steps", "eval_every", "ckpt_every", "keep_checkpoints")}
    return {"model": with_defaults(ModelConfig, cfg["model"]), "train": train, "tokenizer": cfg["tokenizer"]}


@torch.no_grad()
def evaluate(model: EngramLM, loader: EvalLoader, dtype: str = "bf16") -> dict[str, float]:
    """Mean next-token loss (nats) over the loader's tokens, and perplexity."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        with autocast(dtype):
            out = model(batch.ids, batch.segment_ids, batch.hash_ids, batch.targets, return_logits=False)
        k = int((batch.targets != -100).sum())
        total += float(out.ce_loss) * k
        n += k
    model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


@dataclass
class TrainResult:
    run_dir: Path
    model: EngramLM
    step: int
    metrics: list[dict[str, Any]]
    final_val: dict[str, float] | None
    tokens_per_s: float


def train(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    label: str | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``. ``stop_after`` ends early at that step (after its
    checkpoint), as an interrupted run would."""
    run_dir = Path(run_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = prepare_run_data(model_cfg, tcfg, cache_dir)
    cfg = data.model_cfg
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, data.compression.lookup).train()
    opt = build_optimizers(model, tcfg.lr, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2), tcfg.table_lr_mult,
                           backbone=tcfg.backbone_optimizer)
    sched = _schedule(tcfg)
    hash_fn = model.hash if model.hasher is not None else None
    loader = TrainLoader(data.datasets["train"], tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed, hash_fn=hash_fn)
    val_loader = EvalLoader(data.datasets["val"], tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, hash_fn=hash_fn)
    config = run_config(cfg, tcfg, data.tokenizer)
    fingerprint = model.hasher.fingerprint() if model.hasher is not None else None
    ckpt_root = run_dir / CHECKPOINTS
    metrics_path = run_dir / METRICS_FILE

    step, tokens = 0, 0
    if resume and latest_checkpoint(ckpt_root) is not None:
        saved = json.loads((latest_checkpoint(ckpt_root) / "config.json").read_text())
        diffs = diff_configs(_resume_key(saved), _resume_key(config))
        if diffs:
            raise ValueError("cannot resume: the run was started with another configuration: " + "; ".join(diffs))
        ck = load_checkpoint(ckpt_root, model, opt, expected_config=saved, expected_fingerprint=fingerprint)
        step, tokens = ck.step, int(ck.trainer_state["tokens"])
        loader.load_state_dict(ck.trainer_state["loader"])
        kept = [r for r in read_jsonl(metrics_path) if r["step"] <= step] if metrics_path.exists() else []
        _rewrite_jsonl(metrics_path, kept)
    else:
        if ckpt_root.exists() and latest_checkpoint(ckpt_root) is not None:
            raise ValueError(f"{run_dir} already holds a run; pass resume=True (--resume) or use another directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_jsonl(metrics_path, [])
    save_tokenizer(data.tokenizer, run_dir / TOKENIZER_FILE)
    data.compression.save(run_dir / COMPRESSION_FILE)
    atomic_write_json(run_dir / RUN_CONFIG, config)

    writer = JsonlWriter(metrics_path)
    extra = {TOKENIZER_FILE: run_dir / TOKENIZER_FILE, COMPRESSION_FILE: run_dir / COMPRESSION_FILE,
             "hash_layout.json": model.hash_layout() or {}}

    def checkpoint(at: int) -> None:
        save_checkpoint(ckpt_root, at, model, opt, config, {"tokens": tokens, "loader": loader.state_dict()},
                        fingerprint=fingerprint, extra_files=extra, keep_last=tcfg.keep_checkpoints)

    end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
    bar = _progress(progress, step, tcfg.steps, label)
    final_val, t_start, tok_start = None, time.perf_counter(), tokens
    try:
        while step < end:
            batch = next(loader)
            opt.set_lr_factor(sched(step))
            with autocast(tcfg.dtype):
                out = model(batch.ids, batch.segment_ids, batch.hash_ids, batch.targets, return_logits=False)
            out.loss.backward()
            gnorm = _clip(model, tcfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_moe_bias()
            step += 1
            tokens += batch.ids.numel()
            loss = float(out.ce_loss.detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}; lower the learning rate")
            rate = (tokens - tok_start) / max(time.perf_counter() - t_start, 1e-9)
            rec: dict[str, Any] = {"step": step, "tokens": tokens, "train_loss": loss, "grad_norm": gnorm,
                                   "lr": opt.param_groups[0]["lr"], "tokens_per_s": rate}
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                final_val = evaluate(model, val_loader, tcfg.dtype)
                rec.update(val_loss=final_val["loss"], val_ppl=final_val["ppl"])
            writer.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", **({"val": f"{final_val['loss']:.3f}"} if "val_loss" in rec else {}))
            if step % tcfg.ckpt_every == 0 or step == end:
                checkpoint(step)
    finally:
        loader.close()
        writer.close()
        if bar is not None:
            bar.close()
    records = read_jsonl(metrics_path)
    if records:
        plot_loss_curves({label or run_dir.name: records}, run_dir / LOSS_PNG)
    if tokens > tok_start:
        rate = (tokens - tok_start) / max(time.perf_counter() - t_start, 1e-9)
    else:  # resumed a finished run: nothing trained now, report what the run measured
        rate = records[-1]["tokens_per_s"] if records else 0.0
    if final_val is None:  # e.g. a finished run resumed, or a stop between evaluations
        final_val = evaluate(model, val_loader, tcfg.dtype)
    return TrainResult(run_dir, model.eval(), step, records, final_val, rate)


def _schedule(t: TrainConfig):
    """lr factor per step; "step" is the paper's step decay (x0.316 at 80% and again at 90% of training)."""
    return build_schedule(t.schedule, total_steps=t.steps, warmup_steps=t.warmup_steps)


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the dense gradient norm (tables' sparse row gradients are left to Adam's normalisation)."""
    dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    if not dense:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(dense, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in dense])))


def _rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from engram.io import atomic_write

    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _progress(enabled: bool, start: int, total: int, label: str | None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=label or "train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedRun:
    model: EngramLM
    tokenizer: Any
    compression: CompressionMap
    config: dict[str, Any]
    step: int


def load_run(path: str | Path, step_dir: str | Path | None = None) -> LoadedRun:
    """Load a trained model for evaluation or generation from a run directory (or one checkpoint)."""
    path = Path(path)
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    ck_dir = Path(step_dir) if step_dir is not None else latest_checkpoint(root)
    if ck_dir is None:
        if (path / "manifest.json").is_file():
            ck_dir = path
        else:
            raise FileNotFoundError(f"no checkpoint under {path}")
    config = json.loads((ck_dir / "config.json").read_text())
    model_cfg = from_dict(ModelConfig, config["model"])
    tok = load_tokenizer(ck_dir / TOKENIZER_FILE)
    cmap = CompressionMap.load(ck_dir / COMPRESSION_FILE)
    model = build_model(model_cfg, cmap.lookup)
    fp = model.hasher.fingerprint() if model.hasher is not None else None
    ck = load_checkpoint(ck_dir, model, None, expected_config=config, expected_fingerprint=fp, restore_rng=False)
    return LoadedRun(model.eval(), tok, cmap, config, ck.step)
