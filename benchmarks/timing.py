"""Interleaved timing of several implementations in one process.

Repeats are interleaved (A B C, B C A, C A B, ...) rather than run back to back per implementation,
so slow drifts of a shared machine (other jobs, frequency scaling) spread over every implementation
instead of biasing whichever ran during a busy spell.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.measure import time_once

__all__ = ["interleaved_times", "summarize", "NOISY_RATIO"]

# A median this many times the minimum means other work shared the CPU/GPU during the repeats: the
# numbers are flagged "noisy" in the terminal and the files.
NOISY_RATIO = 1.3


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
                      tick: Optional[Callable[[], None]] = None,
                      on_error: Optional[Callable[[str, BaseException], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` interleaved rounds.

    A function that raises is dropped (``on_error`` is told) and the others go on.
    """
    live = dict(fns)
    times: Dict[str, List[float]] = {name: [] for name in fns}

    def call(name: str, timed: bool) -> None:
        if name not in live:
            return
        try:
            dt = time_once(live[name], device)
        except Exception as err:  # noqa: BLE001 - one broken implementation must not end the run
            del live[name]
            if on_error is not None:
                on_error(name, err)
            return
        finally:
            if tick is not None:
                tick()
        if timed:
            times[name].append(dt)

    names = list(fns)
    if not names:
        return times
    for _ in range(warmup):
        for name in names:
            call(name, False)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            call(name, True)
    return times


def summarize(times: List[float], batch: int) -> Dict[str, object]:
    """Median and min in ms, images/s at the median, and ``noisy`` (median > NOISY_RATIO x min)."""
    if not times:
        return {"ms_median": None, "ms_min": None, "img_s": None, "n": 0, "noisy": None}
    med = statistics.median(times)
    return {"ms_median": med * 1e3, "ms_min": min(times) * 1e3, "img_s": batch / med, "n": len(times),
            "noisy": med > NOISY_RATIO * min(times)}
