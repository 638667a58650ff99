"""Placement planning for scale-out training: per-rank memory and per-step traffic (``engram plan``).

    from engram.config import preset
    from engram.plan import PlanConfig, plan, format_plan, corpus_rows_per_token

    cfg = preset("engram-27b")
    rpt = corpus_rows_per_token(cfg, "brown", batch=4, seq_len=4096)   # measured on real text
    p = plan(cfg, PlanConfig(world_size=64, batch_size=4, seq_len=4096, rows_per_token=rpt.unique))
    print(format_plan(p)); p.check_fits(80)                            # PlacementError if it does not fit

See ``docs/scaleout.md``.
"""

from engram.plan.planner import (GiB, ParamCounts, PlacementError, Plan, PlanConfig, activation_bytes_per_token,
                                 format_plan, plan, smallest_world_size)
from engram.plan.traffic import RowsPerToken, corpus_rows_per_token, layout_hasher, measure_rows_per_token

__all__ = ["GiB", "ParamCounts", "PlacementError", "Plan", "PlanConfig", "RowsPerToken", "activation_bytes_per_token",
           "corpus_rows_per_token", "format_plan", "layout_hasher", "measure_rows_per_token", "plan",
           "smallest_world_size"]
