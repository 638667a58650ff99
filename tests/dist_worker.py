"""One rank of a multi-process test (run as a script by tests/dist_helpers.py, one process per rank).

    python tests/dist_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR [JSON_ARGS]

The ranks meet through a FileStore (``file://INIT_FILE``), not a port. Each writes what it computed to
OUT_DIR/rank<r>.pt; a failure prints one line "FAILED <type>: <message>" on stderr and exits 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: the shared problem definitions
import dist_problems  # noqa: E402

from engram.dist import Runtime  # noqa: E402


class Tables(nn.Module):
    """A module holding one Engram table, enough for ``memory_tables`` and the optimizer."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def memory_tables(self):
        return {self.table.layout.name: self.table}


def lookup(rt: Runtime, out: Path, args: dict) -> None:
    """Sharded lookups + backward + per-group clipping + SparseRowAdam over several steps."""
    from engram.dist.sharded import shard_tables
    from engram.train.optim import SparseRowAdam, clip_grad_groups_

    torch.manual_seed(0)
    model = Tables(dist_problems.make_table())
    shard_tables(model, rt.rank, rt.world_size, rt.table_group)
    opt = SparseRowAdam([model.table.weight], lr=dist_problems.LR)
    losses = []
    for step in range(dist_problems.STEPS):
        ids, target = dist_problems.batch(step)  # the global batch, [B, T, H] and [B, T, H, D]
        b = ids.shape[0] // rt.world_size
        mine = slice(rt.rank * b, (rt.rank + 1) * b)
        rows = model.table(ids[mine])
        n_global = ids.numel()
        loss = (rows * target[mine]).sum() * rt.world_size / n_global  # the global mean, averaged over ranks
        loss.backward()
        total = rt.all_reduce_sum(loss.detach().clone()) / rt.world_size
        losses.append(float(total))
        clip_grad_groups_([], [model.table.weight], dist_problems.MAX_NORM, "per_group", rt.all_reduce_sum)
        opt.step()
        opt.zero_grad()
    st = opt.state[model.table.weight]
    torch.save({"range": model.table.row_range, "weight": model.table.weight.detach(), "exp_avg": st["exp_avg"],
                "exp_avg_sq": st["exp_avg_sq"], "losses": losses, "stats": model.table.store.stats.as_dict()},
               out / f"rank{rt.rank}.pt")


def train(rt: Runtime, out: Path, args: dict) -> None:
    """The real trainer on a prepared cache (a test kills one rank through $ENGRAM_FAULTS)."""
    from engram.config import TrainConfig, preset
    from engram.train.trainer import train as run_train

    t0 = time.monotonic()
    try:
        res = run_train(preset("debug"), TrainConfig(**args["train"]), args["run_dir"], cache_dir=args["cache_dir"],
                        progress=False, runtime=rt, resume=args.get("resume", False))
        torch.save({"step": res.step, "seconds": time.monotonic() - t0}, out / f"rank{rt.rank}.pt")
    finally:
        (out / f"rank{rt.rank}.seconds").write_text(f"{time.monotonic() - t0:.3f}\n")


SCENARIOS = {"lookup": lookup, "train": train}


def main() -> int:
    scenario, rank, world, init_file, out = sys.argv[1:6]
    args = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    torch.set_num_threads(1)
    rt = Runtime.init(int(rank), int(world), "cpu", timeout_s=float(args.get("timeout", 60)),
                      init_method=f"file://{init_file}")
    ok = False
    try:
        SCENARIOS[scenario](rt, Path(out), args)
        ok = True
    except Exception as e:  # noqa: BLE001 - reported to the test
        (Path(out) / f"rank{rank}.failed_at").write_text(f"{time.time():.3f}\n")
        print(f"FAILED {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        return 3
    finally:
        rt.close(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
