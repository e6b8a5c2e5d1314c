"""Runs worker subprocesses (benchmarks/worker.py) and the largest-batch-under-budget search."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks.worker import MARKER

__all__ = ["run_worker", "run_workers", "largest_batch"]

_ROOT = Path(__file__).resolve().parents[1]  # the directory holding the ``benchmarks`` package


# glibc's mmap threshold, fixed for every measurement worker (every implementation alike): each allocation of
# 128 KiB or more is its own mapping, returned to the OS when freed, so the RSS peak follows the live tensors.
# With glibc's default the threshold grows with the first large frees and freed blocks then stay in the heap,
# which made the same step's peak vary by up to 80 MiB between runs (heap fragmentation, not tensors).
MMAP_THRESHOLD = str(128 * 1024)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    return env


def run_worker(job: Dict[str, Any], timeout: float = 1800.0) -> Dict[str, Any]:
    """Runs one job in a fresh interpreter; returns its result dict (``error``/``oom`` on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(_ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "oom": False}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    killed = proc.returncode in (-9, 137)  # the kernel's OOM killer sends SIGKILL
    tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
    return {"error": f"worker exited with {proc.returncode}: {tail[0][:300]}", "oom": killed}


def run_workers(jobs: List[Dict[str, Any]], parallel: int = 1, timeout: float = 1800.0,
                on_done: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """Runs ``jobs`` with up to ``parallel`` processes at once; results in job order.

    Running them side by side does not change what they measure (peak RSS and saved bytes are per
    process), only when memory is short on the machine.
    """
    def one(job: Dict[str, Any]) -> Dict[str, Any]:
        result = run_worker(job, timeout)
        if on_done is not None:
            on_done()
        return result

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, jobs))


def largest_batch(peak_at: Callable[[int], Optional[int]], budget: int, guess: int,
                  max_batch: int = 1024, growth: float = 1.25,
                  rel_tol: float = 0.0) -> Tuple[int, List[Tuple[int, Optional[int]]]]:
    """Largest batch b <= max_batch with ``peak_at(b) <= budget`` (0 if even b=1 does not fit).

    ``peak_at`` returns the measured peak bytes, or None when the run failed (out of memory). Starts at
    ``guess`` (an extrapolation from a measured batch), steps away from it by ``growth`` — the step
    doubling each time, so a bad guess costs only a few probes — until the answer is bracketed, then
    bisects — to the exact batch, or with ``rel_tol`` > 0 until the bracket is within that fraction of the batch
    (fewer probes). Assumes peak memory grows with the batch. Returns (batch, probes).
    """
    probes: Dict[int, Optional[int]] = {}

    def fits(b: int) -> bool:
        if b not in probes:
            probes[b] = peak_at(b)
        return probes[b] is not None and probes[b] <= budget

    b = min(max(1, guess), max_batch)
    step = max(1, int(b * (growth - 1)))
    lo, hi = 0, max_batch + 1  # lo fits (0 trivially), hi does not (max_batch + 1 by definition)
    if fits(b):
        lo = b
        while lo + step <= max_batch:  # climb until a probe fails (or max_batch is passed)
            if not fits(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, step * 2
    else:
        hi = b
        while hi > 1:  # descend until a probe fits (or b=1 does not)
            nb = max(1, hi - step)
            if fits(nb):
                lo = nb
                break
            hi, step = nb, step * 2
    while hi - lo > max(1, int(lo * rel_tol)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, sorted(probes.items())
