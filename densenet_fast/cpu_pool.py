"""The mapped pool of the CPU kernels' large activations (docs/design.md §11, ``csrc/cpu/workspace.h``).

Block buffers, working gradients and the readers' input gradients of 1 MiB or more come from private anonymous
mappings that the pool reuses, never holding more than the high-water mark of its live bytes; smaller tensors
come from torch's CPU allocator. ``DNF_CPU_POOL=0`` sends every tensor to torch's allocator instead (for an
allocator of your own, such as jemalloc or tcmalloc).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from densenet_fast._extension import load_extension

__all__ = ["cpu_pool_stats", "cpu_pool_release"]


def cpu_pool_stats() -> dict[str, Any]:
    """The pool's counters: ``live_bytes`` (held by tensors), ``free_bytes`` (mapped, kept for reuse),
    ``high_water_bytes``, ``maps``, ``unmaps``, ``reuses``, ``mapped_min_bytes`` (smaller tensors bypass the pool)
    and ``enabled`` (``DNF_CPU_POOL``)."""
    load_extension()
    return json.loads(torch.ops.densenet_fast.cpu_pool_stats())


def cpu_pool_release() -> None:
    """Returns every free mapping to the OS and resets the high-water mark to the live bytes (as
    ``torch.cuda.empty_cache`` does for the CUDA caching allocator), e.g. after training, before inference."""
    load_extension()
    torch.ops.densenet_fast.cpu_pool_release()
