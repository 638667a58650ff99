"""Train every (variant, seed) of an experiment, evaluate it on held-out text, write a summary per run.

A run is identified by its config hash: sha256 of the canonical JSON of its model config, training config
and evaluation sets (16 hex digits). The runner skips a run only when a summary carrying that hash exists;
anything else is trained with ``resume="auto"``, so an interrupted run continues from its newest
checkpoint (bit-exactly, see docs/training.md) and an experiment can be finished across sessions.

Layout (``results`` is committed; ``runs`` holds checkpoints and is not):
    RESULTS/SIZE/EXPERIMENT/summaries/VARIANT-sSEED-HASH8.json
    RUNS/SIZE/EXPERIMENT/VARIANT-sSEED-HASH8/          a training run directory

Runs go seed by seed (every variant of seed 0, then seed 1, ...), so a partial experiment always holds
complete pairs for the comparisons.

Several processes may run one experiment at once and share its runs: each run is claimed with an OS lock
(``RUNS/SIZE/EXPERIMENT/.claims/NAME``) for as long as one process trains and evaluates it; the others skip
it and take the next. Whether two one-thread processes beat one two-thread process depends on the model
(docs/experiments.md has the figures: Engram runs gain, dense runs lose).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from engram.config import ModelConfig, TrainConfig, to_dict
from engram.io import RunLock, RunLockedError, atomic_write_json

from experiments.specs import SIZES, Experiment, Size, experiments, missing_fields

SUMMARY_FORMAT = "engram-experiment-summary-v1"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunPlan:
    """One (variant, seed) of an experiment, fully specified."""

    experiment: str
    variant: str
    seed: int
    size: str
    model: ModelConfig
    train: TrainConfig
    eval_sets: tuple[tuple[str, int], ...]

    def config(self) -> dict:
        return {"model": to_dict(self.model), "train": to_dict(self.train), "eval": [list(e) for e in self.eval_sets]}

    def hashed_config(self) -> dict:
        """``config()`` without fields added after runs were first recorded, where they hold the value that
        reproduces the behaviour from before they existed: adding an option must not orphan finished runs."""
        cfg = self.config()
        for part, fields in ADDED_FIELDS.items():
            for name, legacy in fields.items():
                if cfg[part].get(name, legacy) == legacy:
                    cfg[part].pop(name, None)
        return cfg

    @property
    def config_hash(self) -> str:
        return config_hash(self.hashed_config())

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}-{self.config_hash[:8]}"


# fields added to the configs after the first runs were recorded, with the value that behaves as before
ADDED_FIELDS: dict[str, dict[str, object]] = {"model": {}, "train": {"compile": False, "grad_clip_groups": "backbone"}}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def default_dtype() -> str:
    """bf16 where this machine runs it fast, else fp32 (engram.runtime.resolve_dtype). Runs record the
    resolved dtype, not "auto", so a run's config hash says what it computed in."""
    from engram.runtime import resolve_dtype

    return resolve_dtype("auto")


def plan_experiment(
    experiment: str,
    size: str | Size = "xs",
    seeds: int | None = None,
    tokens: int | None = None,
    dtype: str | None = None,
) -> tuple[list[RunPlan], list[str]]:
    """The runs of an experiment (seed-major order) and the variants left out, with the reason."""
    sz = SIZES[size] if isinstance(size, str) else size
    spec = _experiment(experiment, sz)
    n_seeds = seeds if seeds is not None else sz.seeds
    if n_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {n_seeds}")
    dtype = dtype or default_dtype()
    runnable, left_out = [], []
    for v in spec.variants:
        missing = missing_fields(v)
        if missing:
            left_out.append(f"{v.name}: needs EngramConfig.{', '.join(missing)}, which this version lacks")
        else:
            runnable.append((v.name, v.build(sz)))
    plans = [RunPlan(experiment, name, seed, sz.name, model, sz.train_config(experiment, seed, tokens, dtype), sz.eval_sets)
             for seed in range(n_seeds) for name, model in runnable]
    return plans, left_out


def _experiment(name: str, size: Size) -> Experiment:
    table = experiments(size)
    if name not in table:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(table)}")
    return table[name]


# ------------------------------------------------------------------------------------------ summaries


def summary_dir(results: Path, size: str, experiment: str) -> Path:
    return Path(results) / size / experiment / "summaries"


def find_summary(results: Path, plan: RunPlan) -> Path | None:
    """The summary carrying this plan's config hash, if one exists."""
    for path in sorted(summary_dir(results, plan.size, plan.experiment).glob(f"*-{plan.config_hash[:8]}.json")):
        if json.loads(path.read_text()).get("config_hash") == plan.config_hash:
            return path
    return None


def load_summaries(results: Path, plans: list[RunPlan]) -> dict[tuple[str, int], dict]:
    """(variant, seed) -> summary for every plan that has one."""
    out = {}
    for p in plans:
        path = find_summary(results, p)
        if path is not None:
            out[(p.variant, p.seed)] = json.loads(path.read_text())
    return out


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": _cpu_model() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------ run


