"""Triton kernels, imported lazily so that ``densenet_fast`` imports without triton.

``load_se_kernels()`` returns the :mod:`~densenet_fast.ops.triton.se_kernels` module (importing
triton and defining the kernels on first call). To run the kernels on CPU tensors through the
Triton interpreter, ``TRITON_INTERPRET=1`` must be in the environment before that first call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

__all__ = ["is_available", "interpreter_enabled", "load_se_kernels"]


def is_available() -> bool:
    """Whether triton is installed (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def load_se_kernels() -> ModuleType:
    """Import and return the SE kernel module; raises RuntimeError if triton is missing."""
    if not is_available():
        raise RuntimeError("densenet_fast: the Triton SE kernels need the `triton` package, "
                           "which is not installed")
    return importlib.import_module(".se_kernels", __name__)
