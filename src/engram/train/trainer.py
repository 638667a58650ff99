"""The training loop: corpus -> tokenizer -> compression map -> token shards -> loader (hashing in its
background thread) -> EngramLM with the paper's optimizer split -> checkpoints, metrics, loss curve.

A run directory holds:
    .lock                  an exclusive OS lock while a process trains in it (see engram.io.RunLock)
    config.json            model + train config of the run (also inside every checkpoint)
    tokenizer.json         the tokenizer the model was trained with
    compression.safetensors  the tokenizer compression map (raw id -> canonical id)
    metrics.jsonl          one record per logged step / evaluation
    loss.png               the loss curve
    checkpoints/step_*/    atomic checkpoints (see engram.checkpoint); ``latest`` names the newest

``train(..., resume=True)`` continues from the newest complete checkpoint bit-exactly: model, optimizer
(sparse table state included), loader position and RNG states are restored; metrics past the
checkpoint are dropped and recomputed. ``resume=True`` with no checkpoint is an error (a typo in
``--out`` must not silently start over); ``resume="auto"`` starts fresh then, for job scripts.

One process trains in a run directory at a time: a second one fails at once, naming the holder's pid.

Where it runs is a ``Runtime`` (engram.dist): a device, and for a job of several processes the rank,
world size and process groups. One code path serves both: with more than one process the tables are
sharded by rows across ranks (engram.dist.sharded), the backbone is data-parallel (DDP, tables excluded),
each rank takes its 1/world part of every batch of ``batch_size`` sequences (the global batch, so a run
resumes at another world size on the same batches), rank 0 holds the run lock and writes the run's files,
and checkpoints are saved by all ranks together. A single process is a runtime of world size 1, for
which every collective is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from engram.config import ModelConfig, TrainConfig, diff_configs, to_dict, with_defaults
from engram.data.bpe import eot_id, load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_corpus_tokenizer
from engram.data.corpora import CORPORA, default_cache_dir, prepare
from engram.data.loader import EvalLoader, TrainLoader
from engram.data.shards import TokenDataset, prepare_tokens
from engram.dist import Runtime
from engram.dist.parallel import data_parallel
from engram.dist.sharded import shard_tables
from engram.io import RunLock, atomic_write, atomic_write_json, fault_point
from engram.model import EngramLM, build_model
from engram.tokenizer import CompressionMap
from engram.checkpoint import CONFIG_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from engram.infer.evaluate import evaluate
from engram.infer.run import (CHECKPOINTS, COMPRESSION_FILE, LOSS_PNG, METRICS_FILE, RUN_CONFIG, TOKENIZER_FILE,
                              read_config_json)
from engram.runtime import autocast, compile_blocks
from engram.train.metrics import JsonlWriter, plot_loss_curves, read_jsonl
from engram.train.optim import TABLE_GROUP, EngramOptimizer, build_optimizers, clip_grad_groups_
from engram.train.schedule import build_schedule

Resume = bool | Literal["auto"]


@dataclass
class RunData:
    """Everything a run needs besides the model: tokenizer, compression map, token datasets."""

    tokenizer: Any  # tokenizers.Tokenizer
    compression: CompressionMap
    datasets: dict[str, TokenDataset]
    model_cfg: ModelConfig  # the requested config, with vocab and pad ids taken from the tokenizer


def corpus_tokenizer(corpus_name: str, vocab_size: int, cache_dir: Path, max_bytes: int | None, corpus=None):
    """The cached byte-level BPE for (corpus, vocab size), trained on first use (and again if the cached
    file is unreadable)."""
    path = cache_dir / "tokenizers" / f"{corpus_name}-{vocab_size}-{max_bytes or 'all'}.json"
    if path.is_file():
        try:
            return load_tokenizer(path)
        except ValueError:
            pass  # a damaged cache entry: rebuild it below
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
    if tcfg.corpus in CORPORA and CORPORA[tcfg.corpus].eval_only:
        trainable = ", ".join(n for n, s in CORPORA.items() if not s.eval_only)
        raise ValueError(f"corpus {tcfg.corpus!r} is held out for evaluation only; train on one of: {trainable}")
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


# what may differ between a run and its resumption: its length, cadences, where files live (the tokenizer
# is compared by content, its fingerprint, not by the path it was given at), and the compute dtype, which
# depends on the machine ("auto"; a run started in bf16 may continue in fp32 elsewhere: its state is fp32
# either way, only bit-exactness across the switch is lost)
_RESUMABLE_CHANGES = ("steps", "eval_every", "ckpt_every", "keep_checkpoints", "tokenizer", "loader_timeout", "dtype",
                      "compile")
# fields added with a default that differs from what runs did before: a saved config without one trained so
_TRAIN_BEFORE = {"grad_clip_groups": "backbone"}


def _resume_key(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must match to continue a run, with configs saved by older versions brought up to date
    (a missing field takes its default, which keeps the old behaviour, or its old value in _TRAIN_BEFORE)."""
    saved = {**_TRAIN_BEFORE, **cfg["train"]}
    train = {k: v for k, v in with_defaults(TrainConfig, saved).items() if k not in _RESUMABLE_CHANGES}
    return {"model": with_defaults(ModelConfig, cfg["model"]), "train": train, "tokenizer": cfg["tokenizer"]}