def run_one(plan: RunPlan, results: Path, runs: Path, cache_dir: Path | None = None, progress: bool = False) -> dict:
    """Train (or resume) one run, evaluate it on the held-out sets, write and return its summary."""
    from engram.train.trainer import train  # the library's training function (the runner's one entry into it)

    run_dir = Path(runs) / plan.size / plan.experiment / plan.name
    resumed_from = _last_step(run_dir)
    t0 = time.perf_counter()
    res = train(plan.model, plan.train, run_dir, resume="auto", cache_dir=cache_dir, progress=progress,
                label=f"{plan.variant} s{plan.seed}")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    held_out = evaluate_held_out(plan, run_dir, cache_dir)
    records = res.metrics
    summary = {
        "format": SUMMARY_FORMAT,
        "experiment": plan.experiment,
        "variant": plan.variant,
        "size": plan.size,
        "seed": plan.seed,
        "config_hash": plan.config_hash,
        "config": plan.config(),
        "git": git_state(),
        "held_out": held_out,
        "params": res.model.param_counts(),
        "steps": res.step,
        "tokens_trained": records[-1]["tokens"] if records else 0,
        "final_train_loss": records[-1]["train_loss"] if records else None,
        "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "tokens_per_s": res.tokens_per_s,
        "wall_seconds": {"train": train_s, "eval": time.perf_counter() - t1},
        "resumed_from_step": resumed_from,
        "machine": machine(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.relative_to(Path(runs))),  # under the --runs root: no machine's paths in summaries
    }
    out = summary_dir(results, plan.size, plan.experiment) / f"{plan.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, summary)
    return summary


def evaluate_held_out(plan: RunPlan, run_dir: Path, cache_dir: Path | None) -> dict[str, dict]:
    """Loss on each held-out set of the plan (``engram.infer.evaluate_run``, the run's own batch shape)."""
    from engram.infer import evaluate_run

    out = {}
    for corpus, batches in plan.eval_sets:
        r = evaluate_run(str(run_dir), corpus=corpus, batches=batches, batch_size=plan.train.batch_size,
                         seq_len=plan.train.seq_len, cache_dir=str(cache_dir) if cache_dir else None)
        out[corpus] = {"loss": r["loss"], "ppl": r["ppl"], "tokens": r["tokens"], "source": r["source"]}
    return out


def _last_step(run_dir: Path) -> int | None:
    """The last step a previous session logged in this run directory (None: a fresh run)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else None


def run_experiment(
    experiment: str,
    size: str = "xs",
    seeds: int | None = None,
    tokens: int | None = None,
    dtype: str | None = None,
    results: str | Path = REPO / "experiments" / "results",
    runs: str | Path = REPO / "runs" / "experiments",
    cache_dir: str | Path | None = None,
    dry_run: bool = False,
    progress: bool = False,
    out: TextIO = sys.stdout,
    max_runs: int | None = None,
) -> dict:
    """Run every missing (variant, seed) of ``experiment`` (at most ``max_runs`` of them, so a long
    experiment can be finished in pieces); returns what was trained and skipped."""
    results, runs = Path(results), Path(runs)
    plans, left_out = plan_experiment(experiment, size, seeds, tokens, dtype)
    for note in left_out:
        print(f"left out {note}", file=out)
    trained, skipped, busy = [], [], []
    for k, p in enumerate(plans, 1):
        head = f"[{k}/{len(plans)}] {experiment} {p.variant} seed {p.seed} ({p.name})"
        if find_summary(results, p) is not None:
            skipped.append(p.name)
            print(f"{head}: summary exists, skipped", file=out)
            continue
        if max_runs is not None and len(trained) >= max_runs:
            break
        tokens_run = p.train.steps * p.train.batch_size * p.train.seq_len
        if dry_run:
            print(f"{head}: would train {p.train.steps} steps ({tokens_run / 1e6:.2f} M tokens, {p.train.dtype})", file=out)
            continue
        claim = claim_run(p, runs)
        if claim is None:
            busy.append(p.name)
            print(f"{head}: being trained by another process, skipped", file=out, flush=True)
            continue
        if find_summary(results, p) is not None:  # another process finished it while we looked
            claim.release()
            skipped.append(p.name)
            print(f"{head}: summary exists, skipped", file=out)
            continue
        print(f"{head}: training {p.train.steps} steps ({tokens_run / 1e6:.2f} M tokens, {p.train.dtype})", file=out, flush=True)
        try:
            s = run_one(p, results, runs, Path(cache_dir) if cache_dir else None, progress)
        finally:
            claim.release()
        losses = ", ".join(f"{c} {v['loss']:.4f}" for c, v in s["held_out"].items())
        print(f"{head}: held-out {losses} ({s['wall_seconds']['train']:.0f} s train, "
              f"{s['tokens_per_s']:,.0f} tokens/s)", file=out, flush=True)
        trained.append(p.name)
    return {"planned": [p.name for p in plans], "trained": trained, "skipped": skipped, "busy": busy,
            "left_out": left_out}


def start_workers(argv: list[str], jobs: int) -> list[subprocess.Popen]:
    """``jobs - 1`` worker processes running ``python -m experiments ARGV`` beside this one, the CPUs split
    evenly between the ``jobs`` processes (this process's torch threads set here too). The runs are
    shared through their claims (``claim_run``)."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [subprocess.Popen([sys.executable, "-m", "experiments", *argv], env=env) for _ in range(jobs - 1)]


def wait_workers(workers: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; the non-zero exit codes (an empty list when all succeeded)."""
    return [code for code in (h.wait() for h in workers) if code != 0]


def claim_run(plan: RunPlan, runs: Path) -> RunLock | None:
    """The lock that makes this process the one training ``plan`` (held through its evaluation and
    summary), or None when another live process holds it. The kernel drops it if the holder dies."""
    try:
        return RunLock(Path(runs) / plan.size / plan.experiment / ".claims" / plan.name).acquire()
    except RunLockedError:
        return None


__all__ = ["RunPlan", "config_hash", "default_dtype", "find_summary", "load_summaries", "plan_experiment",
           "run_experiment", "run_one", "start_workers", "summary_dir", "wait_workers", "claim_run"]
