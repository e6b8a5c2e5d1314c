"""In-process measurements of one model: step functions, timing, peak memory, bytes saved for backward.

Peak memory and saved bytes are meant to run in a fresh process per implementation (benchmarks/worker.py)
so that one implementation's allocator state cannot leak into another's numbers.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_inputs", "autocast", "train_step", "eval_step", "sync", "time_once",
           "step_peak_memory", "can_reset_peak", "saved_tensor_bytes", "is_oom"]


def make_inputs(batch: int, size: int, num_classes: int, device: torch.device,
                seed: int = 0, spatial_dims: int = 2, in_channels: int = 3) -> Tuple[Tensor, Tensor]:
    """A deterministic image batch [batch, 3, size, size] (or volume batch [batch, in_channels, size, size, size])
    and integer targets, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *[size] * spatial_dims, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for non-float32 runs (weights stay float32, as in ordinary AMP training)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype = torch.float32) -> None:
    """One training step without the optimizer: zero_grad(set_to_none) + forward + loss + backward.

    Gradients are set to None first, as ``optimizer.zero_grad()`` does, so their allocation is part of
    every step (and of its peak).
    """
    model.zero_grad(set_to_none=True)
    with autocast(x.device, dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()


def eval_step(model: nn.Module, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inference forward (model must already be in eval mode)."""
    with torch.inference_mode(), autocast(x.device, dtype):
        return model(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text or "cannot allocate memory" in text


# -- CPU resident memory ---------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_hwm() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def can_reset_peak(device: torch.device) -> bool:
    """Whether step_peak_memory can measure a step after others (CUDA, or a resettable VmHWM)."""
    return device.type == "cuda" or _reset_hwm()


def _release_free_memory() -> None:
    """Frees garbage and hands the free pages of glibc's heap and of densenet_fast's CPU pool (its mappings kept
    for reuse, csrc/cpu/workspace.h) back to the OS, so RSS is the live data only and the measured step pays
    for every byte it uses."""
    gc.collect()
    if "densenet_fast" in sys.modules:  # never imported for the other implementations
        release = getattr(torch.ops.densenet_fast, "cpu_pool_release", None)
        if release is not None:
            release()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_peak_memory(step: Callable[[], None], device: torch.device, warmup: int = 1,
                     before: Optional[Callable[[], None]] = None) -> Dict[str, object]:
    """Peak memory of one call of ``step`` above the memory held just before it.

    ``before`` runs ahead of the baseline reading (e.g. ``model.zero_grad(set_to_none=True)``, so
    that the gradients the step allocates count in its peak).

    CUDA: ``max_memory_allocated`` − ``memory_allocated`` (the caching allocator's tensor bytes).
    CPU: peak RSS growth. Where the kernel lets us reset the high-water mark (VmHWM), ``warmup`` steps
    run first (so one-time allocations — oneDNN caches, thread pools, compiled graphs — are excluded),
    then garbage is freed, the mark reset and one step measured. Otherwise the first step is measured
    with ``ru_maxrss`` before/after (then one-time allocations are included).
    """
    if device.type == "cuda":
        for _ in range(warmup):
            step()
        if before is not None:
            before()
        sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "baseline_bytes": base,
                "mem_method": "cuda max_memory_allocated"}
    if _reset_hwm():
        for _ in range(warmup):
            step()
        if before is not None:
            before()
        _release_free_memory()
        base = _status_kib("VmRSS") * 1024
        _reset_hwm()
        step()
        return {"peak_bytes": _status_kib("VmHWM") * 1024 - base, "baseline_bytes": base,
                "mem_method": "VmHWM reset after warm-up"}
    if before is not None:
        before()
    _release_free_memory()
    base = _maxrss_bytes()
    step()
    return {"peak_bytes": _maxrss_bytes() - base, "baseline_bytes": base,
            "mem_method": "ru_maxrss first step (includes one-time allocations)"}


# -- saved tensors ---------------------------------------------------------------------------------
def _storage_key(t: Tensor) -> Tuple[object, int]:
    try:
        s = t.untyped_storage()
        return (t.device, s.data_ptr() or id(s)), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. opaque layouts)
        return (t.device, id(t)), t.numel() * t.element_size()


def saved_tensor_bytes(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes autograd keeps from forward to backward for one training step, counted by unique storage.

    Tensors that are parameters or buffers of the model are reported apart (``saved_param_bytes``):
    they live anyway. Views of one storage (e.g. slices of a dense block's buffer) count once. Under
    non-reentrant checkpointing, what the checkpointed region saves is recomputed, not kept, and is
    correctly not counted; its inputs are saved through these hooks and are counted.
    """
    model_keys = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[Tuple[object, int], int] = {}
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        key, nbytes = _storage_key(t)
        seen[key] = max(seen.get(key, 0), nbytes)
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(x.device, dtype):
            loss = F.cross_entropy(model(x), y)
    loss.backward()  # frees the graph; also checks the hooks kept everything backward needs
    params = sum(n for k, n in seen.items() if k in model_keys)
    return {"saved_bytes": sum(seen.values()) - params, "saved_param_bytes": params,
            "saved_tensors": count, "saved_storages": len(seen)}
