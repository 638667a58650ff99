"""Shared benchmark helpers: interleaved timing against a baseline in the same run, and table printing.

The machine is noisy, so every benchmark times candidate and baseline alternately, reports medians and
the ratio, and never asserts on speed.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_pair(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved (a, b, a, b, ...)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