@dataclass
class TrainResult:
    run_dir: Path
    model: EngramLM
    step: int
    metrics: list[dict[str, Any]]  # rank 0's records (other ranks of a job: none)
    final_val: dict[str, float] | None
    tokens_per_s: float
    empty_batches: int = 0  # batches skipped this session because every target was masked


@dataclass
class _Run:
    """The objects of one training session, built by ``_build_run``."""

    cfg: ModelConfig
    tcfg: TrainConfig
    data: RunData
    model: EngramLM
    opt: EngramOptimizer
    loader: TrainLoader
    val_loader: EvalLoader
    config: dict[str, Any]
    run_dir: Path
    runtime: Runtime = field(default_factory=Runtime.single)
    net: torch.nn.Module | None = None  # what a training step calls: the model, or DDP around it (``train``)
    step: int = 0
    tokens: int = 0
    empty_batches: int = 0
    extra_files: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.model

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def main(self) -> bool:
        return self.runtime.is_main

    def sum_over_ranks(self):
        """``runtime.all_reduce_sum`` in a job of several processes, None alone (nothing to sum)."""
        return self.runtime.all_reduce_sum if self.runtime.distributed else None


def train(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: Resume = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    label: str | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``. ``stop_after`` ends early at that step (after its
    checkpoint), as an interrupted run would. ``runtime`` says where (default: one process on the CPU);
    in a job of several processes every rank calls ``train`` with its own runtime."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    rt = runtime if runtime is not None else Runtime.single()
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} exists and is not a directory")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lock = rt.agree(lambda: RunLock(run_dir).acquire() if rt.is_main else None, "locking the run directory")
    try:  # rank 0 holds the lock on behalf of the job
        run = rt.agree(lambda: _build_run(model_cfg, tcfg, run_dir, cache_dir, rt), "building the run")
        run.net = data_parallel(run.model, rt)  # collective: outside ``agree``, once every rank has its model
        rt.agree(lambda: _start_or_resume(run, resume), "starting or resuming the run")
        end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
        return _train_until(run, end, progress and rt.is_main, label)
    finally:
        if lock is not None:
            lock.release()


def _build_run(model_cfg: ModelConfig, tcfg: TrainConfig, run_dir: Path, cache_dir: Path,
               rt: Runtime | None = None) -> _Run:
    rt = rt if rt is not None else Runtime.single()
    data = prepare_run_data(model_cfg, tcfg, cache_dir)
    cfg = data.model_cfg
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, data.compression.lookup).train()
    if rt.distributed:  # every rank built the same tables (same seed): each keeps its rows
        shard_tables(model, rt.rank, rt.world_size, rt.table_group)
    model.to(rt.device)
    if tcfg.compile:
        compile_blocks(model)
    opt = build_optimizers(model, tcfg.lr, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2), tcfg.table_lr_mult,
                           backbone=tcfg.backbone_optimizer)
    hash_fn = model.hash if model.hasher is not None else None
    shard, pin = (rt.rank, rt.world_size), rt.device.type == "cuda"
    loader = TrainLoader(data.datasets["train"], tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed, hash_fn=hash_fn,
                         timeout=tcfg.loader_timeout, shard=shard, pin_memory=pin)
    val_loader = EvalLoader(data.datasets["val"], tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, hash_fn=hash_fn,
                            timeout=tcfg.loader_timeout, source=f"corpus {tcfg.corpus!r} validation split",
                            shard=shard, pin_memory=pin)
    extra = {TOKENIZER_FILE: run_dir / TOKENIZER_FILE, COMPRESSION_FILE: run_dir / COMPRESSION_FILE}
    return _Run(cfg, tcfg, data, model, opt, loader, val_loader, run_config(cfg, tcfg, data.tokenizer), run_dir,
                rt, extra_files=extra)


