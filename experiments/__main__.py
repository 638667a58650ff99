"""Command line of the experiments (run from the repository root):

    python -m experiments list                       experiments, variants and budgets of a size
    python -m experiments run NAME [--size xs]       train what is missing, then write the report
    python -m experiments report NAME [--size xs]    the report from the summaries alone (no training)
    python -m experiments run NAME --quick           a seconds-long smoke run (tiny model, `mini`, 2 seeds)
    python -m experiments run NAME --jobs 2          two processes share the runs, one thread each

NAME is iso, rho, memory or placement. ``--seeds``, ``--tokens`` and ``--dtype`` override the size's
defaults (each changes the config hash, so the runs are new runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engram.argtypes import POS_INT, drop_option

from experiments.runner import REPO, default_dtype, plan_experiment, run_experiment, start_workers, wait_workers
from experiments.specs import EXPERIMENT_NAMES, SIZES

QUICK_RESULTS = REPO / "runs" / "experiments-quick" / "results"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "report", "list"):
        s = sub.add_parser(name)
        if name != "list":
            s.add_argument("experiment", choices=EXPERIMENT_NAMES)
        s.add_argument("--size", choices=list(SIZES), default="xs", help="model and budget ladder (default xs)")
        s.add_argument("--quick", action="store_true", help="the `quick` size; results under runs/ (not committed)")
        s.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the size's, 3)")
        s.add_argument("--tokens", type=int, help="training tokens per run (default: the size's budget)")
        s.add_argument("--dtype", choices=["bf16", "fp32"], help=f"default: what this machine runs fast ({default_dtype()})")
        s.add_argument("--results", help="summaries and reports (default experiments/results)")
        s.add_argument("--runs", help="run directories with checkpoints (default runs/experiments)")
        s.add_argument("--cache-dir", help="data cache (default $ENGRAM_CACHE_DIR or ~/.cache/engram)")
        if name == "run":
            s.add_argument("--dry-run", action="store_true", help="list what would be trained")
            s.add_argument("--progress", action="store_true", help="a progress bar per run")
            s.add_argument("--max-runs", type=int, help="train at most this many missing runs, then report")
            s.add_argument("--jobs", type=POS_INT, default=1,
                           help="processes sharing the runs, each with CPUs / JOBS threads (default 1)")
            s.add_argument("--no-report", action="store_true", help="train only; write no report")
    args = p.parse_args(argv)
    if args.quick:
        args.size = "quick"
        args.results = args.results or str(QUICK_RESULTS)
        args.runs = args.runs or str(REPO / "runs" / "experiments-quick" / "runs")
    args.results = Path(args.results or REPO / "experiments" / "results")
    args.runs = Path(args.runs or REPO / "runs" / "experiments")
    return args


def main(argv: list[str] | None = None) -> int:
    from engram.runtime import tune_malloc

    tune_malloc()
    args = _args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "run":
            workers = start_workers(_worker_argv(argv), args.jobs) if args.jobs > 1 and not args.dry_run else []
            try:
                res = run_experiment(args.experiment, args.size, args.seeds, args.tokens, args.dtype, args.results,
                                     args.runs, args.cache_dir, args.dry_run, args.progress, max_runs=args.max_runs)
            finally:
                failed = wait_workers(workers)
            if failed:
                raise ValueError(f"{len(failed)} of {len(workers)} worker processes failed (exit codes {failed}); "
                                 "their runs resume on the next `run`")
            busy = f", {len(res['busy'])} being trained elsewhere" if res["busy"] else ""
            print(f"{args.experiment}: trained {len(res['trained'])}, skipped {len(res['skipped'])}{busy} "
                  f"of {len(res['planned'])} runs")
            if args.dry_run or args.no_report:
                return 0
        return _report(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments: error: {e}", file=sys.stderr)
        return 2


def _worker_argv(argv: list[str] | None) -> list[str]:
    """This command line for a worker process: the same run, no workers of its own, no report."""
    return drop_option(sys.argv[1:] if argv is None else argv, "--jobs") + ["--no-report"]


def _report(args: argparse.Namespace) -> int:
    from experiments.report import build_report
    from experiments.ngram_counts import memory_ngram_counts

    counts = None
    if args.experiment == "memory":
        counts = memory_ngram_counts(args.size, args.seeds, args.tokens, args.dtype, args.results, args.runs, args.cache_dir)
    r = build_report(args.experiment, args.size, args.seeds, args.tokens, args.dtype, args.results, counts)
    print(f"report: {args.results / r['path']} ({r['finished_runs']} of {r['planned_runs']} runs finished)")
    for c in r["comparisons"]:
        if c["eval"] == SIZES[args.size].eval_sets[0][0]:
            from experiments.stats import describe

            print(f"  {c['variant']} - {c['baseline']} on {c['eval']}: {describe(c)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from engram.allocation import count

    size = SIZES[args.size]
    print(f"size {size.name}: corpus {size.corpus}, {size.batch_size} x {size.seq_len} tokens per step, "
          f"{args.seeds or size.seeds} seeds, held-out {', '.join(c for c, _ in size.eval_sets)}")
    for name in EXPERIMENT_NAMES:
        plans, left_out = plan_experiment(name, size, args.seeds, args.tokens, args.dtype)
        tokens = plans[0].train.steps * size.batch_size * size.seq_len
        print(f"\n{name}: {len(plans)} runs of {tokens / 1e6:.2f} M tokens ({plans[0].train.dtype})")
        for p in plans:
            if p.seed != 0:
                continue
            c = count(p.model)
            tables = c["engram_tables"] + c["overencoding_tables"]
            print(f"  {p.variant:20s} P_tot {c['P_tot']:>11,}  P_act {c['P_act']:>10,}  tables {tables:>11,}")
        for note in left_out:
            print(f"  left out {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
