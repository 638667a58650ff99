"""argparse value types shared by every ``commands.py``: a bad value is reported by argparse as
``argument --NAME: ...``, naming the option the user typed (exit status 2, no traceback). Also
``drop_option``, for a command that re-runs itself in other processes without one of its options."""

from __future__ import annotations

import argparse
import math
from typing import Sequence


def int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
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


POS_INT, NONNEG_INT = int_at_least(1), int_at_least(0)
POS_FLOAT, NONNEG_FLOAT = finite_float(0.0, lo_open=True), finite_float(0.0)
UNIT_INTERVAL = finite_float(0.0, 1.0, lo_open=True)  # (0, 1]


def drop_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` and ``option=VALUE`` (a launcher's own option, removed from the
    command line its workers run)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out
