"""Subprocess entry point: measures one implementation in a fresh interpreter.

``python -m benchmarks.worker '<job json>'`` builds the model, loads the shared weights, measures the
training-step peak memory and/or the bytes saved for backward, and prints one line
``BENCH_RESULT {...}`` on stdout. A fresh process per measurement keeps one implementation's
allocator state, caches and thread pools out of another's numbers.

Job keys: model, impl, batch, size, device, dtype, threads, weights (path of a torch.save'd state dict),
tasks (subset of ["memory", "saved", "memory_default"]), warmup, seed, mem_cap (optional, CPU: bytes this
process may allocate, enforced with RLIMIT_DATA so that an allocation beyond it fails with "can't allocate memory"
and the run is recorded as out of memory instead of pushing a shared machine into its OOM killer),
default_alloc_runs (optional, default DEFAULT_ALLOC_RUNS).

"memory_default" (CPU): the same step's peak under glibc's default allocator, as a user runs it: the worker runs
``default_alloc_runs`` fresh child workers without the fixed mmap threshold of ``benchmarks.runner`` (no
``MALLOC_*`` or ``GLIBC_TUNABLES`` variable) and records their peaks, median and spread
(:func:`default_allocator_peaks`).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import traceback
from typing import Any, Dict, List

MARKER = "BENCH_RESULT "
DEFAULT_ALLOC_RUNS = 5  # fresh processes per default-allocator figure (the spread needs several)


def default_allocator_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` without the variables that tune glibc's allocator (``MALLOC_*``, ``GLIBC_TUNABLES``)."""
    return {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def default_allocator_peaks(job: Dict[str, Any], runs: int) -> Dict[str, Any]:
    """The step's peak memory in ``runs`` fresh child workers under glibc's default allocator, one after the
    other. Record fields: ``peak_bytes_default_alloc`` (median), ``peak_bytes_default_alloc_max``,
    ``peak_bytes_default_alloc_runs`` (every run) and ``peak_default_alloc_spread`` ((max - min) / min); or
    ``default_alloc_error`` when a run failed."""
    child = {**job, "tasks": ["memory"]}
    child.pop("default_alloc_runs", None)
    env = default_allocator_env(dict(os.environ))
    peaks: List[int] = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(child)], capture_output=True,
                              text=True, env=env)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(MARKER)), None)
        result = json.loads(line[len(MARKER):]) if line else {"error": f"worker exited with {proc.returncode}"}
        if "peak_bytes" not in result:
            return {"default_alloc_error": result.get("error", "no peak measured")}
        peaks.append(int(result["peak_bytes"]))
    return {"peak_bytes_default_alloc": int(statistics.median(peaks)), "peak_bytes_default_alloc_max": max(peaks),
            "peak_bytes_default_alloc_runs": peaks,
            "peak_default_alloc_spread": (max(peaks) - min(peaks)) / min(peaks) if min(peaks) > 0 else None}


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from benchmarks import measure
    from benchmarks.impls import IMPLS, build_model
    from benchmarks.specs import get_spec

    out: Dict[str, Any] = {}
    tasks = job.get("tasks", ["memory", "saved"])
    if "memory_default" in tasks and job["device"] == "cpu":  # before this process allocates anything
        out.update(default_allocator_peaks(job, int(job.get("default_alloc_runs", DEFAULT_ALLOC_RUNS))))
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job.get("mem_cap") and job["device"] == "cpu":
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        cap = int(job["mem_cap"]) if hard == resource.RLIM_INFINITY else min(int(job["mem_cap"]), hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    spec, impl = get_spec(job["model"]), IMPLS[job["impl"]]
    device, dtype = torch.device(job["device"]), getattr(torch, job.get("dtype", "float32"))
    state = torch.load(job["weights"], map_location="cpu", weights_only=True)
    model = build_model(impl, spec, state, device)
    del state
    x, y = measure.make_inputs(job["batch"], job["size"], spec.num_classes, device, job.get("seed", 0),
                               spec.spatial_dims, spec.in_channels)
    warmup = job.get("warmup", 1)
    # The saved-bytes step is a full training step, so it doubles as the memory warm-up — unless the
    # peak cannot be reset (then the memory step must be the process's first).
    saved_first = "saved" in tasks and measure.can_reset_peak(device)
    if saved_first:
        out.update(measure.saved_tensor_bytes(model, x, y, dtype))
        warmup -= 1
    if "memory" in tasks:
        out.update(measure.step_peak_memory(lambda: measure.train_step(model, x, y, dtype), device,
                                            warmup=max(0, warmup),
                                            before=lambda: model.zero_grad(set_to_none=True)))
    if "saved" in tasks and not saved_first:
        out.update(measure.saved_tensor_bytes(model, x, y, dtype))
    return out


def main() -> int:
    job = json.loads(sys.argv[1])
    try:
        result = run_job(job)
    except Exception as err:  # reported to the parent, which records the row as failed / over budget
        from benchmarks.measure import is_oom

        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300], "oom": is_oom(err)}
        traceback.print_exc()
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