def _start_or_resume(run: _Run, resume: Resume) -> None:
    """Restore the newest checkpoint (resume) or start a fresh run; then write the run's files (rank 0)."""
    latest = latest_checkpoint(run.ckpt_root)
    if resume and latest is not None:
        saved = read_config_json(latest / CONFIG_FILE)
        diffs = diff_configs(_resume_key(saved), _resume_key(run.config))
        if diffs:
            raise ValueError("cannot resume: the run was started with another configuration: " + "; ".join(diffs))
        ck = load_checkpoint(latest, run.model, run.opt, expected_config=saved)
        run.step, run.tokens = ck.step, int(ck.trainer_state["tokens"])
        run.loader.load_state_dict(ck.trainer_state["loader"])
        if run.main:
            kept = [r for r in read_jsonl(run.metrics_path) if r["step"] <= run.step] if run.metrics_path.exists() else []
            _rewrite_jsonl(run.metrics_path, kept)
    elif resume is True:
        raise ValueError(f"nothing to resume: {run.ckpt_root} holds no complete checkpoint; start without --resume "
                         "(or pass --resume auto to start fresh when there is none)")
    elif latest is not None:
        raise ValueError(f"{run.run_dir} already holds a run; pass resume=True (--resume) or use another directory")
    elif run.main:
        _rewrite_jsonl(run.metrics_path, [])
    if run.main:
        save_tokenizer(run.data.tokenizer, run.run_dir / TOKENIZER_FILE)
        run.data.compression.save(run.run_dir / COMPRESSION_FILE)
        atomic_write_json(run.run_dir / RUN_CONFIG, run.config)


def _forward_backward(run: _Run, batch) -> tuple[float, int]:
    """Forward and backward of this rank's part of the global batch; returns (the global batch's mean
    cross-entropy, its number of targets).

    Each rank's loss is its cross-entropy sum over the global number of targets, times the world size:
    DDP and the sharded lookups average gradients over ranks, so the gradients are exactly those of the
    global batch's mean loss even when ranks hold different numbers of targets (alone: the plain loss)."""
    rt = run.runtime
    n_local = int((batch.targets != -100).sum())
    with autocast(run.tcfg.dtype, batch.ids.device):
        out = run.net(batch.ids, batch.segment_ids, batch.hash_ids, batch.targets, return_logits=False)
    ce = float(out.ce_loss.detach())
    if not rt.distributed:
        out.loss.backward()
        return ce, n_local
    sums = rt.all_reduce_sum(torch.tensor([ce * n_local, n_local], dtype=torch.float64)).tolist()
    n_global = int(sums[1])
    scale = rt.world_size * n_local / max(n_global, 1)
    (out.ce_loss * scale + out.aux_loss).backward()
    return sums[0] / max(n_global, 1), n_global


def _clip(run: _Run) -> tuple[float, float]:
    """Clip the backbone's and the tables' gradients as configured; their norms before clipping."""
    tables = {id(p) for g in run.opt.param_groups if g["name"] == TABLE_GROUP for p in g["params"]}
    backbone = [p for p in run.model.parameters() if id(p) not in tables]
    table_params = [p for p in run.model.parameters() if id(p) in tables]
    return clip_grad_groups_(backbone, table_params, run.tcfg.grad_clip, run.tcfg.grad_clip_groups,
                             run.sum_over_ranks())


