"""The lookup problem the sharded-table test solves twice: in ranks (dist_worker.py) and in one process.

Two heads of 37 and 41 rows, 4 wide: a global batch of 6 x 8 positions asks 96 ids of 78 rows, so ids
repeat inside every rank's part and across ranks; position (0, 0) and (5, 7) ask the same row on purpose.
"""

import torch

from engram.memory.table import EngramTable

HEADS, D, B, T = (37, 41), 4, 6, 8
STEPS, LR, MAX_NORM = 4, 0.05, 0.05  # MAX_NORM small enough that clipping scales every step


def make_table() -> EngramTable:
    torch.manual_seed(0)
    return EngramTable(HEADS, D, name="engram.1")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hash ids [B, T, H] int64, target [B, T, H, D] fp32) of one step."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.stack([torch.randint(0, n, (B, T), generator=g) for n in HEADS], -1)
    ids[5, 7] = ids[0, 0]  # a duplicate across the first and the last rank, whatever the world size
    target = torch.randn(B, T, len(HEADS), D, generator=g)
    return ids, target