def _train_step(run: _Run, sched) -> dict[str, Any]:
    """One optimizer step on the next batch; returns its metrics record (without evaluation)."""
    rt = run.runtime
    fault_point("train.step")  # tests kill a rank here
    batch = next(run.loader).to(rt.device, non_blocking=True)
    run.opt.set_lr_factor(sched(run.step))
    loss, n_targets = _forward_backward(run, batch)
    gnorm, table_norm = _clip(run)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if rt.distributed:  # every rank applies the same bias step, from the whole batch's expert loads
        for moe in run.model.moe_layers():
            rt.all_reduce_sum(moe.expert_load)
    run.model.update_moe_bias()
    run.step += 1
    run.tokens += batch.ids.numel() * rt.world_size
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} at step {run.step}; lower the learning rate")
    rec: dict[str, Any] = {"step": run.step, "tokens": run.tokens, "train_loss": loss, "grad_norm": gnorm,
                           "lr": run.opt.param_groups[0]["lr"]}
    if run.model.memory_tables():
        rec["table_grad_norm"] = table_norm
    if n_targets == 0:  # loss is 0 by definition: say so, never a NaN
        run.empty_batches += 1
        rec["empty_batch"] = True
    return rec


def _checkpoint(run: _Run, at: int) -> None:
    save_checkpoint(run.ckpt_root, at, run.model, run.opt, run.config,
                    {"tokens": run.tokens, "loader": run.loader.state_dict()},
                    extra_files=run.extra_files, keep_last=run.tcfg.keep_checkpoints,
                    comm=run.runtime if run.runtime.distributed else None)


def _evaluate(run: _Run) -> dict[str, float]:
    return evaluate(run.model, run.val_loader, run.tcfg.dtype, run.sum_over_ranks())


def _train_until(run: _Run, end: int, progress: bool, label: str | None) -> TrainResult:
    tcfg = run.tcfg
    sched = build_schedule(tcfg.schedule, total_steps=tcfg.steps, warmup_steps=tcfg.warmup_steps)
    writer = JsonlWriter(run.metrics_path) if run.main else None
    bar = _progress(progress, run.step, tcfg.steps, label)
    final_val, t_start, tok_start = None, time.perf_counter(), run.tokens
    try:
        while run.step < end:
            with run.runtime.guard(f"training step {run.step + 1}"):
                rec = _train_step(run, sched)
                rec["tokens_per_s"] = (run.tokens - tok_start) / max(time.perf_counter() - t_start, 1e-9)
                if run.step % tcfg.eval_every == 0 or run.step == tcfg.steps:
                    final_val = _evaluate(run)
                    rec.update(val_loss=final_val["loss"], val_ppl=final_val["ppl"])
            if writer is not None:
                writer.write(rec)
            if bar is not None:
                bar.update(1)
                post = {"val": f"{final_val['loss']:.3f}"} if "val_loss" in rec else {}
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", **post)
            if run.step % tcfg.ckpt_every == 0 or run.step == end:
                with run.runtime.guard(f"saving the checkpoint of step {run.step}"):
                    _checkpoint(run, run.step)
        with run.runtime.guard("the final evaluation"):
            return _finish(run, final_val, t_start, tok_start, label, writer)
    finally:
        run.loader.close()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()


def _finish(run: _Run, final_val: dict | None, t_start: float, tok_start: int, label: str | None,
            writer: JsonlWriter | None) -> TrainResult:
    if writer is not None:
        writer.close()
    records = read_jsonl(run.metrics_path) if run.main else []
    if records:
        plot_loss_curves({label or run.run_dir.name: records}, run.run_dir / LOSS_PNG)
    if run.tokens > tok_start:
        rate = (run.tokens - tok_start) / max(time.perf_counter() - t_start, 1e-9)
    else:  # resumed a finished run: nothing trained now, report what the run measured
        rate = records[-1]["tokens_per_s"] if records else 0.0
    if final_val is None:  # e.g. a finished run resumed, or a stop between evaluations
        final_val = _evaluate(run)
    return TrainResult(run.run_dir, run.model.eval(), run.step, records, final_val, rate, run.empty_batches)


def _rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _progress(enabled: bool, start: int, total: int, label: str | None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=label or "train", unit="step", dynamic_ncols=True)
